"""Sampling with any stage's model callable (``model(sample, timestep, condition)``) and the validation clips the
trainer writes every ``validation.every`` steps: GIFs for video stages, PNGs for image stages."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch


@torch.no_grad()
def sample_latents(model, scheduler, shape, condition: dict, uncondition: dict | None, steps: int,
                   guidance_scale: float = 1.0, generator: torch.Generator | None = None, device=None):
    """Run ``scheduler`` for ``steps`` from Gaussian noise of ``shape`` (``[B, C, F, h, w]`` or ``[B, C, h, w]``,
    drawn on the CPU from ``generator``). Classifier-free guidance when ``guidance_scale > 1`` (diffusers'
    form ``u + s (c - u)``). Returns the final latents (for an LCM scheduler, the last denoised estimate)."""
    scheduler.set_timesteps(steps, device=device)
    sample = (torch.randn(shape, generator=generator) * scheduler.init_noise_sigma).to(device)
    for t in scheduler.timesteps:
        timestep = t.to(device).expand(shape[0])
        model_input = scheduler.scale_model_input(sample, t)
        output = model(model_input, timestep, condition)
        if guidance_scale > 1.0:
            unconditional = model(model_input, timestep, uncondition)
            output = unconditional + guidance_scale * (output - unconditional)
        sample = scheduler.step(output, t, sample, generator=generator).prev_sample
    return sample


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, chunk: int = 16) -> np.ndarray:
    """``latents [B, C, F, h, w]`` or ``[B, C, h, w]`` -> ``uint8 [B, F, H, W, 3]`` (F = 1 for images)."""
    video = latents.dim() == 5
    if video:
        batch, frames = latents.shape[0], latents.shape[2]
        flat = latents.permute(0, 2, 1, 3, 4).flatten(0, 1)
    else:
        batch, frames, flat = latents.shape[0], 1, latents
    flat = flat / vae.config.scaling_factor
    dtype = next(vae.parameters()).dtype
    images = torch.cat([vae.decode(part.to(dtype)).sample.float() for part in flat.split(chunk)])
    images = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    return images.reshape(batch, frames, *images.shape[1:]).cpu().numpy()


def latent_shape(vae, batch: int, frames: int | None, size: int, channels: int) -> tuple:
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if size % factor:
        raise ValueError(f"size {size} is not divisible by the VAE's downsampling factor {factor}")
    spatial = (size // factor, size // factor)
    return (batch, channels, frames, *spatial) if frames else (batch, channels, *spatial)


def _file_name(index: int, prompt: str) -> str:
    return f"{index:02d}-{re.sub(r'[^a-zA-Z0-9]+', '_', prompt).strip('_')[:60] or 'clip'}"


def write_validation(trainer, directory: Path) -> list[Path]:
    """Sample the validation prompts with the stage's online model and write them under ``directory``."""
    from ..export import export_to_gif
    from .trainer import _collate

    run, stage, parts, device = trainer.run, trainer.stage, trainer.parts, trainer.accelerator.device
    validation = run.validation
    generator = torch.Generator().manual_seed(validation.seed)
    frames = (validation.frames or run.data.frames) if stage.video else None
    was_training = stage.student.training
    stage.student.eval()
    if stage.name == "teacher_free":  # adapters need a real first frame / control clip: use the dataset's
        items = [trainer.dataset[i] for i in range(min(len(validation.prompts), len(trainer.dataset)))]
        batch = stage.add_adapter_condition(trainer._prepare_batch(_collate(items), generator))
        prompts = [item["caption"] for item in items]
        condition, uncondition = batch["condition"], batch["uncondition"]
        frames = batch["latents"].shape[2]
    else:
        prompts = list(validation.prompts)
        condition = {"text": trainer._encode_text(prompts).float()}
        uncondition = {"text": trainer._encode_text([""] * len(prompts)).float()}
    shape = latent_shape(parts["vae"], len(prompts), frames, run.data.size, parts["vae"].config.latent_channels)
    with trainer.accelerator.autocast():
        latents = sample_latents(stage.sampling_model(), stage.sampling_scheduler(), shape, condition, uncondition,
                                 validation.steps, validation.guidance_scale, generator, device)
    clips = decode_latents(parts["vae"], latents.float())
    stage.student.train(was_training)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for index, (prompt, clip) in enumerate(zip(prompts, clips)):
        if frames:
            written.append(export_to_gif(clip, directory / f"{_file_name(index, prompt)}.gif"))
        else:
            from PIL import Image

            path = directory / f"{_file_name(index, prompt)}.png"
            Image.fromarray(clip[0]).save(path)
            written.append(path)
    return written
