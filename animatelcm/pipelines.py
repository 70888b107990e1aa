"""``AnimateLCMPipeline``: diffusers' AnimateDiffPipeline with AnimateLCM's defaults and the fused scheduler."""

from __future__ import annotations

import json
import numbers
from pathlib import Path

import torch
from diffusers import AnimateDiffPipeline, UNet2DConditionModel
from diffusers import LCMScheduler as DiffusersLCMScheduler

from .motion_prompt import inflate, motion_cross_attention_dim
from .schedulers import LCMScheduler, animatelcm_scheduler

DEFAULT_STEPS = 4
DEFAULT_GUIDANCE = 1.0
DEFAULT_FRAMES = 16


class AnimateLCMPipeline(AnimateDiffPipeline):
    """Text-to-video in a few steps with an AnimateLCM motion module and LCM LoRA.

    Accepts everything :class:`diffusers.AnimateDiffPipeline` accepts. Differences: ``scheduler`` may be omitted
    (AnimateLCM's: :func:`animatelcm_scheduler`, linear betas, ``original_inference_steps=100``); a plain
    ``diffusers.LCMScheduler`` is replaced by :class:`animatelcm.LCMScheduler` with the same config (same results,
    fused step); ``__call__`` defaults to 4 steps, guidance 1.0 (no negative branch) and 16 frames.
    With the same components, latents and generator it produces what ``AnimateDiffPipeline`` with
    ``diffusers.LCMScheduler`` produces.

    Output of ``__call__``: ``frames`` as a list (per video) of PIL images (``output_type="pil"``), an array
    ``[B, F, H, W, 3]`` in [0, 1] (``"np"``), a tensor ``[B, F, 3, H, W]`` (``"pt"``), or the latents
    ``[B, 4, F, H/8, W/8]`` (``"latent"``).
    """

    # scheduler has a default here, so diffusers' from_pretrained must be told it is a component.
    _optional_components = [*AnimateDiffPipeline._optional_components, "scheduler"]

    def __init__(self, vae, text_encoder, tokenizer, unet, motion_adapter, scheduler=None, feature_extractor=None,
                 image_encoder=None):
        if scheduler is None:
            scheduler = animatelcm_scheduler()
        elif type(scheduler) is DiffusersLCMScheduler:
            scheduler = LCMScheduler.from_config(scheduler.config)
        if isinstance(unet, UNet2DConditionModel) and motion_cross_attention_dim(motion_adapter) is not None:
            unet = inflate(unet, motion_adapter)  # diffusers' inflation knows only text-blind motion modules
        super().__init__(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                         motion_adapter=motion_adapter, scheduler=scheduler, feature_extractor=feature_extractor,
                         image_encoder=image_encoder)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As diffusers' ``save_pretrained``; the scheduler is recorded as ``diffusers.LCMScheduler`` (same config)
        so the folder loads in plain diffusers too (this class upgrades it again when loading)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        index_path = Path(save_directory) / "model_index.json"
        index = json.loads(index_path.read_text())
        if isinstance(self.scheduler, LCMScheduler):
            index["scheduler"] = ["diffusers", "LCMScheduler"]
            index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def max_frames(self) -> int | None:
        """Longest clip the motion modules' positional table allows (None when it cannot be read)."""
        adapter = getattr(self, "motion_adapter", None)
        if adapter is not None:
            return adapter.config.motion_max_seq_length
        for name, buffer in self.unet.named_buffers():
            if name.endswith("pos_embed.pe"):
                return buffer.shape[1]
        return None

    def _check_call_arguments(self, num_frames, num_inference_steps, guidance_scale, decode_chunk_size, output_type):
        if not isinstance(num_frames, numbers.Integral) or num_frames < 1:
            raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
        limit = self.max_frames()
        if limit is not None and num_frames > limit and not self.free_noise_enabled:
            raise ValueError(f"num_frames={num_frames} exceeds the motion module's positional table "
                             f"({limit} frames); generate at most {limit} frames or enable FreeNoise "
                             "(pipe.enable_free_noise()) for longer clips")
        if not isinstance(num_inference_steps, numbers.Integral) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        if not isinstance(guidance_scale, numbers.Real) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a non-negative number, got {guidance_scale!r}")
        if not isinstance(decode_chunk_size, numbers.Integral) or decode_chunk_size < 1:
            raise ValueError(f"decode_chunk_size must be a positive integer, got {decode_chunk_size!r}")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be one of 'pil', 'np', 'pt', 'latent'; got {output_type!r}")

    def __call__(self, prompt=None, num_frames: int = DEFAULT_FRAMES, height=None, width=None,
                 num_inference_steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE,
                 output_type: str = "pil", decode_chunk_size: int = 16, num_videos_per_prompt: int = 1, **kwargs):
        """Generate videos; arguments as :meth:`diffusers.AnimateDiffPipeline.__call__` (latents
        ``[B, 4, F, H/8, W/8]``), with AnimateLCM defaults: 4 steps, guidance 1.0, 16 frames.

        ``num_videos_per_prompt`` is honoured (diffusers' AnimateDiffPipeline silently makes one video per prompt):
        each prompt (and negative prompt, or their embeddings) is repeated that many times, so B = prompts x
        ``num_videos_per_prompt``, each video with its own noise."""
        self._check_call_arguments(num_frames, num_inference_steps, guidance_scale, decode_chunk_size, output_type)
        if not isinstance(num_videos_per_prompt, numbers.Integral) or num_videos_per_prompt < 1:
            raise ValueError(f"num_videos_per_prompt must be a positive integer, got {num_videos_per_prompt!r}")
        if num_videos_per_prompt > 1:
            prompt, kwargs = _repeat_prompts(prompt, kwargs, num_videos_per_prompt)
        return super().__call__(prompt=prompt, num_frames=num_frames, height=height, width=width,
                                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                output_type=output_type, decode_chunk_size=decode_chunk_size, **kwargs)


def _repeat_prompts(prompt, kwargs: dict, times: int):
    """Each prompt, negative prompt and prompt embedding repeated ``times`` times in a row (the batch diffusers'
    AnimateDiffPipeline would build for ``num_videos_per_prompt`` if it did not force it to 1)."""
    for name in ("ip_adapter_image", "ip_adapter_image_embeds"):
        if kwargs.get(name) is not None:
            raise ValueError(f"num_videos_per_prompt > 1 with {name} is not supported; call the pipeline once per "
                             "video, or pass each prompt several times in a list")

    def repeat(value):
        if value is None:
            return None
        if isinstance(value, str):
            return [value] * times
        if isinstance(value, torch.Tensor):
            return value.repeat_interleave(times, dim=0)
        return [item for item in value for _ in range(times)]

    kwargs = dict(kwargs)
    for name in ("prompt_embeds", "negative_prompt_embeds"):
        if name in kwargs:
            kwargs[name] = repeat(kwargs[name])
    prompt = repeat(prompt)
    negative = kwargs.get("negative_prompt")
    embeds = kwargs.get("prompt_embeds")
    if isinstance(negative, str) and (prompt is not None or embeds is not None):
        # one negative prompt for every video: diffusers wants a list as long as the batch
        kwargs["negative_prompt"] = [negative] * (len(prompt) if prompt is not None else embeds.shape[0])
    elif negative is not None:
        kwargs["negative_prompt"] = repeat(negative)
    return prompt, kwargs
