"""The six training stages. Each builds its networks from the loaded parts, says which parameters train, computes
one micro-batch's loss, keeps its target network, and writes what it trained in formats that load back.

A stage's ``student`` is one ``nn.Module`` with ``forward(sample, timestep, condition) -> model output`` (see
:mod:`animatelcm.adapters`), so the trainer treats every stage alike (DDP wrapping, checkpoints, validation); the
``autoencoder`` stage's student is the VAE round trip ``forward(pixels, noise)`` and it trains on pixels.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from ..adapters import (ControlledVideoModel, ImageToVideoAdapter, ImageToVideoModel, VideoDenoiser,
                        edge_maps)
from . import models
from .distill import ConsistencyDistillationLoss, DistillationConfig


def _distillation_config(run, teacher_free: bool) -> DistillationConfig:
    d = run.distill
    return DistillationConfig(num_ddim_timesteps=d.num_ddim_timesteps, w_min=d.w_min, w_max=d.w_max,
                              huber_c=d.huber_c, timestep_scaling=d.timestep_scaling,
                              prediction_type=run.model.prediction_type, teacher_free=teacher_free,
                              timestep_range=run.train.timestep_range,
                              timestep_range_share=run.train.timestep_range_share)


class Stage:
    """Common parts. Subclasses set ``student``, ``teacher`` (or None), ``ema`` (or None) and implement
    :meth:`loss` and :meth:`export`."""

    name = ""
    video = False
    consistency = False  # sample validation clips with LCM (True) or DDIM with guidance (False)
    uses_latents = True  # batches hold VAE latents and text conditions (False: pixels only)
    dataset = None       # the run's raw dataset, set by the trainer

    def __init__(self, run, parts: dict, weight_dtype: torch.dtype):
        self.run, self.parts, self.weight_dtype = run, parts, weight_dtype
        self.teacher = None
        self.ema = None

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.student.parameters() if p.requires_grad]

    def trainable_names(self) -> list[str]:
        return [n for n, p in self.student.named_parameters() if p.requires_grad]

    def after_optimizer_step(self) -> None:
        if self.ema is not None:
            self.ema.update(self.student)

    def target(self):
        """The target network theta^- as a callable (EMA overrides, or the online network without gradient)."""
        if self.ema is None:
            return self.student
        overrides = self.ema.overrides(self.student)
        return lambda x, t, c: torch.func.functional_call(self.student, overrides, (x, t, c))

    def sampling_model(self):
        """What validation samples with: the online student."""
        return self.student

    def sampling_scheduler(self):
        """LCM (consistency stages, on the distillation grid) or DDIM (diffusion stages)."""
        from diffusers import DDIMScheduler

        from ..schedulers import animatelcm_scheduler

        if self.consistency:
            return animatelcm_scheduler(original_inference_steps=self.run.distill.num_ddim_timesteps,
                                        prediction_type=self.run.model.prediction_type)
        return DDIMScheduler.from_config(self.parts["noise_scheduler"].config)

    def loss(self, student, batch: dict, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def export(self, directory: Path) -> dict:
        raise NotImplementedError

    def enable_gradient_checkpointing(self) -> None:
        """Checkpoint the student's diffusers models that support it (the UNet, a ControlNet); others, as the small
        image-to-video adapter, keep their activations (diffusers' ``ModelMixin`` declares the attribute False)."""
        for module in self.student.modules():
            if hasattr(module, "enable_gradient_checkpointing") and getattr(module, "_supports_gradient_checkpointing",
                                                                            False):
                module.enable_gradient_checkpointing()

    def _save_base(self, directory: Path, unet) -> Path:
        """An SD folder (unet, vae, text_encoder, tokenizer, scheduler) that ``model.base`` can name."""
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(vae=self.parts["vae"], text_encoder=self.parts["text_encoder"],
                                       tokenizer=self.parts["tokenizer"], unet=unet,
                                       scheduler=self.parts["noise_scheduler"], safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(str(directory))
        return directory

    def _save_video(self, directory: Path, motion_unet, adapter, consistency: bool) -> dict:
        """Motion modules (diffusers folder + original-layout file) and a whole pipeline folder."""
        from diffusers import AnimateDiffPipeline

        from ..loading import save_motion_adapter
        from ..pipelines import AnimateLCMPipeline

        written = {"motion_adapter": save_motion_adapter(adapter, directory / "motion_adapter"),
                   "motion_adapter_original": save_motion_adapter(adapter, directory / "motion_adapter.safetensors")}
        common = dict(vae=self.parts["vae"], text_encoder=self.parts["text_encoder"],
                      tokenizer=self.parts["tokenizer"], unet=motion_unet, motion_adapter=adapter)
        if consistency:
            pipe = AnimateLCMPipeline(scheduler=self.sampling_scheduler(), **common)
        else:
            pipe = AnimateDiffPipeline(scheduler=self.sampling_scheduler(), **common)
        pipe.save_pretrained(str(directory / "pipeline"))
        written["pipeline"] = directory / "pipeline"
        return written


class _Autoencoding(torch.nn.Module):
    """The VAE round trip as one module (so DDP can wrap it): ``forward(pixels [N, 3, H, W], noise [N, C, h, w])
    -> (reconstruction [N, 3, H, W], posterior mean, posterior log-variance)``."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, pixels, noise):
        posterior = self.vae.encode(pixels).latent_dist
        latents = posterior.mean + posterior.std * noise
        return self.vae.decode(latents).sample, posterior.mean, posterior.logvar


class AutoencoderStage(Stage):
    """Trains the VAE (``AutoencoderKL``) on single frames: L1 + L2 reconstruction of a posterior sample plus
    ``autoencoder.kl_weight`` x KL to N(0, I). Exports ``vae/`` (diffusers folder) with ``scaling_factor`` set so
    the scaled latents of the data have unit standard deviation."""

    name = "autoencoder"
    uses_latents = False

    def __init__(self, run, parts, weight_dtype):
        super().__init__(run, parts, weight_dtype)
        vae = parts["vae"]
        initial = run.autoencoder.initial_log_variance
        if initial is not None and run.model.tiny is not None and run.model.vae is None:
            channels = vae.config.latent_channels
            with torch.no_grad():  # quant_conv outputs (mean, log-variance) stacked on the channels
                vae.quant_conv.bias[channels:] = initial
                vae.quant_conv.weight[channels:] *= 0.01
        vae.requires_grad_(True).train()
        self.student = _Autoencoding(vae)

    def loss(self, student, batch, generator):
        pixels = batch["pixels"]
        factor = 2 ** (len(self.parts["vae"].config.block_out_channels) - 1)
        channels = self.parts["vae"].config.latent_channels
        shape = (pixels.shape[0], channels, pixels.shape[2] // factor, pixels.shape[3] // factor)
        noise = torch.randn(shape, generator=generator).to(pixels)
        reconstruction, mean, logvar = student(pixels, noise)
        error = reconstruction.float() - pixels.float()
        kl = 0.5 * (mean.float().pow(2) + logvar.float().exp() - 1 - logvar.float()).sum(dim=(1, 2, 3)).mean()
        return error.abs().mean() + error.pow(2).mean() + self.run.autoencoder.kl_weight * kl

    @torch.no_grad()
    def latent_std(self) -> float:
        """Standard deviation of posterior samples of the first ``autoencoder.scaling_clips`` clips (all frames)."""
        vae = self.parts["vae"]
        generator = torch.Generator().manual_seed(self.run.seed)
        count = min(self.run.autoencoder.scaling_clips, len(self.dataset))
        samples = []
        for index in range(count):
            pixels = self.dataset[index]["pixel_values"].to(vae.device, vae.dtype)
            posterior = vae.encode(pixels).latent_dist
            mean, std = posterior.mean.float().cpu(), posterior.std.float().cpu()
            samples.append(mean + std * torch.randn(mean.shape, generator=generator))
        return float(torch.cat(samples).std())

    def export(self, directory):
        vae = self.parts["vae"].eval()
        vae.register_to_config(scaling_factor=1.0 / self.latent_std())
        vae.save_pretrained(str(directory / "vae"))
        return {"vae": directory / "vae"}


class DiffusionStage(Stage):
    """Epsilon- (or v-) prediction training: ``diffusion_image`` trains the whole image UNet, ``diffusion_video``
    the motion modules of the inflated UNet (spatial weights frozen). ``train.loss_weighting`` weights the
    timesteps (see :data:`animatelcm.training.config.LOSS_WEIGHTINGS`); ``train.timestep_range`` with
    ``train.timestep_range_share`` focuses a share of each batch on a range of timesteps (:meth:`timesteps`)."""

    def __init__(self, run, parts, weight_dtype):
        super().__init__(run, parts, weight_dtype)
        self.video = run.stage == "diffusion_video"
        self.name = run.stage
        unet = parts["unet"]
        if self.video:
            unet = models.inflate(unet, parts["motion_adapter"])
            unet.requires_grad_(False)
            for name, parameter in unet.named_parameters():
                parameter.requires_grad_("motion_modules" in name)
        else:
            unet.requires_grad_(True)
        self.student = VideoDenoiser(unet.train())

    def loss(self, student, batch, generator):
        scheduler = self.parts["noise_scheduler"]
        latents = batch["latents"]
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        timesteps = self.timesteps(latents.shape[0], scheduler.config.num_train_timesteps, generator)
        timesteps = timesteps.to(latents.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        if self.video and self.run.train.hidden_frames > 0:
            noisy, noise = self.hide_frames(latents, noisy, noise, timesteps, generator)
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        prediction = student(noisy, timesteps, batch["condition"])
        error = (prediction.float() - target.float()).pow(2).flatten(1).mean(1)
        if self.run.train.loss_weighting == "v":  # epsilon error / alpha_bar_t = the v-prediction error
            error = error / scheduler.alphas_cumprod.to(error.device)[timesteps]
        return error.mean()

    def hide_frames(self, latents, noisy, noise, timesteps, generator):
        """``train.hidden_frames``: in each clip whose ``t >= train.hidden_frames_min_timestep``, that share of the
        frames (drawn per frame) gets the input of the last timestep (``latents [B, C, F, h, w]`` noised with fresh
        noise: its own content hidden), and its noise target becomes the noise that explains that input at the
        clip's ``t`` given the true clean frame, ``(x_in - sqrt(abar_t) x0) / sqrt(1 - abar_t)``: the motion modules
        must fill those frames in from the others (issue 6: the teacher's frames otherwise drift apart in colour).
        Returns ``(noisy, noise)`` with the hidden frames' input and target noise replaced."""
        abar = self.parts["noise_scheduler"].alphas_cumprod.to(latents.device, torch.float32)
        batch, _, frames = latents.shape[:3]
        eligible = (timesteps >= self.run.train.hidden_frames_min_timestep).view(batch, 1, 1, 1, 1)
        chosen = torch.rand(batch, 1, frames, 1, 1, generator=generator).to(latents.device)
        hidden = eligible & (chosen < self.run.train.hidden_frames)
        fresh = torch.randn(latents.shape, generator=generator).to(latents)
        hidden_input = (abar[-1].sqrt() * latents.float() + (1 - abar[-1]).sqrt() * fresh.float()).to(noisy.dtype)
        noisy = torch.where(hidden, hidden_input, noisy)
        alpha = abar[timesteps].sqrt().view(batch, 1, 1, 1, 1)
        sigma = (1 - abar[timesteps]).sqrt().view(batch, 1, 1, 1, 1)
        explaining = ((noisy.float() - alpha * latents.float()) / sigma).to(noise.dtype)
        return noisy, torch.where(hidden, explaining, noise)

    def timesteps(self, batch: int, num_train_timesteps: int, generator) -> torch.Tensor:
        """``[batch]`` int64 training timesteps: uniform over ``[0, num_train_timesteps)``, except that each sample
        is drawn from ``train.timestep_range = [low, high)`` instead with probability ``train.timestep_range_share``.
        A focused range at high noise gives the motion modules the many samples that teach a prompt-dependent
        motion there (the miniature world's ``diffusion_video_high_noise`` stage)."""
        timesteps = torch.randint(0, num_train_timesteps, (batch,), generator=generator)
        bounds = self.run.train.timestep_range
        if bounds is None:
            return timesteps
        low, high = bounds
        if high > num_train_timesteps:
            raise ValueError(f"train.timestep_range {bounds} exceeds the scheduler's {num_train_timesteps} training "
                             "timesteps; lower its upper bound")
        focused = torch.randint(low, high, (batch,), generator=generator)
        chosen = torch.rand(batch, generator=generator) < self.run.train.timestep_range_share
        return torch.where(chosen, focused, timesteps)

    def export(self, directory):
        unet = self.student.unet
        if self.video:
            adapter = models.extract_motion_adapter(unet)
            return self._save_video(directory, unet, adapter, consistency=False)
        return {"base": self._save_base(directory / "base", unet)}


class ConsistencyStage(Stage):
    """Shared by the three consistency stages: the loss, and the EMA target over the trainable parameters."""

    consistency = True

    def _setup_loss(self, teacher_free: bool):
        self.loss_fn = ConsistencyDistillationLoss(self.parts["noise_scheduler"].alphas_cumprod,
                                                   _distillation_config(self.run, teacher_free))

    def _setup_target(self, initial: dict | None = None, extra_names=()):
        if self.run.distill.target == "ema":
            names = list(dict.fromkeys([*self.trainable_names(), *extra_names]))
            self.ema = models.ParameterEMA(self.student, names, self.run.distill.ema_decay, initial)

    def loss(self, student, batch, generator):
        teacher = None if self.teacher is None else (lambda x, t, c: self.teacher(x, t, c))
        return self.loss_fn(lambda x, t, c: student(x, t, c), self.target(), teacher, batch["latents"],
                            batch["condition"], batch.get("uncondition"), generator=generator)


class ImageConsistencyStage(ConsistencyStage):
    """``image_cd``: teacher = the image UNet; student = the same UNet + a spatial LoRA (the only trainable part)."""

    name = "image_cd"

    def __init__(self, run, parts, weight_dtype):
        super().__init__(run, parts, weight_dtype)
        unet = parts["unet"]
        self.teacher = VideoDenoiser(models.frozen_copy(unet, weight_dtype))
        unet.requires_grad_(False)
        models.add_spatial_lora(unet, run.distill.lora_rank, run.distill.lora_alpha, "spatial", seed=run.seed)
        self.student = VideoDenoiser(unet.train())
        self._setup_loss(teacher_free=False)
        self._setup_target()

    def export(self, directory):
        if self.ema is not None:
            self.ema.copy_to(self.student)
        return {f"lora_{kind}": path for kind, path in models.save_lora(self.student.unet, "spatial",
                                                                         directory / "lora").items()}


class VideoConsistencyStage(ConsistencyStage):
    """``video_cd``: teacher = image UNet + pretrained motion modules; student = spatial weights + spatial LoRA +
    motion modules (trainable). Decoupled: the LoRA is stage 1's (frozen unless ``train_lora``); with the
    initialization strategy the EMA target starts with the LoRA's ``lora_B`` at zero (without it) and picks it up
    through the EMA updates. Not decoupled (ablation): a fresh LoRA trained together with the motion modules."""

    name = "video_cd"
    video = True

    def __init__(self, run, parts, weight_dtype):
        super().__init__(run, parts, weight_dtype)
        distill = run.distill
        adapter = parts["motion_adapter"]
        self.teacher = VideoDenoiser(models.frozen_copy(models.inflate(parts["unet"], adapter), weight_dtype))
        unet = models.inflate(parts["unet"], copy.deepcopy(adapter))
        unet.requires_grad_(False)
        if distill.decoupled:
            models.load_spatial_lora(unet, run.model.lora, "spatial", allow_pickle=run.model.allow_pickle)
        else:
            models.add_spatial_lora(unet, distill.lora_rank, distill.lora_alpha, "spatial", seed=run.seed)
        train_lora = distill.train_lora or not distill.decoupled
        for name, parameter in unet.named_parameters():
            is_lora = ".lora_" in name
            parameter.requires_grad_(("motion_modules" in name and not is_lora) or (is_lora and train_lora))
        self.student = VideoDenoiser(unet.train())
        self._setup_loss(teacher_free=False)
        lora_names = models.lora_parameter_names(self.student, "spatial")
        initial = None
        if distill.decoupled and distill.init_strategy:
            parameters = dict(self.student.named_parameters())
            initial = {n: torch.zeros_like(parameters[n]) for n in lora_names if ".lora_B." in n}
        self._setup_target(initial=initial, extra_names=lora_names if initial else ())

    def export(self, directory):
        if self.ema is not None:
            self.ema.copy_to(self.student)
        unet = self.student.unet
        written = {f"lora_{kind}": path for kind, path in models.save_lora(unet, "spatial", directory / "lora").items()}
        fused = models.fuse_and_unload_lora(copy.deepcopy(unet))
        written.update(self._save_video(directory, fused, models.extract_motion_adapter(fused), consistency=True))
        return written


class TeacherFreeStage(ConsistencyStage):
    """``teacher_free``: consistency training (both points from one noise draw) of an adapter on a frozen video
    consistency model: an :class:`ImageToVideoAdapter` from scratch, or a LoRA on a ControlNet."""

    name = "teacher_free"
    video = True

    def __init__(self, run, parts, weight_dtype):
        super().__init__(run, parts, weight_dtype)
        unet = parts["unet"]
        if not hasattr(unet, "down_blocks") or not hasattr(unet.down_blocks[0], "motion_modules"):
            unet = models.inflate(unet, parts["motion_adapter"])
            if run.model.lora is not None:
                models.load_spatial_lora(unet, run.model.lora, "spatial", allow_pickle=run.model.allow_pickle)
                models.fuse_and_unload_lora(unet)
        unet = models.cast(unet.requires_grad_(False).eval(), weight_dtype)
        self.unet = unet
        adapter_config = run.adapter
        if adapter_config.kind == "i2v":
            self.student = ImageToVideoModel(unet, self._image_adapter(unet).train())
        else:
            from diffusers import ControlNetModel
            from peft import LoraConfig, inject_adapter_in_model

            if run.model.controlnet is not None:
                from ..loading import load_controlnet

                controlnet = load_controlnet(run.model.controlnet, unet=unet, allow_pickle=run.model.allow_pickle)
            else:
                controlnet = ControlNetModel.from_unet(_spatial_unet(unet, parts))
            controlnet.requires_grad_(False)
            pattern = r"^(down_blocks|mid_block)\..*\.(" + "|".join(models.SPATIAL_LORA_LAYERS) + ")$"
            torch.manual_seed(run.seed)
            inject_adapter_in_model(LoraConfig(r=adapter_config.lora_rank, lora_alpha=adapter_config.lora_rank,
                                               target_modules=pattern, init_lora_weights="gaussian"),
                                    controlnet, adapter_name="control")
            for name, parameter in controlnet.named_parameters():
                parameter.requires_grad_(".lora_" in name or (adapter_config.train_output_convs and (
                    name.startswith("controlnet_down_blocks") or name.startswith("controlnet_mid_block"))))
            self.student = ControlledVideoModel(unet, controlnet.train(), adapter_config.conditioning_scale)
        self._setup_loss(teacher_free=True)
        self._setup_target()

    def _image_adapter(self, unet):
        """The i2v adapter to train: ``model.image_adapter`` (adapted; its widths must be the UNet's) or a fresh
        :class:`ImageToVideoAdapter`, at ``adapter.motion_scale``, in float32."""
        run = self.run
        widths = tuple(unet.config.block_out_channels)
        if run.model.image_adapter is None:
            return ImageToVideoAdapter(in_channels=unet.config.in_channels, block_out_channels=widths,
                                       motion_scale=run.adapter.motion_scale)
        from ..loading import load_image_adapter

        adapter = load_image_adapter(run.model.image_adapter, torch_dtype=torch.float32,
                                     allow_pickle=run.model.allow_pickle)
        from .config import ConfigError

        if tuple(adapter.config.block_out_channels) != widths:
            raise ConfigError(f"model.image_adapter {run.model.image_adapter}: built for UNet widths "
                              f"{tuple(adapter.config.block_out_channels)}, this model's are {widths}")
        layers = min(len(block.motion_modules) for block in unet.down_blocks)
        if layers <= adapter.injection_layer:
            raise ConfigError(f"model.image_adapter {run.model.image_adapter}: adds its features before motion module "
                              f"{adapter.injection_layer} of each down block; this model's have {layers}")
        adapter.register_to_config(motion_scale=run.adapter.motion_scale)
        return adapter.requires_grad_(True)

    def add_adapter_condition(self, batch: dict) -> dict:
        """The batch with the adapter's input in its conditions: the clip's first-frame latent ``[B, C, h, w]``
        (i2v) or control images ``[B, F, 3, H, W]`` from its frames (ControlNet)."""
        extra = {}
        if self.run.adapter.kind == "i2v":
            extra["first_frame"] = batch["latents"][:, :, 0]
        else:
            pixels = batch["pixels"]
            extra["control"] = edge_maps(pixels) if self.run.adapter.control == "edges" else (pixels + 1) / 2
        return {**batch, "condition": {**batch["condition"], **extra},
                "uncondition": {**batch["uncondition"], **extra}}

    def loss(self, student, batch, generator):
        return super().loss(student, self.add_adapter_condition(batch), generator)

    def export(self, directory):
        if self.ema is not None:
            self.ema.copy_to(self.student)
        if self.run.adapter.kind == "i2v":
            self.student.adapter.save_pretrained(str(directory / "i2v_adapter"))
            return {"i2v_adapter": directory / "i2v_adapter"}
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        controlnet = self.student.controlnet
        directory.mkdir(parents=True, exist_ok=True)
        lora = {k: v.detach().float().contiguous().cpu()
                for k, v in get_peft_model_state_dict(controlnet, adapter_name="control").items()}
        save_file(lora, str(directory / "controlnet_lora.safetensors"))
        merged = copy.deepcopy(controlnet)
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in merged.modules():
            if isinstance(module, BaseTunerLayer):
                module.merge()
        _replace_tuner_layers(merged)
        merged.save_pretrained(str(directory / "controlnet"))
        return {"controlnet_lora": directory / "controlnet_lora.safetensors", "controlnet": directory / "controlnet"}


def _spatial_unet(motion_unet, parts):
    """A UNet2DConditionModel with the spatial weights the ControlNet is initialised from: the image UNet when the
    parts have one, else the video model's own (:func:`models.extract_spatial_unet`)."""
    from diffusers import UNet2DConditionModel

    if isinstance(parts["unet"], UNet2DConditionModel):
        return parts["unet"]
    return models.extract_spatial_unet(motion_unet)


def _replace_tuner_layers(module) -> None:
    """Swap merged peft layers for their base layers, in place."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, child in list(module.named_children()):
        if isinstance(child, BaseTunerLayer):
            setattr(module, name, child.get_base_layer())
        else:
            _replace_tuner_layers(child)


STAGE_CLASSES = {"autoencoder": AutoencoderStage, "diffusion_image": DiffusionStage, "diffusion_video": DiffusionStage,
                 "image_cd": ImageConsistencyStage, "video_cd": VideoConsistencyStage,
                 "teacher_free": TeacherFreeStage}


def build_stage(run, parts, weight_dtype) -> Stage:
    return STAGE_CLASSES[run.stage](run, parts, weight_dtype)
