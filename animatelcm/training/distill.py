"""One training step's loss for consistency distillation (with a teacher) and teacher-free consistency training,
SPEC.md section 3. Models are passed as callables ``model(x_t [B, ...], t [B], condition) -> output [B, ...]`` (see
:func:`unet_predictor`), so the same loss serves image UNets, UNets with motion modules, and adapters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops.consistency import predicted_original_sample
from .consistency import (
    broadcast_to,
    consistency_function,
    ddim_solver_step,
    ddim_timesteps,
    guided,
    pseudo_huber_loss,
)


@dataclass
class DistillationConfig:
    """Hyper-parameters of one consistency-distillation step (defaults: public LCM code; SPEC.md section 3)."""

    num_ddim_timesteps: int = 50      # N; skip k = 1000 // N
    w_min: float = 3.0                # guidance weight w ~ U[w_min, w_max] (LCM form: (1 + w) eps_c - w eps_u)
    w_max: float = 15.0
    huber_c: float = 0.001
    timestep_scaling: float = 10.0
    prediction_type: str = "epsilon"
    teacher_free: bool = False        # consistency training: both points from one noise draw, no teacher
    timestep_range: tuple[int, int] | None = None  # [low, high): grid points t_{n+k} drawn for a share of the batch
    timestep_range_share: float = 1.0


def unet_predictor(unet):
    """Adapt a diffusers UNet to ``model(x, t, encoder_hidden_states) -> output``."""
    def predict(sample, timesteps, encoder_hidden_states):
        return unet(sample, timesteps, encoder_hidden_states=encoder_hidden_states).sample
    return predict


class ConsistencyDistillationLoss:
    """Loss of one step: sample n, noise the clean latents ``x0`` to ``x_{t_{n+k}}``; the student's consistency
    output there; the teacher's guided DDIM step to ``x_{t_n}`` (or, teacher-free, the same noise at ``t_n``);
    the target network's consistency output at ``x_{t_n}`` without gradient; pseudo-Huber distance.

    ``alphas_cumprod [T]`` is the noise schedule (e.g. ``scheduler.alphas_cumprod``).
    """

    def __init__(self, alphas_cumprod: torch.Tensor, config: DistillationConfig = DistillationConfig()):
        if config.w_min > config.w_max:
            raise ValueError(f"DistillationConfig: w_min={config.w_min} exceeds w_max={config.w_max}")
        self.alphas_cumprod = alphas_cumprod.float()
        self.config = config
        self.grid = ddim_timesteps(len(alphas_cumprod), config.num_ddim_timesteps)
        self.skip = len(alphas_cumprod) // config.num_ddim_timesteps
        self.focus = None
        if config.timestep_range is not None:
            low, high = config.timestep_range
            self.focus = torch.nonzero((self.grid >= low) & (self.grid < high)).flatten()
            if not len(self.focus):
                raise ValueError(f"timestep_range {list(config.timestep_range)} holds none of the "
                                 f"{config.num_ddim_timesteps} grid points (every {self.skip}th timestep, ending at "
                                 f"{int(self.grid[-1])}); widen it")

    def timesteps(self, batch: int, generator=None, device=None):
        """(t_{n+k}, t_n) ``[B]`` for a random grid index per sample: uniform over the grid, except that with
        ``timestep_range`` each sample takes a grid point inside that range with probability
        ``timestep_range_share`` (1-step sampling starts at the top grid point, which a uniform draw visits once in
        ``num_ddim_timesteps``)."""
        index = torch.randint(0, len(self.grid), (batch,), generator=generator)
        if self.focus is not None:
            focused = self.focus[torch.randint(0, len(self.focus), (batch,), generator=generator)]
            chosen = torch.rand(batch, generator=generator) < self.config.timestep_range_share
            index = torch.where(chosen, focused, index)
        t_next = self.grid[index]
        return t_next.to(device), (t_next - self.skip).clamp(min=0).to(device)

    def __call__(self, student, target, teacher, latents, condition, uncondition=None, generator=None):
        """``latents [B, ...]`` clean (VAE) latents; ``condition`` / ``uncondition`` what the models take as the
        prompt (the unconditional one only for a teacher with guidance). Returns the scalar loss (gradients flow
        into ``student`` only)."""
        config, device = self.config, latents.device
        alphas = self.alphas_cumprod.to(device)
        t_next, t_cur = self.timesteps(latents.shape[0], generator, device)
        noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(device)
        x_next = ddim_solver_step(latents, noise, alphas[t_next])
        student_output = consistency_function(student(x_next, t_next, condition), x_next, t_next, alphas,
                                              config.prediction_type, config.timestep_scaling)
        with torch.no_grad():
            if config.teacher_free:
                x_cur = ddim_solver_step(latents, noise, alphas[t_cur])
            else:
                if teacher is None or uncondition is None:
                    raise ValueError("consistency distillation needs a teacher and an unconditional prompt; set "
                                     "teacher_free=True to train without a teacher")
                w = torch.empty(latents.shape[0]).uniform_(config.w_min, config.w_max, generator=generator).to(device)
                sqrt_a = broadcast_to(alphas[t_next].sqrt(), latents)
                sqrt_1m = broadcast_to((1 - alphas[t_next]).sqrt(), latents)
                x0_c, x0_u = (predicted_original_sample(teacher(x_next, t_next, c), x_next, sqrt_a, sqrt_1m,
                                                        config.prediction_type) for c in (condition, uncondition))
                x0 = guided(x0_c, x0_u, w)
                eps = (x_next - sqrt_a * x0) / sqrt_1m
                x_cur = ddim_solver_step(x0, eps, alphas[t_cur])
            target_output = consistency_function(target(x_cur, t_cur, condition), x_cur, t_cur, alphas,
                                                 config.prediction_type, config.timestep_scaling)
        return pseudo_huber_loss(student_output, target_output, config.huber_c)
