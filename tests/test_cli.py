import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from PIL import Image

import animatelcm.export
from animatelcm.cli import main
from animatelcm.loading import save_motion_adapter


def run_cli(*args):
    """The real console entry point in a subprocess: exit status, stdout, stderr."""
    env = {k: v for k, v in os.environ.items() if k != "ANIMATELCM_DEBUG"}
    result = subprocess.run([sys.executable, "-m", "animatelcm", *args], capture_output=True, text=True, env=env,
                            timeout=300)
    return result.returncode, result.stdout, result.stderr


@pytest.mark.parametrize("command", [["generate", "--prompt", "x"], ["eval", "--clips", "1"],
                                     ["train", "missing.yaml"]])
def test_a_misspelt_backend_override_is_refused_before_anything_loads(command, tmp_path, monkeypatch, capsys):
    """ANIMATELCM_BACKEND is checked first: one line naming the valid backends, exit status 2, before the command
    itself starts (its models would load first)."""
    import animatelcm.cli

    def started(args):
        raise AssertionError(f"{args.command} started")

    for command_function in ("generate", "evaluate", "train"):
        monkeypatch.setattr(animatelcm.cli, command_function, started)
    monkeypatch.setenv("ANIMATELCM_BACKEND", "tritn")
    assert main([*command, "--out" if command[0] != "train" else "--output-dir", str(tmp_path / "out.gif")]) == 2
    assert "ANIMATELCM_BACKEND='tritn' is not a backend; use one of auto" in capsys.readouterr().err


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


def test_cuda_graph_flag(tmp_path, monkeypatch, capsys):
    """--cuda-graph patches with cuda_graph=True (the UNet's forward replays graphs on a GPU); on the CPU it says it
    has no effect and the clip is the one without it; with --no-fused it is a one-line error before loading."""
    import animatelcm.patching as patching

    options = []
    real_patch = patching.patch_pipeline
    monkeypatch.setattr(patching, "patch_pipeline", lambda pipe, **k: options.append(k) or real_patch(pipe, **k))
    base = ["generate", "--prompt", "a blue square moving up", "--steps", "2", "--frames", "4"]
    for name, extra in (("plain", []), ("graph", ["--cuda-graph"])):
        assert main([*base, *extra, "--out", str(tmp_path / f"{name}.gif")]) == 0
    assert options == [{"cuda_graph": False}, {"cuda_graph": True}]
    assert "--cuda-graph has no effect on the CPU" in capsys.readouterr().err
    assert (iio.imread(tmp_path / "graph.gif") == iio.imread(tmp_path / "plain.gif")).all()
    assert main([*base, "--cuda-graph", "--no-fused", "--out", str(tmp_path / "x.gif")]) == 2
    assert "drop --no-fused" in capsys.readouterr().err and len(options) == 2


def test_clip_skip_reaches_the_pipeline(tmp_path, monkeypatch):
    from animatelcm import AnimateLCMPipeline

    seen = []
    real = AnimateLCMPipeline.__call__
    monkeypatch.setattr(AnimateLCMPipeline, "__call__", lambda self, *a, **k: seen.append(k.get("clip_skip"))
                        or real(self, *a, **k))
    for extra in ([], ["--clip-skip", "1"]):
        assert main(["generate", "--prompt", "a red circle moving up", "--out", str(tmp_path / "clip.gif"),
                     "--steps", "1", "--frames", "2", *extra]) == 0
    assert seen == [None, 1]


def test_a_negative_prompt_without_guidance_is_noted(tmp_path, capsys):
    argv = ["generate", "--prompt", "a red circle moving up", "--negative-prompt", "blue", "--out",
            str(tmp_path / "clip.gif"), "--steps", "1", "--frames", "2"]
    for guidance, noted in (("1.0", True), ("1.5", False)):
        assert main(argv + ["--guidance", guidance]) == 0
        assert ("--negative-prompt has no effect" in capsys.readouterr().err) == noted


def test_seed_minus_one_draws_a_seed_and_says_which(tmp_path, capsys):
    argv = ["generate", "--prompt", "a red circle moving up", "--steps", "1", "--frames", "2"]
    assert main(argv + ["--seed", "-1", "--out", str(tmp_path / "drawn.gif")]) == 0
    seed = re.search(r"seed (\d+) \(drawn for --seed -1; --seed \1 makes this clip again\)",
                     capsys.readouterr().err).group(1)
    assert main(argv + ["--seed", seed, "--out", str(tmp_path / "again.gif")]) == 0
    assert (iio.imread(tmp_path / "drawn.gif") == iio.imread(tmp_path / "again.gif")).all()


def test_several_clips_from_one_model_load(tmp_path, capsys, monkeypatch):
    """Repeated --prompt / --negative-prompt / --seed make one clip each (a flag given once applies to all), written
    as --out's name with -0, -1, ... (zero-padded to sort), each the clip its arguments make alone; the model loads
    once; counts that do not agree are a one-line error before it loads."""
    import animatelcm.default_model as default_model

    loads = []
    real_load = default_model.load_default_model
    monkeypatch.setattr(default_model, "load_default_model", lambda **k: loads.append(1) or real_load(**k))
    common = ["--steps", "2", "--frames", "3", "--guidance", "1.5"]
    argv = ["generate", *common, "--prompt", "a red circle moving up", "--prompt", "a blue square moving left",
            "--negative-prompt", "green", "--seed", "5", "--out", str(tmp_path / "set.gif")]
    assert main(argv) == 0 and len(loads) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set-0.gif", "set-1.gif"]
    for index, prompt in enumerate(["a red circle moving up", "a blue square moving left"]):
        assert main(["generate", *common, "--prompt", prompt, "--negative-prompt", "green", "--seed", "5", "--out",
                     str(tmp_path / "alone.gif")]) == 0
        assert (iio.imread(tmp_path / f"set-{index}.gif") == iio.imread(tmp_path / "alone.gif")).all()
    seeds = [str(seed) for seed in range(11)]
    assert main(["generate", *common, "--prompt", "a red circle moving up", *[a for s in seeds for a in ("--seed", s)],
                 "--out", str(tmp_path / "seeds" / "s.mp4")]) == 0
    names = sorted(p.name for p in (tmp_path / "seeds").iterdir())
    assert names == [f"s-{i:02d}.mp4" for i in range(11)]
    assert not (iio.imread(tmp_path / "seeds" / names[0]) == iio.imread(tmp_path / "seeds" / names[1])).all()
    capsys.readouterr()
    loads.clear()
    assert main(["generate", "--prompt", "a", "--prompt", "b", "--seed", "1", "--seed", "2", "--seed", "3"]) == 2
    assert "--prompt is given 2 times for 3 clips" in capsys.readouterr().err and not loads


def test_user_errors_are_one_line_exit_2(tmp_path, capsys, monkeypatch):
    (tmp_path / "a_file").write_text("")
    (tmp_path / "a_folder.gif").mkdir()
    cases = [
        (["generate", "--prompt", "x", "--out", str(tmp_path / "a_file" / "x.gif")], "a_file is a file, not a folder"),
        (["generate", "--prompt", "x", "--out", str(tmp_path / "a_folder.gif")], "is a folder; name a file"),
        (["eval", "--clips", "1", "--save-clips", str(tmp_path / "a_file" / "c.pt")], "is a file, not a folder"),
        (["generate", "--prompt", "x", "--steps", "0"], "--steps"),
        (["generate", "--prompt", "x", "--base", str(tmp_path / "nope"), "--motion-module", str(tmp_path)], "no such file"),
        (["generate", "--prompt", "x", "--out", str(tmp_path / "x.avi")], ".gif or .mp4"),
        (["generate", "--prompt", "x", "--frames", "40", "--out", str(tmp_path / "x.gif")], "positional table"),
        (["generate", "--prompt", "x", "--height", "30"], "multiple of 8"),
        (["generate", "--prompt", "x", "--fps", "0"], "--fps"),
        (["generate", "--prompt", "x", "--guidance", "nan"], "finite"),
        (["generate", "--prompt", "x", "--lora", str(tmp_path / "style.safetensors") + ":inf"], "finite"),
        (["generate", "--prompt", "x", "--device", "cuda"], "CUDA"),
        (["generate", "--prompt", "x", "--clip-skip", "9", "--out", str(tmp_path / "x.gif")], "clip_skip=9"),
        (["generate", "--prompt", "x", "--vae", str(tmp_path)], "embedded default model keeps its own"),
        (["generate", "--prompt", "x", "--seed", str(2 ** 64)], "at most"),
        (["generate", "--prompt", "x", "--seed", "-2"], "at least -1"),
        (["generate", "--prompt", "x", "--image-motion-scale", "0.5"], "--image-motion-scale needs --image"),
        (["eval", "--seed", "-1"], "at least 0"),
        (["generate"], "--prompt"),
    ]
    monkeypatch.delenv("ANIMATELCM_DEBUG", raising=False)

    def in_process(argv):
        try:
            code = main(argv)
        except SystemExit as exit:  # argparse's errors
            code = exit.code
        return code, "", capsys.readouterr().err

    # two through the real console entry point, each its own process (the exit status included); the rest here
    with ThreadPoolExecutor(max_workers=2) as pool:
        by_process = list(pool.map(lambda argv: run_cli(*argv), [argv for argv, _ in cases[3:5]]))
    results = [in_process(argv) for argv, _ in cases[:3]] + by_process + [in_process(argv) for argv, _ in cases[5:]]
    for (argv, needle), (code, _, stderr) in zip(cases, results):
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert code == 2, (argv, stderr)
        assert lines[-1].startswith("animatelcm: error:") and needle in lines[-1], (argv, stderr)
        assert "Traceback" not in stderr


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has an MPS device")
def test_devices_this_torch_cannot_use_are_named(monkeypatch):
    """An MPS device on a machine without one, a kind this torch was not built with: one-line errors (the CLI's
    main turns a UserError into exit status 2, tested above)."""
    from animatelcm.cli import UserError, _resolve_device

    with pytest.raises(UserError, match="--device mps: torch sees no MPS device here"):
        _resolve_device("mps")
    if not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        with pytest.raises(UserError, match="--device xpu: this torch cannot use it"):
            _resolve_device("xpu")
    assert _resolve_device("cpu") == torch.device("cpu")


def test_control_frames_from_a_folder_in_natural_name_order(tmp_path):
    """frame2.png comes before frame10.png (unpadded frame numbers, as many tools write them)."""
    from animatelcm.cli import _read_clip

    for index in range(1, 13):
        Image.fromarray(np.full((8, 8, 3), index * 20, dtype=np.uint8)).save(tmp_path / f"frame{index}.png")
    clip = _read_clip(tmp_path, None, 8, 8, edges=False)
    assert torch.allclose(clip.mean(dim=(1, 2, 3)) * 255, torch.arange(1, 13) * 20.0, atol=0.5)
    assert len(_read_clip(tmp_path, 5, 8, 8, edges=False)) == 5


def test_control_frames_keep_their_aspect_ratio(tmp_path):
    """A 16:9-ish control clip for a square video gives its centre, not the whole frame squashed (as the --image
    picture and ControlNet UIs' crop and resize)."""
    from animatelcm.cli import _read_clip

    frames = np.random.default_rng(0).integers(0, 255, (3, 24, 40, 3), dtype=np.uint8)
    for folder, clip in (("wide", frames), ("square", frames[:, :, 8:32]), ("strip", frames[:, :, 17:23])):
        (tmp_path / folder).mkdir()
        for index, frame in enumerate(clip):
            Image.fromarray(frame).save(tmp_path / folder / f"{index}.png")

    def read(folder, height, width):
        return _read_clip(tmp_path / folder, None, height, width, edges=False)

    assert read("wide", 16, 16).shape == (3, 3, 16, 16)
    assert torch.equal(read("wide", 16, 16), read("square", 16, 16))
    assert torch.equal(read("wide", 32, 8), read("strip", 32, 8))  # 4:1 tall: the middle 6 of 40 columns


def test_ctrl_c_while_generating_exits_130_without_a_traceback(monkeypatch, capsys):
    from animatelcm import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.delenv("ANIMATELCM_DEBUG", raising=False)
    monkeypatch.setattr(cli, "generate", interrupted)
    assert cli.main(["generate", "--prompt", "x"]) == 130
    assert capsys.readouterr().err.strip() == "animatelcm: interrupted"


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
    import animatelcm

    assert run_cli("--version")[:2] == (0, f"animatelcm {animatelcm.__version__}\n")


@pytest.mark.parametrize("module", ["animatelcm.info"])
def test_python_m_info(module):
    result = subprocess.run([sys.executable, "-m", module], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "backends:" in result.stdout


@pytest.fixture
def tiny_model_args(components, tmp_path):
    """CLI arguments naming the tiny components saved as a base SD folder and a motion module folder."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    StableDiffusionPipeline(vae=components["vae"], text_encoder=components["text_encoder"],
                            tokenizer=components["tokenizer"], unet=components["unet"], scheduler=DDIMScheduler(),
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(tmp_path / "sd")
    save_motion_adapter(components["motion_adapter"], tmp_path / "mm")
    return ["--base", str(tmp_path / "sd"), "--motion-module", str(tmp_path / "mm"), "--height", "32", "--width",
            "32", "--steps", "2", "--seed", "3"]


def test_generate_from_an_image(components, tiny_model_args, tmp_path, capsys):
    """--image with --image-adapter animates the picture: the clip differs from the text-only one (an adapter with
    random weights), is reproducible, starts from the picture's centre at the clip's aspect ratio, and each missing
    piece is a one-line error."""
    from animatelcm.adapters import ImageToVideoAdapter

    adapter = ImageToVideoAdapter(block_out_channels=tuple(components["unet"].config.block_out_channels))
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in adapter.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.2)
    adapter.save_pretrained(tmp_path / "i2v")
    picture, centre = tmp_path / "first.png", tmp_path / "centre.png"
    pixels = torch.randint(0, 255, (40, 56, 3), dtype=torch.uint8).numpy()
    Image.fromarray(pixels).save(picture)
    Image.fromarray(pixels[:, 8:48]).save(centre)  # a 32x32 clip shows the picture's centre, not the picture squashed
    image_args = ["--image-adapter", str(tmp_path / "i2v"), "--frames", "5"]
    for name, image in (("a.gif", picture), ("b.gif", picture), ("centre.gif", centre)):
        assert main(["generate", "--prompt", "a cat", *tiny_model_args, *image_args, "--image", str(image),
                     "--out", str(tmp_path / name)]) == 0
    assert main(["generate", "--prompt", "a cat", *tiny_model_args, "--frames", "5", "--out",
                 str(tmp_path / "text.gif")]) == 0
    animated, again, centred, text_only = (iio.imread(tmp_path / f"{name}.gif")
                                           for name in ("a", "b", "centre", "text"))
    assert animated.shape[:3] == (5, 32, 32)
    assert (animated == again).all() and (animated != text_only).any()
    # the same clip as from the centre alone, up to resampling at the crop's edges (squashed: 5 grey levels off)
    assert np.abs(animated.astype(float) - centred).mean() < 1.5
    capsys.readouterr()
    for argv, needle in [(["--image", str(picture)], "image adapter"),
                         (["--image-adapter", str(tmp_path / "i2v")], "needs --image"),
                         (["--image", str(tmp_path / "i2v" / "config.json"), "--image-adapter", str(tmp_path / "i2v")],
                          "not a readable image"),
                         (["--image", str(picture), "--image-adapter", str(picture)], "folder with config.json")]:
        assert main(["generate", "--prompt", "a cat", *tiny_model_args, *argv, "--out", str(tmp_path / "x.gif")]) == 2
        assert needle in capsys.readouterr().err, argv


def test_generate_from_an_image_with_the_animatelcm_i2v_release(components, tiny_model_args, tmp_path, capsys):
    """AnimateLCM_sd15_i2v.ckpt as --motion-module brings its image encoder: --image animates the picture with it
    (sampled on the release's original_inference_steps, 200), as --image-adapter naming the same file does;
    --image-motion-scale sets its frame embedding's strength (0.8, the release's, changes nothing)."""
    from ldm_layout import write_animatelcm_i2v_release

    release = tmp_path / "AnimateLCM_sd15_i2v.safetensors"
    write_animatelcm_i2v_release(release, components["motion_adapter"],
                                 tuple(components["unet"].config.block_out_channels))
    args = [*tiny_model_args, "--motion-module", str(release), "--frames", "5"]
    picture = tmp_path / "first.png"
    Image.fromarray(torch.randint(0, 255, (32, 32, 3), dtype=torch.uint8).numpy()).save(picture)
    capsys.readouterr()
    for name, extra in (("released.gif", []), ("named.gif", ["--image-adapter", str(release)]),
                        ("default_scale.gif", ["--image-motion-scale", "0.8"]),
                        ("no_embedding.gif", ["--image-motion-scale", "0"]), ("text.gif", None)):
        image_args = [] if extra is None else ["--image", str(picture), *extra]
        assert main(["generate", "--prompt", "a cat", *args, *image_args, "--out", str(tmp_path / name)]) == 0
        assert ("original_inference_steps=200" in capsys.readouterr().err) == (extra is not None)
    released, named, default_scale, no_embedding, text_only = (
        iio.imread(tmp_path / f"{name}.gif") for name in ("released", "named", "default_scale", "no_embedding", "text"))
    assert (released == named).all() and (released == default_scale).all()
    assert (released != text_only).any() and (released != no_embedding).any()


def test_generate_samples_animatelcm_i2v_as_its_demo(components, tiny_model_args, tmp_path, capsys, monkeypatch):
    """With AnimateLCM-I2V's encoder the clip is sampled as its demo samples it: original_inference_steps 200,
    beta_end 0.014 and the frames' colours moved towards the picture (a saved pipeline with that encoder: its own
    scheduler, the colours matched); --beta-end and --no-match-image-colors change that. Other image adapters and text-to-video keep the model's schedule and colours unless told; --beta-end on a
    schedule it does not set is a one-line error."""
    from ldm_layout import write_animatelcm_i2v_release

    from animatelcm import LCMScheduler
    from animatelcm.adapters import ImageToVideoAdapter
    from animatelcm.loading import load_image_adapter
    from animatelcm.pipelines import AnimateLCMPipeline

    release = tmp_path / "AnimateLCM_sd15_i2v.safetensors"
    write_animatelcm_i2v_release(release, components["motion_adapter"],
                                 tuple(components["unet"].config.block_out_channels))
    ImageToVideoAdapter(block_out_channels=tuple(components["unet"].config.block_out_channels)).save_pretrained(
        tmp_path / "own")
    picture = tmp_path / "first.png"
    Image.fromarray(torch.randint(0, 255, (32, 32, 3), dtype=torch.uint8).numpy()).save(picture)
    calls, call = [], AnimateLCMPipeline.__call__

    def spy(pipe, *args, **kwargs):
        config = pipe.scheduler.config
        calls.append((config.original_inference_steps, config.beta_end, kwargs.get("match_image_colors")))
        return call(pipe, *args, **kwargs)

    monkeypatch.setattr(AnimateLCMPipeline, "__call__", spy)
    released = [*tiny_model_args, "--motion-module", str(release), "--image", str(picture)]
    cases = [(released, (200, 0.014, True)),
             ([*released, "--beta-end", "0.013", "--no-match-image-colors"], (200, 0.013, False)),
             ([*tiny_model_args, "--image", str(picture), "--image-adapter", str(tmp_path / "own")], (100, 0.012, False)),
             ([*tiny_model_args, "--image", str(picture), "--image-adapter", str(tmp_path / "own"),
               "--match-image-colors"], (100, 0.012, True)),
             ([*tiny_model_args, "--beta-end", "0.015"], (100, 0.015, None)),
             (["--model", str(tmp_path / "saved"), "--image", str(picture), "--height", "32", "--width", "32"],
              (100, 0.012, True))]
    AnimateLCMPipeline(**components, image_adapter=load_image_adapter(release)).save_pretrained(tmp_path / "saved")
    for argv, expected in cases:
        calls.clear()
        assert main(["generate", "--prompt", "a cat", *argv, "--frames", "3", "--out", str(tmp_path / "a.gif")]) == 0
        assert calls == [expected], argv
    assert "original_inference_steps=200, beta_end=0.014" in capsys.readouterr().err
    assert main(["generate", "--prompt", "a cat", *tiny_model_args, "--match-image-colors", "--out",
                 str(tmp_path / "x.gif")]) == 2
    assert "--match-image-colors needs --image" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--prompt", "a cat", "--beta-end", "1.5"])
    assert "between 0 and 1" in capsys.readouterr().err
    AnimateLCMPipeline(**components, scheduler=LCMScheduler(beta_schedule="squaredcos_cap_v2")).save_pretrained(
        tmp_path / "cosine")
    assert main(["generate", "--prompt", "a cat", "--model", str(tmp_path / "cosine"), "--beta-end", "0.015",
                 "--height", "32", "--width", "32", "--out", str(tmp_path / "x.gif")]) == 2
    assert "does not use beta_end" in capsys.readouterr().err


def test_generate_with_a_pickled_motion_lora(components, tiny_model_args, tmp_path, capsys):
    """An AnimateDiff motion LoRA as released (a .ckpt in the original layout) through --lora: refused without
    --allow-pickle, and with it the clip changes."""
    state = {}
    generator = torch.Generator().manual_seed(0)
    for name, weight in components["motion_adapter"].state_dict().items():
        if ".attn1.to_q.weight" in name:
            stem = name.replace(".transformer_blocks.", ".temporal_transformer.transformer_blocks.").replace(
                ".attn1.to_q.weight", ".attention_blocks.0.processor.to_q_lora")
            state[f"{stem}.down.weight"] = torch.randn(4, weight.shape[1], generator=generator)
            state[f"{stem}.up.weight"] = torch.randn(weight.shape[0], 4, generator=generator)
    torch.save({"state_dict": state}, tmp_path / "zoom.ckpt")
    argv = ["generate", "--prompt", "a red circle moving right", "--frames", "4", *tiny_model_args]
    assert main(argv + ["--lora", f"{tmp_path / 'zoom.ckpt'}:0.9", "--out", str(tmp_path / "no.gif")]) == 2
    assert "--allow-pickle" in capsys.readouterr().err
    assert main(argv + ["--lora", f"{tmp_path / 'zoom.ckpt'}:0.9", "--allow-pickle",
                        "--out", str(tmp_path / "zoom.gif")]) == 0
    assert main(argv + ["--out", str(tmp_path / "plain.gif")]) == 0
    zoom, plain = (iio.imread(tmp_path / name).astype(np.int16) for name in ("zoom.gif", "plain.gif"))
    assert zoom.shape == plain.shape and np.abs(zoom - plain).max() > 10


def test_generate_from_a_video(tiny_model_args, tmp_path, capsys, monkeypatch):
    """--video redraws a clip (a video file or a folder of frames): the video-to-video pipeline gets its frames
    (centre at the clip's aspect ratio, the first --frames) and --strength (default 0.8); the clip is reproducible,
    changes with the strength and differs from text-to-video; bad combinations are one-line errors."""
    from animatelcm.cli import _read_clip
    from animatelcm.pipelines import AnimateLCMVideoToVideoPipeline

    source = torch.randint(0, 255, (6, 40, 56, 3), dtype=torch.uint8).numpy()
    iio.imwrite(tmp_path / "source.gif", source, extension=".gif", duration=125, loop=0)
    calls, call = [], AnimateLCMVideoToVideoPipeline.__call__

    def spy(pipe, *args, **kwargs):
        calls.append(kwargs)
        return call(pipe, *args, **kwargs)

    monkeypatch.setattr(AnimateLCMVideoToVideoPipeline, "__call__", spy)
    base = ["generate", "--prompt", "a cat", *tiny_model_args]
    for name, extra in {"a.gif": [], "b.gif": [], "full.gif": ["--strength", "1"], "four.gif": ["--frames", "4"]}.items():
        assert main([*base, "--video", str(tmp_path / "source.gif"), *extra, "--out", str(tmp_path / name)]) == 0
    assert main([*base, "--frames", "6", "--out", str(tmp_path / "text.gif")]) == 0
    assert [c["strength"] for c in calls] == [0.8, 0.8, 1.0, 0.8] and len(calls[3]["video"]) == 4
    expected = _read_clip(tmp_path / "source.gif", None, 32, 32)
    torch.testing.assert_close(torch.stack(calls[0]["video"]), expected)
    clips = {name: iio.imread(tmp_path / name) for name in ("a.gif", "b.gif", "full.gif", "four.gif", "text.gif")}
    assert clips["a.gif"].shape[:3] == (6, 32, 32) and clips["four.gif"].shape[0] == 4
    assert (clips["a.gif"] == clips["b.gif"]).all()
    assert (clips["a.gif"] != clips["full.gif"]).any() and (clips["a.gif"] != clips["text.gif"]).any()
    assert "(6 frames, 1 step," in capsys.readouterr().out  # --steps 2 at strength 0.8: the last int(1.6) = 1
    for argv, needle in [(["--strength", "0.5"], "--strength needs --video"),
                         (["--video", str(tmp_path / "source.gif"), "--image", str(tmp_path / "x.png")],
                          "without --video and --control"),
                         (["--video", str(tmp_path / "source.gif"), "--strength", "0.3"], "runs no step"),
                         (["--video", str(tmp_path / "source.gif"), "--frames", "7"], "fewer than --frames 7"),
                         (["--video", str(tmp_path / "empty")], f"--video {tmp_path / 'empty'}: no images"),
                         (["--video", str(tmp_path / "long.gif")], "--frames 32 takes the first 32")]:
        if not (tmp_path / "long.gif").exists():  # longer than the motion module's positional table (32)
            iio.imwrite(tmp_path / "long.gif", np.tile(source, (7, 1, 1, 1)), extension=".gif", duration=125, loop=0)
        Image.fromarray(source[0]).save(tmp_path / "x.png")
        (tmp_path / "empty").mkdir(exist_ok=True)
        assert main([*base, *argv, "--out", str(tmp_path / "x.gif")]) == 2, argv
        assert needle in capsys.readouterr().err, argv


def test_generate_from_control_frames(components, tiny_model_args, tmp_path, capsys):
    """--control (a video file or a folder of images) with --controlnet: as many frames as the clip (or --frames
    of them), following the control images, edge maps on request; mismatches are one-line errors."""
    from diffusers import ControlNetModel

    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(components["unet"], conditioning_channels=3)
    with torch.no_grad():  # its output convs start at zero: give them weights so the control shows
        for name, parameter in controlnet.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
                parameter.copy_(torch.randn_like(parameter) * 0.2)
    controlnet.save_pretrained(tmp_path / "cn")
    control = torch.randint(0, 255, (6, 48, 48, 3), dtype=torch.uint8).numpy()
    iio.imwrite(tmp_path / "control.gif", control, extension=".gif", duration=125, loop=0)
    (tmp_path / "frames").mkdir()
    for index, frame in enumerate(control):
        Image.fromarray(frame).save(tmp_path / "frames" / f"{index:03d}.png")
    control_args = ["--controlnet", str(tmp_path / "cn"), "--control-scale", "2.0"]
    runs = {"video.gif": ["--control", str(tmp_path / "control.gif")],
            "folder.gif": ["--control", str(tmp_path / "frames")],
            "edges.gif": ["--control", str(tmp_path / "frames"), "--control-edges"],
            "four.gif": ["--control", str(tmp_path / "frames"), "--frames", "4"],
            "text.gif": []}
    for name, extra in runs.items():
        argv = ["generate", "--prompt", "a cat", *tiny_model_args, *extra, "--out", str(tmp_path / name)]
        assert main(argv + (control_args if extra else ["--frames", "6"])) == 0, name
    # the same ControlNet as one file in the original layout (ControlNet 1.1's .pth files): the same clip
    from ldm_layout import controlnet_to_ldm

    torch.save(controlnet_to_ldm(controlnet.state_dict()), tmp_path / "control_v11p_sd15_test.pth")
    assert main(["generate", "--prompt", "a cat", *tiny_model_args, *runs["video.gif"], "--control-scale", "2.0",
                 "--controlnet", str(tmp_path / "control_v11p_sd15_test.pth"), "--allow-pickle",
                 "--out", str(tmp_path / "file.gif")]) == 0
    # two ControlNets (the same one twice, at 1.0 each): their residuals add up to one at 2.0
    assert main(["generate", "--prompt", "a cat", *tiny_model_args, *runs["video.gif"], *runs["video.gif"],
                 "--controlnet", str(tmp_path / "cn"), "--controlnet", str(tmp_path / "control_v11p_sd15_test.pth"),
                 "--allow-pickle", "--control-scale", "1.0", "--out", str(tmp_path / "two.gif")]) == 0
    # the video redrawn following the control frames (video to video with a ControlNet)
    iio.imwrite(tmp_path / "source.gif", np.ascontiguousarray(control[::-1]), extension=".gif", duration=125, loop=0)
    for name, extra in (("redrawn.gif", control_args), ("redrawn_alone.gif", [])):
        assert main(["generate", "--prompt", "a cat", *tiny_model_args, "--video", str(tmp_path / "source.gif"),
                     "--strength", "1", *(["--control", str(tmp_path / "control.gif")] if extra else []), *extra,
                     "--out", str(tmp_path / name)]) == 0, name
    clips = {name: iio.imread(tmp_path / name).astype(int)
             for name in [*runs, "file.gif", "two.gif", "redrawn.gif", "redrawn_alone.gif"]}
    assert clips["redrawn.gif"].shape[:3] == (6, 32, 32)
    assert np.abs(clips["redrawn.gif"] - clips["redrawn_alone.gif"]).mean() > 1
    assert np.array_equal(clips["file.gif"], clips["video.gif"])
    to_single, to_text = (np.abs(clips["two.gif"] - clips[name]).mean() for name in ("video.gif", "text.gif"))
    assert to_single < 0.5 and to_text > 5 * to_single
    assert clips["video.gif"].shape[:3] == (6, 32, 32) and clips["four.gif"].shape[0] == 4
    assert (clips["video.gif"] != clips["text.gif"]).any() and (clips["edges.gif"] != clips["folder.gif"]).any()
    capsys.readouterr()
    for argv, needle in [(["--control", str(tmp_path / "frames")], "needs --controlnet"),
                         (["--controlnet", str(tmp_path / "cn")], "needs --control"),
                         (["--control", str(tmp_path / "frames"), *control_args, "--frames", "8"], "fewer than"),
                         (["--control", str(tmp_path / "cn"), *control_args], "no images"),
                         (["--control", str(tmp_path / "frames"), "--controlnet", str(tmp_path / "frames")],
                          "config.json"),
                         (["--control", str(tmp_path / "frames"), "--controlnet",
                           str(tmp_path / "control_v11p_sd15_test.pth")], "--allow-pickle"),
                         (["--control", str(tmp_path / "frames"), *control_args, *control_args], "pair up"),
                         (["--control", str(tmp_path / "frames"), "--control", str(tmp_path / "frames"),
                           *control_args, *control_args, "--control-scale", "1"], "one each (2), not 3"),
                         (["--control", str(tmp_path / "frames"), "--control", str(tmp_path / "frames" / "000.png"),
                           *control_args, *control_args], "(--control 6, --control 1 frames)"),
                         (["--control", str(tmp_path / "frames"), "--video", str(tmp_path / "three"), *control_args],
                          "(--control 6, --video 3 frames): give --frames N")]:
        (tmp_path / "three").mkdir(exist_ok=True)
        for index in range(3):
            Image.fromarray(control[index]).save(tmp_path / "three" / f"{index}.png")
        assert main(["generate", "--prompt", "a cat", *tiny_model_args, *argv, "--out", str(tmp_path / "x.gif")]) == 2
        assert needle in capsys.readouterr().err, argv


def test_prompt_travel(tiny_model_args, tmp_path, capsys, monkeypatch):
    """--prompt-at FRAME:TEXT hands the pipeline diffusers' FreeNoise prompt dict ({0: --prompt, FRAME: TEXT}) for
    every clip; FreeNoise's window is the clip when the clip is shorter, so a travel that names the same prompt
    again is the plain clip up to rounding (guidance 1) and another prompt changes it; clips shorter than 16 frames work
    under --free-noise too (diffusers' FreeNoise has no window for them); bad frames are one-line errors before
    the model loads."""
    from animatelcm.pipelines import AnimateLCMPipeline

    prompts, call = [], AnimateLCMPipeline.__call__
    monkeypatch.setattr(AnimateLCMPipeline, "__call__",
                        lambda pipe, *a, **k: prompts.append(k["prompt"]) or call(pipe, *a, **k))
    base = ["generate", "--prompt", "a cat", *tiny_model_args, "--frames", "6"]
    for name, extra in {"plain": [], "same": ["--prompt-at", "3:a cat"], "free": ["--free-noise"],
                        "dog": ["--prompt-at", "4: a dog", "--prompt-at", "2:a cow"]}.items():
        assert main([*base, *extra, "--out", str(tmp_path / f"{name}.gif")]) == 0, name
    assert prompts == ["a cat", {0: "a cat", 3: "a cat"}, "a cat", {0: "a cat", 2: "a cow", 4: "a dog"}]
    clips = {name: iio.imread(tmp_path / f"{name}.gif") for name in ("plain", "same", "free", "dog")}
    change = {name: np.abs(clips[name].astype(int) - clips["plain"].astype(int)) for name in ("same", "free", "dog")}
    # The same prompt again reaches the UNet as per-frame embeddings (other matrix shapes, so other summation
    # orders, which depend on the thread count): the clip may differ by rounding, a level here and there.
    assert change["same"].max() <= 2 and change["same"].mean() < 1e-2, "same"
    assert (change["free"] == 0).all(), "free"  # one FreeNoise window, the whole clip: the same computation
    assert change["dog"].mean() > 0.5, "dog"
    assert main([*base, "--prompt", "a cow", "--prompt-at", "3:a dog", "--out", str(tmp_path / "two.gif")]) == 0
    assert prompts[-2:] == [{0: "a cat", 3: "a dog"}, {0: "a cow", 3: "a dog"}]
    capsys.readouterr()
    for argv, needle in [(["--prompt-at", "6:a dog"], "the clip has 6 frames (0 to 5)"),
                         (["--prompt-at", "3:a", "--prompt-at", "3:b"], "names frame 3 twice"),
                         (["--prompt-at", "3:a", "--image", str(tmp_path / "plain.gif")], "--prompt-at with --image")]:
        assert main([*base, *argv, "--out", str(tmp_path / "x.gif")]) == 2, argv
        assert needle in capsys.readouterr().err, argv
    for argv, needle in [(["--prompt-at", "0:a dog"], "frame 0 takes --prompt"),
                         (["--prompt-at", "3"], "expected FRAME:TEXT")]:
        with pytest.raises(SystemExit) as exited:  # argparse's own one-line error
            main([*base, *argv, "--out", str(tmp_path / "x.gif")])
        assert exited.value.code == 2 and needle in capsys.readouterr().err, argv
    code, _, stderr = run_cli("generate", "--prompt", "x", "--prompt-at", "8:y", "--out", str(tmp_path / "y.gif"))
    assert code == 2 and "prompt attention" in stderr and "Traceback" not in stderr  # the default model's modules


def test_generate_with_sparse_control(components, tiny_model_args, tmp_path, capsys, monkeypatch):
    """--sparsectrl with --sparse-frame FRAME:IMAGE steers the named frames: the SparseCtrl pipeline gets the
    images (centre at the clip's aspect ratio) and their frames; the clip is reproducible (the RGB model's encode
    draws from torch's global generator, seeded per clip), follows the control (scale 0 is the text-only clip) and
    loads the model in AnimateDiff's file layout too; bad combinations are one-line errors before loading."""
    from animatelcm import AnimateLCMPipeline
    from animatelcm.pipelines import AnimateLCMSparseControlNetPipeline
    from animatelcm.testing import tiny_sparse_controlnet

    pipe = AnimateLCMPipeline(**components)
    tiny_sparse_controlnet(pipe.unet, pipe.motion_adapter).save_pretrained(tmp_path / "sparse")
    for index in range(2):
        Image.fromarray(np.random.default_rng(index).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(
            tmp_path / f"p{index}.png")
    calls, call = [], AnimateLCMSparseControlNetPipeline.__call__
    monkeypatch.setattr(AnimateLCMSparseControlNetPipeline, "__call__",
                        lambda p, *a, **k: calls.append(k) or call(p, *a, **k))
    # the frames as decoded, before the GIF's palette (where a last-bit difference of the decode can flip entries)
    decoded, export = {}, animatelcm.export.export_video

    def recording_export(frames, path, **kwargs):
        decoded[Path(path).stem] = frames
        return export(frames, path, **kwargs)

    monkeypatch.setattr(animatelcm.export, "export_video", recording_export)
    base = ["generate", "--prompt", "a cat", *tiny_model_args, "--frames", "6"]
    sparse = ["--sparsectrl", str(tmp_path / "sparse"), "--sparse-frame", f"0:{tmp_path / 'p0.png'}",
              "--sparse-frame", f"5:{tmp_path / 'p1.png'}"]
    for name, extra in {"a": sparse, "b": sparse, "zero": [*sparse, "--control-scale", "0"], "text": []}.items():
        assert main([*base, *extra, "--out", str(tmp_path / f"{name}.gif")]) == 0, name
    assert calls[0]["controlnet_frame_indices"] == [0, 5] and calls[0]["controlnet_conditioning_scale"] == 1.0
    assert [picture.size for picture in calls[0]["conditioning_frames"]] == [(32, 32)] * 2
    assert iio.imread(tmp_path / "a.gif").shape[:3] == (6, 32, 32)
    assert decoded["a"].shape == (6, 32, 32, 3) and (decoded["a"] == decoded["b"]).all()
    assert np.abs(decoded["a"] - decoded["text"]).max() > 1e-2
    np.testing.assert_allclose(decoded["zero"], decoded["text"], rtol=0, atol=1e-5)
    capsys.readouterr()
    for argv, needle in [(sparse[:2], "--sparsectrl and --sparse-frame go together"),
                         (sparse[2:], "--sparsectrl and --sparse-frame go together"),
                         ([*sparse, "--video", str(tmp_path / "p0.png")], "--sparsectrl with --video"),
                         ([*sparse, "--sparse-frame", f"6:{tmp_path / 'p0.png'}"], "the clip has 6 frames"),
                         ([*sparse, "--sparse-frame", f"5:{tmp_path / 'p0.png'}"], "names frame 5 twice"),
                         ([*sparse, "--sparse-frame", "3:missing.png"], "--sparse-frame 3:missing.png: no such"),
                         ([*sparse, "--control-scale", "1", "--control-scale", "2"], "one scale"),
                         ([*sparse, "--prompt-at", "3:a dog"], "no FreeNoise")]:
        assert main([*base, *argv, "--out", str(tmp_path / "x.gif")]) == 2, argv
        assert needle in capsys.readouterr().err, argv
    with pytest.raises(SystemExit):
        main([*base, "--sparsectrl", str(tmp_path / "sparse"), "--sparse-frame", "x.png"])
    assert "expected FRAME:IMAGE" in capsys.readouterr().err


def test_generate_longer_than_the_positional_table_with_free_noise(tiny_model_args, tmp_path):
    """--free-noise makes clips longer than the motion module's table (32 frames here) in overlapping windows; the
    embedded default model's prompted motion modules refuse it with the reason."""
    args = ["generate", "--prompt", "a cat", *tiny_model_args, "--steps", "1", "--frames", "36"]
    assert main([*args, "--free-noise", "--out", str(tmp_path / "long.gif")]) == 0
    assert iio.imread(tmp_path / "long.gif").shape[0] == 36
    code, _, stderr = run_cli(*args, "--out", str(tmp_path / "x.gif"))
    assert code == 2 and "--free-noise" in stderr
    code, _, stderr = run_cli("generate", "--prompt", "x", "--frames", "40", "--free-noise", "--out",
                              str(tmp_path / "y.gif"))
    assert code == 2 and "prompt attention" in stderr and "Traceback" not in stderr
