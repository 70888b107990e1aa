"""``AnimateLCMPipeline`` (text or image to video), ``AnimateLCMControlNetPipeline`` (control frames to video),
``AnimateLCMVideoToVideoPipeline`` (a video redrawn) and ``AnimateLCMVideoToVideoControlNetPipeline`` (a video
redrawn following control frames): diffusers' AnimateDiff pipelines with AnimateLCM's defaults and the fused
scheduler."""

import json
import numbers
import types
from pathlib import Path
from typing import Optional, Union

import torch
from diffusers import (AnimateDiffControlNetPipeline, AnimateDiffPipeline, AnimateDiffSparseControlNetPipeline,
                       AnimateDiffVideoToVideoControlNetPipeline, AnimateDiffVideoToVideoPipeline, AutoencoderKL,
                       ControlNetModel, MotionAdapter, SparseControlNetModel, UNet2DConditionModel, UNetMotionModel)
from diffusers import LCMScheduler as DiffusersLCMScheduler
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.animatediff.pipeline_output import AnimateDiffPipelineOutput
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

from . import diffusers_notices  # noqa: F401 (its filter is installed at import)
from .adapters import AnimateLCMImageEncoder, ImageToVideoAdapter, features_before_motion_modules
from .motion_prompt import inflate, motion_cross_attention_dim
from .schedulers import LCMScheduler, animatelcm_scheduler

DEFAULT_STEPS = 4
DEFAULT_GUIDANCE = 1.0
DEFAULT_FRAMES = 16
DEFAULT_STRENGTH = 0.8  # diffusers' AnimateDiffVideoToVideoPipeline's


def _animatelcm_parts(unet, motion_adapter, scheduler):
    """``(unet, scheduler)`` as AnimateLCM's pipelines take them: the default scheduler when None, a plain
    ``diffusers.LCMScheduler`` upgraded to :class:`animatelcm.LCMScheduler` (same config), and a UNet2DConditionModel
    inflated here when the motion modules attend to the prompt (diffusers' inflation knows only text-blind ones)."""
    if scheduler is None:
        scheduler = animatelcm_scheduler()
    elif type(scheduler) is DiffusersLCMScheduler:
        scheduler = LCMScheduler.from_config(scheduler.config)
    if isinstance(unet, UNet2DConditionModel) and motion_cross_attention_dim(motion_adapter) is not None:
        unet = inflate(unet, motion_adapter)
    return unet, scheduler


class _AnimateLCMDefaults:
    """What AnimateLCM's pipelines add to diffusers': argument checks, ``num_videos_per_prompt`` honoured, and a
    ``save_pretrained`` whose folder also loads in plain diffusers."""

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As diffusers' ``save_pretrained``; the scheduler is recorded as ``diffusers.LCMScheduler`` (same config)
        so the folder loads in plain diffusers too (this class upgrades it again when loading)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        index_path = Path(save_directory) / "model_index.json"
        index = json.loads(index_path.read_text())
        if isinstance(self.scheduler, LCMScheduler):
            index["scheduler"] = ["diffusers", "LCMScheduler"]
            index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def enable_free_noise(self, *args, **kwargs):
        """diffusers' FreeNoise (longer clips in overlapping windows), refused with a reason for prompted motion
        modules (:mod:`animatelcm.motion_prompt`), whose prompt attention FreeNoise's rebuilt blocks would drop."""
        width = motion_cross_attention_dim(self.unet)
        if width is not None:
            raise ValueError(f"FreeNoise rebuilds the motion modules' blocks without their prompt attention "
                             f"(this model's attend to the prompt: motion_cross_attention_dim={width}); generate at "
                             f"most {self.max_frames()} frames with it")
        return super().enable_free_noise(*args, **kwargs)

    def _batched_prompts(self, prompt, kwargs: dict, num_videos_per_prompt: int):
        """The prompts (and negative prompts, embeddings) for ``num_videos_per_prompt`` videos each; under FreeNoise
        as given: one video a call, its prompt a string or diffusers' ``{frame: prompt}`` dict."""
        if not self.free_noise_enabled:
            return _repeat_prompts(prompt, kwargs, num_videos_per_prompt)
        if num_videos_per_prompt != 1:
            raise ValueError("num_videos_per_prompt > 1 with FreeNoise is not supported: FreeNoise makes one video a "
                             "call; call the pipeline once per video")
        return prompt, kwargs

    def max_frames(self) -> int | None:
        """Longest clip the motion modules' positional table allows (None when it cannot be read)."""
        adapter = getattr(self, "motion_adapter", None)
        if adapter is not None:
            return adapter.config.motion_max_seq_length
        for name, buffer in self.unet.named_buffers():
            if name.endswith("pos_embed.pe"):
                return buffer.shape[1]
        return None

    def encode_prompt(self, prompt, device, num_images_per_prompt, do_classifier_free_guidance, negative_prompt=None,
                      prompt_embeds=None, negative_prompt_embeds=None, lora_scale=None, clip_skip=None):
        """diffusers' ``encode_prompt`` (``prompt_embeds [B, 77, D]``, ``negative_prompt_embeds``). With
        ``clip_skip`` it also works with transformers 5's ``CLIPTextModel``, which has no ``text_model``, where
        diffusers reads the final LayerNorm it applies to the earlier layer's output (same arithmetic)."""
        encoder = self.text_encoder
        layers = getattr(getattr(encoder, "config", None), "num_hidden_layers", None)
        if clip_skip is not None and prompt_embeds is None and layers is not None and not (
                isinstance(clip_skip, numbers.Integral) and 0 <= clip_skip <= layers):
            raise ValueError(f"clip_skip={clip_skip!r}: the text encoder has {layers} layers; skip 0 to {layers} "
                             "of them")
        arguments = (prompt, device, num_images_per_prompt, do_classifier_free_guidance, negative_prompt,
                     prompt_embeds, negative_prompt_embeds, lora_scale, clip_skip)
        if (clip_skip is None or encoder is None or hasattr(encoder, "text_model")
                or not hasattr(encoder, "final_layer_norm")):
            return super().encode_prompt(*arguments)
        encoder.__dict__["text_model"] = types.SimpleNamespace(final_layer_norm=encoder.final_layer_norm)
        try:
            return super().encode_prompt(*arguments)
        finally:
            del encoder.__dict__["text_model"]

    def _check_latents(self, latents, videos: int, num_frames: int, height, width):
        """Given ``latents`` must be ``[videos, C, num_frames, h, w]``, with ``h, w = height / 8, width / 8`` when
        ``height`` or ``width`` is given (else the latents set the size, as in diffusers); diffusers would fail deep
        in the UNet, or return a clip of another size than asked for."""
        if latents is None:
            return
        factor = self.vae_scale_factor
        expected = [videos, self.unet.config.in_channels, num_frames]
        if height is not None or width is not None:
            height = height or self.unet.config.sample_size * factor
            width = width or self.unet.config.sample_size * factor
            if height % factor or width % factor:
                return  # diffusers' own check says what is wrong
            expected += [height // factor, width // factor]
        got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else None
        if got is None or len(got) != 5 or list(got[:len(expected)]) != expected:
            spatial = f"height / {factor}, width / {factor}" if len(expected) == 5 else "h, w"
            shape = ", ".join(map(str, expected + (["h", "w"] if len(expected) == 3 else [])))
            raise ValueError(f"latents must be a tensor of shape [{shape}] (videos = prompts x "
                             f"num_videos_per_prompt, latent channels, frames, {spatial}); got "
                             f"{got if got is not None else type(latents).__name__}")

    def _check_call_arguments(self, num_frames, num_inference_steps, guidance_scale, decode_chunk_size, output_type,
                              num_videos_per_prompt):
        if not isinstance(num_frames, numbers.Integral) or num_frames < 1:
            raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
        limit = self.max_frames()
        if limit is not None and num_frames > limit and not self.free_noise_enabled:
            longer = ("" if motion_cross_attention_dim(self.unet) is not None else
                      " or enable FreeNoise (pipe.enable_free_noise(), or --free-noise on the command line) for "
                      "longer clips")
            raise ValueError(f"a clip of {num_frames} frames exceeds the motion module's positional table "
                             f"({limit} frames); generate at most {limit} frames (--frames {limit} takes the first "
                             f"{limit} of a --video or --control clip){longer}")
        window = getattr(self, "_free_noise_context_length", None) if self.free_noise_enabled else None
        if isinstance(window, int) and num_frames < window:
            raise ValueError(f"FreeNoise's window ({window} frames) is longer than the clip ({num_frames} frames), "
                             f"which leaves diffusers' FreeNoise blocks no window to denoise; enable it with "
                             f"context_length={num_frames} (one window: plain sampling, with a per-frame prompt "
                             f"dict) or generate at least {window} frames")
        if not isinstance(num_inference_steps, numbers.Integral) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        if not isinstance(guidance_scale, numbers.Real) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a non-negative number, got {guidance_scale!r}")
        if not isinstance(decode_chunk_size, numbers.Integral) or decode_chunk_size < 1:
            raise ValueError(f"decode_chunk_size must be a positive integer, got {decode_chunk_size!r}")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be one of 'pil', 'np', 'pt', 'latent'; got {output_type!r}")
        if not isinstance(num_videos_per_prompt, numbers.Integral) or num_videos_per_prompt < 1:
            raise ValueError(f"num_videos_per_prompt must be a positive integer, got {num_videos_per_prompt!r}")


class AnimateLCMPipeline(_AnimateLCMDefaults, AnimateDiffPipeline):
    """Text-to-video (and, with an image adapter, image-to-video) in a few steps with an AnimateLCM motion module
    and LCM LoRA.

    Accepts everything :class:`diffusers.AnimateDiffPipeline` accepts. Differences: ``scheduler`` may be omitted
    (AnimateLCM's: :func:`animatelcm_scheduler`, linear betas, ``original_inference_steps=100``); a plain
    ``diffusers.LCMScheduler`` is replaced by :class:`animatelcm.LCMScheduler` with the same config (same results,
    fused step); ``__call__`` defaults to 4 steps, guidance 1.0 (no negative branch) and 16 frames.
    With the same components, latents and generator it produces what ``AnimateDiffPipeline`` with
    ``diffusers.LCMScheduler`` produces.

    ``image_adapter`` (optional, an :class:`animatelcm.adapters.ImageToVideoAdapter`, e.g. trained by the
    ``teacher_free`` stage with ``adapter.kind: i2v``, or the :class:`animatelcm.adapters.AnimateLCMImageEncoder` of
    AnimateLCM's released I2V model) lets ``__call__`` take an ``image``: the clip then starts from that picture
    (saved and loaded with the pipeline like any other component).

    Output of ``__call__``: ``frames`` as a list (per video) of PIL images (``output_type="pil"``), an array
    ``[B, F, H, W, 3]`` in [0, 1] (``"np"``), a tensor ``[B, F, 3, H, W]`` (``"pt"``), or the latents
    ``[B, 4, F, H/8, W/8]`` (``"latent"``).
    """

    # scheduler has a default here, so diffusers' from_pretrained must be told it is a component.
    _optional_components = [*AnimateDiffPipeline._optional_components, "scheduler", "image_adapter"]
    model_cpu_offload_seq = "text_encoder->image_encoder->image_adapter->unet->vae"

    # The diffusers models' annotations are what DiffusionPipeline.from_pipe reads to carry components over.
    # typing.Union, not X | Y, and no postponed annotations: diffusers before 0.35 maps components to classes from
    # these annotations (from_pipe) and reads only classes and typing.Union there.
    def __init__(self, vae: AutoencoderKL, text_encoder, tokenizer, unet: Union[UNet2DConditionModel, UNetMotionModel],
                 motion_adapter: MotionAdapter, scheduler=None, feature_extractor=None, image_encoder=None,
                 image_adapter: Optional[Union[ImageToVideoAdapter, AnimateLCMImageEncoder]] = None):
        unet, scheduler = _animatelcm_parts(unet, motion_adapter, scheduler)
        super().__init__(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                         motion_adapter=motion_adapter, scheduler=scheduler, feature_extractor=feature_extractor,
                         image_encoder=image_encoder)
        self.register_modules(image_adapter=image_adapter)

    def __setattr__(self, name, value):
        # diffusers records a component assigned after it was registered as None only through register_modules;
        # without this, `pipe.image_adapter = adapter` would run but save_pretrained would leave the adapter out.
        if (name == "image_adapter" and value is not None and name in self.__dict__
                and self.config.image_adapter[0] is None):
            self.register_modules(image_adapter=value)
            return
        super().__setattr__(name, value)

    def __call__(self, prompt=None, num_frames: int = DEFAULT_FRAMES, height=None, width=None,
                 num_inference_steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE,
                 output_type: str = "pil", decode_chunk_size: int = 16, num_videos_per_prompt: int = 1,
                 image=None, match_image_colors: bool = False, **kwargs):
        """Generate videos; arguments as :meth:`diffusers.AnimateDiffPipeline.__call__` (latents
        ``[B, 4, F, H/8, W/8]``), with AnimateLCM defaults: 4 steps, guidance 1.0, 16 frames.

        ``num_videos_per_prompt`` is honoured (diffusers' AnimateDiffPipeline silently makes one video per prompt):
        each prompt (and negative prompt, or their embeddings) is repeated that many times, so B = prompts x
        ``num_videos_per_prompt``, each video with its own noise.

        ``image`` (needs ``image_adapter``): the first frame to animate, one for every video or one per prompt, as
        PIL images, arrays ``[H, W, 3]`` / ``[N, H, W, 3]`` or tensors ``[3, H, W]`` / ``[N, 3, H, W]`` with values
        in [0, 1], or a list of those (sizes and kinds may differ); each resized to ``height`` x ``width``. Its VAE latent (the distribution's mean) drives the adapter,
        whose features are added before motion module ``image_adapter.injection_layer`` of every down block, on
        both halves of classifier-free guidance (as the adapter was trained).

        ``match_image_colors`` (with ``image``, decoded output types only): shift each decoded frame's mean hue,
        saturation and value towards its video's picture (:func:`match_picture_colors`), the post-processing of
        AnimateLCM-I2V's demo against the colour drift of its few-step samples."""
        self._check_call_arguments(num_frames, num_inference_steps, guidance_scale, decode_chunk_size, output_type,
                                   num_videos_per_prompt)
        prompts = _prompt_count(prompt, kwargs)
        self._check_latents(kwargs.get("latents"), prompts * num_videos_per_prompt, num_frames, height, width)
        prompt, kwargs = self._batched_prompts(prompt, kwargs, num_videos_per_prompt)
        arguments = dict(prompt=prompt, num_frames=num_frames, height=height, width=width,
                         num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                         output_type=output_type, decode_chunk_size=decode_chunk_size, **kwargs)
        if match_image_colors and (image is None or output_type == "latent"):
            raise ValueError("match_image_colors=True shifts decoded frames towards the image: it needs image= and "
                             f"an output_type of pil, np or pt (got image={type(image).__name__}, "
                             f"output_type={output_type!r})")
        if image is None:
            return super().__call__(**arguments)
        features, pixels = self._image_features(image, prompts, num_videos_per_prompt, num_frames, height, width)
        if match_image_colors:
            arguments["output_type"] = "pt"
        with features_before_motion_modules(self.unet, features, self.image_adapter.injection_layer):
            output = super().__call__(**arguments)
        if not match_image_colors:
            return output
        return_dict = kwargs.get("return_dict", True)
        frames = match_picture_colors(output.frames if return_dict else output[0], (pixels + 1) / 2)
        if output_type == "np":
            frames = frames.permute(0, 1, 3, 4, 2).cpu().float().numpy()
        elif output_type == "pil":
            frames = [self.video_processor.numpy_to_pil(video.permute(0, 2, 3, 1).cpu().float().numpy())
                      for video in frames]
        return AnimateDiffPipelineOutput(frames=frames) if return_dict else (frames,)

    @torch.no_grad()
    def _image_features(self, image, prompts: int, num_videos_per_prompt: int, num_frames: int, height, width):
        """``(features, pixels)``: the image adapter's feature maps ``[B*F, C_l, h_l, w_l]`` per down block for
        B = prompts x ``num_videos_per_prompt`` videos, and the pictures they came from ``[B, 3, H, W]`` in
        [-1, 1]."""
        if self.image_adapter is None:
            raise ValueError("image= needs an image adapter: build the pipeline with image_adapter="
                             "ImageToVideoAdapter.from_pretrained(...) (the teacher_free stage with adapter.kind: i2v "
                             "writes one to final/i2v_adapter), or leave image out for text-to-video")
        adapter_widths = tuple(self.image_adapter.config.block_out_channels)
        if adapter_widths != tuple(self.unet.config.block_out_channels):
            raise ValueError(f"the image adapter was built for a UNet with block widths {adapter_widths}, this model's "
                             f"are {tuple(self.unet.config.block_out_channels)}: use an adapter trained on this model")
        if self.free_noise_enabled:
            raise ValueError("image= with FreeNoise is not supported: the adapter embeds the frame index of the whole "
                             "clip, FreeNoise denoises windows of it; call pipe.disable_free_noise() first")
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        # the pipeline's video processor does not resize; a fresh one with diffusers' defaults does. Each item of a
        # list on its own, so the pictures may differ in size and kind.
        processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        pixels = torch.cat([processor.preprocess(_as_image_batch(item), height=height, width=width)
                            for item in (image if isinstance(image, (list, tuple)) else [image])])
        videos = prompts * num_videos_per_prompt
        if pixels.shape[0] == prompts and num_videos_per_prompt > 1:
            pixels = pixels.repeat_interleave(num_videos_per_prompt, dim=0)
        elif pixels.shape[0] == 1:
            pixels = pixels.expand(videos, -1, -1, -1)
        if pixels.shape[0] != videos:
            raise ValueError(f"got {pixels.shape[0]} images for {prompts} prompt(s); give one image, or one per "
                             "prompt")
        device = self._execution_device  # (with model CPU offload, the hooks bring the VAE and adapter there)
        latent = self.vae.encode(pixels.to(device, self.vae.dtype)).latent_dist.mode()
        return self.image_adapter(latent * self.vae.config.scaling_factor, num_frames=num_frames), pixels


class _ControlNetParts:
    """The constructor of AnimateLCM's ControlNet pipelines: diffusers' components, with the scheduler and UNet as
    :func:`_animatelcm_parts` makes them. (diffusers reads the components and their classes from this signature;
    the SparseCtrl pipeline takes a SparseControlNetModel, the others a ControlNetModel or several.)"""

    def __init__(self, vae: AutoencoderKL, text_encoder, tokenizer, unet: Union[UNet2DConditionModel, UNetMotionModel],
                 motion_adapter: MotionAdapter,
                 controlnet: Union[ControlNetModel, list[ControlNetModel], tuple[ControlNetModel], MultiControlNetModel,
                                   SparseControlNetModel],
                 scheduler=None, feature_extractor=None, image_encoder=None):
        unet, scheduler = _animatelcm_parts(unet, motion_adapter, scheduler)
        super().__init__(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                         motion_adapter=motion_adapter, controlnet=controlnet, scheduler=scheduler,
                         feature_extractor=feature_extractor, image_encoder=image_encoder)


class AnimateLCMControlNetPipeline(_ControlNetParts, _AnimateLCMDefaults, AnimateDiffControlNetPipeline):
    """Control frames (edges, depth, poses, or the frames themselves, per the ControlNet) to video in a few steps:
    diffusers' :class:`~diffusers.AnimateDiffControlNetPipeline` with AnimateLCM's scheduler and defaults (4 steps,
    guidance 1.0, 16 frames), ``num_videos_per_prompt`` honoured. ``controlnet`` is a diffusers ControlNetModel (or
    several), e.g. one adapted by the ``teacher_free`` stage with ``adapter.kind: controlnet_lora``
    (``final/controlnet``). Build one from a loaded pipeline with
    ``AnimateLCMControlNetPipeline.from_pipe(pipe, controlnet=controlnet)``.

    ``__call__(prompt, conditioning_frames=[F images], ...)``: the control images (PIL, or arrays ``[H, W, 3]`` /
    tensors ``[3, H, W]`` of one shape in [0, 1]; or one array ``[F, H, W, 3]`` / tensor ``[F, 3, H, W]``), one per
    frame, resized to ``height`` x ``width``; output as :class:`AnimateLCMPipeline`'s."""

    _optional_components = [*AnimateDiffControlNetPipeline._optional_components, "scheduler"]

    def __call__(self, prompt=None, num_frames: int = DEFAULT_FRAMES, height=None, width=None,
                 num_inference_steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE,
                 output_type: str = "pil", decode_chunk_size: int = 16, num_videos_per_prompt: int = 1,
                 conditioning_frames=None, **kwargs):
        """Generate videos that follow ``conditioning_frames`` (one control image per frame; required); the other
        arguments as :meth:`AnimateLCMPipeline.__call__`."""
        self._check_call_arguments(num_frames, num_inference_steps, guidance_scale, decode_chunk_size, output_type,
                                   num_videos_per_prompt)
        conditioning_frames = _checked_conditioning_frames(self.controlnet, conditioning_frames, num_frames)
        self._check_latents(kwargs.get("latents"), _prompt_count(prompt, kwargs) * num_videos_per_prompt,
                            num_frames, height, width)
        prompt, kwargs = self._batched_prompts(prompt, kwargs, num_videos_per_prompt)
        return super().__call__(prompt=prompt, num_frames=num_frames, height=height, width=width,
                                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                output_type=output_type, decode_chunk_size=decode_chunk_size,
                                conditioning_frames=conditioning_frames, **kwargs)

    def prepare_video(self, video, width, height, batch_size, num_videos_per_prompt, device, dtype,
                      do_classifier_free_guidance=False, guess_mode=False):
        """The control images as :func:`_control_images` prepares them."""
        return _control_images(self, super().prepare_video, video, width, height, batch_size, num_videos_per_prompt,
                               device, dtype, do_classifier_free_guidance and not guess_mode)


class AnimateLCMVideoToVideoPipeline(_AnimateLCMDefaults, AnimateDiffVideoToVideoPipeline):
    """A video redrawn to a prompt in a few steps: diffusers' :class:`~diffusers.AnimateDiffVideoToVideoPipeline`
    with AnimateLCM's scheduler and defaults (4 steps, guidance 1.0, ``strength`` 0.8: the last
    ``int(steps * strength)`` steps of the schedule run, from the video's latents noised to the first of them),
    ``num_videos_per_prompt`` honoured and one clip serving several prompts. Build one from a loaded pipeline with
    ``AnimateLCMVideoToVideoPipeline.from_pipe(pipe)``.

    ``__call__(video, prompt, ...)``: ``video`` is one clip for every video, as a list of frames (PIL images, arrays
    ``[H, W, 3]`` or tensors ``[3, H, W]`` in [0, 1]), an array ``[F, H, W, 3]`` or a tensor ``[F, 3, H, W]``; or a
    list of such clips, one per prompt. Each frame is resized to ``height`` x ``width``. Output as
    :class:`AnimateLCMPipeline`'s, with as many frames as the clip."""

    _optional_components = [*AnimateDiffVideoToVideoPipeline._optional_components, "scheduler"]

    def __init__(self, vae: AutoencoderKL, text_encoder, tokenizer, unet: Union[UNet2DConditionModel, UNetMotionModel],
                 motion_adapter: MotionAdapter, scheduler=None, feature_extractor=None, image_encoder=None):
        unet, scheduler = _animatelcm_parts(unet, motion_adapter, scheduler)
        super().__init__(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                         motion_adapter=motion_adapter, scheduler=scheduler, feature_extractor=feature_extractor,
                         image_encoder=image_encoder)

    def __call__(self, video=None, prompt=None, height=None, width=None, num_inference_steps: int = DEFAULT_STEPS,
                 guidance_scale: float = DEFAULT_GUIDANCE, strength: float = DEFAULT_STRENGTH,
                 output_type: str = "pil", decode_chunk_size: int = 16, num_videos_per_prompt: int = 1, **kwargs):
        """Redraw ``video`` (required) to ``prompt``; the other arguments as :meth:`AnimateLCMPipeline.__call__`
        and diffusers' ``strength`` (in (0, 1]; ``int(num_inference_steps * strength)`` must be at least 1)."""
        clips, prompt, kwargs, _ = _video_call(self, video, prompt, kwargs, height, width, num_inference_steps,
                                               guidance_scale, strength, output_type, decode_chunk_size,
                                               num_videos_per_prompt)
        return super().__call__(video=clips, prompt=prompt, height=height, width=width,
                                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                strength=strength, output_type=output_type, decode_chunk_size=decode_chunk_size,
                                **kwargs)


class AnimateLCMVideoToVideoControlNetPipeline(_ControlNetParts, _AnimateLCMDefaults,
                                               AnimateDiffVideoToVideoControlNetPipeline):
    """A video redrawn to a prompt while following control frames (poses, depth, edges of it, say): diffusers'
    :class:`~diffusers.AnimateDiffVideoToVideoControlNetPipeline` with AnimateLCM's scheduler and defaults, the
    video as :class:`AnimateLCMVideoToVideoPipeline` takes it and the control frames as
    :class:`AnimateLCMControlNetPipeline` takes them (one per frame of the video). Build one with
    ``AnimateLCMVideoToVideoControlNetPipeline.from_pipe(pipe, controlnet=controlnet)``."""

    _optional_components = [*AnimateDiffVideoToVideoControlNetPipeline._optional_components, "scheduler"]

    def __call__(self, video=None, prompt=None, height=None, width=None, num_inference_steps: int = DEFAULT_STEPS,
                 guidance_scale: float = DEFAULT_GUIDANCE, strength: float = DEFAULT_STRENGTH,
                 output_type: str = "pil", decode_chunk_size: int = 16, num_videos_per_prompt: int = 1,
                 conditioning_frames=None, **kwargs):
        """Redraw ``video`` following ``conditioning_frames`` (one control image per frame of the video; both
        required); the other arguments as :meth:`AnimateLCMVideoToVideoPipeline.__call__`."""
        clips, prompt, kwargs, frames = _video_call(self, video, prompt, kwargs, height, width, num_inference_steps,
                                                    guidance_scale, strength, output_type, decode_chunk_size,
                                                    num_videos_per_prompt)
        conditioning_frames = _checked_conditioning_frames(self.controlnet, conditioning_frames, frames)
        return super().__call__(video=clips, prompt=prompt, height=height, width=width,
                                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                strength=strength, output_type=output_type, decode_chunk_size=decode_chunk_size,
                                conditioning_frames=conditioning_frames, **kwargs)

    def check_inputs(self, *args, video=None, **kwargs):
        """diffusers' checks, shown the first clip: they count the frames as ``len(video)``, which for the list of
        clips this class passes (one per video) is the number of videos."""
        return super().check_inputs(*args, video=video[0] if video else video, **kwargs)

    def prepare_conditioning_frames(self, video, width, height, batch_size, num_videos_per_prompt, device, dtype,
                                    do_classifier_free_guidance=False, guess_mode=False):
        """The control images as :func:`_control_images` prepares them."""
        return _control_images(self, super().prepare_conditioning_frames, video, width, height, batch_size,
                               num_videos_per_prompt, device, dtype, do_classifier_free_guidance and not guess_mode)


class AnimateLCMSparseControlNetPipeline(_ControlNetParts, _AnimateLCMDefaults, AnimateDiffSparseControlNetPipeline):
    """Video from a prompt and control images at a few of its frames (AnimateDiff v3's SparseCtrl: RGB frames,
    scribbles) in a few steps: diffusers' :class:`~diffusers.AnimateDiffSparseControlNetPipeline` with AnimateLCM's
    scheduler and defaults (4 steps, guidance 1.0, 16 frames), ``num_videos_per_prompt`` honoured (each video
    follows the same control images) and the VAE decode in chunks of ``decode_chunk_size`` frames, as the other
    pipelines'. ``controlnet`` is a :class:`diffusers.SparseControlNetModel`
    (:func:`animatelcm.loading.load_sparse_controlnet`). Build one from a loaded pipeline with
    ``AnimateLCMSparseControlNetPipeline.from_pipe(pipe, controlnet=controlnet)``.

    ``__call__(prompt, conditioning_frames=[images], controlnet_frame_indices=[frames], ...)``: one control image
    (PIL, array ``[H, W, 3]`` or tensor ``[3, H, W]`` in [0, 1]) per index, each resized to ``height`` x
    ``width``; an RGB model reads them through the VAE, a scribble model as they are. FreeNoise is not available
    here (diffusers' SparseCtrl pipeline has none)."""

    _optional_components = [*AnimateDiffSparseControlNetPipeline._optional_components, "scheduler"]
    free_noise_enabled = False  # diffusers' SparseCtrl pipeline has no FreeNoise

    def enable_free_noise(self, *args, **kwargs):
        """Refused: diffusers' SparseCtrl pipeline has no FreeNoise."""
        raise ValueError("the SparseCtrl pipeline has no FreeNoise (diffusers' has none); generate at most "
                         f"{self.max_frames()} frames with it")

    def __call__(self, prompt=None, num_frames: int = DEFAULT_FRAMES, height=None, width=None,
                 num_inference_steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE,
                 output_type: str = "pil", decode_chunk_size: int = 16, num_videos_per_prompt: int = 1,
                 conditioning_frames=None, controlnet_frame_indices=(0,), **kwargs):
        """Generate videos whose frames ``controlnet_frame_indices`` (distinct, in ``[0, num_frames)``) follow
        ``conditioning_frames`` (one control image each, in that order; required); the other arguments as
        :meth:`AnimateLCMPipeline.__call__`."""
        self._check_call_arguments(num_frames, num_inference_steps, guidance_scale, decode_chunk_size, output_type,
                                   num_videos_per_prompt)
        if conditioning_frames is None:
            raise ValueError("conditioning_frames is required: one control image per index of "
                             "controlnet_frame_indices")
        if not isinstance(conditioning_frames, (list, tuple)) and getattr(conditioning_frames, "ndim", 3) == 3:
            conditioning_frames = [conditioning_frames]  # one image (PIL, [H, W, 3] or [3, H, W])
        conditioning_frames = _frame_list(conditioning_frames, "conditioning_frames")
        indices = list(controlnet_frame_indices)
        if not indices or any(not isinstance(i, numbers.Integral) or not 0 <= i < num_frames for i in indices) or (
                len(set(indices)) != len(indices)):
            raise ValueError(f"controlnet_frame_indices must be distinct frame numbers in [0, {num_frames}), got "
                             f"{controlnet_frame_indices!r}")
        if len(conditioning_frames) != len(indices):
            raise ValueError(f"got {len(conditioning_frames)} conditioning frames for {len(indices)} frame indices "
                             f"{indices}; give one control image per index")
        self._check_latents(kwargs.get("latents"), _prompt_count(prompt, kwargs) * num_videos_per_prompt,
                            num_frames, height, width)
        prompt, kwargs = self._batched_prompts(prompt, kwargs, num_videos_per_prompt)
        self._decode_chunk_size = decode_chunk_size
        return super().__call__(prompt=prompt, num_frames=num_frames, height=height, width=width,
                                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                output_type=output_type, conditioning_frames=conditioning_frames,
                                controlnet_frame_indices=indices, **kwargs)

    def decode_latents(self, latents, decode_chunk_size: int | None = None):
        """diffusers' decode (latents ``[B, 4, F, h, w]`` -> float32 video ``[B, 3, F, H, W]``), ``decode_chunk_size``
        frames (default: the call's) at a time."""
        chunk = decode_chunk_size or getattr(self, "_decode_chunk_size", None) or 16
        latents = latents / self.vae.config.scaling_factor
        batch, channels, frames, height, width = latents.shape
        latents = latents.permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, height, width)
        image = torch.cat([self.vae.decode(latents[i:i + chunk]).sample for i in range(0, len(latents), chunk)])
        return image[None, :].reshape((batch, frames, -1) + image.shape[2:]).permute(0, 2, 1, 3, 4).float()


def _video_call(pipe, video, prompt, kwargs: dict, height, width, num_inference_steps, guidance_scale, strength,
                output_type, decode_chunk_size, num_videos_per_prompt):
    """``(clips, prompt, kwargs, frames)`` for a video-to-video call: the arguments checked, ``video`` as one clip
    (a list of frames) per video, the prompts batched as :meth:`_AnimateLCMDefaults._batched_prompts` does."""
    if video is None:
        raise ValueError("video is required: the clip to redraw, as a list of frames, an array [F, H, W, 3] or a "
                         "tensor [F, 3, H, W]")
    clips = _video_clips(video)
    lengths = sorted({len(clip) for clip in clips})
    if len(lengths) > 1:
        raise ValueError(f"the clips have {lengths} frames; give clips of one length")
    pipe._check_call_arguments(lengths[0], num_inference_steps, guidance_scale, decode_chunk_size, output_type,
                               num_videos_per_prompt)
    if not isinstance(strength, numbers.Real) or not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength!r}")
    if int(num_inference_steps * strength) < 1:
        raise ValueError(f"strength={strength} of num_inference_steps={num_inference_steps} runs no step "
                         f"(int(steps x strength) = 0): raise one of them")
    prompts = _prompt_count(prompt, kwargs)
    if len(clips) not in (1, prompts):
        raise ValueError(f"got {len(clips)} clips for {prompts} prompt(s); give one clip, or one per prompt")
    videos = prompts * num_videos_per_prompt
    pipe._check_latents(kwargs.get("latents"), videos, lengths[0], height, width)
    clips = clips * videos if len(clips) == 1 else [clip for clip in clips for _ in range(num_videos_per_prompt)]
    prompt, kwargs = pipe._batched_prompts(prompt, kwargs, num_videos_per_prompt)
    return clips, prompt, kwargs, lengths[0]


def _checked_conditioning_frames(controlnet, conditioning_frames, num_frames: int):
    """The control frames of a ControlNet pipeline's call, required and one per frame (for one ControlNet; a
    MultiControlNetModel takes a list of clips, checked by diffusers)."""
    if conditioning_frames is None:
        raise ValueError("conditioning_frames is required: one control image per frame")
    if isinstance(controlnet, MultiControlNetModel):
        return conditioning_frames
    conditioning_frames = _frame_list(conditioning_frames, "conditioning_frames")
    if isinstance(conditioning_frames, (list, tuple)) and conditioning_frames and len(conditioning_frames) != num_frames:
        raise ValueError(f"got {len(conditioning_frames)} conditioning frames for {num_frames} frames; give one "
                         "control image per frame")
    return conditioning_frames


def _control_images(pipe, prepare, video, width, height, batch_size, num_videos_per_prompt, device, dtype,
                    doubled: bool):
    """The control images ``[batch_size, 3, H', W']`` (``batch_size`` = videos x frames) from diffusers' ``prepare``
    (its ``prepare_video``): one copy of the clip per video (diffusers' own prepares a single clip whatever the
    number of prompts), doubled for guidance when ``doubled``. H' x W' is the latent size times the ControlNet's
    downsampling, as the ``teacher_free`` stage trains it: the pixel size for SD1.5 (both 8), twice it for a VAE
    that downsamples 4x."""
    controlnet = pipe.controlnet
    net = controlnet.nets[0] if isinstance(controlnet, MultiControlNetModel) else controlnet
    factor = 2 ** (len(net.config.conditioning_embedding_out_channels) - 1)
    height, width = height // pipe.vae_scale_factor * factor, width // pipe.vae_scale_factor * factor
    frames = prepare(video, width, height, batch_size, num_videos_per_prompt, device, dtype)
    if frames.shape[0] != batch_size and batch_size % frames.shape[0] == 0:
        frames = frames.repeat(batch_size // frames.shape[0], 1, 1, 1)
    return torch.cat([frames] * 2) if doubled else frames


def _video_clips(video) -> list[list]:
    """``video`` as a list of clips, each a list of frames (one clip, or a list of them)."""
    import numpy as np

    if isinstance(video, (list, tuple)) and video and (
            isinstance(video[0], (list, tuple)) or getattr(video[0], "ndim", 0) == 4):
        return [_frame_list(clip, "video") for clip in video]
    clip = _frame_list(video, "video")
    if not isinstance(clip, list) or not clip or isinstance(clip[0], (np.ndarray, torch.Tensor)) and clip[0].ndim != 3:
        raise TypeError(f"video must be a list of frames, an array [F, H, W, 3], a tensor [F, 3, H, W], or a list of "
                        f"those (one clip per prompt); got {type(video).__name__}")
    return [clip]


def _rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """``[..., 3, H, W]`` RGB in [0, 1] -> HSV on OpenCV's 8-bit scale: hue in [0, 180) (degrees / 2), saturation
    and value in [0, 255]."""
    red, green, blue = rgb.unbind(-3)
    value, low = rgb.amax(-3), rgb.amin(-3)
    spread = value - low
    safe = spread.clamp_min(1e-12)
    hue = torch.where(value == red, 60 * (green - blue) / safe,
                      torch.where(value == green, 120 + 60 * (blue - red) / safe, 240 + 60 * (red - green) / safe))
    hue = torch.where(spread > 0, hue, torch.zeros_like(hue)) % 360
    saturation = torch.where(value > 0, spread / value.clamp_min(1e-12), torch.zeros_like(value))
    return torch.stack([hue / 2, saturation * 255, value * 255], dim=-3)


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_rgb_to_hsv`: ``[..., 3, H, W]`` on OpenCV's 8-bit HSV scale -> RGB in [0, 1]."""
    hue, saturation, value = hsv.unbind(-3)
    sector = (hue * 2 / 60) % 6  # hue in sixths of the circle
    saturation, value = saturation / 255, value / 255

    def channel(n):  # the closed form of the piecewise HSV -> RGB map
        k = (n + sector) % 6
        return value - value * saturation * torch.clamp(torch.minimum(k, 4 - k), 0, 1)

    return torch.stack([channel(5), channel(3), channel(1)], dim=-3)


def match_picture_colors(frames: torch.Tensor, pictures: torch.Tensor, hue_weight: float = 0.03) -> torch.Tensor:
    """Frames with their colours moved towards a picture's, as AnimateLCM-I2V's demo post-processes its clips.

    For each frame, on OpenCV's 8-bit HSV scale: saturation and value are shifted by the whole difference between
    the picture's mean and the frame's mean, hue by ``hue_weight`` of it (hue is kept nearly as generated), each
    clipped to its range. (The demo rounds every stage to 8 bits; this computes in floating point.)

    Args:
        frames: ``[B, F, 3, H, W]`` RGB in [0, 1].
        pictures: ``[B, 3, H', W']`` (or ``[3, H', W']`` for every video) RGB in [0, 1], any size.
    Returns:
        ``[B, F, 3, H, W]`` RGB in [0, 1], the dtype and device of ``frames``.
    """
    if frames.dim() != 5 or frames.shape[2] != 3:
        raise ValueError(f"frames must be [B, F, 3, H, W] RGB, got shape {tuple(frames.shape)}")
    if pictures.dim() == 3:
        pictures = pictures[None]
    if pictures.dim() != 4 or pictures.shape[1] != 3 or pictures.shape[0] not in (1, frames.shape[0]):
        raise ValueError(f"pictures must be [B, 3, H, W] RGB with B = {frames.shape[0]} (or 1), got shape "
                         f"{tuple(pictures.shape)}")
    hsv = _rgb_to_hsv(frames.float().clamp(0, 1))
    target = _rgb_to_hsv(pictures.to(frames.device, torch.float32).clamp(0, 1)).mean(dim=(-2, -1))[:, None]
    shift = (target - hsv.mean(dim=(-2, -1))) * torch.tensor([hue_weight, 1.0, 1.0], device=frames.device)
    hsv = hsv + shift[..., None, None]
    limits = torch.tensor([180.0, 255.0, 255.0], device=frames.device)[:, None, None]
    hsv = torch.minimum(hsv.clamp_min(0), limits)
    return _hsv_to_rgb(hsv).to(frames.dtype)


def _frame_list(frames, name: str):
    """A clip's frames (the argument ``name``) as the list diffusers takes: an array ``[F, H, W, 3]`` or a tensor
    ``[F, 3, H, W]`` split into its frames; a list is checked for frames diffusers would fail to stack."""
    import numpy as np

    if isinstance(frames, (np.ndarray, torch.Tensor)):
        if frames.ndim != 4:
            raise ValueError(f"{name} as an array must be [F, H, W, 3] (a tensor [F, 3, H, W]), got shape "
                             f"{tuple(frames.shape)}")
        return list(frames)
    if isinstance(frames, (list, tuple)):
        shapes = {tuple(frame.shape) for frame in frames if isinstance(frame, (np.ndarray, torch.Tensor))}
        if len(shapes) > 1:
            raise ValueError(f"{name} given as arrays or tensors must share one shape, got {sorted(shapes)}; resize "
                             "them to one size first, or pass PIL images (resized for you)")
        return list(frames)
    return frames


def _prompt_count(prompt, kwargs: dict) -> int:
    """How many prompts (or prompt embeddings) a call names."""
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, (list, tuple)):
        return len(prompt)
    embeds = kwargs.get("prompt_embeds")
    return 1 if embeds is None else embeds.shape[0]


def _as_image_batch(image):
    """One picture or a stack of them as diffusers' image processor takes it: a PIL image, an array
    ``[N, H, W, 3]`` or a tensor ``[N, 3, H, W]`` in [0, 1]."""
    import numpy as np

    if isinstance(image, np.ndarray) and image.ndim == 3:
        return image[None]
    if isinstance(image, torch.Tensor) and image.dim() == 3:
        return image[None]
    if isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim == 4:
        return image
    if hasattr(image, "convert"):  # a PIL image
        return image.convert("RGB")
    shape = f" of shape {tuple(image.shape)}" if isinstance(image, (np.ndarray, torch.Tensor)) else ""
    raise TypeError(f"image must be a PIL image, an array [H, W, 3] / [N, H, W, 3], a tensor [3, H, W] / "
                    f"[N, 3, H, W], or a list of those; got {type(image).__name__}{shape}")


def _repeat_prompts(prompt, kwargs: dict, times: int = 1):
    """Each prompt, negative prompt and prompt embedding repeated ``times`` times in a row (the batch diffusers'
    AnimateDiffPipeline would build for ``num_videos_per_prompt`` if it did not force it to 1); one negative prompt
    string is given to every prompt (diffusers wants a list as long as the prompts)."""
    for name in ("ip_adapter_image", "ip_adapter_image_embeds"):
        if times > 1 and kwargs.get(name) is not None:
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
