import copy

import pytest
import torch

from animatelcm import animatelcm_scheduler
from animatelcm.testing import TinyConfig, tiny_unet
from animatelcm.training.consistency import consistency_function, pseudo_huber_loss
from animatelcm.training.distill import ConsistencyDistillationLoss, DistillationConfig, unet_predictor

CONFIG = TinyConfig(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
                    text_hidden_size=32)
ALPHAS = animatelcm_scheduler().alphas_cumprod


def setup(seed=0):
    torch.manual_seed(seed)
    teacher = tiny_unet(CONFIG).eval().requires_grad_(False)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    target = copy.deepcopy(teacher).eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(4, 4, 8, 8, generator=generator)
    condition = torch.randn(4, 7, 32, generator=generator)
    return teacher, student, target, latents, condition, torch.zeros(4, 7, 32)


def recording(calls, name, model):
    def call(x, t, c):
        out = model(x, t, c)
        calls.setdefault(name, []).append((x.detach().clone(), t.clone(), c, out.detach().clone()))
        return out
    return call


def test_guided_step_follows_the_recipe():
    """Recompute one guided step by hand from what each network saw and returned: DDIM grid with skip k,
    x0 guidance (1 + w) x0_c - w x0_u, DDIM step to t_n, consistency outputs, pseudo-Huber."""
    teacher, student, target, latents, condition, uncondition = setup()
    calls = {}
    loss_fn = ConsistencyDistillationLoss(ALPHAS, DistillationConfig(w_min=2.0, w_max=2.0))
    loss = loss_fn(recording(calls, "student", unet_predictor(student)), recording(calls, "target", unet_predictor(target)),
                   recording(calls, "teacher", unet_predictor(teacher)), latents, condition, uncondition,
                   generator=torch.Generator().manual_seed(4))
    x_next, t_next, _, student_out = calls["student"][0]
    (_, _, c1, eps_c), (_, _, c2, eps_u) = ((x, t, c, o) for x, t, c, o in calls["teacher"])
    assert c1 is condition and c2 is uncondition
    x_cur, t_cur, _, target_out = calls["target"][0]
    assert torch.all(t_next - t_cur == 20) and torch.all((t_next + 1) % 20 == 0)
    ab = ALPHAS[t_next].reshape(-1, 1, 1, 1)
    x0_c, x0_u = ((x_next - (1 - ab).sqrt() * e) / ab.sqrt() for e in (eps_c, eps_u))
    x0 = 3 * x0_c - 2 * x0_u
    eps = (x_next - ab.sqrt() * x0) / (1 - ab).sqrt()
    ab_prev = ALPHAS[t_cur].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(x_cur, ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps, atol=1e-5, rtol=1e-4)
    expected = pseudo_huber_loss(consistency_function(student_out, x_next, t_next, ALPHAS),
                                 consistency_function(target_out, x_cur, t_cur, ALPHAS))
    torch.testing.assert_close(loss.detach(), expected, atol=1e-6, rtol=1e-5)


def test_gradients_reach_only_the_student():
    teacher, student, target, latents, condition, uncondition = setup()
    loss = ConsistencyDistillationLoss(ALPHAS)(unet_predictor(student), unet_predictor(target), unet_predictor(teacher),
                                               latents, condition, uncondition, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters()) and all(p.grad is None for p in target.parameters())
    assert sum(p.grad.abs().sum().item() for p in student.parameters() if p.grad is not None) > 0


def held_out(loss_fn, student, target, latents, condition):
    with torch.no_grad():
        return sum(loss_fn(unet_predictor(student), unet_predictor(target), None, latents, condition,
                           generator=torch.Generator().manual_seed(100 + i)).item() for i in range(8)) / 8


@pytest.mark.parametrize("seed", [0, 1])
def test_teacher_free_training_lowers_the_held_out_loss(seed):
    """With the target fixed, 40 SGD steps on the student lower the loss on held-out (timestep, noise) draws."""
    _, student, target, latents, condition, _ = setup(seed)
    loss_fn = ConsistencyDistillationLoss(ALPHAS, DistillationConfig(teacher_free=True))
    before = held_out(loss_fn, student, target, latents, condition)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.002)
    generator = torch.Generator().manual_seed(1)
    for _ in range(40):
        loss = loss_fn(unet_predictor(student), unet_predictor(target), None, latents, condition, generator=generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert held_out(loss_fn, student, target, latents, condition) < 0.85 * before


def test_teacher_free_points_share_the_noise_draw():
    _, student, target, latents, condition, _ = setup()
    calls = {}
    loss_fn = ConsistencyDistillationLoss(ALPHAS, DistillationConfig(teacher_free=True))
    loss_fn(recording(calls, "student", unet_predictor(student)), recording(calls, "target", unet_predictor(target)),
            None, latents, condition, generator=torch.Generator().manual_seed(3))
    noises = []
    for name in ("student", "target"):
        x, t, _, _ = calls[name][0]
        ab = ALPHAS[t].reshape(-1, 1, 1, 1)
        noises.append((x - ab.sqrt() * latents) / (1 - ab).sqrt())
    torch.testing.assert_close(noises[0], noises[1], atol=1e-4, rtol=1e-4)


def test_configuration_errors():
    with pytest.raises(ValueError, match="w_min"):
        ConsistencyDistillationLoss(ALPHAS, DistillationConfig(w_min=5, w_max=2))
    _, student, target, latents, condition, _ = setup()
    with pytest.raises(ValueError, match="teacher"):
        ConsistencyDistillationLoss(ALPHAS)(unet_predictor(student), unet_predictor(target), None, latents, condition)


@pytest.mark.parametrize("share", [1.0, 0.5])
def test_timestep_range_focuses_its_share_on_the_grid_points_inside(share):
    alphas = animatelcm_scheduler().alphas_cumprod
    loss = ConsistencyDistillationLoss(alphas, DistillationConfig(num_ddim_timesteps=50, timestep_range=(919, 1000),
                                                                  timestep_range_share=share))
    t_next, t_cur = loss.timesteps(4000, torch.Generator().manual_seed(0))
    assert set(t_next.tolist()) <= set(loss.grid.tolist())
    assert torch.equal(t_cur, (t_next - 20).clamp(min=0))
    focused = (t_next >= 919).float().mean().item()
    assert abs(focused - (share + (1 - share) * 5 / 50)) < 0.03  # 5 of the 50 grid points lie in the range
    assert set(t_next[t_next >= 919].tolist()) == {919, 939, 959, 979, 999}
    if share < 1:
        assert t_next.min() == 19  # the rest still covers the whole grid
    plain = ConsistencyDistillationLoss(alphas, DistillationConfig(num_ddim_timesteps=50))
    drawn = plain.timesteps(4000, torch.Generator().manual_seed(0))[0]
    assert (drawn >= 919).float().mean().item() < 0.13
    with pytest.raises(ValueError, match="holds none of the 50 grid points"):
        ConsistencyDistillationLoss(alphas, DistillationConfig(num_ddim_timesteps=50, timestep_range=(960, 975)))
