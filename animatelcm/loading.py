"""Offline loaders for the checkpoints people download: motion modules (original AnimateDiff/AnimateLCM layout or
diffusers), LCM and personalised LoRAs (kohya or diffusers), base SD1.5 as a diffusers folder or a single file, and
the adapters the trainer writes (image-to-video adapter, ControlNet).

Nothing here touches a model hub: every path is local and every ``from_pretrained`` runs with
``local_files_only=True``. Bad files raise :class:`CheckpointError` naming the file and the problem.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import re
import warnings
from collections import defaultdict
from pathlib import Path

import torch

from . import diffusers_notices, motion_prompt  # noqa: F401 (diffusers_notices: at import)

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# Original AnimateDiff/AnimateLCM names -> diffusers names (SPEC.md section 1).
ORIGINAL_MARKERS = (".temporal_transformer.", ".attention_blocks.", ".norms.", ".ff_norm.")
LORA_SCALES_ATTRIBUTE = "_animatelcm_lora_scales"  # {adapter name: scale} set by load_lora
MOTION_DEFAULTS = dict(motion_num_attention_heads=8, motion_norm_num_groups=32, motion_max_seq_length=32)


class CheckpointError(ValueError):
    """A checkpoint file or folder that cannot be used; the message names the path and the problem."""


def quiet_dtype_rename(function):
    """Run ``function`` without the notice newer diffusers/transformers print for ``torch_dtype`` (now ``dtype``).
    The loaders keep passing ``torch_dtype``: the older releases this package supports know only that name."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*`torch_dtype` is deprecated")
            return function(*args, **kwargs)
    return wrapper


def _require_path(path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{what} not found: {path}")
    return path


def read_state_dict(path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a pickled ``.ckpt``/``.pt``/``.pth``/``.bin`` when
    ``allow_pickle=True`` (a ``state_dict`` wrapper, ``module.`` prefixes and entries that are not tensors, such as
    the ``animatediff_config`` of AnimateDiff's v3 releases, are removed)."""
    path = _require_path(path, "checkpoint")
    suffix = path.suffix.lower()
    if suffix in SAFE_SUFFIXES:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, RuntimeError) as error:
            raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {error}") from error
    elif suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise CheckpointError(
                f"{path}: {suffix} files are Python pickles, which can run arbitrary code when loaded. Convert it "
                "to .safetensors, or pass allow_pickle=True (CLI: --allow-pickle; a training config: "
                "model.allow_pickle: true) if you trust its source.")
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - old checkpoints pickle non-tensor objects; the user opted in
            try:
                state = torch.load(str(path), map_location="cpu", weights_only=False)
            except Exception as error:  # noqa: BLE001
                raise CheckpointError(f"{path}: could not unpickle the checkpoint (truncated or corrupt?): {error}") from error
    else:
        raise CheckpointError(f"{path}: unknown checkpoint type {suffix!r}; expected .safetensors "
                              f"(or {', '.join(PICKLE_SUFFIXES)} with allow_pickle=True)")
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)} if isinstance(state, dict) else {}
    if not tensors:
        found = (f"no tensors among its entries {sorted(map(str, state))[:5]}" if isinstance(state, dict)
                 else f"a {type(state).__name__}")
        raise CheckpointError(f"{path}: expected a mapping of names to tensors, found {found}")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in tensors.items()}


def is_original_motion_layout(state: dict) -> bool:
    """Whether keys use the original AnimateDiff/AnimateLCM motion-module names."""
    return any(marker in key for key in state for marker in ORIGINAL_MARKERS) or any("pos_encoder" in k for k in state)


def original_to_diffusers_motion_keys(state: dict) -> tuple[dict, int | None]:
    """Rename original-layout motion-module keys to diffusers' (diffusers' own converter) and return them with the
    positional table length found in ``pos_encoder.pe`` keys (None when the file has none, as AnimateLCM's)."""
    from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers

    lengths = {v.shape[1] for k, v in state.items() if k.endswith("pos_encoder.pe") and v.dim() == 3}
    if len(lengths) > 1:
        raise CheckpointError(f"positional tables of different lengths {sorted(lengths)} in one motion module")
    return convert_animatediff_checkpoint_to_diffusers(state), (lengths.pop() if lengths else None)


def _counts(state: dict, pattern: str) -> dict[int, set[int]]:
    found = defaultdict(set)
    for key in state:
        match = re.match(pattern, key)
        if match:
            found[int(match.group(1))].add(int(match.group(2)))
    return found


def _collapse(values: list[int]) -> int | tuple[int, ...]:
    """One int when every block has the same count (the form diffusers' own configs and LoRA code expect)."""
    return values[0] if len(set(values)) == 1 else tuple(values)


def infer_motion_adapter_config(state: dict, source: str = "motion module") -> dict:
    """MotionAdapter config from diffusers-layout motion-module tensors: block widths, motion layers per block,
    transformer layers, mid block, conv_in and (from ``pos_embed.pe``) the sequence length. Head count and norm
    groups cannot be read from tensors: SD1.5 defaults (8 heads, 32 groups) are used unless overridden."""
    down_layers = _counts(state, r"down_blocks\.(\d+)\.motion_modules\.(\d+)\.")
    up_layers = _counts(state, r"up_blocks\.(\d+)\.motion_modules\.(\d+)\.")
    if not down_layers:
        raise CheckpointError(f"{source}: no down_blocks.*.motion_modules.* tensors; this is not a motion module")
    blocks = sorted(down_layers)
    if blocks != list(range(len(blocks))):
        raise CheckpointError(f"{source}: down block indices {blocks} are not contiguous")
    widths = []
    for i in blocks:
        key = f"down_blocks.{i}.motion_modules.0.norm.weight"
        if key not in state:
            raise CheckpointError(f"{source}: missing {key}")
        widths.append(int(state[key].shape[0]))
    layers = [len(down_layers[i]) for i in blocks]
    up_expected = {len(blocks) - 1 - i: layers[i] + 1 for i in blocks}
    up_found = {i: len(v) for i, v in up_layers.items()}
    if up_found != up_expected:
        raise CheckpointError(f"{source}: up blocks hold {up_found} motion layers; a MotionAdapter with down-block "
                              f"layers {layers} needs {up_expected}")
    transformer_layers = [len(_counts(state, rf"down_blocks\.({i})\.motion_modules\.0\.transformer_blocks\.(\d+)\.")[i])
                          for i in blocks]
    config = dict(block_out_channels=tuple(widths), motion_layers_per_block=_collapse(layers),
                  motion_transformer_layers_per_block=_collapse(transformer_layers))
    mid = _counts(state, r"mid_block\.motion_modules\.(\d+)\.transformer_blocks\.(\d+)\.")
    config["use_motion_mid_block"] = bool(mid)
    if mid:
        config["motion_mid_block_layers_per_block"] = len(mid)
        config["motion_transformer_layers_per_mid_block"] = _collapse([len(mid[j]) for j in sorted(mid)])
    if "conv_in.weight" in state:
        config["conv_in_channels"] = int(state["conv_in.weight"].shape[1])
    pe_lengths = {v.shape[1] for k, v in state.items() if k.endswith("pos_embed.pe")}
    if len(pe_lengths) == 1:
        config["motion_max_seq_length"] = pe_lengths.pop()
    prompt = "down_blocks.0.motion_modules.0.transformer_blocks.0.attn2."
    if prompt + "to_k.weight" in state and prompt + "to_q.weight" in state:
        key_width = int(state[prompt + "to_k.weight"].shape[1])
        if key_width != int(state[prompt + "to_q.weight"].shape[1]):  # attn2 attends to the prompt
            config[motion_prompt.CONFIG_KEY] = key_width
    return config


def _config_overrides(config, source) -> dict:
    if config is None:
        return {}
    if isinstance(config, dict):
        return dict(config)
    path = _require_path(config, "motion adapter config")
    if path.is_dir():
        path = path / "config.json"
    try:
        loaded = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: not a readable JSON config for {source}: {error}") from error
    return {k: v for k, v in loaded.items() if not k.startswith("_")}


MOTION_CONFIG_METADATA = "animatelcm_motion_config"  # safetensors metadata key written by save_motion_adapter
# What the tensors cannot tell (the original layout stores no config): kept in the file's metadata.
MOTION_HYPERPARAMETERS = ("motion_num_attention_heads", "motion_norm_num_groups", "motion_max_seq_length")


def _saved_motion_config(path: Path) -> dict:
    """Head count, group count and sequence length from a file written by :func:`save_motion_adapter` ({} for
    other files)."""
    if path.suffix.lower() not in SAFE_SUFFIXES:
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    saved = json.loads(metadata.get(MOTION_CONFIG_METADATA, "{}"))
    return {k: v for k, v in saved.items() if k in MOTION_HYPERPARAMETERS}


_WEIGHT_FILE = re.compile(r"^[^.]+?(?:\.(?P<variant>[A-Za-z0-9_]+))?(?:-\d+-of-\d+)?\.(?:safetensors|bin)$")


def _weights_variant(folder: Path) -> str | None:
    """The variant of a model folder whose weight files all carry one (``fp16`` in
    ``diffusion_pytorch_model.fp16.safetensors``: many downloads hold only those), else None. diffusers and
    transformers read plain weight files unless they are given the variant."""
    variants = {match["variant"] for path in folder.glob("*") if (match := _WEIGHT_FILE.match(path.name))}
    return next(iter(variants)) if len(variants) == 1 and None not in variants else None


def _pipeline_variant(folder: Path) -> str | None:
    """The one variant among a pipeline folder's variant-only components (diffusers then reads plain files for
    the others), else None."""
    variants = {_weights_variant(sub) for sub in folder.iterdir() if sub.is_dir()} - {None}
    return next(iter(variants)) if len(variants) == 1 else None


def _load_prompted_model(cls, folder: Path, torch_dtype=None, overrides=None):
    """A diffusers model folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) of ``cls`` with prompted
    motion modules (:mod:`animatelcm.motion_prompt`), or None when its config has none (diffusers loads those)."""
    from safetensors.torch import load_file

    config = {**json.loads((folder / "config.json").read_text()), **(overrides or {})}
    width = config.pop(motion_prompt.CONFIG_KEY, None)
    if width is None:
        return None
    weights = folder / "diffusion_pytorch_model.safetensors"
    if not weights.exists():
        raise CheckpointError(f"{folder}: a model with prompted motion modules needs {weights.name}")
    model = motion_prompt.add_motion_cross_attention(cls.from_config(config), width)
    model.load_state_dict(load_file(str(weights)))
    return model.to(torch_dtype).eval() if torch_dtype is not None else model.eval()


SPATIAL_UNET_MARKERS = (".attentions.", ".resnets.", "conv_norm_out.", "time_embedding.")


def _motion_module_tensors(state: dict, path: Path) -> dict:
    """The motion-module tensors of a checkpoint: as they are in a motion-module file (without the image encoder
    AnimateLCM-I2V's holds beside them), or picked out of a whole video UNet's (what AnimateDiff's ``train.py``
    saves: every UNet tensor, names prefixed ``module.`` by its DDP wrapper), as AnimateDiff's loader picks them;
    the spatial tensors left out are counted in a warning."""
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    state = {key: value for key, value in state.items()  # AnimateLCM-I2V's image encoder: load_image_adapter's
             if not key.startswith(IMAGE_ENCODER_PREFIX)}
    spatial = [key for key in state if "motion_modules." not in key and any(m in key for m in SPATIAL_UNET_MARKERS)]
    if spatial and len(spatial) < len(state):
        motion = {key: value for key, value in state.items() if "motion_modules." in key}
        warnings.warn(f"{path.name}: a whole video UNet's checkpoint; reading its motion modules only and leaving out "
                      f"its {len(state) - len(motion)} other tensors (the base model supplies those)", stacklevel=4)
        return motion
    return state


@quiet_dtype_rename
def load_motion_adapter(path, config=None, allow_pickle: bool = False, torch_dtype: torch.dtype | None = None):
    """Load a :class:`diffusers.MotionAdapter` from a local path.

    Args:
        path: a diffusers ``MotionAdapter`` folder (``config.json`` + weights), or one ``.safetensors`` file (or
            ``.ckpt``/``.pt`` with ``allow_pickle=True``) in the original AnimateDiff/AnimateLCM key layout
            (``...temporal_transformer.transformer_blocks.0.attention_blocks.0...``, with or without
            ``pos_encoder`` keys) or in diffusers' layout, alone or within a whole video UNet's checkpoint (as
            AnimateDiff's ``train.py`` saves them; its motion modules are read).
        config: entries that override what is inferred from the tensors (dict, a ``config.json``, or a folder
            holding one), e.g. ``{"motion_max_seq_length": 64}`` or ``{"motion_num_attention_heads": 8}``.
        allow_pickle: permit pickled checkpoints (they can execute code when loaded).
        torch_dtype: cast the weights (default: as stored).

    Returns:
        The adapter, with ``config`` describing the inferred block layout.
    """
    from accelerate import init_empty_weights
    from diffusers import MotionAdapter

    path = _require_path(path, "motion adapter")
    if path.is_dir():
        if not (path / "config.json").exists():
            raise CheckpointError(f"{path}: a motion adapter folder needs config.json (a diffusers MotionAdapter "
                                  "folder); for a single checkpoint pass the file itself")
        try:
            adapter = _load_prompted_model(MotionAdapter, path, torch_dtype, _config_overrides(config, str(path)))
            if adapter is None:
                adapter = MotionAdapter.from_pretrained(str(path), local_files_only=True, torch_dtype=torch_dtype,
                                                        variant=_weights_variant(path),
                                                        **_config_overrides(config, str(path)))
        except (OSError, ValueError, RuntimeError) as error:
            raise CheckpointError(f"{path}: could not load the MotionAdapter folder: {error}") from error
        return adapter

    state = _motion_module_tensors(read_state_dict(path, allow_pickle=allow_pickle), path)
    pe_length = None
    if is_original_motion_layout(state):
        state, pe_length = original_to_diffusers_motion_keys(state)
    inferred = {**MOTION_DEFAULTS, **_saved_motion_config(path), **infer_motion_adapter_config(state, str(path))}
    if pe_length is not None:
        inferred["motion_max_seq_length"] = pe_length
    inferred.update(_config_overrides(config, str(path)))
    prompt_width = inferred.pop(motion_prompt.CONFIG_KEY, None)
    try:
        with init_empty_weights():
            adapter = MotionAdapter(**inferred)
            if prompt_width is not None:
                motion_prompt.add_motion_cross_attention(adapter, prompt_width)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: cannot build a MotionAdapter from config {inferred}: {error}") from error
    expected = adapter.state_dict()
    # Positional tables are deterministic sinusoids (a buffer, never trained): files may omit them (AnimateLCM's
    # do) and their length was read above, so the model's own tables are kept.
    state = {k: v for k, v in state.items() if not k.endswith("pos_embed.pe")}
    missing = sorted(k for k in expected if k not in state and not k.endswith("pos_embed.pe"))
    unexpected = sorted(k for k in state if k not in expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise CheckpointError(f"{path}: tensors do not match a MotionAdapter with config {inferred}: "
                              + "; ".join(parts))
    mismatched = [f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                  for k, v in state.items() if v.shape != expected[k].shape]
    if mismatched:
        raise CheckpointError(f"{path}: {len(mismatched)} tensors have the wrong shape, e.g. {mismatched[0]} "
                              "(override the config if the layout was inferred wrongly)")
    adapter.load_state_dict(state, strict=False, assign=True)
    if torch_dtype is not None:
        adapter.to(torch_dtype)
    adapter.eval()
    return adapter


@quiet_dtype_rename
def _load_model_folder(cls, path, what: str, torch_dtype=None):
    """A diffusers-format model folder (``config.json`` + weights) of ``cls``, offline, in eval mode."""
    folder = _require_path(path, what)
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise CheckpointError(f"{what} {folder}: expected a folder with config.json and the weights (as "
                              f"{cls.__name__}.save_pretrained writes it)")
    try:
        model = cls.from_pretrained(str(folder), local_files_only=True, torch_dtype=torch_dtype,
                                    variant=_weights_variant(folder))
    except (OSError, ValueError, RuntimeError, TypeError) as error:
        raise CheckpointError(
            f"{what} {folder}: cannot load it as a {cls.__name__}: {str(error).splitlines()[0]}") from error
    return model.eval()


IMAGE_ENCODER_PREFIX = "img_encoder."


def holds_image_encoder(path, allow_pickle: bool = False) -> bool:
    """Whether the checkpoint file ``path`` holds the image encoder of AnimateLCM's released I2V model
    (``img_encoder.*`` tensors, beside its motion modules in ``AnimateLCM_sd15_i2v.ckpt``)."""
    path = Path(path)
    return path.is_file() and any(key.startswith(IMAGE_ENCODER_PREFIX) for key in _tensor_shapes(path, allow_pickle))


def load_image_adapter(path, torch_dtype: torch.dtype | None = None, allow_pickle: bool = False):
    """The image adapter to set as ``AnimateLCMPipeline.image_adapter``: from a folder (``save_pretrained``'s: an
    :class:`animatelcm.adapters.ImageToVideoAdapter`, as the ``teacher_free`` stage with ``adapter.kind: i2v``
    writes to ``final/i2v_adapter``, or an :class:`~animatelcm.adapters.AnimateLCMImageEncoder`), or an
    :class:`~animatelcm.adapters.AnimateLCMImageEncoder` from a file holding AnimateLCM-I2V's ``img_encoder.*``
    tensors (``AnimateLCM_sd15_i2v.ckpt``, pickled: ``allow_pickle=True``), its widths and blocks per level read
    from the tensors (the most blocks per level that fit the widths: two for the release)."""
    from .adapters import AnimateLCMImageEncoder, ImageToVideoAdapter

    path = _require_path(path, "image adapter")
    if path.is_dir():
        cls = (AnimateLCMImageEncoder if _config_class(path / "config.json") == AnimateLCMImageEncoder.__name__
               else ImageToVideoAdapter)
        return _load_model_folder(cls, path, "image adapter", torch_dtype)
    if path.suffix.lower() not in SAFE_SUFFIXES + PICKLE_SUFFIXES:
        raise CheckpointError(f"image adapter {path}: expected a folder with config.json (as the teacher_free stage "
                              "writes final/i2v_adapter) or a checkpoint holding AnimateLCM-I2V's image encoder "
                              "(AnimateLCM_sd15_i2v.ckpt)")
    state = {key[len(IMAGE_ENCODER_PREFIX):]: value
             for key, value in read_state_dict(path, allow_pickle=allow_pickle).items()
             if key.startswith(IMAGE_ENCODER_PREFIX)}
    if "conv_in.weight" not in state:
        raise CheckpointError(f"image adapter {path}: no {IMAGE_ENCODER_PREFIX}conv_in.weight in the file, so it holds "
                              "no AnimateLCM-I2V image encoder; an ImageToVideoAdapter is loaded from its folder")
    blocks = 1 + max((int(key.split(".")[1]) for key in state if key.startswith("body.")), default=-1)
    widths = [state.get(f"body.{index}.block1.weight", torch.empty(0)).shape[0] for index in range(blocks)]
    if not blocks or 0 in widths:
        raise CheckpointError(f"image adapter {path}: encoder blocks missing (block widths read: {widths})")
    # every level has the same number of blocks and the width changes only between levels, so the blocks per level
    # divide every run of equal widths (SD1.5's 320 320 640 640 1280 1280 1280 1280: two, four levels)
    runs = [len(list(group)) for _, group in itertools.groupby(widths)]
    per_level = functools.reduce(math.gcd, runs)
    config = dict(in_channels=state["conv_in.weight"].shape[1], block_out_channels=tuple(widths[::per_level]),
                  blocks_per_level=per_level)
    encoder = AnimateLCMImageEncoder(**config)
    expected = encoder.state_dict()
    wrong = sorted(set(expected) ^ set(state)) + [key for key in state if key in expected
                                                  and state[key].shape != expected[key].shape]
    if wrong:
        raise CheckpointError(f"image adapter {path}: its {IMAGE_ENCODER_PREFIX}* tensors do not fit an "
                              f"AnimateLCMImageEncoder with {config}: {len(wrong)} missing, extra or of another shape "
                              f"(e.g. {', '.join(wrong[:3])})")
    encoder.load_state_dict(state)
    return (encoder.to(torch_dtype) if torch_dtype is not None else encoder).eval()


def controlnet_config_for(unet) -> dict:
    """The ``diffusers.ControlNetModel`` config of a ControlNet for ``unet`` (a UNet2DConditionModel or
    UNetMotionModel): the architecture of its encoder half (motion blocks named as their 2-D counterparts), as a
    ControlNet trained for that base has it."""
    import inspect

    from diffusers import ControlNetModel

    accepted = inspect.signature(ControlNetModel.__init__).parameters
    config = {key: value for key, value in unet.config.items() if key in accepted and not key.startswith("_")}
    config["down_block_types"] = tuple(kind.replace("Motion", "2D") for kind in unet.config.down_block_types)
    return config


def _conditioning_embedding_channels(state: dict) -> dict:
    """``conditioning_channels`` and ``conditioning_embedding_out_channels`` of an original-layout ControlNet, read
    from its hint encoder's convolutions (``input_hint_block.{0, 2, ...}``: conv_in, then per level a convolution
    keeping the width and one widening it)."""
    convolutions = sorted((int(match.group(1)), value) for key, value in state.items()
                          if (match := re.fullmatch(r"(?:control_model\.)?input_hint_block\.(\d+)\.weight", key)))
    if len(convolutions) < 2:
        return {}
    first = convolutions[0][1]
    widths = [first.shape[0]] + [weight.shape[0] for _, weight in convolutions[2:-1:2]]
    return {"conditioning_channels": first.shape[1], "conditioning_embedding_out_channels": tuple(widths)}


def load_controlnet(path, torch_dtype: torch.dtype | None = None, unet=None, allow_pickle: bool = False):
    """A :class:`diffusers.ControlNetModel` for :class:`AnimateLCMControlNetPipeline`, from a diffusers folder (the
    ``teacher_free`` stage with ``adapter.kind: controlnet_lora`` writes ``final/controlnet``; the hub's
    ``lllyasviel/control_v11p_sd15_*`` folders), or from one file in the original ControlNet layout (ControlNet
    1.1's ``control_v11p_sd15_openpose.pth``, pickled, so ``allow_pickle=True``; their ``.safetensors``
    conversions) or in diffusers' (a hub folder's weights file on its own), whose architecture is ``unet``'s encoder
    (:func:`controlnet_config_for`; the pipeline's UNet)."""
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    model, path = _folder_model_or_file(ControlNetModel, path, "ControlNet", "load_controlnet", unet, torch_dtype)
    if model is not None:
        return model

    state = read_state_dict(path, allow_pickle=allow_pickle)
    config = {**controlnet_config_for(unet), **_conditioning_embedding_channels(state)}
    # diffusers' conversion maps the tensors a file lacks to None
    converted = {key: value for key, value in convert_controlnet_checkpoint(state, config).items() if value is not None}
    return _model_with_weights(ControlNetModel.from_config(config), converted, torch_dtype,
                               f"ControlNet {path}: not a ControlNet for this model's UNet",
                               "an SD1.5 ControlNet in the original layout, or a diffusers folder, is expected")


def _folder_model_or_file(cls, path, what: str, loader: str, unet, torch_dtype):
    """``(model, path)`` for a diffusers folder of ``cls``; ``(None, path)`` for a single file, whose architecture
    comes from the ``unet`` it controls (an error naming ``loader``'s ``unet=`` when it is not given)."""
    path = _require_path(path, what)
    if path.is_dir():
        return _load_model_folder(cls, path, what, torch_dtype), path
    if unet is None:
        raise CheckpointError(f"{what} {path}: a single file holds no architecture; pass the UNet it controls "
                              f"({loader}(path, unet=pipe.unet)), or give a diffusers folder")
    return None, path


def _model_with_weights(model, state: dict, torch_dtype, mismatch: str, expected_kind: str):
    """``model`` (just built from a config) holding ``state`` exactly (every tensor present, of its shape), cast to
    ``torch_dtype``, in eval mode; a :class:`CheckpointError` saying ``mismatch``, how many tensors disagree and
    one of them, and ``expected_kind`` otherwise."""
    expected = model.state_dict()
    problems = ([f"missing {key}" for key in expected if key not in state]
                + [f"unexpected {key}" for key in state if key not in expected]
                + [f"{key}: file {tuple(value.shape)} vs model {tuple(expected[key].shape)}"
                   for key, value in state.items() if key in expected and value.shape != expected[key].shape])
    if problems:
        raise CheckpointError(f"{mismatch} ({len(problems)} mismatches, e.g. {problems[0]}): {expected_kind}")
    model.load_state_dict(state, assign=True)
    if torch_dtype is not None:
        model.to(torch_dtype)
    return model.eval()


def _original_to_diffusers_sparse_keys(state: dict) -> dict:
    """AnimateDiff v3's SparseCtrl names (its motion modules as in a motion-module file, the ControlNet half already
    as diffusers names it) in diffusers' layout; the positional tables are kept (``pos_embed.pe``)."""
    renames = ((".temporal_transformer", ""), (".attention_blocks.0", ".attn1"), (".attention_blocks.1", ".attn2"),
               (".attn1.pos_encoder", ".attn1.pos_embed"), (".attn2.pos_encoder", ".attn2.pos_embed"),
               (".norms.0", ".norm1"), (".norms.1", ".norm2"), (".ff_norm", ".norm3"))
    converted = {}
    for key, value in state.items():
        for old, new in renames:
            key = key.replace(old, new)
        converted[key] = value
    return converted


def sparse_controlnet_config_for(unet, state: dict) -> dict:
    """The ``diffusers.SparseControlNetModel`` config of SparseCtrl tensors ``state`` (diffusers' names) for
    ``unet`` (a UNetMotionModel, or a UNet2DConditionModel): the encoder half's architecture from the UNet, the
    motion modules' heads from it too (their count cannot be read from tensors), and from the tensors the
    conditioning embedding (a VAE latent through one convolution, AnimateDiff's RGB model; or an image through a
    small encoder, its scribble one), whether the mask of conditioned frames is concatenated, and the positional
    table's length."""
    import inspect

    from diffusers import SparseControlNetModel

    accepted = inspect.signature(SparseControlNetModel.__init__).parameters
    config = {key: value for key, value in unet.config.items() if key in accepted and not key.startswith("_")}
    config["down_block_types"] = tuple(kind.replace("2D", "Motion") for kind in unet.config.down_block_types)
    simplified = "controlnet_cond_embedding.weight" in state
    first = state.get("controlnet_cond_embedding.weight" if simplified else "controlnet_cond_embedding.conv_in.weight")
    if first is None:
        raise CheckpointError("no controlnet_cond_embedding tensors: this is not a SparseCtrl model")
    channels = 4 if simplified else 3  # a VAE latent, or an RGB image
    if int(first.shape[1]) - channels not in (0, 1):
        raise CheckpointError(f"its conditioning embedding reads {int(first.shape[1])} channels: a SparseCtrl model "
                              f"{'on latents' if simplified else 'on images'} reads {channels} (+1 for the mask)")
    config.update(use_simplified_condition_embedding=simplified, conditioning_channels=channels,
                  concat_conditioning_mask=int(first.shape[1]) == channels + 1)
    if not simplified:
        # conv_in, then per level a convolution keeping the width and one widening it (blocks 1, 3, ...)
        widths, block = [int(first.shape[0])], 1
        while f"controlnet_cond_embedding.blocks.{block}.weight" in state:
            widths.append(int(state[f"controlnet_cond_embedding.blocks.{block}.weight"].shape[0]))
            block += 2
        config["conditioning_embedding_out_channels"] = tuple(widths)
    motion_heads = unet.config.get("motion_num_attention_heads")
    if motion_heads is not None:
        config["motion_num_attention_heads"] = motion_heads
    lengths = {int(value.shape[1]) for key, value in state.items() if key.endswith("pos_embed.pe")}
    if len(lengths) == 1:
        config["motion_max_seq_length"] = lengths.pop()
    return config


def load_sparse_controlnet(path, torch_dtype: torch.dtype | None = None, unet=None, allow_pickle: bool = False):
    """A :class:`diffusers.SparseControlNetModel` (AnimateDiff v3's SparseCtrl: control images at a few frames) for
    :class:`AnimateLCMSparseControlNetPipeline`, from a diffusers folder (the hub's
    ``guoyww/animatediff-sparsectrl-rgb`` / ``-scribble``) or one file in AnimateDiff's layout
    (``v3_sd15_sparsectrl_rgb.ckpt``, pickled, so ``allow_pickle=True``; or a ``.safetensors`` of it) or in
    diffusers', whose encoder architecture is ``unet``'s (:func:`sparse_controlnet_config_for`)."""
    from diffusers import SparseControlNetModel

    model, path = _folder_model_or_file(SparseControlNetModel, path, "SparseCtrl model", "load_sparse_controlnet",
                                        unet, torch_dtype)
    if model is not None:
        return model
    state = read_state_dict(path, allow_pickle=allow_pickle)
    if "state_dict" in state and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    state = _original_to_diffusers_sparse_keys(state)
    try:
        config = sparse_controlnet_config_for(unet, state)
    except CheckpointError as error:
        raise CheckpointError(f"SparseCtrl model {path}: {error}") from None
    model = SparseControlNetModel.from_config(config)
    tables = {key: value for key, value in model.state_dict().items() if key.endswith("pos_embed.pe")}
    return _model_with_weights(model, {**tables, **state}, torch_dtype,  # a file without tables keeps the model's
                               f"SparseCtrl model {path}: not a SparseCtrl model for this model's UNet",
                               "AnimateDiff v3's SparseCtrl for SD1.5, in its own layout or diffusers', is expected")


def first_folder(*paths) -> Path | None:
    """The first of ``paths`` (None entries skipped) that is a folder: where a single-file VAE finds its config."""
    return next((Path(path) for path in paths if path is not None and Path(path).is_dir()), None)


def load_vae(path, config_folder=None, allow_pickle: bool = False, torch_dtype: torch.dtype | None = None):
    """A ``diffusers.AutoencoderKL`` from a diffusers folder, or from one file (``.safetensors``; pickled
    ``.ckpt``/``.pt`` with ``allow_pickle=True``) in the original LDM layout or diffusers', as the VAEs people download
    to pair with "noVAE" personalised models (``vae-ft-mse-840000-ema-pruned.safetensors``) are. A single file takes
    its architecture from ``config_folder``'s ``vae/config.json`` (an SD1.5 diffusers folder)."""
    from diffusers import AutoencoderKL

    path = _require_path(path, "VAE")
    if path.is_dir():
        return _load_model_folder(AutoencoderKL, path / "vae" if (path / "vae" / "config.json").is_file() else path,
                                  "VAE", torch_dtype)
    if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        read_state_dict(path, allow_pickle=False)  # raises the explanatory error
    if config_folder is None or not (Path(config_folder) / "vae" / "config.json").is_file():
        raise CheckpointError(f"VAE {path}: a single-file VAE needs a Stable Diffusion 1.5 diffusers folder with "
                              f"vae/config.json for its architecture (CLI: --base-config, or a folder --base)")
    try:
        return AutoencoderKL.from_single_file(str(path), config=str(config_folder), subfolder="vae",
                                              local_files_only=True, torch_dtype=torch_dtype).eval()
    except Exception as error:  # noqa: BLE001 - diffusers raises its own SingleFileComponentError among others
        raise CheckpointError(f"VAE {path}: could not load it as a Stable Diffusion VAE: "
                              f"{str(error).splitlines()[0]}") from error


UNET_TOP_LEVEL = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in.", "conv_out.", "conv_norm_out.",
                  "time_embedding.")


def _needs_renaming(keys) -> bool:
    """Whether a LoRA's keys are in a layout diffusers' ``load_lora_weights`` does not read: the original AnimateDiff
    motion-LoRA names, or UNet module paths without the ``unet.`` prefix (``unet.save_attn_procs`` files)."""
    return is_original_motion_layout(keys) or any(key.startswith(UNET_TOP_LEVEL) for key in keys)


def _unet_lora_keys(state: dict) -> dict:
    """A LoRA of :func:`_needs_renaming` in the layout diffusers' LoRA loader reads: original AnimateDiff motion-LoRA
    names (``v2_lora_ZoomIn.ckpt`` and its kind:
    ``...motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.processor.to_q_lora.down.weight``)
    become diffusers' (``...motion_modules.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight``), and UNet
    module paths get the ``unet.`` prefix. The delta stays ``up @ down``, as AnimateDiff applies it."""
    from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers

    if is_original_motion_layout(state):
        state = convert_animatediff_checkpoint_to_diffusers(state)
    return {f"unet.{key}" if key.startswith(UNET_TOP_LEVEL) else key: value for key, value in state.items()}


KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
LYCORIS_ONLY_MARKERS = (".hada_w1_a", ".lokr_w1", ".lokr_w1_a", ".oft_blocks", ".oft_diag", ".lora_mid.weight")
_TEXT_ENCODER_LORA_RENAMES = ((re.compile(r"\.to_(q|k|v)_lora\.(down|up)\.weight$"), r".\1_proj.\2.weight"),
                              (re.compile(r"\.to_out_lora\.(down|up)\.weight$"), r".out_proj.\1.weight"),
                              (re.compile(r"\.lora_linear_layer\.(down|up)\.weight$"), r".\1.weight"))


def is_kohya_layout(keys) -> bool:
    """Whether a LoRA's tensor names are kohya-ss's (sd-scripts, LyCORIS, most personalised LoRAs people download):
    every name starts with ``lora_unet_`` or ``lora_te_`` (``lora_te1_``/``lora_te2_``)."""
    return bool(keys) and all(key.startswith(KOHYA_PREFIXES) for key in keys)


def _alphas_folded(state: dict, path: Path) -> dict:
    """A kohya LoRA with each layer's ``alpha / rank`` multiplied into its ``lora_up`` and the ``.alpha`` entries
    dropped, ranks made one (:func:`_ranks_padded`): the same deltas (``alpha / rank * up @ down``) with the
    per-layer scale 1 diffusers gives a file without alphas. diffusers 0.42 applies one alpha to layers whose alphas or ranks differ (kohya's resized and
    extracted LoRAs, LoCon's own ``conv_alpha``): measured, 109 of 236 layers of a tiny UNet got the wrong scale."""
    folded = {key: value for key, value in state.items() if not key.endswith(".alpha")}
    for key in state.keys() - folded.keys():
        stem = key[:-len(".alpha")]
        down, up = folded.get(f"{stem}.lora_down.weight"), folded.get(f"{stem}.lora_up.weight")
        if down is None or up is None:
            raise CheckpointError(f"{path}: {key} has no {stem}.lora_down.weight and .lora_up.weight beside it; "
                                  "is the file truncated, or not a LoRA?")
        folded[f"{stem}.lora_up.weight"] = (up.float() * (float(state[key]) / down.shape[0])).to(up.dtype)
    return _ranks_padded(folded)


def _ranks_padded(state: dict) -> dict:
    """A kohya LoRA whose layers differ in rank, each padded to the largest with zeros (rows of ``lora_down``,
    columns of ``lora_up``): the same deltas ``up @ down``, one rank for all. Without alphas, diffusers 0.32 scales a
    layer whose rank is not the most common one by ``first rank / its rank`` (measured: 5x on text encoder layers of
    rank 1 beside rank 5), so mixed ranks are made one. (The largest costs the unfused LoRA some arithmetic.)"""
    ranks = {key[:-len(".lora_down.weight")]: value.shape[0] for key, value in state.items()
             if key.endswith(".lora_down.weight")}
    if len(set(ranks.values())) < 2:
        return state
    rank = max(ranks.values())
    padded = dict(state)
    for stem, own in ranks.items():
        up_key = f"{stem}.lora_up.weight"
        if own == rank or up_key not in state:
            continue
        down, up = state[f"{stem}.lora_down.weight"], state[up_key]
        padded[f"{stem}.lora_down.weight"] = torch.cat([down, down.new_zeros((rank - own, *down.shape[1:]))], dim=0)
        padded[up_key] = torch.cat([up, up.new_zeros((up.shape[0], rank - own, *up.shape[2:]))], dim=1)
    return padded


def _kohya_lora_in_diffusers_layout(state: dict, path: Path) -> dict:
    """A kohya LoRA (:func:`is_kohya_layout`) as the state dict diffusers' LoRA loaders read, with the same deltas:
    alphas folded (:func:`_alphas_folded`), names converted by diffusers (``lora_state_dict``), then the text
    encoder's names put in peft's layout (``...self_attn.q_proj.lora_A.weight``). Left in diffusers' legacy names,
    a text encoder LoRA whose attention layers lack ``out_proj`` (q and v only, say) fails to load, and one that also
    has MLP layers loads with its attention layers silently dropped (diffusers 0.42.1)."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    unsupported = sorted({marker for key in state for marker in LYCORIS_ONLY_MARKERS if marker in key})
    if unsupported:
        raise CheckpointError(
            f"{path}: a LyCORIS network of another kind than LoRA/LoCon (its tensors hold {', '.join(unsupported)}: "
            "LoHa, LoKr, OFT or Tucker-decomposed), which diffusers cannot load. Merge it into the base model with "
            "LyCORIS's tools and pass that as --base, or use a LoRA")
    converted, _ = StableDiffusionLoraLoaderMixin.lora_state_dict(_alphas_folded(state, path))
    renamed = {}
    for key, value in converted.items():
        if key.startswith("text_encoder.") and ".lora_A." not in key and ".lora_B." not in key:
            for pattern, replacement in _TEXT_ENCODER_LORA_RENAMES:
                key = pattern.sub(replacement, key)
            key = key.replace(".down.weight", ".lora_A.weight").replace(".up.weight", ".lora_B.weight")
        renamed[key] = value
    return renamed


def lora_source(path: Path, allow_pickle: bool = False) -> tuple[dict | str, dict]:
    """``(source, options)`` for diffusers' LoRA loaders (``load_lora_weights(source, **options)``,
    ``lora_state_dict``) reading the LoRA file ``path``: the file itself (its folder and ``weight_name``, so
    diffusers also reads its metadata) where diffusers reads its layout right, else a state dict converted here:
    kohya files (:func:`_kohya_lora_in_diffusers_layout`), original AnimateDiff motion LoRAs and UNet-only names
    (:func:`_unet_lora_keys`), and every pickled file (read only with ``allow_pickle=True``)."""
    suffix = path.suffix.lower()
    if suffix not in SAFE_SUFFIXES + PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: LoRAs are read from .safetensors files (or folders holding one; "
                              f"{', '.join(PICKLE_SUFFIXES)} with allow_pickle=True)")
    keys = None if suffix in PICKLE_SUFFIXES else _tensor_shapes(path)
    if keys is not None and not _needs_renaming(keys) and not is_kohya_layout(keys):
        return str(path.parent), {"weight_name": path.name}
    state = read_state_dict(path, allow_pickle=allow_pickle)
    return (_kohya_lora_in_diffusers_layout(state, path) if is_kohya_layout(state) else _unet_lora_keys(state)), {}


def lora_weights_file(path) -> Path:
    """``path`` if a file, else the LoRA file of the folder as diffusers picks it: ``pytorch_lora_weights.safetensors``,
    else the folder's only ``.safetensors`` file (``diffusion_pytorch_model.safetensors`` in diffusers' hub copies
    of AnimateDiff's motion LoRAs), else its only pickled one (which :func:`load_lora` reads with ``allow_pickle``)."""
    path = _require_path(path, "LoRA")
    if path.is_file():
        return path
    standard = path / "pytorch_lora_weights.safetensors"
    if standard.is_file():
        return standard
    files = sorted(path.glob("*.safetensors")) or sorted(f for f in path.iterdir() if f.suffix in PICKLE_SUFFIXES)
    if len(files) != 1:
        raise CheckpointError(f"{path}: " + ("no .safetensors LoRA file in the folder" if not files else
                                             f"{len(files)} LoRA files and no pytorch_lora_weights.safetensors"
                                             f" ({', '.join(f.name for f in files)}); name the file"))
    return files[0]


def load_lora(pipe, path, adapter_name: str, scale: float = 1.0, fuse: bool = False, allow_pickle: bool = False):
    """Load a LoRA into ``pipe``'s UNet (and text encoder, if the file has such keys) under ``adapter_name``, and
    activate it with ``scale`` stacked on top of the adapters already active. ``fuse=True`` merges it into the
    weights.

    ``path``: a ``.safetensors`` file or a folder holding one (:func:`lora_weights_file`), in kohya
    (``lora_unet_*``, ``lora_te_*``: LoRA and LoCon, each layer at its own rank and alpha) or diffusers/peft layout;
    AnimateDiff motion LoRAs (camera zoom, pan, ...) in the diffusers layout or the original one, whose releases are
    pickled ``.ckpt`` files, read only with ``allow_pickle=True`` (only for files you trust). diffusers/peft do the
    loading; a file none of whose tensors names a layer of the pipeline raises :class:`CheckpointError`."""
    path = lora_weights_file(path)
    source, options = lora_source(path, allow_pickle)
    first = not any(pipe.get_list_adapters().values())
    try:
        pipe.load_lora_weights(source, adapter_name=adapter_name, local_files_only=True, **options)
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        if first:  # peft leaves its (empty) LoRA wrappers around the layers a failed load reached
            pipe.unload_lora_weights()
        raise CheckpointError(f"{path}: could not load as a LoRA: {error}") from error
    if not any(adapter_name in names for names in pipe.get_list_adapters().values()):
        if first:
            pipe.unload_lora_weights()
        raise CheckpointError(
            f"{path}: none of its tensors names a layer of this pipeline's UNet or text encoder, so nothing was "
            "loaded. Is it a LoRA for another model (SDXL, say), or not a LoRA?")
    scales = getattr(pipe, LORA_SCALES_ATTRIBUTE, {})
    scales = {name: value for name, value in scales.items() if name in pipe.get_active_adapters()}
    scales[adapter_name] = scale
    pipe.set_adapters(list(scales), list(scales.values()))
    setattr(pipe, LORA_SCALES_ATTRIBUTE, scales)
    if fuse:
        pipe.fuse_lora(adapter_names=[adapter_name], lora_scale=1.0)
    return pipe


def diffusers_to_original_motion_keys(state: dict) -> dict:
    """Inverse of :func:`original_to_diffusers_motion_keys`: diffusers MotionAdapter keys -> the original
    AnimateDiff/AnimateLCM layout (positional tables dropped, as in AnimateLCM's files)."""
    renames = ((".norm1.", ".norms.0."), (".norm2.", ".norms.1."), (".norm3.", ".ff_norm."),
               (".attn1.", ".attention_blocks.0."), (".attn2.", ".attention_blocks.1."))
    converted = {}
    for key, value in state.items():
        if key.endswith("pos_embed.pe"):
            continue
        key = re.sub(r"motion_modules\.(\d+)\.", r"motion_modules.\1.temporal_transformer.", key)
        for old, new in renames:
            key = key.replace(old, new)
        converted[key] = value
    return converted


def save_motion_adapter(adapter, path, layout: str = "original") -> Path:
    """Save a MotionAdapter as one ``.safetensors`` in the ``"original"`` AnimateDiff/AnimateLCM layout or in
    ``"diffusers"`` key layout, or (``path`` without a suffix) as a diffusers folder. All three load back with
    :func:`load_motion_adapter` (a file keeps the head count, group count and sequence length, which the tensors do
    not determine, in its metadata). The write goes to a temporary name first, then is renamed."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix == "":
        adapter.save_pretrained(str(path))
        return path
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"save_motion_adapter: {path} must end in .safetensors (or name a folder)")
    if layout not in ("original", "diffusers"):
        raise ValueError(f"save_motion_adapter: layout must be 'original' or 'diffusers', got {layout!r}")
    state = {k: v.detach().contiguous().cpu() for k, v in adapter.state_dict().items()}
    if layout == "original":
        state = diffusers_to_original_motion_keys(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    metadata = {MOTION_CONFIG_METADATA: json.dumps({k: adapter.config[k] for k in MOTION_HYPERPARAMETERS})}
    save_file(state, str(temporary), metadata=metadata)
    temporary.replace(path)
    return path


@quiet_dtype_rename
def _config_class(path: Path) -> str | None:
    """The ``_class_name`` a diffusers ``config.json`` records (None if unreadable or absent)."""
    try:
        return json.loads(path.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


DEFAULT_LOAD_DTYPE = torch.float32
"""What the loaders give every part when no ``torch_dtype`` is named: diffusers' models load in float32 by default,
but transformers 5 keeps a text encoder in the dtype of its file, and a folder saved in float16 (as many SD1.5
models are published) then ran its float16 prompt embeddings into a float32 UNet, which failed."""


def _load_base_components(base, base_config, allow_pickle, torch_dtype, vae=None) -> dict:
    """vae, text_encoder, tokenizer, unet of SD1.5 from a diffusers folder or a single-file checkpoint; ``vae``, a
    loaded VAE, replaces the base's. ``torch_dtype`` None: float32 (:data:`DEFAULT_LOAD_DTYPE`)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    torch_dtype = torch_dtype or DEFAULT_LOAD_DTYPE
    base = _require_path(base, "base model")
    if base.is_dir():
        missing = [sub for sub in ("unet", "vae", "text_encoder", "tokenizer") if not (base / sub).is_dir()]
        if missing:
            raise CheckpointError(f"{base}: not a diffusers Stable Diffusion folder (missing {', '.join(missing)}/)")
        unet_class = _config_class(base / "unet" / "config.json")
        if unet_class not in (None, "UNet2DConditionModel"):
            raise CheckpointError(f"{base}: its unet is a {unet_class}, not Stable Diffusion's UNet2DConditionModel"
                                  + (" (a saved video pipeline: load it as the model folder, CLI --model, with no "
                                     "motion module)" if unet_class == "UNetMotionModel" else ""))
        try:
            parts = {name: cls.from_pretrained(str(base), subfolder=name, local_files_only=True, torch_dtype=torch_dtype,
                                               variant=_weights_variant(base / name))
                     for name, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL),
                                       ("text_encoder", CLIPTextModel)) if not (name == "vae" and vae is not None)}
            parts["tokenizer"] = CLIPTokenizer.from_pretrained(str(base), subfolder="tokenizer", local_files_only=True)
        except (OSError, ValueError, RuntimeError) as error:
            raise CheckpointError(f"{base}: could not load the Stable Diffusion folder: {error}") from error
        _check_sd15_unet(parts["unet"], base)
        return {"vae": vae, **parts} if vae is not None else parts
    if base.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        read_state_dict(base, allow_pickle=False)  # raises the explanatory error
    if base_config is None:
        raise CheckpointError(
            f"{base}: a single-file checkpoint needs a local config: pass base_config (CLI: --base-config) naming a "
            "diffusers Stable Diffusion 1.5 folder; its model_index.json, */config.json and tokenizer files suffice")
    base_config = _require_path(base_config, "base config folder")
    shapes = _tensor_shapes(base, allow_pickle)
    conv_in, conv_out = (shapes.get(f"model.diffusion_model.{name}.weight") for name in ("input_blocks.0.0", "out.2"))
    if conv_in and conv_out:  # before diffusers' own error, which suggests overwriting the weights
        _refuse_extra_input_channels(conv_in[1], conv_out[0], base)
    given = _parts_missing_from_single_file(base, shapes, base_config, {"vae": vae} if vae else {}, torch_dtype,
                                            allow_pickle)
    try:
        pipe = StableDiffusionPipeline.from_single_file(str(base), config=str(base_config), local_files_only=True,
                                                        torch_dtype=torch_dtype, safety_checker=None,
                                                        requires_safety_checker=False, **given)
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise CheckpointError(f"{base}: could not load as a single-file Stable Diffusion checkpoint with config "
                              f"{base_config}: {error}") from error
    _check_sd15_unet(pipe.unet, base)
    return dict(unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)


def _tensor_shapes(path: Path, allow_pickle: bool = False) -> dict[str, tuple]:
    """``{tensor name: shape}`` of a checkpoint file (as a dict of names, what diffusers' key tests take), without
    reading its tensors where the format allows (safetensors; zip pickles are memory-mapped)."""
    if path.suffix.lower() in SAFE_SUFFIXES:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as file:
                return {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): "
                                  f"{error}") from error
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        return {key: tuple(value.shape) for key, value in state.items() if isinstance(value, torch.Tensor)}
    except Exception:  # noqa: BLE001 - legacy pickles cannot be memory-mapped or hold other objects
        return {key: tuple(value.shape) for key, value in read_state_dict(path, allow_pickle=allow_pickle).items()}


def _has_weights(folder: Path) -> bool:
    return any(_WEIGHT_FILE.match(path.name) for path in folder.glob("*"))


CLIP_PREFIX = "cond_stage_model.transformer."
UNWRAPPED_CLIP_PREFIXES = tuple(CLIP_PREFIX + part for part in ("embeddings.", "encoder.", "final_layer_norm."))


def _text_encoder_of_unwrapped_clip_keys(base: Path, keys: dict, base_config: Path, torch_dtype,
                                         allow_pickle: bool):
    """The CLIP text encoder of a single file that names its weights without ``text_model.``
    (``cond_stage_model.transformer.encoder.layers.0...``, as files saved by older transformers, some personalised
    SD1.5 models among them, do; AUTOMATIC1111 renames them on load), built from ``base_config``'s
    ``text_encoder/config.json``. diffusers does not see these weights and would take another text encoder."""
    from transformers import CLIPTextConfig, CLIPTextModel

    try:
        model = CLIPTextModel(CLIPTextConfig.from_pretrained(str(base_config / "text_encoder"), local_files_only=True))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{base}: its text encoder weights need {base_config / 'text_encoder'}/config.json for "
                              f"the architecture: {error}") from error
    names = [key for key in keys if key.startswith(UNWRAPPED_CLIP_PREFIXES)]
    if base.suffix.lower() in SAFE_SUFFIXES:
        from safetensors import safe_open

        with safe_open(str(base), framework="pt") as file:
            tensors = {key: file.get_tensor(key) for key in names}
    else:
        state = read_state_dict(base, allow_pickle=allow_pickle)
        tensors = {key: state[key] for key in names}
    wrapper = "text_model." if hasattr(model, "text_model") else ""  # transformers 5 dropped the wrapper
    state = {wrapper + key[len(CLIP_PREFIX):]: value for key, value in tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [key for key in missing if not key.endswith("position_ids")]
    unexpected = [key for key in unexpected if not key.endswith("position_ids")]
    if missing or unexpected:
        raise CheckpointError(
            f"{base}: its text encoder weights ({CLIP_PREFIX}encoder...) do not fit {base_config / 'text_encoder'}'s "
            f"config: {len(missing)} missing ({', '.join(missing[:3])}), {len(unexpected)} unexpected "
            f"({', '.join(unexpected[:3])}). Is it a Stable Diffusion 1.5 model?")
    return model.to(torch_dtype).eval() if torch_dtype is not None else model.eval()


def _parts_missing_from_single_file(base: Path, keys: dict, base_config: Path, given: dict,
                                    torch_dtype=None, allow_pickle: bool = False) -> dict:
    """``given`` (parts the caller supplies, a VAE say) plus the parts diffusers' ``from_single_file`` would not
    find in a single-file ``base`` (its tensor names: ``keys``): a text encoder named without ``text_model.``,
    read here (:func:`_text_encoder_of_unwrapped_clip_keys`), and the VAE and text encoder it lacks ("noVAE"
    personalised models, UNet-only files), loaded from ``base_config``'s weights: ``from_single_file`` keyword
    arguments (diffusers alone fails on such files)."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import LDM_VAE_KEYS, is_clip_model_in_single_file
    from transformers import CLIPTextModel

    present = {"vae": any(key.startswith(tuple(LDM_VAE_KEYS)) for key in keys),
               "text_encoder": is_clip_model_in_single_file(CLIPTextModel, keys)}
    parts = dict(given)
    if not present["text_encoder"] and any(key.startswith(UNWRAPPED_CLIP_PREFIXES) for key in keys):
        parts["text_encoder"] = _text_encoder_of_unwrapped_clip_keys(base, keys, base_config, torch_dtype,
                                                                     allow_pickle)
    for name, cls in (("vae", AutoencoderKL), ("text_encoder", CLIPTextModel)):
        if present[name] or name in parts:
            continue
        if not _has_weights(base_config / name):
            raise CheckpointError(
                f"{base}: holds no {name} weights, and the config folder {base_config} has none in {name}/ "
                "either: pass a Stable Diffusion 1.5 folder with weights as base_config (CLI: --base-config)"
                + (", or a VAE (vae=..., CLI: --vae)" if name == "vae" else ""))
        warnings.warn(f"{base.name} holds no {name} weights: using {base_config / name}'s", stacklevel=2)
        parts[name] = _load_model_folder(cls, base_config / name, name, torch_dtype)
    return parts


def _refuse_extra_input_channels(in_channels: int, out_channels: int, base) -> None:
    if in_channels != out_channels:
        raise CheckpointError(
            f"{base}: a UNet with {in_channels} input and {out_channels} output channels (an inpainting or "
            "instruct-pix2pix model: its extra input channels take a masked or source image), which text-to-video "
            "AnimateLCM cannot drive; use a text-to-image Stable Diffusion 1.5 model")


def _check_sd15_unet(unet, base) -> None:
    """Refuse, naming the file, a base UNet that AnimateLCM's pipelines and trainer cannot drive: one with extra
    embeddings (SDXL's), which would fail the first call with a TypeError, or with more input than output channels
    (inpainting and instruct-pix2pix models'), whose calls would fail on the latents' shape."""
    _refuse_extra_input_channels(unet.config.in_channels, unet.config.out_channels, base)
    if unet.config.addition_embed_type is not None:
        raise CheckpointError(
            f"{base}: a UNet with {unet.config.addition_embed_type!r} extra embeddings (SDXL's), which AnimateLCM's "
            "Stable Diffusion 1.5 pipeline cannot drive; for SDXL use diffusers' AnimateDiffSDXLPipeline with an "
            "SDXL motion module (animatelcm.patch_pipeline runs it on the fused kernels)")


def _check_parts_match(unet, adapter, base, motion_module) -> None:
    """Refuse, naming both files, a motion module made for another base model (diffusers would say only
    "incompatible", or fail on a weight's shape)."""
    levels, widths = tuple(unet.config.block_out_channels), tuple(adapter.config.block_out_channels)
    if levels != widths:
        raise CheckpointError(f"{motion_module}: a motion module for UNet block widths {widths}, but the base "
                              f"{base} has {levels}: they are made for different base models")


def _refuse_image_pipeline(model: Path) -> None:
    """A pipeline folder whose UNet has no motion modules and which holds no motion adapter (a Stable Diffusion
    image pipeline) would sample every frame on its own: refused, naming the way to animate it."""
    try:
        index = json.loads((model / "model_index.json").read_text())
    except (OSError, ValueError):
        return  # diffusers' loader names what is wrong with it
    adapter = index.get("motion_adapter") if isinstance(index, dict) else None
    if _config_class(model / "unet" / "config.json") == "UNet2DConditionModel" and not (
            isinstance(adapter, list) and adapter and adapter[0]):
        raise CheckpointError(
            f"{model}: a Stable Diffusion image pipeline (a UNet without motion modules, no motion adapter): it would "
            "draw every frame on its own. Give it as the base with motion modules (CLI: --base FOLDER "
            "--motion-module FILE; load_pipeline(base=..., motion_module=...))")


@quiet_dtype_rename
def load_pipeline(model=None, *, base=None, base_config=None, motion_module=None, motion_config=None, vae=None,
                  lcm_lora=None, lcm_lora_scale: float = 0.8, loras=(), allow_pickle: bool = False,
                  torch_dtype: torch.dtype | None = None, device=None):
    """Build an :class:`animatelcm.AnimateLCMPipeline` from local files.

    Either ``model``, a saved pipeline folder (``model_index.json`` + components, e.g. written by
    ``save_pretrained``), or the parts: ``base`` (SD1.5 diffusers folder or single file + ``base_config``) and
    ``motion_module`` (see :func:`load_motion_adapter`; ``motion_config`` overrides). Then ``lcm_lora`` (the
    AnimateLCM spatial LoRA, applied at ``lcm_lora_scale``; AnimateLCM uses 0.8) and ``loras``, a sequence of
    ``(path, scale)`` LoRAs stacked on top (:func:`load_lora`). ``vae`` (see :func:`load_vae`; a single file takes
    its architecture from ``base_config``, the ``base`` folder or the ``model`` folder) replaces the model's VAE; a
    single-file ``base`` without VAE or text encoder weights ("noVAE" models) takes them from ``vae`` or
    ``base_config``'s weights. The scheduler is the model folder's (a
    ``diffusers.LCMScheduler`` becomes :class:`animatelcm.LCMScheduler`, same config; another one, DDIM say, is kept:
    :func:`animatelcm.schedulers.lcm_scheduler_like` makes AnimateLCM's on its noise schedule, as ``animatelcm
    generate`` does), or, from parts, AnimateLCM's (:func:`animatelcm.animatelcm_scheduler`). Every part is
    loaded in ``torch_dtype`` (default float32, whatever dtype the files hold) and moved to ``device``.
    """
    from .pipelines import AnimateLCMPipeline

    torch_dtype = torch_dtype or DEFAULT_LOAD_DTYPE

    if model is not None and (base is not None or motion_module is not None):
        raise ValueError("give either a model folder or base + motion_module, not both")
    if vae is not None:
        vae = load_vae(vae, first_folder(base_config, base, model), allow_pickle=allow_pickle, torch_dtype=torch_dtype)
    if model is not None:
        model = _require_path(model, "model folder")
        if not (model / "model_index.json").exists():
            raise CheckpointError(f"{model}: not a saved pipeline folder (no model_index.json)")
        _refuse_image_pipeline(model)
        try:
            from diffusers import MotionAdapter, UNetMotionModel

            prompted = {"vae": vae} if vae is not None else {}  # and prompted motion modules, which diffusers
            # cannot build from their config, are passed in built
            if (model / "unet" / "config.json").exists():
                unet = _load_prompted_model(UNetMotionModel, model / "unet", torch_dtype)
                if unet is not None:
                    prompted["unet"] = unet
                    if (model / "motion_adapter" / "config.json").exists():
                        adapter = _load_prompted_model(MotionAdapter, model / "motion_adapter", torch_dtype)
                        if adapter is not None:
                            prompted["motion_adapter"] = adapter
            pipe = AnimateLCMPipeline.from_pretrained(str(model), local_files_only=True, torch_dtype=torch_dtype,
                                                      variant=_pipeline_variant(model),
                                                      **prompted)
        except (OSError, ValueError, RuntimeError) as error:
            raise CheckpointError(f"{model}: could not load the pipeline folder: {error}") from error
    else:
        if base is None or motion_module is None:
            raise ValueError("building a pipeline from parts needs both base (SD1.5) and motion_module")
        parts = _load_base_components(base, base_config, allow_pickle, torch_dtype, vae=vae)
        adapter = load_motion_adapter(motion_module, config=motion_config, allow_pickle=allow_pickle,
                                      torch_dtype=torch_dtype)
        _check_parts_match(parts["unet"], adapter, base, motion_module)
        pipe = AnimateLCMPipeline(motion_adapter=adapter, **parts)
    if lcm_lora is not None:
        load_lora(pipe, lcm_lora, adapter_name="animatelcm", scale=lcm_lora_scale, allow_pickle=allow_pickle)
    for index, (path, scale) in enumerate(loras):
        load_lora(pipe, path, adapter_name=f"lora_{index}", scale=scale, allow_pickle=allow_pickle)
    if device is not None:
        pipe.to(device)
    return pipe
