"""The embedded default model used when no model is given (``animatelcm generate`` with no model arguments).

``assets/default_model`` is a saved :class:`~animatelcm.AnimateLCMPipeline` (fp16 weights, a few MB): the miniature
AnimateLCM trained end to end by ``benchmarks/mini_world.py`` on the synthetic moving-shapes world, with
``default_model.json`` describing it, and an image-to-video adapter trained on it teacher-free (``mini_world.py
i2v``), so ``animatelcm generate --image`` works without an adapter flag. ``assets/attribute_net.safetensors`` is the evaluation network of that world
(:mod:`animatelcm.evaluation`), the default of ``animatelcm eval --attribute-net``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_MODEL_DIR = ASSETS / "default_model"
ATTRIBUTE_NET_PATH = ASSETS / "attribute_net.safetensors"


@dataclass
class DefaultModel:
    """The loaded default pipeline and what a user should be told about it."""

    pipe: object
    description: str
    height: int
    width: int
    fps: float
    frames: int
    steps: int


def load_default_model(torch_dtype=None, device=None) -> DefaultModel:
    """Load the embedded default model; ``torch_dtype`` defaults to float32 (the weights are stored in fp16)."""
    import torch

    from .loading import load_pipeline

    meta = json.loads((DEFAULT_MODEL_DIR / "default_model.json").read_text())
    pipe = load_pipeline(DEFAULT_MODEL_DIR, torch_dtype=torch_dtype or torch.float32, device=device)
    return DefaultModel(pipe=pipe, description=meta["description"], height=meta["height"], width=meta["width"],
                        fps=meta["fps"], frames=meta["frames"], steps=meta["steps"])
