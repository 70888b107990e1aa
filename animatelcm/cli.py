"""Command line: ``animatelcm generate`` (prompt -> GIF/MP4), ``animatelcm train`` (one training stage from a
YAML config; exit status 3 when the loss diverges), ``animatelcm eval`` (score a model on the moving-shapes world)
and ``animatelcm info``.

User errors (a bad value, a missing or unreadable file) print one line ``animatelcm: error: ...`` and exit with
status 2; set ``ANIMATELCM_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import sys
import time
from pathlib import Path

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class UserError(Exception):
    """A problem with what the user asked for; printed as one line, exit status 2."""


def _int_at_least(minimum: int, maximum: int | None = None):
    """An argparse type: an integer >= ``minimum`` (and <= ``maximum``, if given)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be at least {minimum}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"{value} must be at most {maximum}")
        return value
    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)
_generator_seed = _int_at_least(-1, 2 ** 64 - 1)  # torch.Generator.manual_seed takes up to this; -1: draw one
_clip_seed = _int_at_least(0, 2 ** 40)  # evaluation.clip_noise seeds clip i with seed * 1_000_003 + i


def _finite_float(text) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _non_negative_float(text):
    value = _finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be a non-negative number")
    return value


def _positive_float(text):
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be a positive number")
    return value


def _strength(text):
    value = _finite_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{value} must be in (0, 1]")
    return value


def _beta(text):
    value = _finite_float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be between 0 and 1 (SD1.5's beta_end is 0.012)")
    return value


def _lora_spec(text):
    """PATH or PATH:SCALE."""
    path, sep, scale = text.rpartition(":")
    if sep and path and not scale.startswith(("/", "\\")):
        try:
            value = float(scale)
        except ValueError:
            return text, 1.0  # a colon in the path itself
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"{text!r}: the LoRA scale must be a finite number")
        return path, value
    return text, 1.0


def _frame_prompt(text):
    """FRAME:TEXT (prompt travel): a frame index of 1 or more and a non-empty prompt."""
    frame, sep, prompt = text.partition(":")
    if not sep or not frame.strip().isdigit() or not prompt.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: expected FRAME:TEXT, a frame number and the prompt from there "
                                         "on (e.g. 8:a dog running)")
    if int(frame) == 0:
        raise argparse.ArgumentTypeError(f"{text!r}: frame 0 takes --prompt; give frames of 1 or more")
    return int(frame), prompt.strip()


def _frame_image(text):
    """FRAME:PATH (SparseCtrl): a frame index and the control image for it."""
    frame, sep, path = text.partition(":")
    if not sep or not frame.strip().isdigit() or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: expected FRAME:IMAGE, a frame number and the control image for "
                                         "it (e.g. 0:first.png)")
    return int(frame), path


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one line (no usage dump) with exit status 2."""

    def error(self, message):
        self.exit(2, f"animatelcm: error: {message} (see `{self.prog} --help`)\n")


def _add_model_arguments(parser) -> None:
    models = parser.add_argument_group("model (all local paths; none given = embedded default)")
    models.add_argument("--model", help="a saved AnimateLCM/AnimateDiff pipeline folder (model_index.json)")
    models.add_argument("--base", help="Stable Diffusion 1.5: diffusers folder or single-file checkpoint")
    models.add_argument("--base-config", help="diffusers SD1.5 folder with the configs for a single-file --base")
    models.add_argument("--motion-module", help="motion module: .safetensors (original or diffusers layout) or folder")
    models.add_argument("--motion-max-frames", type=_positive_int, default=None,
                        help="override the motion module's positional table length (inferred from the file)")
    models.add_argument("--vae", help="VAE replacing the model's: diffusers folder, or single file "
                        "(vae-ft-mse-840000-ema-pruned.safetensors, say; its config from --base-config or the "
                        "--base/--model folder); what 'noVAE' single-file --base models need, unless --base-config "
                        "holds VAE weights")
    models.add_argument("--lcm-lora", help="AnimateLCM spatial LoRA (.safetensors, kohya or diffusers keys)")
    models.add_argument("--lcm-lora-scale", type=_finite_float, default=0.8, help="scale of the LCM LoRA (default 0.8)")
    models.add_argument("--lora", action="append", default=[], type=_lora_spec, metavar="PATH[:SCALE]",
                        help="LoRA stacked on top (repeatable): a personalised style LoRA, or an AnimateDiff "
                             "motion LoRA (zoom, pan, ...; original or diffusers layout)")
    models.add_argument("--allow-pickle", action="store_true",
                        help="allow .ckpt/.pt checkpoints (pickles can run code: only for files you trust)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = OneLineErrorParser(prog="animatelcm", description="Few-step video generation with AnimateLCM.")
    parser.add_argument("--version", action="version", version=f"animatelcm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineErrorParser)

    gen = sub.add_parser("generate", help="turn a prompt (and an image, a video, or control frames) into a GIF or MP4",
                         description="Generate a clip. With no model arguments the embedded default model is used.")
    gen.add_argument("--prompt", required=True, action="append",
                     help="what the clip should show; repeat it for several clips from one model load (written as "
                          "OUT's name with -0, -1, ... added)")
    gen.add_argument("--prompt-at", action="append", default=[], type=_frame_prompt, metavar="FRAME:TEXT",
                     help="prompt travel: the prompt at frame FRAME (repeatable; --prompt is frame 0's). Between "
                          "these frames the text embeddings are interpolated, after the last held; runs on FreeNoise "
                          "(as --free-noise), so not with --image")
    gen.add_argument("--negative-prompt", action="append", default=[],
                     help="what to avoid (only used with --guidance > 1); one for every clip, or one per --prompt")
    _add_model_arguments(gen)
    adapters = gen.add_argument_group("image to video, video to video, control frames to video")
    adapters.add_argument("--image", help="picture to animate (PNG/JPEG/...): the clip starts from it; needs an image "
                                          "adapter (--image-adapter, one saved in --model, or AnimateLCM-I2V's "
                                          "release as --motion-module)")
    adapters.add_argument("--image-adapter", help="ImageToVideoAdapter folder (the teacher_free stage with "
                                                  "adapter.kind: i2v writes final/i2v_adapter), or a file holding "
                                                  "AnimateLCM-I2V's image encoder (AnimateLCM_sd15_i2v.ckpt: "
                                                  "--allow-pickle; given as --motion-module, it is used without this)")
    adapters.add_argument("--image-motion-scale", type=_non_negative_float, default=None, metavar="S",
                          help="strength of the frame embedding the image adapter adds (default: the adapter's own, "
                               "0.8 for AnimateLCM-I2V); lower keeps more of the picture, higher moves more "
                               "(AnimateLCM-I2V's demo offers 0 to 1.5)")
    adapters.add_argument("--match-image-colors", action=argparse.BooleanOptionalAction, default=None,
                          help="shift each frame's mean hue, saturation and brightness towards the picture's, as "
                               "AnimateLCM-I2V's demo does (default: on with AnimateLCM-I2V's encoder, off otherwise)")
    adapters.add_argument("--video", help="video to video: a clip (a video file, or a folder of images in natural "
                                          "name order) redrawn to the prompt, keeping its layout and motion; as "
                                          "many frames as it has (or the first --frames)")
    adapters.add_argument("--strength", type=_strength, default=None, metavar="S",
                          help="how much of --video is redrawn, in (0, 1]: the last int(steps x S) steps run from "
                               "its frames noised to the first of them (default 0.8, diffusers'; 1 redraws all)")
    adapters.add_argument("--control", action="append", default=[],
                          help="control clip, one image per frame: a video file (.mp4, .gif, ...) or a folder of "
                               "images in natural name order (frame2 before frame10); needs --controlnet. Repeat "
                               "both (in the same order) to combine ControlNets, openpose and depth, say")
    adapters.add_argument("--controlnet", action="append", default=[],
                          help="ControlNet: a diffusers folder (the teacher_free stage with adapter.kind: "
                               "controlnet_lora writes final/controlnet), or an SD1.5 ControlNet file in the "
                               "original layout (control_v11p_sd15_*.pth: --allow-pickle; or .safetensors)")
    adapters.add_argument("--control-scale", type=_non_negative_float, action="append", default=[],
                          help="strength of the ControlNet's residuals (default 1.0); one for all ControlNets, or "
                               "one each")
    adapters.add_argument("--control-edges", action="store_true",
                          help="turn the control frames into Sobel edge maps first (for ControlNets trained with "
                               "adapter.control: edges)")
    adapters.add_argument("--sparsectrl",
                          help="SparseCtrl model (AnimateDiff v3's: RGB or scribble) steering a few frames given "
                               "with --sparse-frame: a diffusers folder, or its file in AnimateDiff's layout "
                               "(v3_sd15_sparsectrl_*.ckpt: --allow-pickle; or .safetensors). --control-scale sets "
                               "its strength")
    adapters.add_argument("--sparse-frame", action="append", default=[], type=_frame_image, metavar="FRAME:IMAGE",
                          help="a control image for frame FRAME (repeatable; a picture for the RGB model, a "
                               "scribble for the scribble one): its centre at the clip's aspect ratio, resized")
    gen.add_argument("--steps", type=_positive_int, default=4, help="sampling steps (default 4)")
    gen.add_argument("--beta-end", type=_beta, default=None, metavar="B",
                     help="last beta of the noise schedule the LCM scheduler samples on (default: the model's; "
                          "0.014 with AnimateLCM-I2V's encoder, as its demo, which offers 0.012 to 0.016: higher "
                          "samples noisier steps)")
    gen.add_argument("--frames", type=_positive_int, default=None,
                     help="frames (default 16, or the length of --video or --control)")
    gen.add_argument("--free-noise", action="store_true",
                     help="for clips longer than the motion module's positional table: denoise overlapping 16-frame "
                          "windows, 4 frames apart (diffusers' FreeNoise; one window for a shorter clip; not with "
                          "--image)")
    gen.add_argument("--height", type=_positive_int, default=None, help="pixels, multiple of 8 (default: the model's)")
    gen.add_argument("--width", type=_positive_int, default=None, help="pixels, multiple of 8 (default: the model's)")
    gen.add_argument("--guidance", type=_non_negative_float, default=1.0,
                     help="classifier-free guidance; 1.0 = off (AnimateLCM's default), up to ~2")
    gen.add_argument("--clip-skip", type=_positive_int, default=None, metavar="N",
                     help="encode the prompt with the text encoder's layer N before the last (through its final "
                          "norm), as some personalised SD1.5 models expect (often 1; diffusers' clip_skip)")
    gen.add_argument("--seed", type=_generator_seed, action="append", default=[],
                     help="random seed (default 0); -1 draws one and prints it, to make the clip again. One for every "
                          "clip, or one per clip: repeat it (with one --prompt, one clip per seed)")
    gen.add_argument("--fps", type=_positive_float, default=None, help="frames per second of the file (default 8)")
    gen.add_argument("--out", default="outputs/animatelcm.gif", help="output file, .gif or .mp4")
    gen.add_argument("--upscale", type=_positive_int, default=1,
                     help="enlarge the written frames N times, nearest neighbour (for viewing small clips)")
    gen.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: fp16 on CUDA, fp32 on CPU")
    gen.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    gen.add_argument("--decode-chunk-size", type=_positive_int, default=16, help="frames per VAE decode call")
    gen.add_argument("--no-fused", action="store_true",
                     help="run diffusers' own modules instead of the fused kernels (animatelcm.patch_pipeline, "
                          "the default; same frames within 1e-3)")
    gen.add_argument("--cuda-graph", action="store_true",
                     help="on a GPU, also replay the UNet from CUDA graphs, one captured per input shape "
                          "(patch_pipeline(cuda_graph=True)). The first step pays two warm-up calls and the capture, "
                          "so it pays off over several clips of one run: on an H100 at 16x512x512 a replayed step "
                          "took 0.062 s against 0.092 s (guidance 1). No effect on the CPU, with --image or on a UNet "
                          "that runs forward hooks (prompted motion modules)")

    tr = sub.add_parser("train", help="run one training stage from a YAML config",
                        description="Run one stage of decoupled consistency learning (see configs/ and README).")
    tr.add_argument("config", help="YAML run configuration (configs/mini/*.yaml, configs/sd15/*.yaml)")
    tr.add_argument("--output-dir", help="where checkpoints, metrics and final/ go (overrides output_dir)")
    tr.add_argument("--max-steps", type=_positive_int, help="optimiser steps (overrides train.max_steps)")
    tr.add_argument("--checkpoint-every", type=_non_negative_int,
                    help="checkpoint every N steps, 0 = only at the end (overrides train.checkpoint_every)")
    tr.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the output dir")
    tr.add_argument("--set", action="append", default=[], type=_override, metavar="KEY=VALUE",
                    help="override any config key, e.g. --set train.learning_rate=1e-5 (repeatable; YAML values)")

    ev = sub.add_parser("eval", help="score a model on the moving-shapes world (FVD/CLIPSIM analogues, fidelity)",
                        description="Generate clips of every 'a {colour} {shape} moving {direction}' prompt from "
                                    "fixed noise and score them (see animatelcm.evaluation).")
    _add_model_arguments(ev)
    ev.add_argument("--scheduler", choices=["lcm", "ddim", "dpmsolver"], default="lcm",
                    help="sampler: lcm (default), ddim or dpmsolver (DPM-Solver++), both trailing spacing")
    ev.add_argument("--lcm-original-steps", type=_positive_int, default=None,
                    help="LCM: the distillation grid (original_inference_steps; default: the model's)")
    ev.add_argument("--steps", type=_positive_int, nargs="+", default=[1, 2, 4, 8], help="step counts (default 1 2 4 8)")
    ev.add_argument("--guidance", type=_non_negative_float, default=1.0, help="classifier-free guidance (1.0 = off)")
    ev.add_argument("--clips", type=_positive_int, default=512, help="generated clips per step count (default 512)")
    ev.add_argument("--real-clips", type=_positive_int, default=512, help="real clips for the FVD statistics")
    ev.add_argument("--frames", type=_positive_int, default=16, help="frames per clip (default 16)")
    ev.add_argument("--attribute-net", default=None,
                    help="the evaluation network (.safetensors; default: the one shipped with the package, for 16 "
                         "frames at 32x32); trained first when --train-attribute-net is given")
    ev.add_argument("--train-attribute-net", action="store_true",
                    help="train the evaluation network on real clips and write it to --attribute-net")
    ev.add_argument("--net-steps", type=_positive_int, default=600, help="training steps of the evaluation network")
    ev.add_argument("--reference", help="clips (.pt) to measure teacher fidelity against, from --save-clips")
    ev.add_argument("--save-clips", help="write the clips of the last step count here (.pt, fp16)")
    ev.add_argument("--i3d", help="I3D TorchScript file (StyleGAN-V interface) for real FVD")
    ev.add_argument("--seed", type=_clip_seed, default=0, help="noise seed (default 0)")
    ev.add_argument("--batch-size", type=_positive_int, default=32, help="clips per pipeline call")
    ev.add_argument("--out", help="write the results as JSON here")
    ev.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: fp16 on CUDA, fp32 on CPU")
    ev.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")

    sub.add_parser("info", help="version, native build and usable backends")
    return parser


def _override(text):
    """KEY=VALUE with a YAML value (``train.max_steps=10``, ``data.kind=video``)."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key.strip(), yaml.safe_load(value)


def train(args) -> dict:
    from .training.config import load_config
    from .training.trainer import Trainer

    overrides = dict(args.set)
    for flag, key in (("output_dir", "output_dir"), ("max_steps", "train.max_steps"),
                      ("checkpoint_every", "train.checkpoint_every")):
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    run = load_config(args.config, overrides)
    outputs = Trainer(run, resume=args.resume).train()
    for name, path in outputs.items():
        print(f"{name}: {path}")
    return outputs


def _resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise UserError(f"--device {name!r} is not a device name ({error})") from None
    if (device.type == "cuda" and not torch.cuda.is_available()) or (
            device.type == "mps" and not torch.backends.mps.is_available()):
        raise UserError(f"--device {name}: torch sees no {device.type.upper()} device here; use --device cpu")
    try:
        torch.empty(0, device=device)  # another kind not built in, or a GPU index past the last
    except (RuntimeError, AssertionError) as error:
        reason = str(error).split(". ")[0].splitlines()[0]
        raise UserError(f"--device {name}: this torch cannot use it ({reason}); use --device cpu"
                        + (f", or cuda:0 to cuda:{torch.cuda.device_count() - 1}" if device.type == "cuda"
                           else "")) from None
    return device


def _resolve_dtype(name: str, device):
    import torch

    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, DTYPES[name])


def _check_writable(flag: str, path: Path) -> None:
    """A file can be written at ``path``: it is not a folder, and its nearest existing parent is a writable folder
    (missing folders are made when the file is written)."""
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; name a file")
    parent = next(p for p in (path.parent, *path.parent.parents) if p.exists())
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: cannot write in {parent}")


def _check_paths(args) -> None:
    for flag in ("model", "base", "base_config", "motion_module", "vae", "lcm_lora", "image", "image_adapter",
                 "video", "control", "controlnet", "sparsectrl"):
        value = getattr(args, flag, None)
        for path in value if isinstance(value, list) else [value]:  # repeatable flags give lists
            if path is not None and not Path(path).exists():
                raise UserError(f"--{flag.replace('_', '-')} {path}: no such file or folder")
    for path, _ in args.lora:
        if not Path(path).exists():
            raise UserError(f"--lora {path}: no such file or folder")
    for frame, path in getattr(args, "sparse_frame", []):
        if not Path(path).is_file():
            raise UserError(f"--sparse-frame {frame}:{path}: no such file")
    if args.command == "generate" and Path(args.out).suffix.lower() not in (".gif", ".mp4"):
        raise UserError(f"--out {args.out}: the file name must end in .gif or .mp4")
    for flag in ("out", "save_clips"):  # checked before the model loads, not after the work is done
        if getattr(args, flag, None):
            _check_writable(f"--{flag.replace('_', '-')}", Path(getattr(args, flag)))
    if args.model and (args.base or args.motion_module):
        raise UserError("give either --model or --base with --motion-module, not both")
    if bool(args.base) != bool(args.motion_module):
        raise UserError("--base and --motion-module go together (or give --model, or neither for the default)")
    if getattr(args, "vae", None) and not (args.model or args.base):
        raise UserError("--vae replaces the VAE of a --model or --base; the embedded default model keeps its own")
    for flag in ("height", "width"):
        value = getattr(args, flag, None)
        if value is not None and value % 8:
            raise UserError(f"--{flag} {value} must be a multiple of 8")
    if args.command == "generate":
        _clips(args)  # the repeated flags agree, before the model loads
        _prompt_travel(args.prompt_at, args.frames)  # and the clip's frames, where --frames gives them
        _check_sparse_control(args)
        if args.prompt_at and args.image:
            raise UserError("--prompt-at with --image: prompt travel runs on FreeNoise, which denoises windows of "
                            "the clip, and the image adapter embeds the frame index of the whole clip; drop one")
        if args.cuda_graph and args.no_fused:
            raise UserError("--cuda-graph replays the fused pipeline's UNet; drop --no-fused (or --cuda-graph)")
        if args.controlnet and not args.control:
            raise UserError("--controlnet needs --control (the control frames it reads)")
        if args.control and not args.controlnet:
            raise UserError("--control needs --controlnet (the ControlNet that reads the frames)")
        if len(args.control) != len(args.controlnet) and args.control and args.controlnet:
            raise UserError(f"--control and --controlnet pair up in order: got {len(args.control)} control clips "
                            f"and {len(args.controlnet)} ControlNets")
        if len(args.control_scale) not in (0, 1, len(args.controlnet)):
            raise UserError(f"--control-scale: give one for all ControlNets or one each ({len(args.controlnet)}), "
                            f"not {len(args.control_scale)}")
        if args.image and (args.video or args.control):
            raise UserError("--image starts a clip from a picture: give it without --video and --control")
        if args.strength is not None and not args.video:
            raise UserError("--strength needs --video (the clip to redraw)")
        if args.video:
            from .pipelines import DEFAULT_STRENGTH

            strength = DEFAULT_STRENGTH if args.strength is None else args.strength
            if int(args.steps * strength) < 1:
                raise UserError(f"--strength {strength:g} of --steps {args.steps} runs no step (the last "
                                "int(steps x strength) steps run): raise one of them")
        for flag in ("image_adapter", "image_motion_scale", "match_image_colors"):
            if getattr(args, flag) is not None and not args.image:
                raise UserError(f"--{flag.replace('_', '-')} needs --image (the picture to animate)")


def _load_model(args, dtype, device):
    """``(pipe, default)``: the pipeline the model arguments name, or the embedded default (``default`` is then
    its :class:`~animatelcm.default_model.DefaultModel`, else None)."""
    from .default_model import load_default_model
    from .loading import load_lora, load_pipeline
    from .schedulers import LCMScheduler, lcm_scheduler_like

    if args.model or args.base:
        print(f"loading model from {args.model or args.base} ...", file=sys.stderr)
        motion_config = {"motion_max_seq_length": args.motion_max_frames} if args.motion_max_frames else None
        pipe = load_pipeline(args.model, base=args.base, base_config=args.base_config,
                             motion_module=args.motion_module, motion_config=motion_config, vae=args.vae,
                             lcm_lora=args.lcm_lora,
                             lcm_lora_scale=args.lcm_lora_scale, loras=args.lora, allow_pickle=args.allow_pickle,
                             torch_dtype=dtype, device=device)
        if not isinstance(pipe.scheduler, LCMScheduler):  # a saved AnimateDiff folder's DDIM, say: few-step LCM
            print(f"NOTE: sampling with AnimateLCM's LCM scheduler on the noise schedule of the folder's "
                  f"{type(pipe.scheduler).__name__}", file=sys.stderr)
            pipe.scheduler = lcm_scheduler_like(pipe.scheduler)
        return pipe, None
    default = load_default_model(torch_dtype=dtype, device=device)
    print("using the embedded default model (the miniature AnimateLCM: prompts 'a {red|green|blue|yellow} "
          "{circle|square|triangle} moving {left|right|up|down}', 32x32 clips)", file=sys.stderr)
    if args.lcm_lora:
        load_lora(default.pipe, args.lcm_lora, adapter_name="animatelcm", scale=args.lcm_lora_scale,
                  allow_pickle=args.allow_pickle)
    for index, (path, scale) in enumerate(args.lora):
        load_lora(default.pipe, path, adapter_name=f"lora_{index}", scale=scale, allow_pickle=args.allow_pickle)
    return default.pipe, default


def evaluate(args) -> dict:
    import json

    import torch
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from . import evaluation
    from .default_model import ATTRIBUTE_NET_PATH

    _check_paths(args)
    if args.attribute_net is None:
        if args.train_attribute_net:
            raise UserError("--train-attribute-net needs --attribute-net PATH to write the network to")
        args.attribute_net = str(ATTRIBUTE_NET_PATH)
    for flag in ("reference", "i3d"):
        value = getattr(args, flag)
        if value is not None and not Path(value).is_file():
            raise UserError(f"--{flag} {value}: no such file")
    if not args.train_attribute_net and not Path(args.attribute_net).is_file():
        raise UserError(f"--attribute-net {args.attribute_net}: no such file (add --train-attribute-net to train "
                        "one there)")
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    device = _resolve_device(args.device)
    dtype = _resolve_dtype(args.dtype, device)
    pipe, _ = _load_model(args, dtype, device)
    pipe.scheduler = evaluation.sampling_scheduler(pipe, args.scheduler, args.lcm_original_steps)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    if args.train_attribute_net:
        _, info = evaluation.train_evaluation_net(args.attribute_net, frames=args.frames, size=size,
                                                  steps=args.net_steps)
        print(f"attribute network: held-out accuracy {info['held_out_accuracy']} -> {args.attribute_net}")
    net, info = evaluation.load_attribute_net(args.attribute_net)
    if (info.get("frames"), info.get("size")) != (args.frames, size):
        print(f"NOTE: the attribute network was trained on {info.get('frames')} frames at {info.get('size')} px; "
              f"evaluating {args.frames} frames at {size} px", file=sys.stderr)
    reference = torch.load(args.reference, weights_only=True) if args.reference else None
    i3d = torch.jit.load(args.i3d, map_location=device).eval() if args.i3d else None
    results = evaluation.evaluate_pipeline(pipe, net, args.steps, num_clips=args.clips, frames=args.frames,
                                           guidance_scale=args.guidance, real_count=args.real_clips, seed=args.seed,
                                           batch_size=args.batch_size, reference=reference, i3d=i3d,
                                           save_clips=args.save_clips)
    report = {"model": args.model or args.base or "embedded default", "scheduler": args.scheduler,
              "guidance": args.guidance, "clips": args.clips, "frames": args.frames, "size": size,
              "device": str(device), "attribute_net": info, "results": results}
    for steps, metrics in results.items():
        print(f"{steps:>3} step(s): " + "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")
    return report


FREE_NOISE_WINDOW = 16  # frames per FreeNoise window: the clip length AnimateLCM's motion modules were trained on
FREE_NOISE_STRIDE = 4   # frames between window starts (diffusers' default)


def generate(args) -> list[Path]:
    """Write the clips the arguments ask for, from one model load; returns their files."""
    import torch
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from .export import export_video

    _check_paths(args)
    diffusers_logging.set_verbosity_error()  # dtype-cast notices are not actionable here; errors still show
    transformers_logging.set_verbosity_error()
    device = _resolve_device(args.device)
    dtype = _resolve_dtype(args.dtype, device)
    height, width, fps = args.height, args.width, args.fps
    started = time.perf_counter()
    pipe, default = _load_model(args, dtype, device)
    if default is not None:
        height, width = height or default.height, width or default.width
        fps = fps or default.fps
    pipe, call_arguments = _add_adapters(args, pipe, dtype, device, height, width)
    if args.beta_end is not None and pipe.scheduler.config.beta_end != args.beta_end:
        from .schedulers import lcm_scheduler_like

        if not _beta_end_applies(pipe.scheduler):
            raise UserError(f"--beta-end: the model's scheduler does not use beta_end (beta_schedule "
                            f"{pipe.scheduler.config.beta_schedule!r}, trained_betas "
                            f"{'given' if pipe.scheduler.config.trained_betas is not None else 'none'}); leave it out")
        pipe.scheduler = lcm_scheduler_like(pipe.scheduler, beta_end=args.beta_end)
    frames = call_arguments.get("num_frames") or len(call_arguments["video"])
    travel = _prompt_travel(args.prompt_at, frames)
    if args.free_noise or travel:  # before the patch, which runs FreeNoise's blocks as it finds them
        if args.image:
            raise UserError("--free-noise with --image: the image adapter embeds the frame index of the whole clip, "
                            "FreeNoise denoises windows of it; drop one of them")
        window = min(FREE_NOISE_WINDOW, pipe.max_frames() or FREE_NOISE_WINDOW, frames)
        pipe.enable_free_noise(context_length=window, context_stride=FREE_NOISE_STRIDE)
    if not args.no_fused:
        from . import patching

        try:
            patching.patch_pipeline(pipe, cuda_graph=args.cuda_graph)
        except (TypeError, ValueError) as error:  # a pipeline the patch does not cover: run it as it is
            print(f"NOTE: running without the fused kernels: {error}", file=sys.stderr)
    if args.cuda_graph:
        from .cuda_graphs import runs_forward_hooks

        unserved = (f"on the {device.type.upper()}" if device.type != "cuda" else "with --image" if args.image
                    else "on this model, whose UNet runs forward hooks (prompted motion modules, say)"
                    if runs_forward_hooks(pipe.unet) else None)
        if unserved:
            print(f"NOTE: --cuda-graph has no effect {unserved}: the UNet runs as it is", file=sys.stderr)
    if args.negative_prompt and args.guidance <= 1:
        print(f"NOTE: --negative-prompt has no effect at --guidance {args.guidance:g} (it steers only with "
              "classifier-free guidance, --guidance > 1)", file=sys.stderr)
    steps = int(args.steps * call_arguments["strength"]) if "strength" in call_arguments else args.steps
    written = []
    for prompt, negative_prompt, seed, out in _clips(args):
        if seed == -1:
            seed = random.SystemRandom().randrange(2 ** 63)
            print(f"seed {seed} (drawn for --seed -1; --seed {seed} makes this clip again)", file=sys.stderr)
        torch.manual_seed(seed)  # what draws from torch's global generator (SparseCtrl's RGB encode) repeats too
        result = pipe(prompt={0: prompt, **travel} if travel else prompt, negative_prompt=negative_prompt,
                      height=height, width=width, num_inference_steps=args.steps, guidance_scale=args.guidance,
                      generator=torch.Generator("cpu").manual_seed(seed), decode_chunk_size=args.decode_chunk_size,
                      clip_skip=args.clip_skip, output_type="np", **call_arguments)
        clip = result.frames[0]
        if args.upscale > 1:
            clip = clip.repeat(args.upscale, axis=1).repeat(args.upscale, axis=2)
        written.append(export_video(clip, out, fps=fps or 8.0))
        print(f"wrote {written[-1]} ({frames} frame{'s' * (frames != 1)}, {steps} step{'s' * (steps != 1)}, "
              f"{time.perf_counter() - started:.1f} s)")
        started = time.perf_counter()
    return written


def _clips(args) -> list[tuple[str, str | None, int, Path]]:
    """``(prompt, negative prompt, seed, output file)`` of each clip the arguments ask for: as many as the most
    repeated of --prompt, --negative-prompt and --seed (each given once or that many times); several clips are
    written as ``--out``'s name with ``-0``, ``-1``, ... added."""
    negatives = args.negative_prompt or [None]
    seeds = args.seed or [0]
    count = max(len(args.prompt), len(negatives), len(seeds))
    for flag, values in (("--prompt", args.prompt), ("--negative-prompt", negatives), ("--seed", seeds)):
        if len(values) not in (1, count):
            raise UserError(f"{flag} is given {len(values)} times for {count} clips: give it once (for every clip) "
                            f"or {count} times")
    out = Path(args.out)
    width = len(str(count - 1))
    outputs = [out] if count == 1 else [out.with_name(f"{out.stem}-{i:0{width}d}{out.suffix}") for i in range(count)]

    def each(values):
        return values * count if len(values) == 1 else values

    return list(zip(each(args.prompt), each(negatives), each(seeds), outputs))


def _prompt_travel(frame_prompts: list[tuple[int, str]], frames: int | None) -> dict[int, str]:
    """--prompt-at's ``(frame, prompt)`` pairs as diffusers' FreeNoise prompt dict (without frame 0, which each clip's
    --prompt fills); each frame must be in the clip of ``frames`` (not checked for None) and given once."""
    travel = {}
    for frame, prompt in frame_prompts:
        if frames is not None and frame >= frames:
            raise UserError(f"--prompt-at {frame}:...: the clip has {frames} frames (0 to {frames - 1}); give a frame "
                            "in it")
        if frame in travel:
            raise UserError(f"--prompt-at names frame {frame} twice; give each frame one prompt")
        travel[frame] = prompt
    return dict(sorted(travel.items()))


def _check_sparse_control(args) -> None:
    """--sparsectrl and --sparse-frame go together, alone (text to video), one image per frame of the clip."""
    if bool(args.sparsectrl) != bool(args.sparse_frame):
        raise UserError("--sparsectrl and --sparse-frame go together: the SparseCtrl model and the frames it steers "
                        "(--sparse-frame 0:first.png, say)")
    if not args.sparsectrl:
        return
    for flag in ("image", "video", "control"):
        if getattr(args, flag):
            raise UserError(f"--sparsectrl with --{flag}: SparseCtrl steers a text-to-video clip; drop one of them")
    if args.control_edges:
        raise UserError("--control-edges applies to --control; give --sparse-frame the scribbles or pictures the "
                        "SparseCtrl model reads")
    if len(args.control_scale) > 1:
        raise UserError("--control-scale: one SparseCtrl model takes one scale")
    frames = args.frames or 16
    seen = set()
    for frame, _ in args.sparse_frame:
        if frame >= frames:
            raise UserError(f"--sparse-frame {frame}:...: the clip has {frames} frames (0 to {frames - 1}); give a "
                            "frame in it")
        if frame in seen:
            raise UserError(f"--sparse-frame names frame {frame} twice; give each frame one image")
        seen.add(frame)


def _beta_end_applies(scheduler) -> bool:
    """Whether ``scheduler``'s noise schedule is set by its ``beta_end`` (not by given betas or a cosine)."""
    config = scheduler.config
    return config.get("trained_betas") is None and config.get("beta_schedule") in ("linear", "scaled_linear")


def _read_picture(path, flag: str = "--image"):
    """The picture at ``path``, RGB and upright by its EXIF orientation."""
    from .training.data import DataError, read_rgb_image

    try:
        return read_rgb_image(path)
    except DataError as error:
        raise UserError(f"{flag} {path}: not a readable image ({error.__cause__})") from None


def _natural_order(path: Path) -> list:
    """Sort key of a file name with its digit runs compared as numbers: frame2.png before frame10.png."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", path.name)]


def _read_clip(path, frames: int | None, height: int, width: int, edges: bool = False, flag: str = "--control"):
    """The clip at ``path`` (a video file or a folder of images; read for the option ``flag``) as
    ``[F, 3, height, width]`` in [0, 1] (``frames`` of them, from the start; all when None): each frame's centre at
    the clip's aspect ratio, resized; optionally as edge maps."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from .adapters import edge_maps
    from .training.data import IMAGE_SUFFIXES, DataError, decode_video

    path = Path(path)
    if path.is_dir():
        files = sorted((p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=_natural_order)
        if not files:
            raise UserError(f"{flag} {path}: no images ({', '.join(IMAGE_SUFFIXES)}) in the folder")
        pictures = [_read_picture(file, flag) for file in files[:frames]]
        clip = np.stack([np.asarray(picture.resize(pictures[0].size)) for picture in pictures])
    else:
        try:
            first_frames = None if frames is None else (lambda available: list(range(min(available, frames))))
            clip = decode_video(path, select=first_frames)
        except DataError as error:
            raise UserError(f"{flag} {error}") from None
    if frames is not None and len(clip) < frames:
        raise UserError(f"{flag} {path} has {len(clip)} frames, fewer than --frames {frames}")
    clip = torch.from_numpy(clip[:frames]).permute(0, 3, 1, 2).float() / 255
    rows, columns = clip.shape[-2:]  # the centre at the clip's aspect ratio (ControlNet UIs' "crop and resize")
    if rows * width > columns * height:
        kept = max(1, round(columns * height / width))
        clip = clip[..., (rows - kept) // 2:(rows - kept) // 2 + kept, :]
    else:
        kept = max(1, round(rows * width / height))
        clip = clip[..., (columns - kept) // 2:(columns - kept) // 2 + kept]
    clip = F.interpolate(clip, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return edge_maps(clip * 2 - 1) if edges else clip


def _add_adapters(args, pipe, dtype, device, height, width):
    """``(pipe, extra call arguments)``: the pipeline with the image adapter or ControlNet the arguments name (a
    ControlNet pipeline for --control, a video-to-video one for --video, with a ControlNet for both), and what its
    call needs besides the prompt (``num_frames``, or the ``video`` whose frames it redraws)."""
    from PIL import Image, ImageOps

    from .adapters import AnimateLCMImageEncoder
    from .loading import holds_image_encoder, load_controlnet, load_image_adapter, load_sparse_controlnet
    from .pipelines import (DEFAULT_STRENGTH, AnimateLCMControlNetPipeline, AnimateLCMSparseControlNetPipeline,
                            AnimateLCMVideoToVideoControlNetPipeline, AnimateLCMVideoToVideoPipeline)
    from .schedulers import IMAGE_TO_VIDEO_BETA_END, IMAGE_TO_VIDEO_ORIGINAL_STEPS, lcm_scheduler_like

    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    height, width = height or size, width or size
    if args.image:
        released_i2v = (not args.image_adapter and getattr(pipe, "image_adapter", None) is None
                        and args.motion_module is not None
                        and holds_image_encoder(args.motion_module, allow_pickle=args.allow_pickle))
        if args.image_adapter or released_i2v:
            pipe.image_adapter = load_image_adapter(args.image_adapter or args.motion_module, torch_dtype=dtype,
                                                    allow_pickle=args.allow_pickle).to(device)
        elif getattr(pipe, "image_adapter", None) is None:
            raise UserError("--image needs an image adapter: give --image-adapter FOLDER (the teacher_free stage with "
                            "adapter.kind: i2v writes final/i2v_adapter), a --model saved with one, or AnimateLCM-I2V's "
                            "release as --motion-module (its image encoder comes with it)")
        if args.image_motion_scale is not None:
            pipe.image_adapter.register_to_config(motion_scale=args.image_motion_scale)
        release = isinstance(pipe.image_adapter, AnimateLCMImageEncoder)
        if release and not args.model:  # sampled as AnimateLCM-I2V's demo samples it (a saved folder: its scheduler)
            overrides = {"original_inference_steps": IMAGE_TO_VIDEO_ORIGINAL_STEPS}
            if _beta_end_applies(pipe.scheduler):
                overrides["beta_end"] = IMAGE_TO_VIDEO_BETA_END if args.beta_end is None else args.beta_end
            print(f"NOTE: sampling AnimateLCM-I2V's image encoder as its demo does: "
                  f"{', '.join(f'{k}={v:g}' for k, v in overrides.items())}", file=sys.stderr)
            pipe.scheduler = lcm_scheduler_like(pipe.scheduler, **overrides)
        # the picture's centre at the clip's aspect ratio, as training clips are cropped and AnimateLCM-I2V's demo
        # crops (the pipeline would stretch it)
        picture = ImageOps.fit(_read_picture(args.image), (width, height), method=Image.Resampling.LANCZOS)
        match_colors = release if args.match_image_colors is None else args.match_image_colors
        return pipe, {"num_frames": args.frames or 16, "image": picture, "match_image_colors": match_colors}
    if args.sparsectrl:
        controlnet = load_sparse_controlnet(args.sparsectrl, torch_dtype=dtype, unet=pipe.unet,
                                            allow_pickle=args.allow_pickle).to(device)
        pictures = [ImageOps.fit(_read_picture(path, "--sparse-frame"), (width, height),
                                 method=Image.Resampling.LANCZOS) for _, path in args.sparse_frame]
        return AnimateLCMSparseControlNetPipeline.from_pipe(pipe, controlnet=controlnet), {
            "num_frames": args.frames or 16, "conditioning_frames": pictures,
            "controlnet_frame_indices": [frame for frame, _ in args.sparse_frame],
            "controlnet_conditioning_scale": (args.control_scale or [1.0])[0]}
    video = _read_clip(args.video, args.frames, height, width, flag="--video") if args.video else None
    arguments = {} if video is None else {
        "video": list(video), "strength": DEFAULT_STRENGTH if args.strength is None else args.strength}
    if not args.control:
        if video is not None:
            return AnimateLCMVideoToVideoPipeline.from_pipe(pipe), arguments
        return pipe, {"num_frames": args.frames or 16}
    controlnets = [load_controlnet(path, torch_dtype=dtype, unet=pipe.unet, allow_pickle=args.allow_pickle)
                   .to(device) for path in args.controlnet]
    clips = [_read_clip(path, args.frames, height, width, args.control_edges) for path in args.control]
    lengths = [len(clip) for clip in [*clips, *([] if video is None else [video])]]
    if len(set(lengths)) > 1:
        named = ", ".join(f"{flag} {length}" for flag, length in
                          zip(["--control"] * len(clips) + ["--video"], lengths))
        raise UserError(f"the clips differ in length ({named} frames): give --frames N to take the first N of each")
    scales = args.control_scale or [1.0]
    cls = AnimateLCMControlNetPipeline if video is None else AnimateLCMVideoToVideoControlNetPipeline
    if video is None:
        arguments["num_frames"] = lengths[0]
    if len(controlnets) == 1:
        return cls.from_pipe(pipe, controlnet=controlnets[0]), {
            **arguments, "conditioning_frames": list(clips[0]), "controlnet_conditioning_scale": scales[0]}
    return cls.from_pipe(pipe, controlnet=controlnets), {
        **arguments, "conditioning_frames": [list(clip) for clip in clips],
        "controlnet_conditioning_scale": scales * len(controlnets) if len(scales) == 1 else scales}


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "info":
        from .info import main as info_main

        info_main()
        return 0
    from .loading import CheckpointError
    from .ops import BackendUnavailableError
    from .ops.dispatch import forced_backend

    try:
        forced_backend()  # a misspelt ANIMATELCM_BACKEND is an error now, not after the models have loaded
        if args.command == "train":
            from .training.trainer import TrainingDiverged, TrainingInterrupted

            try:
                train(args)
            except TrainingDiverged as error:
                if os.environ.get("ANIMATELCM_DEBUG"):
                    raise
                print(f"animatelcm: training stopped: {error}", file=sys.stderr)
                return 3
            except TrainingInterrupted as error:
                print(f"animatelcm: {error}", file=sys.stderr)
                return 130  # the shell's status for a run stopped by Ctrl-C
        elif args.command == "eval":
            evaluate(args)
        else:
            generate(args)
    except (UserError, CheckpointError, BackendUnavailableError, ValueError, OSError) as error:
        if os.environ.get("ANIMATELCM_DEBUG"):
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"animatelcm: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C while loading or generating: nothing was written (exports are atomic)
        if os.environ.get("ANIMATELCM_DEBUG"):
            raise
        print("animatelcm: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
