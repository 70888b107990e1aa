"""The trainer end to end on a tiny synthetic world: every stage's loss falls, the initialization strategy, shared
noise in teacher-free training, exports that load back, exact resume after SIGKILL, 2-process DDP, NaN stop, latent
cache, and configuration errors raised before any training."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
import torch

from animatelcm.training.config import ConfigError, RunConfig, load_config
from animatelcm.training.trainer import Trainer, TrainingDiverged, _collate

TINY = dict(block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
            cross_attention_dim=32, text_hidden_size=32, motion_heads=2, vae_block_out_channels=[8, 16],
            sample_size=8)
STEPS = 30
REPO = Path(__file__).resolve().parents[1]


def config(stage, output_dir, model, **sections):
    """A tiny run: 2 clips of 4 frames at 16 px (8x8 latents), batch 2, lr 1e-2."""
    data = dict(kind="synthetic", num_clips=2, frames=4, size=16)
    data.update(sections.pop("data", {}))
    train = dict(batch_size=2, max_steps=STEPS, learning_rate=1e-2, progress=False)
    train.update(sections.pop("train", {}))
    return dict(stage=stage, output_dir=str(output_dir), model=model, data=data, train=train, **sections)


def run_with_evaluation(cfg):
    trainer = Trainer(load_config(cfg))
    before = trainer.evaluate()
    outputs = trainer.train()
    return trainer, outputs, before, trainer.evaluate()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The teacher (image UNet, motion modules) and the stage-1 LoRA, trained here for STEPS steps each."""
    root = tmp_path_factory.mktemp("world")
    results = {}
    _, out, *losses = run_with_evaluation(config("diffusion_image", root / "di", {"tiny": TINY}))
    results["diffusion_image"], base = losses, str(out["base"])
    _, out, *losses = run_with_evaluation(config("diffusion_video", root / "dv", {"base": base}))
    results["diffusion_video"], motion, pipeline = losses, str(out["motion_adapter"]), str(out["pipeline"])
    _, out, *losses = run_with_evaluation(config("image_cd", root / "icd", {"base": base},
                                                 distill=dict(lora_rank=4)))
    results["image_cd"], lora = losses, str(out["lora_diffusers"].parent)
    return dict(root=root, base=base, motion=motion, lora=lora, losses=results, pipeline=pipeline,
                motion_original=str(Path(motion).with_suffix(".safetensors")))


@pytest.mark.parametrize("stage", ["diffusion_image", "diffusion_video", "image_cd"])
def test_teacher_and_image_stage_losses_fall(world, stage):
    before, after = world["losses"][stage]
    assert after < 0.97 * before, (stage, before, after)


def test_video_cd_loss_falls_and_exports_load_back(world, tmp_path):
    from diffusers import AnimateDiffPipeline, MotionAdapter

    from animatelcm import load_motion_adapter, load_pipeline

    _, out, before, after = run_with_evaluation(config(
        "video_cd", tmp_path / "vcd", {"base": world["base"], "motion_adapter": world["motion"],
                                       "lora": world["lora"]}))
    assert after < 0.97 * before
    folder, original = out["motion_adapter"], out["motion_adapter_original"]
    reference = MotionAdapter.from_pretrained(str(folder), local_files_only=True).state_dict()
    for path in (folder, original):
        loaded = load_motion_adapter(path).state_dict()
        for key, value in reference.items():
            if not key.endswith("pos_embed.pe"):
                torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)
    pipe = load_pipeline(out["pipeline"])
    frames = pipe("a red circle moving right", num_frames=4, height=16, width=16, num_inference_steps=2,
                  generator=torch.Generator().manual_seed(0), output_type="np").frames
    assert frames.shape == (1, 4, 16, 16, 3) and frames.std() > 0
    # The LoRA in both formats gives the same UNet as the fused pipeline.
    outputs = []
    for name in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors"):
        video = load_pipeline(base=world["base"], motion_module=folder, lcm_lora=out["lora_diffusers"].parent / name,
                              lcm_lora_scale=1.0)
        assert isinstance(video, AnimateDiffPipeline)
        latents = torch.randn(1, 4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        text = torch.randn(4, 77, 32, generator=torch.Generator().manual_seed(2))
        outputs.append(video.unet(latents, 500, encoder_hidden_states=text).sample)
    fused = pipe.unet(latents, 500, encoder_hidden_states=text).sample
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outputs[0], fused, rtol=1e-4, atol=1e-5)


def test_not_decoupled_ablation_trains_a_fresh_lora_with_the_motion_modules(world, tmp_path):
    trainer, _, before, after = run_with_evaluation(config(
        "video_cd", tmp_path / "nd", {"base": world["base"], "motion_adapter": world["motion"]},
        distill=dict(decoupled=False, lora_rank=4), train=dict(max_steps=10)))
    names = trainer.stage.trainable_names()
    assert any(".lora_" in n for n in names) and any("motion_modules" in n for n in names)
    assert after < before


def _outputs(model, seed=0, frames=4):
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(1, 4, frames, 8, 8, generator=generator)
    condition = {"text": torch.randn(1, 77, 32, generator=generator)}
    return model(sample, torch.tensor([499]), condition)


@pytest.mark.parametrize("init_strategy", [True, False])
def test_initialization_strategy_at_step_zero(world, tmp_path, init_strategy):
    """With the strategy the online student has the stage-1 LoRA while the target and the teacher do not; without
    it the target starts equal to the student."""
    run = load_config(config("video_cd", tmp_path / "init", {"base": world["base"], "motion_adapter": world["motion"],
                                                               "lora": world["lora"]},
                             distill=dict(init_strategy=init_strategy)))
    trainer = Trainer(run)
    trainer._setup()
    stage = trainer.stage
    with torch.no_grad():
        student, target, teacher = (_outputs(m) for m in (stage.student, stage.target(), stage.teacher))
    assert (student - teacher).abs().max() > 1e-4  # the LoRA is in the online student
    if init_strategy:
        torch.testing.assert_close(target, teacher, rtol=1e-5, atol=1e-6)
    else:
        torch.testing.assert_close(target, student, rtol=1e-5, atol=1e-6)
    lora_b = [n for n in stage.ema.shadow if ".lora_B." in n]
    assert bool(lora_b) == init_strategy


def test_teacher_free_i2v_adapter(world, tmp_path):
    """The adapter starts as an exact no-op, both points of a step share one noise draw, the loss falls, and the
    trained adapter loads back."""
    from animatelcm.adapters import ImageToVideoAdapter
    from animatelcm.training.models import inflate, load_spatial_lora

    cfg = config("teacher_free", tmp_path / "tf", {"base": world["base"], "motion_adapter": world["motion"],
                                                    "lora": world["lora"]}, train=dict(max_steps=20))
    trainer = Trainer(load_config(cfg))
    trainer._setup()
    stage = trainer.stage
    base_unet = inflate(stage.parts["unet"], stage.parts["motion_adapter"])
    load_spatial_lora(base_unet, world["lora"])
    first = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        adapted = _outputs(lambda x, t, c: stage.student(x, t, {**c, "first_frame": first}))
        plain = _outputs(lambda x, t, c: base_unet(x, t, encoder_hidden_states=c["text"].repeat_interleave(4, 0)).sample)
    torch.testing.assert_close(adapted, plain, rtol=1e-5, atol=1e-6)

    seen = {}
    alphas = stage.loss_fn.alphas_cumprod

    def recording(name, model):
        def call(x, t, c):
            seen[name] = (x.detach().clone(), t.clone())
            return model(x, t, c)
        return call

    batch = stage.add_adapter_condition(trainer._prepare_batch(
        {"pixel_values": torch.stack([trainer.dataset[0]["pixel_values"]]), "caption": ["a red circle moving right"]},
        torch.Generator().manual_seed(0)))
    x0 = batch["latents"]
    stage.loss_fn(recording("student", stage.student), recording("target", stage.target()), None, x0,
                  batch["condition"], generator=torch.Generator().manual_seed(3))
    (x_next, t_next), (x_cur, t_cur) = seen["student"], seen["target"]
    noise_next = (x_next - alphas[t_next].sqrt().view(-1, 1, 1, 1, 1) * x0) / (1 - alphas[t_next]).sqrt().view(-1, 1, 1, 1, 1)
    noise_cur = (x_cur - alphas[t_cur].sqrt().view(-1, 1, 1, 1, 1) * x0) / (1 - alphas[t_cur]).sqrt().view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(noise_next, noise_cur, rtol=1e-4, atol=1e-4)
    assert torch.all(t_next > t_cur)

    empty = trainer._encode_text([""]).float()
    assert not torch.equal(batch["condition"]["text"], empty)  # teacher_free keeps every caption by default
    dropping = Trainer(load_config(config("teacher_free", tmp_path / "tf_drop", cfg["model"],
                                          data=dict(uncond_prob=1.0))))
    dropping._setup()
    dropped = dropping._prepare_batch({"pixel_values": torch.stack([dropping.dataset[0]["pixel_values"]]),
                                       "caption": ["a red circle moving right"]}, torch.Generator().manual_seed(0))
    torch.testing.assert_close(dropped["condition"]["text"], empty)
    assert [RunConfig(stage=stage).caption_drop_probability
            for stage in ("diffusion_image", "image_cd", "teacher_free")] == [0.1, 0.0, 0.0]

    before = trainer.evaluate()
    out = trainer.train()
    assert trainer.evaluate() < before
    loaded = ImageToVideoAdapter.from_pretrained(str(out["i2v_adapter"]))
    assert any(p.abs().sum() > 0 for n, p in loaded.named_parameters() if n.startswith("outputs."))


def test_teacher_free_adapts_an_existing_image_adapter(world, tmp_path):
    """model.image_adapter (here AnimateLCM-I2V's release layout, on a model with its two layers per down block) is
    the adapter teacher_free i2v starts from and trains; the export loads back as the same kind. It is refused for
    other adapters, and one that does not fit the UNet is an error naming why."""
    from ldm_layout import write_animatelcm_i2v_release

    from animatelcm import AnimateLCMImageEncoder, load_image_adapter
    from animatelcm.testing import TinyConfig, tiny_motion_adapter
    from animatelcm.training.config import ConfigError

    two_layers = dict(TINY, layers_per_block=2)
    motion = tiny_motion_adapter(TinyConfig(**{k: tuple(v) if isinstance(v, list) else v
                                               for k, v in two_layers.items()}))
    motion.save_pretrained(tmp_path / "motion")
    release = tmp_path / "release.safetensors"
    start = write_animatelcm_i2v_release(release, motion, tuple(TINY["block_out_channels"]), seed=1)
    model = {"tiny": two_layers, "motion_adapter": str(tmp_path / "motion"), "image_adapter": str(release)}
    trainer = Trainer(load_config(config("teacher_free", tmp_path / "adapt", model, train=dict(max_steps=3),
                                         adapter=dict(motion_scale=0.5))))
    trainer._setup()
    adapter = trainer.stage.student.adapter
    assert isinstance(adapter, AnimateLCMImageEncoder) and adapter.config.motion_scale == 0.5
    assert all(torch.equal(adapter.state_dict()[key], value) for key, value in start.items())
    assert set(trainer.stage.trainable_names()) == {"adapter." + key for key in start}
    exported = load_image_adapter(trainer.train()["i2v_adapter"])
    assert isinstance(exported, AnimateLCMImageEncoder)
    assert any(not torch.equal(exported.state_dict()[key], value) for key, value in start.items())

    with pytest.raises(ConfigError, match="model.image_adapter is the image adapter teacher_free"):
        load_config(config("teacher_free", tmp_path / "cn", model, adapter=dict(kind="controlnet_lora")))
    one_layer = {"base": world["base"], "motion_adapter": world["motion"], "image_adapter": str(release)}
    with pytest.raises(ConfigError, match="before motion module 1 of each down block; this model's have 1"):
        Trainer(load_config(config("teacher_free", tmp_path / "one", one_layer)))._setup()
    write_animatelcm_i2v_release(release, motion, (8, 16))
    with pytest.raises(ConfigError, match=r"built for UNet widths \(8, 16\)"):
        Trainer(load_config(config("teacher_free", tmp_path / "narrow", model)))._setup()


def test_teacher_free_controlnet_lora(world, tmp_path):
    from diffusers import ControlNetModel

    _, out, before, after = run_with_evaluation(config(
        "teacher_free", tmp_path / "cn", {"base": world["base"], "motion_adapter": world["motion"],
                                          "lora": world["lora"]},
        adapter=dict(kind="controlnet_lora", train_output_convs=True, lora_rank=4), train=dict(max_steps=15)))
    assert after < before
    controlnet = ControlNetModel.from_pretrained(str(out["controlnet"]), local_files_only=True)
    assert not any("lora" in name for name in controlnet.state_dict())


def test_teacher_free_controlnet_lora_on_a_saved_video_pipeline(world, tmp_path):
    """With only a saved video pipeline (no image UNet) the ControlNet starts from the video model's own spatial
    weights, and the stage trains and exports it."""
    trainer = Trainer(load_config(config(
        "teacher_free", tmp_path / "cnp", {"pretrained": world["pipeline"]},
        adapter=dict(kind="controlnet_lora", train_output_convs=True, lora_rank=4), train=dict(max_steps=3))))
    trainer._setup()
    controlnet, unet = trainer.stage.student.controlnet, trainer.stage.unet
    for name in ("conv_in.weight", "time_embedding.linear_1.weight"):
        torch.testing.assert_close(controlnet.get_parameter(name), unet.get_parameter(name))
    assert (tmp_path / "cnp" / "final" / "controlnet" / "config.json").parent == trainer.train()["controlnet"]


def test_teacher_free_controlnet_lora_from_an_original_layout_file(world, tmp_path):
    """A downloaded ControlNet file (ControlNet 1.1's pickled .pth layout) is what the stage adapts: read with
    model.allow_pickle, its weights under the LoRA wrappers; without allow_pickle the error says so."""
    from diffusers import ControlNetModel, UNet2DConditionModel
    from ldm_layout import controlnet_to_ldm

    from animatelcm.loading import CheckpointError

    reference = ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(world["base"], subfolder="unet"))
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.copy_(torch.randn_like(parameter))
    torch.save(controlnet_to_ldm(reference.state_dict()), tmp_path / "control_v11p_sd15_test.pth")
    model = {"base": world["base"], "motion_adapter": world["motion"], "lora": world["lora"],
             "controlnet": str(tmp_path / "control_v11p_sd15_test.pth")}
    adapter = dict(kind="controlnet_lora", lora_rank=4)
    with pytest.raises(CheckpointError, match="allow_pickle"):
        Trainer(load_config(config("teacher_free", tmp_path / "refused", model, adapter=adapter)))._setup()
    trainer = Trainer(load_config(config("teacher_free", tmp_path / "cnf", {**model, "allow_pickle": True},
                                         adapter=adapter)))
    trainer._setup()
    loaded = {name.replace(".base_layer", ""): value
              for name, value in trainer.stage.student.controlnet.state_dict().items() if ".lora_" not in name}
    assert loaded.keys() == reference.state_dict().keys()
    assert all(torch.equal(value, loaded[name]) for name, value in reference.state_dict().items())


def test_extract_spatial_unet_inverts_inflation(components):
    from diffusers import UNetMotionModel

    from animatelcm.training.models import extract_spatial_unet

    spatial = extract_spatial_unet(UNetMotionModel.from_unet2d(components["unet"], components["motion_adapter"]))
    sample, text = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    timesteps = torch.tensor([10, 700])
    with torch.no_grad():
        torch.testing.assert_close(spatial(sample, timesteps, text).sample,
                                   components["unet"](sample, timesteps, text).sample)


def _cli(*args, env=None):
    return subprocess.Popen([sys.executable, "-m", "animatelcm", "train", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _trainable(checkpoint: Path) -> dict:
    from safetensors.torch import load_file

    state = load_file(str(checkpoint / "trainable.safetensors"))
    ema = torch.load(checkpoint / "custom_checkpoint_2.pkl", weights_only=True)
    return {**state, **{f"ema:{k}": v for k, v in ema.items()}}


def _interrupted_run(cfg_path, output_dir, ready, signum):
    """``animatelcm train`` into ``output_dir``, sent ``signum`` once ``ready()`` holds (within 120 s)."""
    process = _cli(str(cfg_path), "--output-dir", str(output_dir))
    deadline = time.time() + 120
    while time.time() < deadline and not ready():
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.05)
    process.send_signal(signum)
    return process


def _resumes_like_a_straight_run(cfg_path, interrupted, straight, target) -> str:
    """Resume ``interrupted`` to step ``target``, run ``straight`` there uninterrupted, and check the two
    checkpoints are the same bit for bit; returns the resumed run's log."""
    resumed = _cli(str(cfg_path), "--output-dir", str(interrupted), "--resume", "--max-steps", str(target))
    log = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, log
    reference = _cli(str(cfg_path), "--output-dir", str(straight), "--max-steps", str(target))
    reference.communicate(timeout=300)
    assert reference.returncode == 0
    a = _trainable(interrupted / "checkpoints" / f"checkpoint-{target}")
    b = _trainable(straight / "checkpoints" / f"checkpoint-{target}")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    return log


def test_resume_after_sigkill_reproduces_an_uninterrupted_run(world, tmp_path):
    cfg = config("image_cd", tmp_path / "placeholder", {"base": world["base"]}, distill=dict(lora_rank=4),
                 train=dict(max_steps=100000, checkpoint_every=2, checkpoints_kept=3, learning_rate=1e-3))
    cfg_path = tmp_path / "run.yaml"
    import yaml

    cfg_path.write_text(yaml.safe_dump(cfg))
    killed = tmp_path / "killed"
    checkpoints = killed / "checkpoints"
    process = _interrupted_run(cfg_path, killed, lambda: checkpoints.is_dir() and any(
        p.name == "checkpoint-4" for p in checkpoints.iterdir()), signal.SIGKILL)
    process.wait()
    steps = sorted(int(p.name.split("-")[1]) for p in checkpoints.iterdir() if p.name.startswith("checkpoint-"))
    last = steps[-1]
    assert last >= 4 and len(steps) <= 3
    target = last + 3
    log = _resumes_like_a_straight_run(cfg_path, killed, tmp_path / "straight", target)
    assert f"(step {last})" in log and "settings changed" not in log  # a longer max_steps is no change
    with (killed / "metrics.csv").open() as handle:
        assert [int(r["step"]) for r in csv.DictReader(handle)][-target:] == list(range(1, target + 1))


def test_bfloat16_training_on_the_cpu_has_sane_gradients(tmp_path):
    """CPU bfloat16 training of a tiny UNet at 32 pixels (its deepest downsampler sees a 1x1 latent): oneDNN's
    bfloat16 weight gradients for that convolution were wrong and run-to-run different on an EPYC (grad norms of
    1e17 and inf), so where the probe finds that, training runs without oneDNN. Every step's gradient norm stays
    finite and near float32's."""
    from animatelcm.training.trainer import onednn_bf16_weight_gradients_are_wrong

    with torch.backends.mkldnn.flags(enabled=False):
        assert not onednn_bf16_weight_gradients_are_wrong()  # PyTorch's own kernels are the reference
    norms = {}
    for precision in ("no", "bf16"):
        cfg = config("diffusion_image", tmp_path / precision, {"tiny": {}}, data=dict(num_clips=8, size=32),
                     train=dict(max_steps=6, learning_rate=1e-4, mixed_precision=precision))
        Trainer(load_config(cfg)).train()
        with (tmp_path / precision / "metrics.csv").open() as handle:
            norms[precision] = [float(row["grad_norm"]) for row in csv.DictReader(handle)]
    for exact, mixed in zip(norms["no"], norms["bf16"]):
        assert math.isfinite(mixed) and abs(mixed - exact) <= 0.1 * exact, norms
    assert torch.backends.mkldnn.enabled  # the trainer's switch does not outlive the run


def test_ctrl_c_stops_at_a_step_boundary_with_a_checkpoint(world, tmp_path):
    """The first Ctrl-C (SIGINT) finishes the optimiser step under way, checkpoints it and exits with status 130 and
    no final/ export; --resume then ends where an uninterrupted run ends, bit for bit."""
    cfg = config("image_cd", tmp_path / "placeholder", {"base": world["base"]}, distill=dict(lora_rank=4),
                 train=dict(max_steps=100000, checkpoint_every=100000, learning_rate=1e-3))
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    stopped = tmp_path / "stopped"
    metrics = stopped / "metrics.csv"
    process = _interrupted_run(cfg_path, stopped, lambda: metrics.exists() and len(metrics.read_text().splitlines()) > 3,
                               signal.SIGINT)
    log = process.communicate(timeout=120)[0]
    assert process.returncode == 130, log
    with metrics.open() as handle:
        last = int(list(csv.DictReader(handle))[-1]["step"])
    assert f"interrupted after step {last}; checkpoint" in log and "Traceback" not in log
    assert [p.name for p in (stopped / "checkpoints").iterdir()] == [f"checkpoint-{last}"]
    assert not (stopped / "final").exists()
    _resumes_like_a_straight_run(cfg_path, stopped, tmp_path / "straight", last + 2)


def test_resuming_names_the_settings_changed_since_the_checkpoint():
    from animatelcm.training.trainer import _changed_settings

    saved = RunConfig(stage="image_cd").to_dict()
    current = RunConfig(stage="image_cd", output_dir="elsewhere").to_dict()
    current["train"].update(max_steps=saved["train"]["max_steps"] * 2, learning_rate=5e-4)
    current["data"]["stride"] = 2
    assert _changed_settings(saved, current) == [f"data.stride: {saved['data']['stride']!r} -> 2",
                                                 f"train.learning_rate: {saved['train']['learning_rate']!r} -> 0.0005"]
    assert _changed_settings(saved, saved) == []
    # a decaying schedule spans max_steps: a longer run changes the rates from the checkpoint on
    for schedule in ("cosine", "linear"):
        decaying = {**saved, "train": {**saved["train"], "lr_scheduler": schedule}}
        longer = {**decaying, "train": {**decaying["train"], "max_steps": 300}}
        assert _changed_settings(decaying, longer) == [
            f"train.max_steps: {saved['train']['max_steps']!r} -> 300 (the {schedule} learning-rate schedule now "
            "spans the new length)"]


def test_two_processes_with_torchrun(world, tmp_path):
    cfg = config("image_cd", tmp_path / "ddp", {"base": world["base"]}, distill=dict(lora_rank=4),
                 data=dict(num_clips=4), train=dict(max_steps=2, batch_size=1))
    import yaml

    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              "-m", "animatelcm", "train", str(tmp_path / "ddp.yaml")], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stdout + process.stderr
    assert "on 2 process(es)" in process.stdout + process.stderr
    assert (tmp_path / "ddp" / "final" / "lora" / "pytorch_lora_weights.safetensors").exists()
    assert (tmp_path / "ddp" / "checkpoints" / "checkpoint-2" / "random_states_1.pkl").exists()


def test_sampler_shards_processes_and_resumes_by_batch_count():
    from animatelcm.training.trainer import ResumableBatchSampler

    ranks = [ResumableBatchSampler(10, 2, rank, 2, seed=3) for rank in (0, 1)]
    epoch = [i for b in range(2) for r in ranks for i in r.indices(b)]
    assert sorted(epoch[:8]) == sorted(set(epoch[:8]))  # no index twice within an epoch
    later = ResumableBatchSampler(10, 2, 1, 2, seed=3, start=3)
    assert next(iter(later)) == ranks[1].indices(3)


def test_nan_loss_stops_and_keeps_the_last_checkpoint(world, tmp_path, monkeypatch):
    from animatelcm.training import stages

    run = load_config(config("diffusion_image", tmp_path / "nan", {"base": world["base"]},
                             train=dict(max_steps=10, checkpoint_every=2)))
    original, calls = stages.DiffusionStage.loss, []

    def failing(self, student, batch, generator):
        calls.append(1)
        loss = original(self, student, batch, generator)
        return loss * float("nan") if len(calls) == 5 else loss

    monkeypatch.setattr(stages.DiffusionStage, "loss", failing)
    with pytest.raises(TrainingDiverged, match="step 5.*checkpoint-4"):
        Trainer(run).train()
    checkpoints = sorted(p.name for p in (tmp_path / "nan" / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-2", "checkpoint-4"]
    assert not (tmp_path / "nan" / "final").exists()


def test_latent_cache_is_built_once_and_matches_the_vae(world, tmp_path):
    cfg = config("image_cd", tmp_path / "cache", {"base": world["base"]}, distill=dict(lora_rank=4),
                 data=dict(cache_latents=True, cache_dir=str(tmp_path / "latents")), train=dict(max_steps=1))
    trainer = Trainer(load_config(cfg))
    trainer.train()
    shards = list((tmp_path / "latents").rglob("shard-*.pt"))
    assert len(shards) == 1
    stamp = shards[0].stat().st_mtime_ns
    item = trainer.dataset[1]
    pixels = trainer.raw_dataset[1]["pixel_values"]
    with torch.no_grad():
        expected = trainer.parts["vae"].encode(pixels).latent_dist.mean
    torch.testing.assert_close(item["latent_mean"].float(), expected, rtol=1e-2, atol=1e-2)
    cfg["output_dir"] = str(tmp_path / "cache2")
    Trainer(load_config(cfg)).train()
    assert shards[0].stat().st_mtime_ns == stamp


@pytest.mark.parametrize("change, message", [
    ({"stage": "video"}, "stage must be one of"),
    ({"train": {"max_steps": 0}}, "train.max_steps must be >= 1"),
    ({"train": {"learning_rate": "fast"}}, "train.learning_rate must be float"),
    ({"train": {"lr": 1e-4}}, "unknown key 'train.lr'"),
    ({"data": {"kind": "video"}}, "data.source is required"),
    ({"data": {"kind": "video", "source": "/no/such/folder"}}, "does not exist"),
    ({"model": {"base": "/no/such/model"}}, "model.base: /no/such/model does not exist"),
    ({"model": {}}, "exactly one of tiny, pretrained, base"),
    ({"stage": "video_cd"}, "needs trained motion modules"),
    ({"distill": {"w_min": 9, "w_max": 3}}, "w_min=9.0 exceeds"),
    ({"train": {"mixed_precision": "fp8"}}, "mixed_precision"),
    ({"train": {"adam_beta2": 1.0}}, "adam_beta2 must be in \\[0, 1\\)"),
    ({"train": {"adam_epsilon": 0.0}}, "adam_epsilon must be positive"),
    ({"train": {"adam_weight_decay": -0.1}}, "adam_weight_decay must be >= 0"),
    ({"train": {"lr_warmup_steps": -1}}, "lr_warmup_steps must be >= 0"),
    ({"stage": "autoencoder", "data": {"cache_latents": True}}, "set data.cache_latents: false"),
    ({"model": {"tiny": TINY, "vae": "/no/such/vae"}}, "model.vae: /no/such/vae does not exist"),
    ({"model": {"tiny": TINY, "motion_heads": 0}}, "model.motion_heads must be >= 1"),
    ({"model": {"tiny": TINY, "motion_layers": 0}}, "model.motion_layers must be >= 1"),
    ({"stage": "diffusion_video", "model": {"tiny": TINY, "motion_layers": 2}}, "trained modules keep their depth"),
    ({"train": {"loss_weighting": "snr"}}, "train.loss_weighting must be one of uniform, v"),
    ({"train": {"loss_weighting": "v"}}, "applies to the diffusion stages only"),
    ({"stage": "diffusion_image", "train": {"loss_weighting": "v"}, "model": {"tiny": TINY,
      "prediction_type": "v_prediction"}}, "already trains on"),
    ({"stage": "autoencoder", "train": {"timestep_range": [900, 1000]}}, "remove it for autoencoder"),
    ({"train": {"timestep_range": [960, 975]}}, "holds none of the consistency stage's grid points"),
    ({"stage": "diffusion_image", "train": {"timestep_range": [900, 1001]}}, "0 <= low < high <= 1000 \\(the"),
    ({"stage": "diffusion_image", "train": {"timestep_range": [500, 500]}}, "0 <= low < high <= 1000 \\(the"),
    ({"stage": "diffusion_image", "train": {"timestep_range": [900]}}, "two integers"),
    ({"stage": "diffusion_image", "train": {"timestep_range": [900, 1000], "timestep_range_share": 0}},
     "timestep_range_share must be in \\(0, 1\\]"),
    ({"stage": "diffusion_image", "train": {"timestep_range_share": 0.5}}, "needs train.timestep_range"),
    ({"train": {"hidden_frames": 0.25}}, "applies to the diffusion_video stage only"),
    ({"data": {"uncond_prob": 0.2}}, "image_cd takes its guidance from the teacher: remove it"),
    ({"stage": "diffusion_image", "data": {"uncond_prob": 1.5}}, "uncond_prob must be in \\[0, 1\\]"),
    ({"stage": "diffusion_video", "model": {"tiny": TINY}, "train": {"hidden_frames": 1.0}},
     "hidden_frames must be in \\[0, 1\\)"),
    ({"stage": "diffusion_video", "model": {"tiny": TINY}, "train": {"hidden_frames_min_timestep": 1000}},
     "hidden_frames_min_timestep must be in"),
])
def test_bad_configs_fail_before_training(tmp_path, change, message):
    cfg = config("image_cd", tmp_path / "bad", {"tiny": TINY})
    for key, value in change.items():
        if isinstance(value, dict) and key != "model":
            cfg[key] = {**cfg[key], **value} if key in cfg else value
        else:
            cfg[key] = value
    with pytest.raises(ConfigError, match=message):
        load_config(cfg)


def test_floats_written_without_a_dot_are_floats(tmp_path):
    """PyYAML (YAML 1.1) reads ``3e-4`` as a string; a float field takes it as the number, from a file or --set."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config("image_cd", tmp_path / "out", {"tiny": TINY})).replace(
        "learning_rate: 0.01", "learning_rate: 3e-4"))
    assert "3e-4" in path.read_text()
    assert load_config(path).train.learning_rate == 3e-4
    assert load_config(path, {"train.learning_rate": yaml.safe_load("5e-5")}).train.learning_rate == 5e-5


def test_mixed_precision_no_written_bare_in_yaml(tmp_path):
    """PyYAML reads a bare ``no`` as False; ``mixed_precision: no`` (the documented value) means "no"."""
    path = tmp_path / "run.yaml"
    text = yaml.safe_dump(config("image_cd", tmp_path / "out", {"tiny": TINY}))
    text = text.replace("progress: false", "progress: false\n  mixed_precision: no")
    path.write_text(text)
    assert yaml.safe_load(text)["train"]["mixed_precision"] is False
    assert load_config(path).train.mixed_precision == "no"
    assert load_config(path, {"train.mixed_precision": yaml.safe_load("no")}).train.mixed_precision == "no"


def test_missing_data_files_fail_before_any_model_is_built(tmp_path):
    from animatelcm.training.data import DataError

    folder = tmp_path / "videos"
    folder.mkdir()
    (folder / "clip.mp4").write_bytes(b"")  # no caption beside it
    cfg = config("diffusion_video", tmp_path / "out", {"tiny": TINY}, data=dict(kind="video", source=str(folder)))
    with pytest.raises(DataError, match="no caption file"):
        Trainer(load_config(cfg)).train()
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_cli_train_reports_config_errors_in_one_line(tmp_path):
    (tmp_path / "bad.yaml").write_text("stage: image_cd\nmodel: {tiny: {}}\ntrain: {max_stepz: 3}\n")
    process = _cli(str(tmp_path / "bad.yaml"))
    output = process.communicate()[0]
    assert process.returncode == 2
    last = output.strip().splitlines()[-1]
    assert last.startswith("animatelcm: error:") and "unknown key 'train.max_stepz'" in last
    assert "Traceback" not in output


def test_shipped_configs_parse():
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        values = __import__("yaml").safe_load(path.read_text())
        model = values.get("model", {})
        # Paths to earlier stages' outputs do not exist in a fresh checkout: check everything else.
        for key in ("base", "motion_adapter", "lora", "pretrained", "base_config", "controlnet", "vae"):
            if key in model:
                model[key] = str(REPO)
        if values.get("data", {}).get("source"):
            values["data"]["source"] = str(REPO)
        load_config(values)
        assert json.dumps(values)  # plain data


@pytest.mark.parametrize("stage, adapter", [("diffusion_video", None), ("teacher_free", "i2v"),
                                            ("teacher_free", "controlnet_lora")])
def test_gradient_checkpointing_gives_the_same_update(world, tmp_path, stage, adapter):
    """The student's UNet (and ControlNet) checkpointed, the image-to-video adapter, which diffusers cannot
    checkpoint, left as it is."""
    from safetensors.torch import load_file

    model = {"base": world["base"]}
    if stage == "teacher_free":
        model.update(motion_adapter=world["motion"], lora=world["lora"])
    states = []
    for checkpointing in (False, True):
        out = tmp_path / f"gc{checkpointing}"
        cfg = config(stage, out, model, train=dict(max_steps=1, gradient_checkpointing=checkpointing),
                     **({"adapter": {"kind": adapter}} if adapter else {}))
        trainer = Trainer(load_config(cfg))
        trainer.train()
        checkpointed = {type(m).__name__ for m in trainer.stage.student.modules()
                        if getattr(m, "is_gradient_checkpointing", False)}
        wanted = {"UNetMotionModel"} | ({"ControlNetModel"} if adapter == "controlnet_lora" else set())
        assert wanted <= checkpointed if checkpointing else not checkpointed, checkpointed
        states.append(load_file(str(out / "checkpoints" / "checkpoint-1" / "trainable.safetensors")))
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("motion_heads, expected", [(None, 1), (2, 2)])
def test_fresh_motion_modules_get_wide_heads_on_a_narrow_unet(world, tmp_path, motion_heads, expected):
    """SD1.5's 8 heads are 40 channels wide; on 16 channels they would be 2 wide, so the default scales them."""
    from animatelcm.training.models import default_motion_heads

    trainer = Trainer(load_config(config("diffusion_video", tmp_path / "dv", {"base": world["base"],
                                                                               "motion_heads": motion_heads})))
    trainer._setup()
    assert trainer.stage.student.unet.config.motion_num_attention_heads == expected
    assert default_motion_heads((320, 640, 1280, 1280)) == 8 and default_motion_heads((160, 320)) == 4


def test_deeper_fresh_motion_modules_train_save_and_load(world, tmp_path):
    """model.motion_layers: two temporal transformer layers in every fresh (prompted) motion module, kept through
    training, the saved pipeline, both motion-module files and the extraction of the modules from the UNet."""
    from animatelcm import load_motion_adapter, load_pipeline
    from animatelcm.motion_prompt import FramePromptAttnProcessor, motion_cross_attention_dim
    from animatelcm.training.models import extract_motion_adapter
    from animatelcm.training.trainer import train

    outputs = train(config("diffusion_video", tmp_path / "deep", {"base": world["base"], "motion_layers": 2,
                                                                  "motion_prompt": True}, train=dict(max_steps=1)))
    pipe = load_pipeline(outputs["pipeline"])
    modules = [m for m in pipe.unet.modules() if type(m).__name__ == "AnimateDiffTransformer3D"]
    assert modules and all(len(m.transformer_blocks) == 2 for m in modules)
    prompted = [m for m in pipe.unet.modules() if isinstance(getattr(m, "processor", None), FramePromptAttnProcessor)]
    assert len(prompted) == 2 * len(modules) and motion_cross_attention_dim(pipe.unet) is not None
    trained = {k: v for k, v in pipe.unet.state_dict().items() if "motion_modules" in k}
    for adapter in (load_motion_adapter(outputs["motion_adapter"]), load_motion_adapter(
            outputs["motion_adapter_original"]), extract_motion_adapter(pipe.unet)):
        assert adapter.config.motion_transformer_layers_per_block == 2
        assert adapter.config.motion_transformer_layers_per_mid_block == 2
        state = adapter.state_dict()
        assert set(state) == set(trained)
        for key, value in trained.items():
            torch.testing.assert_close(state[key], value)


def test_v_loss_weighting_is_the_v_prediction_objective_of_an_epsilon_model(world, tmp_path):
    trainer = Trainer(load_config(config("diffusion_video", tmp_path / "dv", {"base": world["base"]},
                                         train=dict(loss_weighting="v"))))
    trainer._setup()
    raw = _collate([trainer.dataset[i] for i in range(2)])
    batch = trainer._prepare_batch(raw, torch.Generator().manual_seed(1))
    stage, scheduler = trainer.stage, trainer.parts["noise_scheduler"]
    with torch.no_grad():
        loss = stage.loss(stage.student, batch, torch.Generator().manual_seed(7))
        generator = torch.Generator().manual_seed(7)  # the draws the stage makes, in its order
        latents = batch["latents"]
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        epsilon = stage.student(noisy, timesteps, batch["condition"])
        alpha = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1, 1)
        sample = (noisy - (1 - alpha).sqrt() * epsilon) / alpha.sqrt()
        velocity = alpha.sqrt() * epsilon - (1 - alpha).sqrt() * sample
        expected = (velocity - scheduler.get_velocity(latents, noise, timesteps)).pow(2).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=0)
    assert timesteps.max() > 500  # the weight matters: 1 / alpha_bar > 10 there


@pytest.mark.parametrize("share", [1.0, 0.5])
def test_timestep_range_focuses_its_share_of_each_batch(world, tmp_path, share):
    trainer = Trainer(load_config(config("diffusion_video", tmp_path / "dv", {"base": world["base"]},
                                         train=dict(timestep_range=[900, 950], timestep_range_share=share))))
    trainer._setup()
    drawn = trainer.stage.timesteps(4000, 1000, torch.Generator().manual_seed(3))
    focused = ((drawn >= 900) & (drawn < 950)).float().mean().item()
    expected = share + (1 - share) * 50 / 1000  # uniform draws land in the range too
    assert drawn.dtype == torch.int64 and drawn.min() >= 0 and drawn.max() < 1000
    assert abs(focused - expected) < 0.03
    if share < 1:
        assert drawn.min() < 450 and drawn.max() >= 950  # the rest covers every noise level
    with pytest.raises(ValueError, match="exceeds the scheduler's 100 training timesteps"):
        trainer.stage.timesteps(2, 100, torch.Generator())
    raw = _collate([trainer.dataset[i] for i in range(2)])
    batch = trainer._prepare_batch(raw, torch.Generator().manual_seed(1))
    stage, scheduler = trainer.stage, trainer.parts["noise_scheduler"]
    with torch.no_grad():  # the loss trains on exactly these timesteps
        loss = stage.loss(stage.student, batch, torch.Generator().manual_seed(7))
        generator = torch.Generator().manual_seed(7)
        latents = batch["latents"]
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = stage.timesteps(latents.shape[0], 1000, generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        expected_loss = (stage.student(noisy, timesteps, batch["condition"]) - noise).pow(2).mean()
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=0)


def test_timestep_range_reaches_the_consistency_loss(world, tmp_path):
    trainer = Trainer(load_config(config("image_cd", tmp_path / "cd", {"base": world["base"]},
                                         distill=dict(lora_rank=4),
                                         train=dict(timestep_range=[919, 1000], timestep_range_share=0.5))))
    trainer._setup()
    loss_fn = trainer.stage.loss_fn
    assert loss_fn.grid[loss_fn.focus].tolist() == [919, 939, 959, 979, 999]
    assert loss_fn.config.timestep_range_share == 0.5


def test_bf16_mixed_precision_and_tensorboard(world, tmp_path):
    pytest.importorskip("tensorboard")
    run = load_config(config("image_cd", tmp_path / "bf16", {"base": world["base"]}, distill=dict(lora_rank=4),
                             train=dict(max_steps=2, mixed_precision="bf16", tensorboard=True),
                             validation=dict(every=2, steps=2)))
    trainer = Trainer(run)
    trainer.train()
    assert trainer.stage.teacher.unet.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in trainer.stage.trainable_parameters())
    assert list((tmp_path / "bf16" / "logs").rglob("events.out.tfevents.*"))
    assert list((tmp_path / "bf16" / "validation" / "step-000002").glob("*.png"))


def test_autoencoder_stage_trains_a_vae_that_later_stages_use(tmp_path):
    from diffusers import AutoencoderKL

    from animatelcm.training.models import load_components

    cfg = config("autoencoder", tmp_path / "ae", {"tiny": TINY}, data=dict(num_clips=8),
                 train=dict(learning_rate=3e-3), autoencoder=dict(scaling_clips=8))
    trainer, out, before, after = run_with_evaluation(cfg)
    assert after < 0.8 * before, (before, after)
    vae = AutoencoderKL.from_pretrained(str(out["vae"]))
    assert vae.config.scaling_factor != 0.18215  # measured on the data, not the SD default
    with torch.no_grad():
        pixels = torch.cat([trainer.raw_dataset[i]["pixel_values"] for i in range(8)])
        posterior = vae.encode(pixels).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape)
    assert 0.8 < float((latents * vae.config.scaling_factor).std()) < 1.25
    next_stage = load_config(config("diffusion_image", tmp_path / "di", {"tiny": TINY, "vae": str(out["vae"])}))
    parts = load_components(next_stage.model, video=False, seed=0, work_dir=tmp_path / "di")
    for key, value in vae.state_dict().items():
        assert torch.equal(parts["vae"].state_dict()[key], value), key


def test_a_novae_single_file_base_with_a_single_file_vae(components, tmp_path):
    """model.base: a single file without VAE weights; model.vae: a VAE file in the LDM layout (its architecture from
    model.base_config); the trainer's parts are those weights."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from ldm_layout import unet_to_ldm, text_encoder_to_ldm, vae_to_ldm
    from safetensors.torch import save_file

    from animatelcm.training.config import ModelConfig
    from animatelcm.training.models import load_components

    StableDiffusionPipeline(vae=components["vae"], text_encoder=components["text_encoder"],
                            tokenizer=components["tokenizer"], unet=components["unet"], scheduler=DDIMScheduler(),
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(tmp_path / "sd")
    save_file({k: v.contiguous() for k, v in {**unet_to_ldm(components["unet"].state_dict()),
                                               **text_encoder_to_ldm(components["text_encoder"].state_dict())}.items()},
              str(tmp_path / "personal_noVAE.safetensors"))
    vae = components["vae"]
    with torch.no_grad():
        for parameter in vae.parameters():
            parameter.add_(1.0)
    save_file({k: v.contiguous() for k, v in vae_to_ldm(vae.state_dict(), len(vae.config.block_out_channels)).items()},
              str(tmp_path / "vae.safetensors"))
    model = ModelConfig(base=str(tmp_path / "personal_noVAE.safetensors"), base_config=str(tmp_path / "sd"),
                        vae=str(tmp_path / "vae.safetensors"))
    parts = load_components(model, video=False, seed=0, work_dir=tmp_path / "work")
    for key, value in vae.state_dict().items():
        assert torch.equal(parts["vae"].state_dict()[key], value), key
    for key, value in components["unet"].state_dict().items():
        assert torch.equal(parts["unet"].state_dict()[key], value), key


def test_pickled_motion_modules_train_only_with_model_allow_pickle(tmp_path):
    """The released AnimateLCM motion module is a pickled .ckpt: refused (naming the config key) unless
    model.allow_pickle; with it the trainer's motion modules are that file's."""
    from animatelcm.loading import CheckpointError, diffusers_to_original_motion_keys
    from animatelcm.training.config import ModelConfig
    from animatelcm.training.models import load_components

    from animatelcm.testing import TinyConfig, tiny_motion_adapter

    # The original layout stores no config: the heads and groups are SD1.5's (8, 32), so the widths allow those.
    tiny = dict(TINY, block_out_channels=[64, 64], norm_num_groups=32, motion_heads=8, vae_block_out_channels=[32, 32])
    adapter = tiny_motion_adapter(TinyConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in tiny.items()}))
    torch.save({"state_dict": diffusers_to_original_motion_keys(adapter.state_dict())}, tmp_path / "mm.ckpt")
    with pytest.raises(CheckpointError, match="model.allow_pickle: true"):
        load_components(ModelConfig(tiny=tiny, motion_adapter=str(tmp_path / "mm.ckpt")), video=True, seed=0,
                        work_dir=tmp_path / "work")
    parts = load_components(ModelConfig(tiny=tiny, motion_adapter=str(tmp_path / "mm.ckpt"), allow_pickle=True),
                            video=True, seed=0, work_dir=tmp_path / "work")
    loaded = parts["motion_adapter"].state_dict()
    for key, value in adapter.state_dict().items():
        if not key.endswith("pos_embed.pe"):
            assert torch.equal(loaded[key], value), key


@pytest.mark.parametrize("alpha", [None, 16])
def test_a_saved_lora_loads_back_at_its_scale(components, tmp_path, alpha):
    """The trainer's LoRA files (diffusers and kohya layouts) give the trained weights back, alpha / rank included:
    what image_cd hands to video_cd and to users."""
    import copy

    from animatelcm import AnimateLCMPipeline, load_lora
    from animatelcm.training.models import add_spatial_lora, load_spatial_lora, save_lora

    unet = copy.deepcopy(components["unet"])
    add_spatial_lora(unet, rank=4, alpha=alpha, seed=0)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if ".lora_B." in name:
                parameter.normal_(0, 0.05)
    paths = save_lora(unet, "spatial", tmp_path / "lora")
    unet.fuse_lora(lora_scale=1.0)
    unet.unload_lora()
    expected = unet.state_dict()
    for layout, path in paths.items():
        pipe = AnimateLCMPipeline(**copy.deepcopy(components))
        load_lora(pipe, path, "trained")
        pipe.fuse_lora(adapter_names=["trained"], lora_scale=1.0)
        pipe.unload_lora_weights()
        spatial = {k: v for k, v in pipe.unet.state_dict().items() if "motion_modules" not in k}
        for key, value in spatial.items():
            torch.testing.assert_close(value, expected[key], atol=1e-5, rtol=1e-5, msg=f"{layout} {key}")
    motion_unet = AnimateLCMPipeline(**copy.deepcopy(components)).unet
    load_spatial_lora(motion_unet, tmp_path / "lora")
    motion_unet.fuse_lora(lora_scale=1.0)
    motion_unet.unload_lora()
    for key, value in motion_unet.state_dict().items():
        if key in expected:
            torch.testing.assert_close(value, expected[key], atol=1e-5, rtol=1e-5, msg=f"load_spatial_lora {key}")


def test_a_lora_folder_without_a_lora_file_is_named(components, tmp_path):
    from animatelcm.loading import CheckpointError
    from animatelcm.training.models import load_spatial_lora

    (tmp_path / "empty_lora").mkdir()
    with pytest.raises(CheckpointError, match="empty_lora: no .safetensors LoRA file"):
        load_spatial_lora(components["unet"], tmp_path / "empty_lora")


def test_image_frames_draws_distinct_random_frames_per_clip(tmp_path):
    from animatelcm.training.trainer import _collate, _random_frames

    frames = torch.arange(6, dtype=torch.float32)[None, :, None].expand(3, 6, 2).clone()  # value = frame index
    raw = {"pixel_values": frames, "latent_mean": frames + 10, "caption": ["a", "b", "c"]}
    picked = _random_frames(raw, 2, torch.Generator().manual_seed(0))
    assert picked["pixel_values"].shape == (3, 2, 2) and picked["caption"] == raw["caption"]
    for clip in range(3):
        chosen = picked["pixel_values"][clip, :, 0]
        assert chosen[0] != chosen[1]
        assert torch.equal(picked["latent_mean"][clip, :, 0], chosen + 10)  # same frames in every tensor
    cfg = config("diffusion_image", tmp_path / "di", {"tiny": TINY}, data=dict(image_frames=3, frames=4))
    trainer = Trainer(load_config(cfg))
    trainer._setup()
    raw = _collate([trainer.dataset[i] for i in range(2)])
    batch = trainer._prepare_batch(raw, torch.Generator().manual_seed(0))
    assert batch["latents"].shape[0] == 2 * 3 and batch["condition"]["text"].shape[0] == 2 * 3
    with pytest.raises(ConfigError, match="image_frames"):
        load_config(config("diffusion_image", tmp_path / "x", {"tiny": TINY}, data=dict(image_frames=9)))


def test_hidden_frames_inputs_and_targets_agree():
    """train.hidden_frames: hidden frames (only in clips at t >= the minimum) get the last timestep's input, and
    every frame's noise target still explains its input at the clip's t: add_noise(x0, target, t) == input."""
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    from animatelcm.training import stages

    scheduler = DDPMScheduler(beta_schedule="linear")
    stage = SimpleNamespace(parts={"noise_scheduler": scheduler},
                            run=SimpleNamespace(train=SimpleNamespace(hidden_frames=0.5, hidden_frames_min_timestep=500)))
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 16, 3, 3, generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.tensor([800, 300])
    noisy = scheduler.add_noise(latents, noise, timesteps)
    hidden_noisy, target = stages.DiffusionStage.hide_frames(stage, latents, noisy, noise, timesteps, generator)
    changed = (hidden_noisy != noisy).flatten(3).any(-1).any(1)  # [clip, frame]
    assert 0 < int(changed[0].sum()) < 16 and not changed[1].any()  # about half of clip 0; none at t = 300
    torch.testing.assert_close(scheduler.add_noise(latents, target, timesteps), hidden_noisy, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(target[1], noise[1])
    abar = scheduler.alphas_cumprod[-1]
    hidden_part = hidden_noisy[0][:, changed[0]] - abar.sqrt() * latents[0][:, changed[0]]
    assert hidden_part.std() > 0.9 * (1 - abar).sqrt()  # the hidden frames carry the last timestep's noise level


def test_hidden_frames_run_in_a_diffusion_video_stage(world, tmp_path, monkeypatch):
    from animatelcm.training import stages

    calls = []
    original = stages.DiffusionStage.hide_frames

    def counting(self, *args):
        calls.append(1)
        return original(self, *args)

    monkeypatch.setattr(stages.DiffusionStage, "hide_frames", counting)
    trainer = Trainer(load_config(config("diffusion_video", tmp_path / "hidden", {"base": world["base"]},
                                         train=dict(max_steps=2, hidden_frames=0.5, hidden_frames_min_timestep=0))))
    trainer.train()
    assert len(calls) == 2
    rows = list(csv.DictReader((tmp_path / "hidden" / "metrics.csv").open()))
    assert rows and all(float(r["loss"]) == float(r["loss"]) for r in rows)  # finite, not NaN
