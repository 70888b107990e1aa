import os
import subprocess
import sys

import imageio.v3 as iio
import pytest
import torch

from animatelcm.cli import main
from animatelcm.loading import save_motion_adapter


def run_cli(*args):
    """The real console entry point in a subprocess: exit status, stdout, stderr."""
    env = {k: v for k, v in os.environ.items() if k != "ANIMATELCM_DEBUG"}
    result = subprocess.run([sys.executable, "-m", "animatelcm", *args], capture_output=True, text=True, env=env,
                            timeout=300)
    return result.returncode, result.stdout, result.stderr


def test_generate_default_model_gif(tmp_path):
    out = tmp_path / "clip.gif"
    code, stdout, stderr = run_cli("generate", "--prompt", "a red circle moving right", "--out", str(out),
                                   "--steps", "2", "--upscale", "3")
    assert code == 0, stderr
    assert "embedded default model" in stderr
    assert str(out) in stdout
    assert iio.imread(out).shape[:3] == (16, 96, 96)  # the default model's 32x32, enlarged 3x


@pytest.mark.parametrize("fused", [True, False])
def test_generate_runs_on_the_fused_kernels_unless_told_not_to(tmp_path, monkeypatch, fused):
    import animatelcm.patching as patching

    patched = []
    real_patch = patching.patch_pipeline
    monkeypatch.setattr(patching, "patch_pipeline", lambda pipe, **k: patched.append(pipe) or real_patch(pipe, **k))
    argv = ["generate", "--prompt", "a blue square moving up", "--out", str(tmp_path / "clip.gif"), "--steps", "1",
            "--frames", "4"] + ([] if fused else ["--no-fused"])
    assert main(argv) == 0
    assert len(patched) == int(fused)
    assert not patched or patching.is_patched(patched[0])


def test_user_errors_are_one_line_exit_2(tmp_path):
    cases = [
        (["generate", "--prompt", "x", "--steps", "0"], "--steps"),
        (["generate", "--prompt", "x", "--base", str(tmp_path / "nope"), "--motion-module", str(tmp_path)], "no such file"),
        (["generate", "--prompt", "x", "--out", str(tmp_path / "x.avi")], ".gif or .mp4"),
        (["generate", "--prompt", "x", "--frames", "40", "--out", str(tmp_path / "x.gif")], "positional table"),
        (["generate", "--prompt", "x", "--height", "30"], "multiple of 8"),
        (["generate", "--prompt", "x", "--fps", "0"], "--fps"),
        (["generate", "--prompt", "x", "--guidance", "nan"], "finite"),
        (["generate", "--prompt", "x", "--lora", str(tmp_path / "style.safetensors") + ":inf"], "finite"),
        (["generate", "--prompt", "x", "--device", "cuda"], "CUDA"),
        (["generate"], "--prompt"),
    ]
    for argv, needle in cases:
        code, _, stderr = run_cli(*argv)
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert code == 2, (argv, stderr)
        assert lines[-1].startswith("animatelcm: error:") and needle in lines[-1], (argv, stderr)
        assert "Traceback" not in stderr


def test_pickled_motion_module_refused_without_flag(components, tmp_path, capsys):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    base = tmp_path / "sd"
    StableDiffusionPipeline(vae=components["vae"], text_encoder=components["text_encoder"],
                            tokenizer=components["tokenizer"], unet=components["unet"], scheduler=DDIMScheduler(),
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(base)
    ckpt = tmp_path / "mm.ckpt"
    torch.save(components["motion_adapter"].state_dict(), ckpt)
    argv = ["generate", "--prompt", "x", "--base", str(base), "--motion-module", str(ckpt), "--out",
            str(tmp_path / "x.gif"), "--frames", "4", "--steps", "1", "--height", "32", "--width", "32"]
    assert main(argv) == 2
    assert "--allow-pickle" in capsys.readouterr().err
    save_motion_adapter(components["motion_adapter"], tmp_path / "mm")  # diffusers folder
    argv[argv.index(str(ckpt))] = str(tmp_path / "mm")
    assert main(argv + ["--out", str(tmp_path / "ok.mp4")]) == 0
    assert iio.imread(tmp_path / "ok.mp4").shape[0] == 4


def test_info_lists_backends():
    code, stdout, _ = run_cli("info")
    assert code == 0
    for name in ("eager", "cpp", "cuda", "triton"):
        assert name in stdout
    assert "native module" in stdout


@pytest.mark.parametrize("module", ["animatelcm.info"])
def test_python_m_info(module):
    result = subprocess.run([sys.executable, "-m", module], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "backends:" in result.stdout
