"""Training configuration: one YAML file per run, read into typed dataclasses and checked before anything trains.

Layout (every section optional except ``stage``; see ``configs/mini/*.yaml`` and ``configs/sd15/*.yaml``)::

    stage: video_cd            # autoencoder | diffusion_image | diffusion_video | image_cd | video_cd | teacher_free
    seed: 0
    output_dir: runs/video_cd
    model: {...}               # ModelConfig: where the networks come from
    data: {...}                # DataConfig
    train: {...}               # TrainConfig: optimiser, steps, precision, checkpoints, logging
    distill: {...}             # DistillConfig: consistency-distillation hyper-parameters (CD / teacher-free stages)
    adapter: {...}             # AdapterConfig: what teacher_free trains (i2v encoder or ControlNet LoRA)
    autoencoder: {...}         # AutoencoderConfig: the VAE objective (stage autoencoder)
    validation: {...}          # ValidationConfig

Unknown keys, wrong types, impossible values and missing files raise :class:`ConfigError` naming the key (and the
file), so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

STAGES = ("autoencoder", "diffusion_image", "diffusion_video", "image_cd", "video_cd", "teacher_free")
VIDEO_STAGES = ("diffusion_video", "video_cd", "teacher_free")
CD_STAGES = ("image_cd", "video_cd", "teacher_free")


class ConfigError(ValueError):
    """A training configuration that cannot run; the message names the key and what to change."""


@dataclass
class ModelConfig:
    """Where the networks come from. One of: ``tiny`` (a fresh SD-topology model of the sizes given, fields of
    :class:`animatelcm.testing.TinyConfig`, random weights from ``seed``), ``pretrained`` (a saved pipeline folder,
    e.g. a previous stage's ``final/pipeline``), or ``base`` (an SD1.5 diffusers folder, or a single file with
    ``base_config``). ``motion_adapter``: the teacher's / starting motion modules (any layout
    :func:`animatelcm.load_motion_adapter` reads). ``lora``: the stage-1 spatial LoRA for ``video_cd``.
    ``image_adapter``: an image adapter for ``teacher_free`` with ``adapter.kind: i2v`` to adapt instead of
    training one from scratch (:func:`animatelcm.load_image_adapter`: a saved adapter folder, or AnimateLCM-I2V's
    release file with ``allow_pickle``). ``controlnet``: a ControlNet for ``teacher_free`` ControlNet adaptation, a diffusers folder or an SD1.5 file in
    the original layout (:func:`animatelcm.load_controlnet`; ``.pth`` with ``allow_pickle``) (without it the
    ControlNet starts from the image UNet's weights, or the video model's spatial weights). ``vae``: a
    diffusers AutoencoderKL folder (e.g. an ``autoencoder`` stage's ``final/vae``) or a single VAE file
    (:func:`animatelcm.load_vae`) replacing the model's VAE; a single-file ``base`` without one ("noVAE" models)
    takes it from here or from ``base_config``'s weights.
    ``motion_heads``: attention heads of fresh motion modules (``diffusion_video`` without ``motion_adapter``;
    default: :func:`animatelcm.training.models.default_motion_heads`). ``motion_layers``: temporal transformer
    layers in each fresh motion module (default 1, AnimateDiff's). ``motion_prompt``: fresh motion modules
    whose second temporal attention attends to the prompt (:mod:`animatelcm.motion_prompt`; without it they are
    AnimateDiff's text-blind ones). ``allow_pickle``: read ``base``, ``motion_adapter``, ``lora``, ``vae``, ``controlnet`` and
    ``image_adapter`` from pickled ``.ckpt``/``.pt``/``.pth`` files (``AnimateLCM_sd15_t2v.ckpt`` as released, say): pickles can run
    code when loaded, so only for files you trust."""

    tiny: dict | None = None
    pretrained: str | None = None
    base: str | None = None
    base_config: str | None = None
    motion_adapter: str | None = None
    lora: str | None = None
    controlnet: str | None = None
    image_adapter: str | None = None
    vae: str | None = None
    motion_heads: int | None = None     # heads of fresh motion modules (default: models.default_motion_heads)
    motion_layers: int = 1              # temporal transformer layers per fresh motion module
    motion_prompt: bool = False         # fresh motion modules attend to the prompt (animatelcm.motion_prompt)
    prediction_type: str = "epsilon"
    allow_pickle: bool = False          # read pickled model files (trusted only)


@dataclass
class DataConfig:
    """``kind``: ``synthetic`` (moving shapes), ``video`` (:class:`VideoTextDataset`) or ``image``
    (:class:`ImageTextDataset`; image stages only), read from ``source``: a folder (``.txt`` captions beside the
    files, a Hugging Face ``metadata.jsonl``/``metadata.csv``, or ``prompts.txt`` + ``videos.txt``), or a CSV /
    JSON-lines file (WebVid's columns, or a path and a caption column; paths relative to ``root``, default the
    file's folder): the layouts :mod:`animatelcm.training.data` lists. Image stages trained on video data see every frame of a clip
    as an image (``image_frames`` > 0: only that many, drawn at random per clip and step, so a batch of many clips
    is more varied than all frames of a few; we measured the autoencoder's reconstruction error after 300 steps at
    0.048 with 4 clips x 16 frames vs 0.017 with 32 clips x 2 frames). ``cache_latents``: encode every clip with the VAE once (mean and std of the latent distribution,
    fp16) into ``cache_dir`` (default ``OUTPUT/latent_cache``) and train from the cache. ``skip_unreadable``: a
    listed file that cannot be decoded (corrupt or truncated) gives way to the next readable one, with a warning
    naming it; false makes it an error that stops the run."""

    kind: str = "synthetic"
    source: str | None = None
    root: str | None = None
    num_clips: int = 480
    frames: int = 16
    size: int = 64
    stride: int = 4
    cache_latents: bool = False
    cache_dir: str | None = None
    uncond_prob: float | None = None  # share of captions replaced by "": see RunConfig.caption_drop_probability
    image_frames: int = 0      # image stages on video data: frames drawn at random from each clip (0 = all)
    num_workers: int = 0
    skip_unreadable: bool = True


@dataclass
class TrainConfig:
    batch_size: int = 4                 # clips (video stages) or images per process and micro-step
    gradient_accumulation: int = 1
    max_steps: int = 100                # optimiser steps
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"      # any name diffusers.optimization.get_scheduler knows
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.0
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0          # 0 or less: no gradient clipping
    loss_weighting: str = "uniform"     # diffusion stages: uniform | v (see LOSS_WEIGHTINGS)
    timestep_range: list[int] | None = None  # [low, high): t (diffusion) or t_{n+k} (consistency) for a share
    timestep_range_share: float = 1.0   # the rest of the batch draws t uniformly from every timestep
    hidden_frames: float = 0.0          # diffusion_video: share of frames hidden from their own input (0: none)
    hidden_frames_min_timestep: int = 500  # ... in clips with t at least this
    mixed_precision: str = "no"         # no | fp16 | bf16
    gradient_checkpointing: bool = False
    checkpoint_every: int = 0           # 0: only the final checkpoint
    checkpoints_kept: int = 2
    log_every: int = 1
    tensorboard: bool = False
    progress: bool = True


# How the diffusion stages weight the per-timestep loss of an epsilon-prediction model. ``uniform`` is plain
# epsilon MSE (SD1.5 / AnimateDiff), in which the error of the clean-sample estimate counts only ``SNR(t)`` times:
# almost nothing at the high noise levels where a clip's layout and motion are decided. ``v`` weights sample ``t``
# by ``1 / alpha_bar_t`` (= 1 + 1/SNR), which makes the loss exactly the v-prediction objective while the model
# stays an epsilon predictor (every later stage, sampler and checkpoint unchanged). Measured on the miniature world
# (motion modules, 1200 steps, 96 clips of 25-step DDIM): FVD analogue 26.8 with ``uniform``, 15.4 with ``v``.
LOSS_WEIGHTINGS = ("uniform", "v")


@dataclass
class DistillConfig:
    """Consistency distillation (SPEC.md section 3). ``target``: ``ema`` (EMA of the online network with
    ``ema_decay``) or ``online`` (the online network without gradient: the LCM-LoRA variant). ``lora_rank`` /
    ``lora_alpha``: the spatial LoRA of ``image_cd`` (and of ``video_cd`` when not decoupled). ``video_cd``:
    ``decoupled`` (start from the stage-1 LoRA; false = the ablation that trains a fresh LoRA and the motion
    modules together on video), ``init_strategy`` (the LoRA is merged into the online student only; the target
    starts without it), ``train_lora`` (keep training the spatial LoRA in stage 2)."""

    num_ddim_timesteps: int = 50
    w_min: float = 3.0
    w_max: float = 15.0
    huber_c: float = 0.001
    timestep_scaling: float = 10.0
    target: str = "ema"
    ema_decay: float = 0.95
    lora_rank: int = 64
    lora_alpha: int | None = None       # default: = lora_rank
    decoupled: bool = True
    init_strategy: bool = True
    train_lora: bool = False


@dataclass
class AdapterConfig:
    """``teacher_free`` only. ``kind``: ``i2v`` (an image-to-video encoder trained from scratch: the first-frame
    latent through a zero-initialised T2I-Adapter-style encoder, a sinusoidal frame embedding x ``motion_scale``,
    added to the down blocks before the motion modules; or ``model.image_adapter`` adapted, at ``motion_scale``) or ``controlnet_lora`` (LoRA of rank ``lora_rank`` on an
    existing ControlNet, adapted to the consistency model; control images from ``control``)."""

    kind: str = "i2v"
    motion_scale: float = 0.8
    lora_rank: int = 16
    train_output_convs: bool = False    # controlnet_lora: also train the ControlNet's zero-initialised output convs
    control: str = "edges"              # edges (Sobel magnitude of each frame) | frames (the frames themselves)
    conditioning_scale: float = 1.0


@dataclass
class AutoencoderConfig:
    """``autoencoder`` stage: the VAE is trained on single frames to minimise ``|x - D(z)|_1 + |x - D(z)|^2 +
    kl_weight * KL(q(z|x) || N(0, I))`` with ``z`` drawn from the posterior. On export the latent scaling factor
    is set to ``1 / std`` of the latents of ``scaling_clips`` clips (as SD's 0.18215 was chosen).
    ``initial_log_variance``: a fresh VAE (``model.tiny`` without ``model.vae``) starts with its posterior
    log-variance near this value (the bias of the log-variance half of ``quant_conv``): with the default init the
    posterior std is ~1, drowning the latent means, and a small VAE needs thousands of steps to shrink it (we
    measured colours still lost after 1600 steps); null keeps the default init."""

    kl_weight: float = 1e-6
    scaling_clips: int = 64
    initial_log_variance: float | None = -6.0


@dataclass
class ValidationConfig:
    every: int = 0                      # 0: no validation during training
    prompts: list = field(default_factory=lambda: ["a red circle moving right"])
    steps: int = 4                      # sampling steps (CD stages: LCM; diffusion stages: DDIM)
    guidance_scale: float = 1.0
    frames: int | None = None           # default: data.frames
    seed: int = 0


@dataclass
class RunConfig:
    stage: str
    seed: int = 0
    output_dir: str = "runs/animatelcm"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    origin: str = "<dict>"              # where the config was read from (for messages)

    @property
    def is_video(self) -> bool:
        return self.stage in VIDEO_STAGES

    @property
    def caption_drop_probability(self) -> float:
        """The share of training captions replaced by the empty prompt (``data.uncond_prob``). Diffusion stages
        (default 0.1): what classifier-free guidance needs. ``teacher_free`` (default 0): with captions dropped, an
        adapter has to carry what the prompt would have said (the image's colour and shape for ``i2v``), because
        both points of each consistency pair then see the empty prompt. ``image_cd`` / ``video_cd`` take their
        guidance from the teacher and drop none."""
        if self.data.uncond_prob is not None:
            return self.data.uncond_prob
        return 0.1 if self.stage in ("diffusion_image", "diffusion_video") else 0.0

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data.pop("origin")
        return data


def _coerce(value, annotation, key: str, source: str):
    """``value`` checked against a field annotation (int, float, bool, str, list, dict, optional forms)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        annotation = next(option for option in options if option is not type(None))
        origin = typing.get_origin(annotation)
    expected = origin or annotation
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is float and isinstance(value, str):  # PyYAML (YAML 1.1) reads 3e-4, without a dot, as a string
        try:
            return float(value)
        except ValueError:
            pass
    if expected is str and value is False:  # PyYAML (YAML 1.1) reads a bare `no` (mixed_precision: no) as False
        return "no"
    if expected is list and isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{source}: {key} must be {expected.__name__}, got {value!r}")


def _build(cls, values, prefix: str, source: str):
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: {prefix or 'the config'} must be a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if not (cls is RunConfig and f.name == "origin")}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{source}: unknown key {prefix + unknown[0]!r} (known keys{' of ' + prefix[:-1] if prefix else ''}: "
                          f"{', '.join(sorted(fields))})")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        nested = hints[name]
        if dataclasses.is_dataclass(nested):
            kwargs[name] = _build(nested, value, f"{prefix}{name}.", source)
        else:
            kwargs[name] = _coerce(value, nested, prefix + name, source)
    try:
        return cls(**kwargs)
    except TypeError as error:  # a required key missing
        raise ConfigError(f"{source}: {error}") from None


def _check(config: RunConfig) -> None:
    source = config.origin

    def fail(message):
        raise ConfigError(f"{source}: {message}")

    def positive(name, value, minimum=1):
        if value < minimum:
            fail(f"{name} must be >= {minimum}, got {value}")

    if config.stage not in STAGES:
        fail(f"stage must be one of {', '.join(STAGES)}; got {config.stage!r}")
    model, data, train, distill = config.model, config.data, config.train, config.distill
    sources = [name for name in ("tiny", "pretrained", "base") if getattr(model, name) is not None]
    if len(sources) != 1:
        fail(f"model: give exactly one of tiny, pretrained, base (got {', '.join(sources) or 'none'})")
    for name in ("pretrained", "base", "base_config", "motion_adapter", "lora", "controlnet", "image_adapter", "vae"):
        path = getattr(model, name)
        if path is not None and not Path(path).exists():
            fail(f"model.{name}: {path} does not exist")
    if model.motion_heads is not None and model.motion_heads < 1:
        fail(f"model.motion_heads must be >= 1, got {model.motion_heads}")
    if model.motion_layers < 1:
        fail(f"model.motion_layers must be >= 1, got {model.motion_layers}")
    if model.motion_layers != 1 and (config.stage != "diffusion_video" or model.motion_adapter is not None
                                     or model.pretrained is not None or model.tiny is not None):
        fail("model.motion_layers sizes fresh motion modules built on model.base: it applies to diffusion_video "
             "without model.motion_adapter / model.pretrained / model.tiny (trained modules keep their depth)")
    if model.motion_prompt and (config.stage != "diffusion_video" or model.motion_adapter is not None
                                or model.pretrained is not None):
        fail("model.motion_prompt builds fresh prompted motion modules: it applies to diffusion_video without "
             "model.motion_adapter / model.pretrained (trained prompted modules are recognised when loaded)")
    if model.prediction_type not in ("epsilon", "v_prediction"):
        fail(f"model.prediction_type must be epsilon or v_prediction, got {model.prediction_type!r}")
    if data.kind not in ("synthetic", "video", "image"):
        fail(f"data.kind must be synthetic, video or image; got {data.kind!r}")
    if data.kind != "synthetic":
        if data.source is None:
            fail(f"data.source is required for data.kind={data.kind} (a folder of files with .txt captions or a "
                 "metadata.jsonl, or a CSV / JSON-lines file: see animatelcm.training.data)")
        if not Path(data.source).exists():
            fail(f"data.source: {data.source} does not exist")
    if data.kind == "image" and config.is_video:
        fail(f"stage {config.stage} trains on video: data.kind must be synthetic or video, not image")
    positive("data.frames", data.frames, 2 if config.is_video else 1)
    positive("data.size", data.size, 8)
    positive("data.num_clips", data.num_clips)
    positive("data.stride", data.stride)
    if not 0 <= data.image_frames <= data.frames:
        fail(f"data.image_frames must be in [0, data.frames={data.frames}], got {data.image_frames}")
    if data.uncond_prob is not None:
        if not 0.0 <= data.uncond_prob <= 1.0:
            fail(f"data.uncond_prob must be in [0, 1], got {data.uncond_prob}")
        if data.uncond_prob > 0 and config.stage not in ("diffusion_image", "diffusion_video", "teacher_free"):
            fail(f"data.uncond_prob applies to the diffusion stages and teacher_free; stage {config.stage} "
                 + ("takes its guidance from the teacher" if config.stage in CD_STAGES else "has no captions")
                 + ": remove it")
    positive("train.batch_size", train.batch_size)
    positive("train.gradient_accumulation", train.gradient_accumulation)
    positive("train.max_steps", train.max_steps)
    positive("train.checkpoints_kept", train.checkpoints_kept)
    positive("train.log_every", train.log_every)
    if train.checkpoint_every < 0:
        fail(f"train.checkpoint_every must be >= 0, got {train.checkpoint_every}")
    if not train.learning_rate > 0:
        fail(f"train.learning_rate must be positive, got {train.learning_rate}")
    if train.lr_warmup_steps < 0:
        fail(f"train.lr_warmup_steps must be >= 0, got {train.lr_warmup_steps}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(train, name) < 1.0:
            fail(f"train.{name} must be in [0, 1), got {getattr(train, name)}")
    if not train.adam_epsilon > 0:
        fail(f"train.adam_epsilon must be positive, got {train.adam_epsilon}")
    if not train.adam_weight_decay >= 0:
        fail(f"train.adam_weight_decay must be >= 0, got {train.adam_weight_decay}")
    if train.max_grad_norm != train.max_grad_norm:
        fail("train.max_grad_norm must be a number (0 or less: no clipping), got nan")
    if train.mixed_precision not in ("no", "fp16", "bf16"):
        fail(f"train.mixed_precision must be no, fp16 or bf16; got {train.mixed_precision!r}")
    if train.loss_weighting not in LOSS_WEIGHTINGS:
        fail(f"train.loss_weighting must be one of {', '.join(LOSS_WEIGHTINGS)}; got {train.loss_weighting!r}")
    if train.loss_weighting != "uniform" and config.stage not in ("diffusion_image", "diffusion_video"):
        fail(f"train.loss_weighting applies to the diffusion stages only; remove it for {config.stage}")
    if train.loss_weighting == "v" and model.prediction_type == "v_prediction":
        fail("train.loss_weighting: v is the objective a v_prediction model already trains on; remove it")
    if train.timestep_range is not None:
        if config.stage == "autoencoder":
            fail("train.timestep_range applies to the diffusion and consistency stages; remove it for autoencoder")
        bounds = train.timestep_range
        if (not isinstance(bounds, (list, tuple)) or len(bounds) != 2 or not all(isinstance(b, int) for b in bounds)
                or not 0 <= bounds[0] < bounds[1] <= 1000):
            fail(f"train.timestep_range must be two integers [low, high) with 0 <= low < high <= 1000 (the "
                 f"training timesteps), got {bounds!r}")
        skip = 1000 // max(distill.num_ddim_timesteps, 1)
        if config.stage not in ("diffusion_image", "diffusion_video") and not any(
                bounds[0] <= (i + 1) * skip - 1 < bounds[1] for i in range(distill.num_ddim_timesteps)):
            fail(f"train.timestep_range {list(bounds)} holds none of the consistency stage's grid points "
                 f"(t = {skip - 1}, {2 * skip - 1}, ..., {1000 - 1}: distill.num_ddim_timesteps="
                 f"{distill.num_ddim_timesteps}); widen it")
    if not 0.0 < train.timestep_range_share <= 1.0:
        fail(f"train.timestep_range_share must be in (0, 1], got {train.timestep_range_share}")
    if train.timestep_range_share != 1.0 and train.timestep_range is None:
        fail("train.timestep_range_share needs train.timestep_range (the range the share is drawn from)")
    if not 0.0 <= train.hidden_frames < 1.0:
        fail(f"train.hidden_frames must be in [0, 1) (a share of each clip's frames), got {train.hidden_frames}")
    if train.hidden_frames and config.stage != "diffusion_video":
        fail(f"train.hidden_frames applies to the diffusion_video stage only; remove it for {config.stage}")
    if not 0 <= train.hidden_frames_min_timestep < 1000:
        fail(f"train.hidden_frames_min_timestep must be in [0, 1000), got {train.hidden_frames_min_timestep}")
    if distill.w_min > distill.w_max:
        fail(f"distill.w_min={distill.w_min} exceeds distill.w_max={distill.w_max}")
    if distill.target not in ("ema", "online"):
        fail(f"distill.target must be ema or online, got {distill.target!r}")
    if not 0.0 <= distill.ema_decay <= 1.0:
        fail(f"distill.ema_decay must be in [0, 1], got {distill.ema_decay}")
    if distill.num_ddim_timesteps < 1 or 1000 % distill.num_ddim_timesteps:
        fail(f"distill.num_ddim_timesteps must divide 1000, got {distill.num_ddim_timesteps}")
    positive("distill.lora_rank", distill.lora_rank)
    if config.stage in ("video_cd", "teacher_free") and model.motion_adapter is None and model.pretrained is None:
        fail(f"{config.stage} needs trained motion modules: set model.motion_adapter (or model.pretrained, a "
             "saved pipeline folder with them)")
    if config.stage == "video_cd" and distill.decoupled and model.lora is None:
        fail("video_cd with distill.decoupled: true starts from the stage-1 LoRA: set model.lora (the image_cd "
             "output, e.g. runs/image_cd/final/lora), or set distill.decoupled: false for the ablation")
    if config.stage == "video_cd" and not distill.decoupled and model.lora is not None:
        fail("distill.decoupled: false trains a fresh spatial LoRA; remove model.lora")
    adapter = config.adapter
    if adapter.kind not in ("i2v", "controlnet_lora"):
        fail(f"adapter.kind must be i2v or controlnet_lora, got {adapter.kind!r}")
    if model.image_adapter is not None and (config.stage != "teacher_free" or adapter.kind != "i2v"):
        fail("model.image_adapter is the image adapter teacher_free with adapter.kind: i2v adapts; remove it here")
    if adapter.control not in ("edges", "frames"):
        fail(f"adapter.control must be edges or frames, got {adapter.control!r}")
    if config.stage == "teacher_free" and config.data.cache_latents and adapter.kind == "controlnet_lora":
        fail("teacher_free with adapter.kind=controlnet_lora needs the pixels for its control images: "
             "set data.cache_latents: false")
    if config.stage == "autoencoder":
        if data.cache_latents:
            fail("stage autoencoder trains the VAE itself: set data.cache_latents: false")
        if config.validation.every:
            fail("stage autoencoder has no sampling to validate: set validation.every: 0")
        if config.autoencoder.kl_weight < 0:
            fail(f"autoencoder.kl_weight must be >= 0, got {config.autoencoder.kl_weight}")
        positive("autoencoder.scaling_clips", config.autoencoder.scaling_clips)
    if config.validation.every < 0 or config.validation.steps < 1:
        fail("validation.every must be >= 0 and validation.steps >= 1")
    if not config.validation.prompts:
        fail("validation.prompts must list at least one prompt")


def load_config(path_or_dict, overrides: dict | None = None) -> RunConfig:
    """Read a run configuration from a YAML file (or a dict), apply ``overrides`` (``{"train.max_steps": 10}``:
    dotted keys, what the CLI flags set), check it and return a :class:`RunConfig`. Raises :class:`ConfigError`."""
    import copy

    import yaml

    if isinstance(path_or_dict, dict):
        values, source = copy.deepcopy(path_or_dict), "<dict>"
    else:
        path = Path(path_or_dict)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            values = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from None
        source = str(path)
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: the config must be a mapping with at least a 'stage' key")
    for dotted, value in (overrides or {}).items():
        *parents, leaf = dotted.split(".")
        node = values
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    if "stage" not in values:
        raise ConfigError(f"{source}: missing 'stage' (one of {', '.join(STAGES)})")
    config = _build(RunConfig, values, "", source)
    config.origin = source
    _check(config)
    return config
