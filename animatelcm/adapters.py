"""Adapters that plug into a video consistency model: the image-to-video encoders (this package's, trained by the
``teacher_free`` stage, and the one of AnimateLCM's released I2V model) and the
wrappers that run a UNetMotionModel with an adapter or a ControlNet as one ``model(sample, timestep, condition)``.

Shapes: ``sample [B, C, F, h, w]`` latents, ``timestep [B]``, ``condition`` a dict with ``text [B, L, D]`` and,
per adapter, ``first_frame [B, C, h, w]`` (i2v) or ``control [B, F, 3, H, W]`` in [0, 1] (ControlNet).
"""

from __future__ import annotations

import contextlib
import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


def frame_embedding(num_frames: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Sinusoidal embedding of frame indices 0..F-1: ``[F, dim]`` (sin half, cos half)."""
    half = dim // 2
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(half, device=device, dtype=torch.float32) / max(half, 1))
    angles = torch.arange(num_frames, device=device, dtype=torch.float32)[:, None] * frequencies[None]
    embedding = torch.cat([angles.sin(), angles.cos()], dim=1)
    if dim % 2:
        embedding = torch.nn.functional.pad(embedding, (0, 1))
    return embedding.to(dtype)


class _ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 1)
        self.act = nn.SiLU()

    def forward(self, x):
        return x + self.conv2(self.act(self.conv1(x)))


class ImageToVideoAdapter(ModelMixin, ConfigMixin):
    """T2I-Adapter-style encoder of the first-frame latent, one feature map per UNet down block, added before the
    first motion module of each (``injection_layer`` 0: :func:`features_before_motion_modules`).

    ``forward(first_frame [B, C, h, w], num_frames) -> list of [B*F, C_l, h / 2^l, w / 2^l]``: the latent is
    repeated over frames, ``conv_in`` lifts it to ``block_out_channels[0]``, a sinusoidal frame embedding times
    ``motion_scale`` is added (so each frame can be told apart), and each level (stride-2 conv from the second level
    on, then residual blocks) ends in a zero-initialised 1x1 conv: the adapter starts as an exact no-op and the
    model it is attached to is unchanged until training moves it.
    """

    injection_layer = 0

    @register_to_config
    def __init__(self, in_channels: int = 4, block_out_channels: tuple = (320, 640, 1280, 1280),
                 num_res_blocks: int = 1, motion_scale: float = 0.8):
        super().__init__()
        channels = list(block_out_channels)
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.levels = nn.ModuleList()
        self.outputs = nn.ModuleList()
        previous = channels[0]
        for level, width in enumerate(channels):
            layers = [nn.Conv2d(previous, width, 3, stride=1 if level == 0 else 2, padding=1)]
            layers += [_ResidualBlock(width) for _ in range(num_res_blocks)]
            self.levels.append(nn.Sequential(*layers))
            output = nn.Conv2d(width, width, 1)
            nn.init.zeros_(output.weight)
            nn.init.zeros_(output.bias)
            self.outputs.append(output)
            previous = width

    def forward(self, first_frame: torch.Tensor, num_frames: int) -> list[torch.Tensor]:
        if first_frame.dim() != 4:
            raise ValueError(f"ImageToVideoAdapter: first_frame must be [B, C, h, w], got {tuple(first_frame.shape)}")
        batch = first_frame.shape[0]
        x = self.conv_in(first_frame.to(self.conv_in.weight.dtype))
        x = x.repeat_interleave(num_frames, dim=0)
        embedding = frame_embedding(num_frames, x.shape[1], x.device, x.dtype) * self.config.motion_scale
        x = x + embedding.repeat(batch, 1)[:, :, None, None]
        features = []
        for level, output in zip(self.levels, self.outputs):
            x = level(x)
            features.append(output(x))
        return features


def interleaved_frame_embedding(num_frames: int, dim: int, device=None) -> torch.Tensor:
    """Sinusoidal embedding of frame indices 0..F-1 as AnimateLCM-I2V's encoder computes it: ``[F, dim]`` (dim
    even) with ``sin(f * w_i)`` in column ``2i`` and ``cos(f * w_i)`` in column ``2i + 1``,
    ``w_i = 10000^(-2i / dim)``; float32."""
    if dim % 2:
        raise ValueError(f"interleaved_frame_embedding: dim must be even, got {dim}")
    frequencies = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    angles = torch.arange(num_frames, device=device, dtype=torch.float32)[:, None] * frequencies[None]
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)


class _EncoderBlock(nn.Module):
    """A block of :class:`AnimateLCMImageEncoder`: optional 2x average pooling (after replicate-padding odd sizes),
    a 1x1 ``in_conv`` where the width changes, then ``x + block2(relu(block1(x)))`` (3x3, then 1x1)."""

    def __init__(self, in_channels: int, out_channels: int, downsample: bool):
        super().__init__()
        self.downsample = downsample
        self.in_conv = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.block1 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.act = nn.ReLU()
        self.block2 = nn.Conv2d(out_channels, out_channels, 1)

    def forward(self, x):
        if self.downsample:
            x = torch.nn.functional.pad(x, (0, x.shape[-1] % 2, 0, x.shape[-2] % 2), mode="replicate")
            x = torch.nn.functional.avg_pool2d(x, 2)
        if self.in_conv is not None:
            x = self.in_conv(x)
        return x + self.block2(self.act(self.block1(x)))


class AnimateLCMImageEncoder(ModelMixin, ConfigMixin):
    """The image encoder of AnimateLCM's released image-to-video model (``AnimateLCM_sd15_i2v.ckpt``, whose
    ``img_encoder.*`` tensors it loads as they are named: :func:`animatelcm.load_image_adapter`), as AnimateLCM's
    public code defines it; an alternative to :class:`ImageToVideoAdapter` for ``AnimateLCMPipeline.image_adapter``.

    ``forward(first_frame [B, C, h, w], num_frames) -> list of [B*F, C_l, h / 2^l, w / 2^l]``: ``conv_in`` (3x3)
    lifts the latent to ``block_out_channels[0]``, it is repeated over frames and
    :func:`interleaved_frame_embedding` times ``motion_scale`` is added; each level then runs ``blocks_per_level``
    :class:`_EncoderBlock` (the first of every level after the first pools 2x) and its output is that level's
    feature, added before the second motion module of the matching down block (``injection_layer`` 1: after the
    second ResNet and spatial attention), where the released model adds it.
    """

    injection_layer = 1

    @register_to_config
    def __init__(self, in_channels: int = 4, block_out_channels: tuple = (320, 640, 1280, 1280),
                 blocks_per_level: int = 2, motion_scale: float = 0.8):
        super().__init__()
        channels = list(block_out_channels)
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        blocks, previous = [], channels[0]
        for level, width in enumerate(channels):
            for index in range(blocks_per_level):
                blocks.append(_EncoderBlock(previous, width, downsample=level > 0 and index == 0))
                previous = width
        self.body = nn.ModuleList(blocks)

    def forward(self, first_frame: torch.Tensor, num_frames: int) -> list[torch.Tensor]:
        if first_frame.dim() != 4:
            raise ValueError(f"AnimateLCMImageEncoder: first_frame must be [B, C, h, w], got "
                             f"{tuple(first_frame.shape)}")
        batch = first_frame.shape[0]
        x = self.conv_in(first_frame.to(self.conv_in.weight.dtype)).repeat_interleave(num_frames, dim=0)
        embedding = interleaved_frame_embedding(num_frames, x.shape[1], x.device) * self.config.motion_scale
        x = x + embedding.repeat(batch, 1)[:, :, None, None].to(x.dtype)
        features, per_level = [], self.config.blocks_per_level
        for index, block in enumerate(self.body):
            x = block(x)
            if (index + 1) % per_level == 0:
                features.append(x)
        return features


@contextlib.contextmanager
def features_before_motion_modules(unet, features: list[torch.Tensor], layer: int = 0):
    """While active, ``features[l]`` is added to the input of motion module ``layer`` of ``unet.down_blocks[l]``
    (``layer`` 0: the down block's features after its first ResNet/attention, before any temporal layer; an
    adapter's ``injection_layer`` says which it was trained with). A UNet batch that is a whole multiple of the
    features' (classifier-free guidance's unconditional and conditional halves) gets them repeated, one copy per
    part."""
    if len(features) != len(unet.down_blocks):
        raise ValueError(f"{len(features)} adapter feature maps for a UNet with {len(unet.down_blocks)} down blocks; "
                         "build the adapter with the UNet's block_out_channels")
    if any(len(block.motion_modules) <= layer for block in unet.down_blocks):
        raise ValueError(f"the adapter adds its features before motion module {layer} of every down block; this UNet's "
                         f"down blocks have {[len(block.motion_modules) for block in unet.down_blocks]}")
    handles = []
    for block, feature in zip(unet.down_blocks, features):
        def add(module, args, kwargs, feature=feature):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            parts = hidden.shape[0] // max(feature.shape[0], 1)
            if parts > 1 and hidden.shape[0] == parts * feature.shape[0]:
                feature = feature.repeat(parts, *(1,) * (feature.dim() - 1))
            if hidden.shape != feature.shape:
                raise ValueError(f"adapter feature {tuple(feature.shape)} does not match the UNet's "
                                 f"{tuple(hidden.shape)}; the latent size must be divisible by "
                                 f"{2 ** (len(unet.down_blocks) - 1)}")
            return (hidden + feature.to(hidden.dtype), *args[1:]), kwargs
        handles.append(block.motion_modules[layer].register_forward_pre_hook(add, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def text_per_frame(text: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """Prompt embeddings ``[B, L, D]`` repeated to ``[B*F, L, D]`` for a video ``sample [B, C, F, h, w]`` (what
    UNetMotionModel expects); unchanged for an image batch."""
    if sample.dim() == 5 and text.shape[0] == sample.shape[0]:
        return text.repeat_interleave(sample.shape[2], dim=0)
    return text


class VideoDenoiser(nn.Module):
    """``model(sample [B, C, F, h, w] or [B, C, h, w], timestep [B], condition) -> model output`` for a plain
    diffusers UNet (2D or motion), ``condition["text"]`` the prompt embeddings."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, condition):
        return self.unet(sample, timestep, encoder_hidden_states=text_per_frame(condition["text"], sample)).sample


class ImageToVideoModel(nn.Module):
    """A (frozen) UNetMotionModel driven by an :class:`ImageToVideoAdapter` on ``condition["first_frame"]``."""

    def __init__(self, unet, adapter: ImageToVideoAdapter):
        super().__init__()
        self.unet, self.adapter = unet, adapter

    def forward(self, sample, timestep, condition):
        features = self.adapter(condition["first_frame"], num_frames=sample.shape[2])
        with features_before_motion_modules(self.unet, features, self.adapter.injection_layer):
            return self.unet(sample, timestep, encoder_hidden_states=text_per_frame(condition["text"], sample)).sample


class ControlledVideoModel(nn.Module):
    """A UNetMotionModel with a per-frame ControlNet on ``condition["control"] [B, F, 3, H, W]`` (values in
    [0, 1]; resized to the ControlNet's input size, 8 h for SD1.5, when it differs), its residuals scaled by
    ``conditioning_scale``."""

    def __init__(self, unet, controlnet, conditioning_scale: float = 1.0):
        super().__init__()
        self.unet, self.controlnet, self.conditioning_scale = unet, controlnet, conditioning_scale

    def forward(self, sample, timestep, condition):
        batch, _, frames = sample.shape[:3]
        text, control = text_per_frame(condition["text"], sample), condition["control"]
        if control.shape[:2] != (batch, frames):
            raise ValueError(f"control images {tuple(control.shape)} do not match {batch} clips of {frames} frames")
        frame_sample = sample.permute(0, 2, 1, 3, 4).reshape(batch * frames, *sample.shape[1:2], *sample.shape[3:])
        control = control.flatten(0, 1)
        factor = 2 ** (len(self.controlnet.config.conditioning_embedding_out_channels) - 1)
        size = (sample.shape[-2] * factor, sample.shape[-1] * factor)
        if control.shape[-2:] != size:  # the VAE's downsampling differs from the ControlNet's embedding
            control = torch.nn.functional.interpolate(control.float(), size=size, mode="bilinear",
                                                      antialias=True, align_corners=False)
        down, mid = self.controlnet(frame_sample, timestep.repeat_interleave(frames),
                                    encoder_hidden_states=text,
                                    controlnet_cond=control.to(frame_sample.dtype),
                                    conditioning_scale=self.conditioning_scale, return_dict=False)
        return self.unet(sample, timestep, encoder_hidden_states=text, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid).sample


def edge_maps(pixels: torch.Tensor) -> torch.Tensor:
    """Control images from frames: ``pixels [..., 3, H, W]`` in [-1, 1] -> Sobel gradient magnitude of the
    luminance, normalised to [0, 1] per frame, repeated to 3 channels ``[..., 3, H, W]``."""
    shape = pixels.shape
    gray = (0.299 * pixels[..., 0, :, :] + 0.587 * pixels[..., 1, :, :] + 0.114 * pixels[..., 2, :, :])
    gray = gray.reshape(-1, 1, *shape[-2:]).float()
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=pixels.device)
    kernels = torch.stack([kx, kx.t()])[:, None]
    gradients = torch.nn.functional.conv2d(torch.nn.functional.pad(gray, (1, 1, 1, 1), mode="replicate"), kernels)
    magnitude = gradients.pow(2).sum(1, keepdim=True).sqrt()
    magnitude = magnitude / magnitude.amax(dim=(-2, -1), keepdim=True).clamp(min=1e-6)
    return magnitude.expand(-1, 3, -1, -1).reshape(shape).to(pixels.dtype)
