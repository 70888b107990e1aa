"""The math of (latent) consistency distillation and teacher-free consistency training, SPEC.md section 3.

All functions work on batches: per-sample scalars (timesteps, guidance weights, alpha_bar values) are tensors
``[B]`` broadcast over ``x [B, ...]``. Nothing here holds state except :func:`ema_update_`, which updates a target
network in place.
"""

from __future__ import annotations

from typing import Iterable

import torch

from ..ops.consistency import predicted_original_sample
from ..schedulers import boundary_condition_scalings


def ddim_timesteps(num_train_timesteps: int = 1000, num_ddim_timesteps: int = 50) -> torch.Tensor:
    """The solver grid ``t_n = (n + 1) * k - 1``, k = T // N, ascending: ``[N]`` int64 (skip k = 20 for N = 50)."""
    if num_ddim_timesteps < 1 or num_train_timesteps % num_ddim_timesteps:
        raise ValueError(f"num_ddim_timesteps={num_ddim_timesteps} must be a positive divisor of "
                         f"num_train_timesteps={num_train_timesteps}")
    skip = num_train_timesteps // num_ddim_timesteps
    return torch.arange(1, num_ddim_timesteps + 1, dtype=torch.int64) * skip - 1


def broadcast_to(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values [B]`` reshaped to ``[B, 1, ..., 1]`` to broadcast against ``like [B, ...]``."""
    return values.reshape(values.shape[0], *([1] * (like.dim() - 1))).to(like.dtype)


def consistency_function(model_output, sample, timesteps, alphas_cumprod, prediction_type="epsilon",
                         timestep_scaling: float = 10.0):
    """f(x_t, t) = c_skip(t) * x_t + c_out(t) * x0_hat: ``model_output, sample [B, ...]``, ``timesteps [B]``,
    ``alphas_cumprod [T]`` on the same device. Returns ``[B, ...]`` (differentiable); equal to
    ``LCMScheduler.step(...).denoised`` for the same inputs."""
    alpha = alphas_cumprod.to(sample.device)[timesteps]
    x0 = predicted_original_sample(model_output, sample, broadcast_to(alpha.sqrt(), sample),
                                   broadcast_to((1 - alpha).sqrt(), sample), prediction_type)
    c_skip, c_out = boundary_condition_scalings(timesteps, timestep_scaling)
    return broadcast_to(c_out, sample) * x0 + broadcast_to(c_skip, sample) * sample


def ddim_solver_step(x0, eps, alpha_cumprod_prev):
    """One DDIM step to the previous grid point: ``sqrt(ab_prev) * x0 + sqrt(1 - ab_prev) * eps`` with
    ``alpha_cumprod_prev [B]``."""
    return broadcast_to(alpha_cumprod_prev.sqrt(), x0) * x0 + broadcast_to((1 - alpha_cumprod_prev).sqrt(), x0) * eps


def guided(conditional, unconditional, guidance_weight):
    """LCM-form classifier-free guidance ``(1 + w) * cond - w * uncond`` with ``guidance_weight [B]``."""
    w = broadcast_to(guidance_weight, conditional)
    return (1 + w) * conditional - w * unconditional


def pseudo_huber_loss(prediction, target, c: float = 0.001, weights=None):
    """Mean over the batch of ``sqrt(|a - b|^2 + c^2) - c`` per element (LCM's elementwise form), optionally
    weighted per sample by ``weights [B]``. Smooth at 0, ~|a - b| for large differences."""
    if c <= 0:
        raise ValueError(f"pseudo_huber_loss: c must be positive, got {c}")
    loss = torch.sqrt((prediction.float() - target.float()) ** 2 + c * c) - c
    loss = loss.reshape(loss.shape[0], -1).mean(dim=1)
    if weights is not None:
        loss = loss * weights.float()
    return loss.mean()


@torch.no_grad()
def ema_update_(target: Iterable[torch.nn.Parameter], online: Iterable[torch.nn.Parameter], decay: float) -> None:
    """target <- decay * target + (1 - decay) * online, in place, parameter by parameter (same order and shapes)."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"ema_update_: decay must be in [0, 1], got {decay}")
    target, online = list(target), list(online)
    if len(target) != len(online):
        raise ValueError(f"ema_update_: {len(target)} target parameters but {len(online)} online ones")
    for t, o in zip(target, online):
        t.mul_(decay).add_(o.detach().to(t.dtype), alpha=1.0 - decay)


def teacher_free_pair(x0, noise, alpha_cumprod_next, alpha_cumprod_current):
    """The two points of teacher-free consistency training, sharing one noise draw:
    ``x_{t_{n+k}} = sqrt(ab_{n+k}) x0 + sqrt(1 - ab_{n+k}) eps`` and ``x_{t_n}`` likewise (``[B]`` alphas)."""
    return ddim_solver_step(x0, noise, alpha_cumprod_next), ddim_solver_step(x0, noise, alpha_cumprod_current)
