"""The shipped default model (the miniature AnimateLCM of benchmarks/mini_world.py) still does its job: 4-step
clips get their prompted colour and shape right, judged by the shipped evaluation network, their shapes move as
one object more than independent frames would, and the CLI's red circle is red in a good part of its frames. A
regression in the sampler, the scheduler, the kernels or the loaders that spoils generation fails here.

Direction is not checked: the miniature teacher does not use the direction word of its prompt (changing it
leaves its noise prediction unchanged at every noise level, benchmarks/results/mini_probe.md), so the shipped
model's direction accuracy is 0.23 at 4 steps (chance 0.25; benchmarks/results/mini_table.md) and a direction
threshold could only sit at chance."""

import numpy as np
import pytest
import torch

from animatelcm.default_model import ATTRIBUTE_NET_PATH, load_default_model
from animatelcm.evaluation import (attribute_accuracy, clip_noise, evaluation_prompts, generate_clips,
                                   load_attribute_net, motion_metrics)

# Measured when the model was shipped, 512 clips at 4 steps (default_model.json, benchmarks/results/mini_table.md):
# colour 0.893, shape 0.707 (chance 0.25 and 0.33), motion straightness 0.278 (real clips 1.0; 1-step samples,
# whose frames are nearly independent, 0.15). The thresholds leave a margin for the 48-clip sample drawn here.
COLOUR_THRESHOLD = 0.8
SHAPE_THRESHOLD = 0.55
STRAIGHTNESS_THRESHOLD = 0.2


@pytest.fixture(scope="module")
def default():
    return load_default_model()


def test_four_step_clips_match_their_prompts(default):
    net, info = load_attribute_net(ATTRIBUTE_NET_PATH)
    assert (info["frames"], info["size"]) == (default.frames, default.height)
    prompts, labels = evaluation_prompts(48)  # every (colour, shape, direction) once
    pipe = default.pipe
    shape = (pipe.unet.config.in_channels, default.frames, default.height // pipe.vae_scale_factor,
             default.width // pipe.vae_scale_factor)
    clips, _ = generate_clips(pipe, prompts, clip_noise(48, shape, seed=123), steps=4, batch_size=16,
                              progress=False)
    accuracy = attribute_accuracy(net, clips, labels)
    motion = motion_metrics(clips)
    assert accuracy["colour"] >= COLOUR_THRESHOLD, accuracy
    assert accuracy["shape"] >= SHAPE_THRESHOLD, accuracy
    assert motion["motion_straightness"] >= STRAIGHTNESS_THRESHOLD, motion


def _red_fraction(frames: np.ndarray) -> float:
    """Fraction of frames ``[F, H, W, 3]`` (uint8) holding a patch of strongly red pixels."""
    rgb = frames.astype(np.int32)
    red = (rgb[..., 0] - np.maximum(rgb[..., 1], rgb[..., 2])) > 60
    return float((red.sum(axis=(1, 2)) >= 4).mean())


def test_cli_red_circle_is_red(tmp_path):
    import imageio.v3 as iio

    from animatelcm.cli import main

    fractions = []
    for seed in range(4):
        out = tmp_path / f"clip{seed}.gif"
        assert main(["generate", "--prompt", "a red circle moving right", "--seed", str(seed), "--out",
                     str(out)]) == 0
        frames = iio.imread(out)
        assert frames.shape[:3] == (16, 32, 32)
        fractions.append(_red_fraction(frames[..., :3]))
    # The shipped model's shape jumps around (see the module docstring) and now and then fades: most frames show
    # it. Measured at shipping: 1.0, 0.75, 0.75, 0.81 for seeds 0-3.
    assert sum(f >= 0.5 for f in fractions) >= 3, fractions
