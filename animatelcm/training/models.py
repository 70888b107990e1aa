"""The networks a training run needs, built from a :class:`~animatelcm.training.config.ModelConfig`, and the
pieces the stages share: the spatial LoRA (peft), the EMA target (parameters by name), fresh motion modules, and
LoRA export in diffusers and kohya formats.
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path

import torch

from ..loading import quiet_dtype_rename
from ..motion_prompt import add_motion_cross_attention, inflate, motion_cross_attention_dim  # noqa: F401

# The spatial layers AnimateLCM's LoRA adapts (SPEC.md section 3), never inside motion modules. peft matches the
# pattern against each module's full name.
SPATIAL_LORA_LAYERS = ("to_q", "to_k", "to_v", r"to_out\.0", "proj_in", "proj_out", r"ff\.net\.0\.proj",
                       r"ff\.net\.2", "conv1", "conv2", "conv_shortcut", r"downsamplers\.0\.conv",
                       r"upsamplers\.0\.conv", "time_emb_proj")
SPATIAL_LORA_PATTERN = (r"^(?!.*motion_modules)(down_blocks|mid_block|up_blocks)\..*\.("
                        + "|".join(SPATIAL_LORA_LAYERS) + ")$")


@quiet_dtype_rename
def load_components(model_config, *, video: bool, seed: int, work_dir: Path, torch_dtype=None) -> dict:
    """``vae``, ``text_encoder``, ``tokenizer``, ``unet`` (UNet2DConditionModel, or a UNetMotionModel when the
    source is a saved video pipeline), ``motion_adapter`` (None for image stages unless given) and
    ``noise_scheduler`` (a DDPMScheduler with the model's training schedule)."""
    from diffusers import DDPMScheduler

    from ..loading import _check_parts_match, _load_base_components, first_folder, load_motion_adapter, load_pipeline, \
        load_vae
    from ..schedulers import animatelcm_scheduler

    motion_adapter = vae = None
    if model_config.vae is not None:
        vae = load_vae(model_config.vae, first_folder(model_config.base_config, model_config.base,
                                                      model_config.pretrained),
                       allow_pickle=model_config.allow_pickle, torch_dtype=torch_dtype)
    torch.manual_seed(seed)  # fresh modules (tiny models, new motion modules) are a function of the seed
    if model_config.tiny is not None:
        from ..testing import TinyConfig, tiny_motion_adapter, tiny_text_encoder, tiny_tokenizer, tiny_unet, tiny_vae

        try:
            tiny = TinyConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in model_config.tiny.items()})
        except TypeError as error:
            from .config import ConfigError

            raise ConfigError(f"model.tiny: {error}") from None
        tokenizer = tiny_tokenizer(work_dir / "tokenizer")
        parts = dict(unet=tiny_unet(tiny), vae=tiny_vae(tiny),
                     text_encoder=tiny_text_encoder(tiny, vocab_size=len(tokenizer)), tokenizer=tokenizer)
        if video and model_config.motion_adapter is None:
            motion_adapter = zero_init_output(tiny_motion_adapter(tiny))
            if model_config.motion_prompt:
                add_motion_cross_attention(motion_adapter, parts["unet"].config.cross_attention_dim)
    elif model_config.pretrained is not None:
        pipe = load_pipeline(model_config.pretrained, torch_dtype=torch_dtype)
        parts = dict(unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
        motion_adapter = getattr(pipe, "motion_adapter", None)
    else:
        parts = _load_base_components(model_config.base, model_config.base_config, model_config.allow_pickle,
                                      torch_dtype, vae=vae)
        if video and model_config.motion_adapter is None:
            motion_adapter = zero_init_output(fresh_motion_adapter(parts["unet"], model_config.motion_heads,
                                                                   model_config.motion_prompt,
                                                                   model_config.motion_layers))
    if vae is not None:
        parts["vae"] = vae
    if model_config.motion_adapter is not None:
        motion_adapter = load_motion_adapter(model_config.motion_adapter, allow_pickle=model_config.allow_pickle,
                                             torch_dtype=torch_dtype)
        _check_parts_match(parts["unet"], motion_adapter, model_config.base or model_config.pretrained or "model.tiny",
                           model_config.motion_adapter)
    parts["motion_adapter"] = motion_adapter
    lcm_only = ("original_inference_steps", "timestep_scaling")
    schedule = {k: v for k, v in animatelcm_scheduler().config.items() if k not in lcm_only}
    parts["noise_scheduler"] = DDPMScheduler.from_config(
        {**schedule, "steps_offset": 1, "prediction_type": model_config.prediction_type})
    for name in ("vae", "text_encoder"):
        parts[name].requires_grad_(False).eval()
    return parts


def default_motion_heads(block_out_channels) -> int:
    """AnimateDiff's head width of 40 channels in the first block, at most 8 heads and at least 1: 8 for SD1.5's
    320 channels; a narrow UNet gets fewer, wider heads rather than 8 heads of a few channels each."""
    return max(1, min(8, block_out_channels[0] // 40))


def fresh_motion_adapter(unet, num_attention_heads: int | None = None, prompted: bool = False,
                         transformer_layers: int = 1):
    """Motion modules sized for ``unet``: its block widths, layers and norm groups, 32 positions,
    ``num_attention_heads`` heads (default :func:`default_motion_heads`) and ``transformer_layers`` temporal
    transformer layers in each module (mid block included); ``prompted``: their second attention attends to the
    prompt (:mod:`animatelcm.motion_prompt`, width ``unet.config.cross_attention_dim``)."""
    from diffusers import MotionAdapter

    config = unet.config
    if num_attention_heads is None:
        num_attention_heads = default_motion_heads(config.block_out_channels)
    adapter = MotionAdapter(block_out_channels=tuple(config.block_out_channels),
                            motion_layers_per_block=config.layers_per_block,
                            motion_norm_num_groups=config.norm_num_groups,
                            motion_num_attention_heads=num_attention_heads,
                            motion_transformer_layers_per_block=transformer_layers,
                            motion_transformer_layers_per_mid_block=transformer_layers)
    if prompted:
        width = config.cross_attention_dim
        if not isinstance(width, int):
            raise ValueError(f"prompted motion modules need one cross_attention_dim, the UNet has {width!r}")
        add_motion_cross_attention(adapter, width)
    return adapter


def zero_init_output(adapter):
    """Zero every motion module's ``proj_out`` (AnimateDiff's initialisation): the inflated UNet then computes
    exactly what the image UNet computes, frame by frame, until training moves it."""
    with torch.no_grad():
        for name, parameter in adapter.named_parameters():
            if ".proj_out." in name:
                parameter.zero_()
    return adapter




def extract_motion_adapter(motion_unet):
    """The motion modules of a UNetMotionModel as a diffusers MotionAdapter (a copy)."""
    from diffusers import MotionAdapter

    config = motion_unet.config
    adapter = MotionAdapter(block_out_channels=tuple(config.block_out_channels),
                            motion_layers_per_block=config.layers_per_block,
                            motion_norm_num_groups=config.norm_num_groups,
                            motion_num_attention_heads=config.motion_num_attention_heads,
                            motion_max_seq_length=config.motion_max_seq_length,
                            use_motion_mid_block=config.use_motion_mid_block,
                            motion_transformer_layers_per_block=config.temporal_transformer_layers_per_block,
                            motion_transformer_layers_per_mid_block=config.temporal_transformer_layers_per_mid_block)
    prompt_width = motion_cross_attention_dim(motion_unet)
    if prompt_width is not None:
        add_motion_cross_attention(adapter, prompt_width)
    state = {k: v.detach().clone() for k, v in motion_unet.state_dict().items()
             if "motion_modules" in k and "lora_" not in k}
    state = {k.replace(".base_layer.", "."): v for k, v in state.items()}
    adapter.load_state_dict(state)
    return adapter


def extract_spatial_unet(motion_unet):
    """The spatial part of a UNetMotionModel as a diffusers UNet2DConditionModel (a copy: every weight but the
    motion modules'), the reverse of inflation; e.g. to build a ControlNet for a saved video pipeline."""
    from diffusers import UNet2DConditionModel

    config = motion_unet.config
    if config.get("mid_block_layers", 1) != 1 or config.get("encoder_hid_dim_type") or config.get(
            "addition_embed_type"):
        raise ValueError("extract_spatial_unet: this UNetMotionModel has a mid block of several layers or extra "
                         "embeddings, which UNet2DConditionModel does not rebuild; load the image UNet instead")
    spatial = UNet2DConditionModel(
        sample_size=config.sample_size, in_channels=config.in_channels, out_channels=config.out_channels,
        down_block_types=tuple(block.replace("Motion", "2D") for block in config.down_block_types),
        up_block_types=tuple(block.replace("Motion", "2D") for block in config.up_block_types),
        block_out_channels=tuple(config.block_out_channels), layers_per_block=config.layers_per_block,
        downsample_padding=config.downsample_padding, mid_block_scale_factor=config.mid_block_scale_factor,
        act_fn=config.act_fn, norm_num_groups=config.norm_num_groups, norm_eps=config.norm_eps,
        cross_attention_dim=config.cross_attention_dim,
        transformer_layers_per_block=config.transformer_layers_per_block,
        reverse_transformer_layers_per_block=config.reverse_transformer_layers_per_block,
        use_linear_projection=config.use_linear_projection, attention_head_dim=config.num_attention_heads,
        time_cond_proj_dim=config.time_cond_proj_dim)
    state = {k.replace(".base_layer.", "."): v.detach().clone() for k, v in motion_unet.state_dict().items()
             if "motion_modules" not in k and "lora_" not in k}
    missing, unexpected = spatial.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"extract_spatial_unet: the spatial weights do not map onto UNet2DConditionModel "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return spatial.to(motion_unet.dtype).eval()


def add_spatial_lora(unet, rank: int, alpha: int | None = None, adapter_name: str = "spatial", seed: int = 0):
    """Add a peft LoRA of ``rank`` to the spatial layers of ``unet`` (2D or motion UNet; never the motion
    modules). ``lora_B`` starts at zero, so the model is unchanged until trained."""
    from peft import LoraConfig

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=SPATIAL_LORA_PATTERN,
                        init_lora_weights="gaussian")
    unet.add_adapter(config, adapter_name=adapter_name)
    return config


def lora_parameter_names(module, adapter_name: str) -> list[str]:
    """Names of the LoRA parameters of ``adapter_name`` in ``module``."""
    return [name for name, _ in module.named_parameters() if f".{adapter_name}." in name and ".lora_" in name]


def lora_state_dict(unet, adapter_name: str) -> dict:
    """The adapter's weights in diffusers' LoRA key layout (``unet.<module>.lora_A.weight``), CPU, contiguous."""
    from diffusers.utils import convert_unet_state_dict_to_peft  # noqa: F401  (peft installed check)
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    return {f"unet.{key}": value.detach().float().contiguous().cpu() for key, value in state.items()}


def save_lora(unet, adapter_name: str, directory: Path) -> dict:
    """Write the LoRA as ``directory/pytorch_lora_weights.safetensors`` (diffusers) and
    ``directory/lora_kohya.safetensors`` (kohya ``lora_unet_*``, alpha per layer). Both load with
    :func:`animatelcm.load_lora` and diffusers' ``load_lora_weights``. Returns ``{format: path}``."""
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    config = unet.peft_config[adapter_name]
    state = lora_state_dict(unet, adapter_name)
    directory.mkdir(parents=True, exist_ok=True)
    diffusers_path = directory / "pytorch_lora_weights.safetensors"
    metadata = {"lora_rank": str(config.r), "lora_alpha": str(config.lora_alpha)}
    from diffusers import StableDiffusionPipeline

    if config.lora_alpha == config.r:
        save_file(state, str(diffusers_path), metadata=metadata)
    elif "unet_lora_adapter_metadata" in inspect.signature(StableDiffusionPipeline.save_lora_weights).parameters:
        # diffusers >= 0.34 reads alpha from the LoRA config it stores in the file
        StableDiffusionPipeline.save_lora_weights(str(directory), unet_lora_layers={k[5:]: v for k, v in state.items()},
                                                  unet_lora_adapter_metadata=config.to_dict())
    else:  # older diffusers store no LoRA config and load alpha = rank: the scale alpha / rank goes into lora_B
        scale = config.lora_alpha / config.r
        save_file({k: v * scale if ".lora_B." in k else v for k, v in state.items()}, str(diffusers_path),
                  metadata={**metadata, "lora_alpha": str(config.r)})
    kohya = convert_state_dict_to_kohya(state)
    kohya = {k: (torch.tensor(float(config.lora_alpha)) if k.endswith(".alpha") else v) for k, v in kohya.items()}
    kohya_path = directory / "lora_kohya.safetensors"
    save_file(kohya, str(kohya_path), metadata=metadata)
    return {"diffusers": diffusers_path, "kohya": kohya_path}


def load_spatial_lora(motion_unet, path, adapter_name: str = "spatial", allow_pickle: bool = False):
    """Load a spatial LoRA file or folder (kohya or diffusers format; pickled ``.ckpt``/``.pt`` files only with
    ``allow_pickle``) into ``motion_unet`` under ``adapter_name`` at scale 1.0 (unfused)."""
    from diffusers import AnimateDiffPipeline

    from ..loading import CheckpointError, lora_source, lora_weights_file

    path = lora_weights_file(path)
    source, options = lora_source(path, allow_pickle)
    try:
        state, network_alphas, *metadata = AnimateDiffPipeline.lora_state_dict(
            source, local_files_only=True, return_lora_metadata=True, **options)
        metadata = {"metadata": metadata[0]} if metadata and metadata[0] is not None else {}  # diffusers >= 0.34
        AnimateDiffPipeline.load_lora_into_unet(state, network_alphas=network_alphas, unet=motion_unet,
                                                adapter_name=adapter_name, **metadata)
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise CheckpointError(f"{path}: could not load as a LoRA: {error}") from error
    motion_unet.set_adapters([adapter_name], [1.0])
    return motion_unet


def fuse_and_unload_lora(unet):
    """Merge every LoRA into the base weights at its active scale and remove the peft layers (in place)."""
    if getattr(unet, "peft_config", None):
        unet.fuse_lora(lora_scale=1.0)
        unet.unload_lora()
    return unet


class ParameterEMA:
    """EMA of selected parameters of a module, kept by name in fp32: the target network theta^- of consistency
    distillation. ``overrides()`` gives the tensors to run the module as the target with
    ``torch.func.functional_call``. ``initial`` overrides the starting value of some names (the initialization
    strategy starts the target's LoRA ``lora_B`` at zero)."""

    def __init__(self, module, names, decay: float, initial: dict | None = None):
        parameters = dict(module.named_parameters())
        missing = [n for n in names if n not in parameters]
        if missing:
            raise KeyError(f"ParameterEMA: no parameter named {missing[0]}")
        self.decay = decay
        self.shadow = {n: parameters[n].detach().float().clone() for n in names}
        for name, value in (initial or {}).items():
            self.shadow[name] = value.detach().float().clone()

    @torch.no_grad()
    def update(self, module) -> None:
        parameters = dict(module.named_parameters())
        for name, shadow in self.shadow.items():
            shadow.mul_(self.decay).add_(parameters[name].detach().float(), alpha=1.0 - self.decay)

    def overrides(self, module) -> dict:
        parameters = dict(module.named_parameters())
        return {n: v.to(parameters[n].dtype) for n, v in self.shadow.items()}

    @torch.no_grad()
    def copy_to(self, module) -> None:
        """Write the EMA values into ``module``'s parameters (for export)."""
        parameters = dict(module.named_parameters())
        for name, shadow in self.shadow.items():
            parameters[name].copy_(shadow.to(parameters[name].dtype))

    def state_dict(self) -> dict:
        return {n: v.clone() for n, v in self.shadow.items()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != set(self.shadow):
            raise KeyError("ParameterEMA: the checkpoint's EMA tracks other parameters than this run")
        for name, value in state.items():
            self.shadow[name].copy_(value)


def frozen_copy(module, dtype=None):
    """A deep copy with gradients off, in eval mode (the teacher)."""
    return cast(copy.deepcopy(module).requires_grad_(False).eval(), dtype)


def cast(module, dtype=None):
    """``module`` in ``dtype`` (reduced precision for frozen networks); fp32 / None leaves it as it is."""
    return module.to(dtype) if dtype not in (None, torch.float32) else module
