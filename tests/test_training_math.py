import numpy as np
import pytest
import torch

from animatelcm import LCMScheduler
from animatelcm.training.consistency import (
    consistency_function,
    ddim_solver_step,
    ddim_timesteps,
    ema_update_,
    guided,
    pseudo_huber_loss,
    teacher_free_pair,
)
from animatelcm.training.synthetic import COLOURS, COMBINATIONS, DIRECTIONS, MovingShapes


def scheduler():
    return LCMScheduler(beta_schedule="linear", original_inference_steps=100)


def test_ddim_grid():
    assert ddim_timesteps(1000, 50).tolist() == list(range(19, 1000, 20))
    assert ddim_timesteps(1000, 100)[:3].tolist() == [9, 19, 29]
    with pytest.raises(ValueError, match="divisor"):
        ddim_timesteps(1000, 30)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_consistency_function_equals_scheduler_denoised(prediction_type):
    s = LCMScheduler(beta_schedule="linear", original_inference_steps=100, prediction_type=prediction_type)
    s.set_timesteps(4)
    x, out = torch.randn(2, 4, 3, 5, 5), torch.randn(2, 4, 3, 5, 5)
    for index, t in enumerate(s.timesteps):
        s._step_index = index
        denoised = s.step(out, t, x).denoised
        ours = consistency_function(out, x, torch.full((2,), int(t)), s.alphas_cumprod, prediction_type)
        torch.testing.assert_close(ours, denoised, atol=1e-6, rtol=1e-6)


def test_boundary_condition_at_zero():
    s = scheduler()
    x, out = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    f0 = consistency_function(out, x, torch.zeros(3, dtype=torch.long), s.alphas_cumprod)
    torch.testing.assert_close(f0, x)  # c_skip(0) = 1, c_out(0) = 0


def test_ddim_step_with_true_noise_reproduces_forward_noising():
    s = scheduler()
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t_prev = torch.tensor([199, 579])
    expected = s.add_noise(x0, eps, t_prev)
    torch.testing.assert_close(ddim_solver_step(x0, eps, s.alphas_cumprod[t_prev]), expected, atol=1e-6, rtol=1e-6)


def test_teacher_free_pair_shares_one_noise():
    s = scheduler()
    x0, eps = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    t_next, t_cur = torch.tensor([519, 39]), torch.tensor([499, 19])
    x_next, x_cur = teacher_free_pair(x0, eps, s.alphas_cumprod[t_next], s.alphas_cumprod[t_cur])
    for x, t in ((x_next, t_next), (x_cur, t_cur)):
        ab = s.alphas_cumprod[t].reshape(2, 1, 1, 1)
        torch.testing.assert_close((x - ab.sqrt() * x0) / (1 - ab).sqrt(), eps, atol=1e-5, rtol=1e-5)


def test_guidance_and_pseudo_huber_and_ema():
    cond, uncond = torch.randn(2, 3), torch.randn(2, 3)
    torch.testing.assert_close(guided(cond, uncond, torch.zeros(2)), cond)
    torch.testing.assert_close(guided(cond, uncond, torch.tensor([2.0, 2.0])), 3 * cond - 2 * uncond)
    a = torch.randn(4, 10, requires_grad=True)
    assert pseudo_huber_loss(a, a.detach()).item() == pytest.approx(0.0, abs=1e-9)
    (grad,) = torch.autograd.grad(pseudo_huber_loss(a, a.detach()), a)
    assert torch.isfinite(grad).all() and grad.abs().max() < 1e-6
    big = pseudo_huber_loss(torch.full((2, 5), 10.0), torch.zeros(2, 5))
    assert big.item() == pytest.approx(10.0, abs=1e-2)
    weighted = pseudo_huber_loss(torch.ones(2, 3), torch.zeros(2, 3), weights=torch.tensor([0.0, 2.0]))
    assert weighted.item() == pytest.approx(pseudo_huber_loss(torch.ones(1, 3), torch.zeros(1, 3)).item(), rel=1e-6)
    with pytest.raises(ValueError, match="positive"):
        pseudo_huber_loss(a, a, c=0)
    target, online = [torch.zeros(3)], [torch.ones(3)]
    ema_update_(target, online, 0.95)
    torch.testing.assert_close(target[0], torch.full((3,), 0.05))
    ema_update_(target, online, 0.0)
    torch.testing.assert_close(target[0], torch.ones(3))
    with pytest.raises(ValueError, match="decay"):
        ema_update_(target, online, 1.5)


def shape_centroid(frame, colour):
    mask = np.all(frame == np.array(COLOURS[colour], dtype=np.uint8), axis=-1)
    ys, xs = np.nonzero(mask)
    return xs.mean(), ys.mean(), mask.sum()


@pytest.mark.parametrize("size, frames", [(64, 16), (32, 8), (48, 12)])
def test_moving_shapes_captions_colours_and_motion(size, frames):
    data = MovingShapes(num_clips=len(COMBINATIONS), frames=frames, size=size, seed=3)
    seen = set()
    for index in range(len(data)):
        clip = data.clip(index)
        colour, shape, direction = clip["colour"], clip["shape"], clip["direction"]
        seen.add((colour, shape, direction))
        assert clip["caption"] == f"a {colour} {shape} moving {direction}"
        video = clip["frames"]
        assert video.shape == (frames, size, size, 3) and video.dtype == np.uint8
        background = video[0, 0, 0].astype(int)
        assert all(np.abs(background - np.array(rgb)).max() > 60 for rgb in COLOURS.values())
        assert background.max() - background.min() < 60  # low saturation
        centres = [shape_centroid(f, colour) for f in video]
        assert all(area > 0 for _, _, area in centres)  # the shape is in every frame
        xs, ys = np.array([c[0] for c in centres]), np.array([c[1] for c in centres])
        moving, still = {"left": (-xs, ys), "right": (xs, ys), "up": (-ys, xs), "down": (ys, xs)}[direction]
        assert np.all(np.diff(moving) > 0) and np.ptp(still) < 0.5  # sub-pixel rasterisation jitter only
    assert seen == set(COMBINATIONS)


def test_moving_shapes_is_deterministic_and_a_dataset():
    a, b = MovingShapes(10, seed=1), MovingShapes(10, seed=1)
    assert np.array_equal(a.clip(7)["frames"], b.clip(7)["frames"])
    assert not np.array_equal(a.clip(7)["frames"], MovingShapes(10, seed=2).clip(7)["frames"])
    item = a[3]
    assert item["pixel_values"].shape == (16, 3, 64, 64) and item["pixel_values"].min() >= -1
    assert item["pixel_values"].max() <= 1 and isinstance(item["caption"], str)
    with pytest.raises(IndexError):
        a.clip(10)
    with pytest.raises(ValueError):
        MovingShapes(0)
    assert set(DIRECTIONS) == {"left", "right", "up", "down"}
