"""Prompted motion modules: the second temporal attention of every motion-module block attends to the prompt.

AnimateDiff's motion modules are text-blind: both attentions of a block are self-attentions over frames, so the
prompt reaches a clip only through the per-frame spatial cross-attention, and the frame index only through the
motion modules. In the miniature world (README, "Miniature reproduction") a UNet with text-blind motion modules,
every weight trainable, cannot learn an output that depends on the prompt and the frame index at once; with
``attn2`` of each motion block a cross-attention to the prompt it can (``benchmarks/results/mini_capacity.md``:
separation -0.05 vs 0.998 after 1000 steps). Trained with many high-noise samples, the prompted teacher learns the
direction word (sampled direction accuracy 0.95) where the text-blind one stays at chance (0.22).

The extension keeps diffusers' classes and key layout: ``attn2`` of each motion block gets ``to_k``/``to_v`` from
the text width (``cross_attention_dim``) instead of the channel width, and the model's config records
``motion_cross_attention_dim``. Queries are the ``[B*H*W, F, C]`` tokens of the motion module; each (pixel, frame)
token attends to the prompt tokens of its own frame (``encoder_hidden_states [B*F, L, D]``, as the UNet receives
them), so the ``[B*H*W, L, D]`` prompt is never materialised. The UNet hands the prompt to those attentions through
a forward pre-hook (:func:`add_motion_cross_attention` installs it); the loaders in :mod:`animatelcm.loading`
rebuild prompted models from their config or, for single files, from the ``to_k`` shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CONFIG_KEY = "motion_cross_attention_dim"
SLOT_ATTRIBUTE = "_animatelcm_motion_prompt"


class PromptSlot:
    """The current UNet call's prompt ``[B*F, L, D]`` and clip shape ``(batch, frames)``, shared by a UNet and its
    prompted attentions (a plain object, so ``copy.deepcopy`` of the UNet gives the copy its own slot).

    ``current`` is set for the duration of a call. ``for_backward`` keeps the last call made with gradients
    enabled: gradient checkpointing reruns motion modules during the backward pass, after the call has returned,
    and they read it then (so a backward must follow its own grad-enabled call of this UNet before the next one,
    as in every training loop; calls without gradients in between, such as EMA or online targets, do not count)."""

    def __init__(self):
        self.current = None
        self.for_backward = None

    def get(self):
        return self.current if self.current is not None else (
            self.for_backward if torch.is_grad_enabled() else None)


def motion_cross_attention_dim(model) -> int | None:
    """The prompt width the motion modules of ``model`` (MotionAdapter or UNetMotionModel) attend to, or None
    for AnimateDiff's text-blind motion modules."""
    config = getattr(model, "config", None)
    return None if config is None else config.get(CONFIG_KEY)


def motion_attn2_layers(model):
    """``(name, Attention)`` of the second attention of every motion-module transformer block."""
    return [(name, module) for name, module in model.named_modules()
            if ".motion_modules." in f".{name}" and name.endswith(".attn2")]


class FramePromptAttnProcessor:
    """``attn2`` of a prompted motion block: ``hidden_states [B*H*W, F, C]`` -> same shape, each (pixel, frame)
    token attending to the prompt tokens ``[L, D]`` of its frame, read from the UNet's :class:`PromptSlot`."""

    def __init__(self, slot: PromptSlot | None = None):
        self.slot = slot

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        prompt = None if self.slot is None else self.slot.get()
        if prompt is None:
            raise RuntimeError("a prompted motion module (motion_cross_attention_dim set) was called without the "
                               "prompt: call it through its UNetMotionModel, built by animatelcm's loaders or "
                               "animatelcm.motion_prompt.add_motion_cross_attention, which hand the prompt over")
        if attention_mask is not None:
            raise ValueError("prompted motion modules do not take an attention mask")
        text, batch, frames = prompt
        sequences, seen_frames, _ = hidden_states.shape
        if seen_frames != frames or sequences % batch or text.shape[0] != batch * frames:
            raise ValueError(f"prompted motion modules need every frame of the clip at once: got tokens "
                             f"{tuple(hidden_states.shape)} and a prompt {tuple(text.shape)} for {batch} clips of "
                             f"{frames} frames (frame windows such as FreeNoise are not supported)")
        pixels = sequences // batch
        residual = hidden_states
        if attn.norm_cross:
            text = attn.norm_encoder_hidden_states(text)
        query = attn.to_q(hidden_states)
        key, value = attn.to_k(text), attn.to_v(text)
        heads = attn.heads
        head_dim = query.shape[-1] // heads
        query = (query.view(batch, pixels, frames, heads, head_dim).permute(0, 2, 3, 1, 4)
                 .reshape(batch * frames, heads, pixels, head_dim))
        key = key.view(batch * frames, -1, heads, head_dim).transpose(1, 2)
        value = value.view(batch * frames, -1, heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(query, key, value, scale=attn.scale)  # [B*F, heads, H*W, d]
        out = (out.view(batch, frames, heads, pixels, head_dim).permute(0, 3, 1, 2, 4)
               .reshape(sequences, frames, heads * head_dim).to(query.dtype))
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out if attn.rescale_output_factor == 1 else out / attn.rescale_output_factor


def _remember_prompt(unet, args, kwargs):
    sample = args[0] if args else kwargs["sample"]
    text = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
    slot = getattr(unet, SLOT_ATTRIBUTE)
    slot.current = (text, sample.shape[0], sample.shape[2])
    if torch.is_grad_enabled():
        slot.for_backward = slot.current


def _forget_prompt(unet, args, kwargs, output):
    getattr(unet, SLOT_ATTRIBUTE).current = None


def add_motion_cross_attention(model, cross_attention_dim: int):
    """Make ``attn2`` of every motion-module block of ``model`` (a MotionAdapter or UNetMotionModel, in place) a
    cross-attention to a ``cross_attention_dim``-wide prompt: fresh ``to_k``/``to_v`` (``to_q``, ``to_out`` and
    everything else kept), the config entry ``motion_cross_attention_dim``, and on a UNetMotionModel the hooks that
    hand each call's ``encoder_hidden_states [B*F, L, D]`` to those attentions. Idempotent for the same width.

    Returns ``model``."""
    if not isinstance(cross_attention_dim, int) or cross_attention_dim < 1:
        raise ValueError(f"cross_attention_dim must be a positive integer, got {cross_attention_dim!r}")
    current = motion_cross_attention_dim(model)
    if current is not None and current != cross_attention_dim:
        raise ValueError(f"the motion modules already attend to a {current}-wide prompt, not {cross_attention_dim}")
    layers = motion_attn2_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no motion-module attentions to give the prompt to")
    from diffusers import UNetMotionModel

    slot = None
    if isinstance(model, UNetMotionModel):
        slot = getattr(model, SLOT_ATTRIBUTE, None)
        if slot is None:
            slot = PromptSlot()
            setattr(model, SLOT_ATTRIBUTE, slot)
            model.register_forward_pre_hook(_remember_prompt, with_kwargs=True)
            model.register_forward_hook(_forget_prompt, with_kwargs=True, always_call=True)
    for _, attn in layers:
        if current is None:
            reference = attn.to_k
            for name in ("to_k", "to_v"):
                setattr(attn, name, nn.Linear(cross_attention_dim, reference.out_features,
                                              bias=reference.bias is not None, device=reference.weight.device,
                                              dtype=reference.weight.dtype))
            attn.is_cross_attention = True
            attn.cross_attention_dim = cross_attention_dim
        attn.set_processor(FramePromptAttnProcessor(slot))
    model.register_to_config(**{CONFIG_KEY: cross_attention_dim})
    return model


def inflate(unet2d, motion_adapter):
    """``UNetMotionModel.from_unet2d`` that also takes prompted motion modules (copies; inputs unchanged)."""
    from diffusers import MotionAdapter, UNetMotionModel

    width = motion_cross_attention_dim(motion_adapter)
    if width is None:
        return UNetMotionModel.from_unet2d(unet2d, motion_adapter)
    plain_config = {k: v for k, v in motion_adapter.config.items() if k != CONFIG_KEY}
    plain = MotionAdapter.from_config(plain_config)  # the text-blind layout, so from_unet2d can build the UNet
    unet = UNetMotionModel.from_unet2d(unet2d, plain)
    add_motion_cross_attention(unet, width)
    unet.load_motion_modules(motion_adapter)
    return unet
