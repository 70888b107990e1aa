"""The shipped default model (the miniature AnimateLCM of benchmarks/mini_world.py) still does its job: 4-step
clips get their prompted colour and shape right, judged by the shipped evaluation network, and the CLI's red circle
is red in a good part of its frames. A regression in the sampler, the scheduler, the kernels or the loaders that spoils generation fails here.

Direction is not checked: the shipped model's motion modules did not learn motion (direction accuracy 0.24 at 4
steps, chance 0.25; the teacher's is 0.27 at 50 steps; see benchmarks/results/mini_table.md), so a direction
threshold could only sit at chance."""

import numpy as np
import pytest
import torch

from animatelcm.default_model import ATTRIBUTE_NET_PATH, load_default_model
from animatelcm.evaluation import (attribute_accuracy, clip_noise, evaluation_prompts, generate_clips,
                                   load_attribute_net)

# Measured when the model was shipped, 512 clips at 4 steps (default_model.json, benchmarks/results/mini_table.md):
# colour 0.896, shape 0.633 (chance 0.25 and 0.33). The thresholds leave a margin for the 48-clip sample drawn here.
COLOUR_THRESHOLD = 0.8
SHAPE_THRESHOLD = 0.45


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
    assert accuracy["colour"] >= COLOUR_THRESHOLD, accuracy
    assert accuracy["shape"] >= SHAPE_THRESHOLD, accuracy


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
    # The shipped model flickers (its frames are nearly independent; see the module docstring): about half of the
    # frames or more show the shape. Measured at shipping: 0.62, 0.94, 0.81, 0.69 for seeds 0-3.
    assert sum(f >= 0.4 for f in fractions) >= 3, fractions
