"""The miniature world's evaluation: the attribute network learns the real clips' attributes, the Frechet distance
follows its closed form, teacher fidelity is an MSE."""

import pytest
import torch

from animatelcm.evaluation import (ATTRIBUTES, AttributeNet, attribute_accuracy, attribute_labels, clip_features,
                                   frechet_distance, teacher_fidelity, train_attribute_net)
from animatelcm.training.synthetic import COLOURS, MovingShapes


def test_attribute_net_recognises_colour_and_direction_on_held_out_clips():
    train = MovingShapes(num_clips=480, frames=8, size=32, seed=0)
    held_out = MovingShapes(num_clips=48, frames=8, size=32, seed=1)
    net = train_attribute_net(train, steps=80, batch_size=16, progress=False)
    clips = torch.stack([held_out[i]["pixel_values"] for i in range(len(held_out))])
    accuracy = attribute_accuracy(net, clips, attribute_labels(held_out, range(len(held_out))))
    assert accuracy["colour"] > 0.8 and accuracy["direction"] > 0.7, accuracy
    assert clip_features(net, clips).shape == (48, 64)


def test_frechet_distance_closed_forms():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(400, 6, generator=generator, dtype=torch.float64) @ torch.randn(6, 6, generator=generator,
                                                                                    dtype=torch.float64)
    a = a - a.mean(0)
    assert abs(frechet_distance(a, a)) < 1e-6
    shift = torch.arange(6, dtype=torch.float64)
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift.pow(2).sum()), rel=1e-6)
    # b = 2a: covariance 4 S, so FD = tr S + 4 tr S - 2 tr (2 S) = tr S
    assert frechet_distance(a, 2 * a) == pytest.approx(float(torch.cov(a.T).trace()), rel=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(a[:1], a)


def test_inputs_are_checked_and_fidelity_is_mse():
    with pytest.raises(ValueError, match=r"\[B, F, 3, H, W\]"):
        AttributeNet().features(torch.zeros(2, 3, 8, 32, 32))
    assert set(AttributeNet()(torch.zeros(2, 4, 3, 32, 32))) == set(ATTRIBUTES)
    assert teacher_fidelity(torch.ones(2, 3), torch.zeros(2, 3)) == 1.0
    with pytest.raises(ValueError, match="shapes differ"):
        teacher_fidelity(torch.ones(2, 3), torch.zeros(3, 2))


def test_prompts_cycle_all_combinations_and_noise_depends_only_on_the_clip():
    from animatelcm.evaluation import clip_noise, evaluation_prompts
    from animatelcm.training.synthetic import COMBINATIONS

    prompts, labels = evaluation_prompts(100)
    assert len(set(prompts[:len(COMBINATIONS)])) == len(COMBINATIONS) and prompts[48] == prompts[0]
    colour, shape, direction = prompts[7].split()[1], prompts[7].split()[2], prompts[7].split()[4]
    assert (ATTRIBUTES["colour"][labels["colour"][7]], ATTRIBUTES["shape"][labels["shape"][7]],
            ATTRIBUTES["direction"][labels["direction"][7]]) == (colour, shape, direction)
    few, many = clip_noise(3, (4, 2, 8, 8), seed=5), clip_noise(10, (4, 2, 8, 8), seed=5)
    assert torch.equal(few, many[:3]) and not torch.equal(many[0], many[1])
    assert not torch.equal(clip_noise(3, (4, 2, 8, 8), seed=6), few)


def test_attribute_net_round_trips_with_its_metadata(tmp_path):
    from animatelcm.evaluation import load_attribute_net, save_attribute_net

    net = AttributeNet(width=16, feature_dim=24)
    path = save_attribute_net(net, tmp_path / "net.safetensors", {"held_out_accuracy": {"colour": 0.5}})
    loaded, info = load_attribute_net(path)
    clips = torch.randn(2, 4, 3, 16, 16)
    assert torch.equal(loaded.features(clips), net.eval().features(clips))
    assert info["held_out_accuracy"]["colour"] == 0.5
    with pytest.raises(FileNotFoundError, match="--train-attribute-net"):
        load_attribute_net(tmp_path / "missing.safetensors")


def test_sampling_schedulers_and_generated_clips(components):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    from animatelcm import AnimateLCMPipeline, LCMScheduler
    from animatelcm.evaluation import clip_noise, evaluation_prompts, generate_clips, sampling_scheduler

    pipe = AnimateLCMPipeline(**{k: v for k, v in components.items() if k != "unet"},
                              unet=__import__("diffusers").UNetMotionModel.from_unet2d(components["unet"],
                                                                                       components["motion_adapter"]))
    assert isinstance(sampling_scheduler(pipe, "lcm"), LCMScheduler)
    assert sampling_scheduler(pipe, "lcm", lcm_original_steps=50).config.original_inference_steps == 50
    ddim = sampling_scheduler(pipe, "ddim")
    assert isinstance(ddim, DDIMScheduler) and ddim.config.timestep_spacing == "trailing"
    ddim.set_timesteps(1)
    assert int(ddim.timesteps[0]) == 999  # one step starts from pure noise
    assert isinstance(sampling_scheduler(pipe, "dpmsolver"), DPMSolverMultistepScheduler)
    with pytest.raises(ValueError, match="lcm, ddim or dpmsolver"):
        sampling_scheduler(pipe, "euler")
    prompts, _ = evaluation_prompts(3)
    noise = clip_noise(3, (4, 2, 8, 8), seed=0)
    clips, seconds = generate_clips(pipe, prompts, noise, steps=1, batch_size=2, progress=False)
    assert clips.shape == (3, 2, 3, 64, 64) and clips.min() >= -1 and clips.max() <= 1 and seconds > 0
    again, _ = generate_clips(pipe, prompts[2:], noise[2:], steps=1, progress=False)
    torch.testing.assert_close(again[0], clips[2], atol=1e-4, rtol=0)  # a clip does not depend on its batch


def test_motion_metrics_tell_a_glide_from_jumps():
    from animatelcm.evaluation import motion_metrics, real_clips, shape_tracks

    clips, labels = real_clips(12, 16, 32, seed=3)
    glide = motion_metrics(clips)
    assert glide["motion_tracked"] == 1.0 and glide["motion_straightness"] > 0.99
    assert glide["motion_displacement"] == pytest.approx(0.5, abs=0.02)  # the clips travel half the frame
    centres, found = shape_tracks(clips)
    rightward = labels["direction"] == ATTRIBUTES["direction"].index("right")
    assert found.all() and (centres[rightward, -1, 0] > centres[rightward, 0, 0] + 10).all()
    shuffled = clips[:, torch.randperm(16, generator=torch.Generator().manual_seed(0))]
    jumps = motion_metrics(shuffled)
    assert jumps["motion_straightness"] < 0.5 and jumps["motion_displacement"] < glide["motion_displacement"]
    blank = clips.clone()
    blank[:6] = 0.0  # no saturated pixels: no track
    assert motion_metrics(blank)["motion_tracked"] == 0.5


def test_frame_consistency_sees_a_recoloured_frame_and_a_flickering_background():
    from animatelcm.evaluation import frame_consistency, real_clips

    clips, labels = real_clips(8, 16, 32, seed=4)
    steady = frame_consistency(clips)
    assert steady["colour_agreement"] == 1.0 and steady["background_change"] < 1e-6
    recoloured = clips.clone()
    clip = 0
    shape = (recoloured[clip, 5].amax(0) - recoloured[clip, 5].amin(0)) > 0.8  # frame 5's shape pixels
    other = next(c for c in COLOURS if ATTRIBUTES["colour"].index(c) != int(labels["colour"][clip]))
    recoloured[clip, 5][:, shape] = (torch.tensor(COLOURS[other], dtype=torch.float32) / 127.5 - 1)[:, None]
    assert frame_consistency(recoloured)["colour_agreement"] == pytest.approx(1 - 1 / 16 / 8)
    flicker = clips.clone()
    background = (flicker.amax(2) - flicker.amin(2)) <= 0.8
    flicker[:, 1::2] += 0.1 * background[:, 1::2].unsqueeze(2)  # every other frame's background brighter
    assert frame_consistency(flicker)["background_change"] == pytest.approx(0.1 * 3 ** 0.5, rel=1e-3)
    assert frame_consistency(flicker)["colour_agreement"] == 1.0


def test_attribute_information_is_the_explained_variance_share():
    from animatelcm.evaluation import attribute_information

    generator = torch.Generator().manual_seed(0)
    count = 4000
    labels = {name: torch.randint(0, len(values), (count,), generator=generator) for name, values in ATTRIBUTES.items()}
    offsets = torch.randn(len(ATTRIBUTES["direction"]), 2, 3, 4, 4, generator=generator)
    # latents = direction-dependent pattern (variance 1 per element) + unit noise: direction explains half
    latents = offsets[labels["direction"]] + torch.randn(count, 2, 3, 4, 4, generator=generator)
    shares = attribute_information(latents, labels)
    assert set(shares) == set(ATTRIBUTES)
    centred_offsets = offsets - offsets.mean(0)
    expected = float(centred_offsets.pow(2).mean() / (centred_offsets.pow(2).mean() + 1))
    assert shares["direction"] == pytest.approx(expected, abs=0.02)
    assert abs(shares["colour"]) < 0.01 and abs(shares["shape"]) < 0.01


def test_prompt_sensitivity_sees_only_the_words_a_model_uses(components):
    from diffusers import AnimateDiffPipeline, DDPMScheduler, UNetMotionModel

    from animatelcm.evaluation import prompt_sensitivity, real_clips, real_latents

    unet = UNetMotionModel.from_unet2d(components["unet"], components["motion_adapter"]).eval()
    pipe = AnimateDiffPipeline(unet=unet, scheduler=DDPMScheduler(), **{
        k: components[k] for k in ("vae", "text_encoder", "tokenizer", "motion_adapter")})
    clips, labels = real_clips(3, 2, 64, seed=0)
    latents = real_latents(pipe, clips, batch_size=2)
    assert latents.shape == (3, 4, 2, 8, 8)
    errors = prompt_sensitivity(pipe, latents, labels, timesteps=(100, 900), batch_size=2)
    assert set(errors) == {100, 900} and set(errors[100]) == {"true", *ATTRIBUTES, "empty"}
    assert all(errors[t]["colour"] != errors[t]["true"] for t in errors)  # random weights read every token
    for name, module in unet.named_modules():  # cut every path from the prompt into the UNet
        if name.endswith("attn2.to_v") and "motion_modules" not in name:
            torch.nn.init.zeros_(module.weight)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
    blind = prompt_sensitivity(pipe, latents, labels, timesteps=(100,), batch_size=2)[100]
    assert len({round(v, 12) for v in blind.values()}) == 1, blind


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_i3d_features_use_the_styleganv_interface():
    from animatelcm.evaluation import i3d_features

    class FakeI3D(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(3))

        def forward(self, videos, rescale: bool, resize: bool, return_features: bool):
            assert videos.shape[1] == 3 and not rescale and resize and return_features
            return (videos.mean(dim=(2, 3, 4)) * self.weight).repeat(1, 2)

    detector = torch.jit.script(FakeI3D())
    clips = torch.randn(5, 4, 3, 8, 8)
    features = i3d_features(detector, clips, batch_size=2)
    assert features.shape == (5, 6) and features.dtype == torch.float64
    torch.testing.assert_close(features[:, :3], clips.mean(dim=(1, 3, 4)).double())


def test_eval_cli_writes_results_and_uses_a_reference(tmp_path):
    import json
    import subprocess
    import sys

    net, out, clips = tmp_path / "net.safetensors", tmp_path / "res.json", tmp_path / "ref.pt"
    common = ["--clips", "4", "--real-clips", "4", "--frames", "4", "--batch-size", "4", "--attribute-net", str(net)]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "2"}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "animatelcm", "eval", *args], capture_output=True, text=True,
                              timeout=600, env=env)

    missing = run(*common)
    assert missing.returncode == 2 and "--train-attribute-net" in missing.stderr.splitlines()[-1]
    first = run(*common, "--steps", "2", "--scheduler", "ddim", "--train-attribute-net", "--net-steps", "2",
                "--save-clips", str(clips), "--out", str(out))
    assert first.returncode == 0, first.stderr
    report = json.loads(out.read_text())
    metrics = report["results"]["2"]
    assert {"fvd_analogue", "accuracy", "accuracy_colour", "seconds_per_clip"} <= set(metrics)
    assert report["attribute_net"]["held_out_clips"] == 512 and report["clips"] == 4
    saved = torch.load(clips, weights_only=True)
    assert saved.shape[:3] == (4, 4, 3) and saved.dtype == torch.float16
    second = run(*common, "--steps", "1", "2", "--scheduler", "ddim", "--reference", str(clips), "--out", str(out))
    assert second.returncode == 0, second.stderr
    results = json.loads(out.read_text())["results"]
    assert results["2"]["teacher_mse"] < 1e-5  # the same sampler and noise reproduce the reference
    assert results["1"]["teacher_mse"] > 10 * results["2"]["teacher_mse"]
