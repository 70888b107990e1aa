"""The miniature world's evaluation: the attribute network learns the real clips' attributes, the Frechet distance
follows its closed form, teacher fidelity is an MSE."""

import pytest
import torch

from animatelcm.evaluation import (ATTRIBUTES, AttributeNet, attribute_accuracy, attribute_labels, clip_features,
                                   frechet_distance, teacher_fidelity, train_attribute_net)
from animatelcm.training.synthetic import MovingShapes


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
