"""The embedded default model used when no model is given (``animatelcm generate`` with no model arguments).

The folder ``assets/default_model`` holds either a saved pipeline (``model_index.json`` + weights: a trained
model) or only ``default_model.json``, describing a tiny model built from its seed with random weights.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "default_model"


@dataclass
class DefaultModel:
    """The loaded default pipeline and what a user should be told about it."""

    pipe: object
    trained: bool
    description: str
    height: int
    width: int
    fps: float


def load_default_model(torch_dtype=None, device=None) -> DefaultModel:
    """Load the embedded default model (trained weights when shipped, else the seeded random tiny model)."""
    from .loading import load_pipeline
    from .pipelines import AnimateLCMPipeline
    from .testing import TinyConfig, tiny_components

    meta = json.loads((DEFAULT_MODEL_DIR / "default_model.json").read_text())
    if (DEFAULT_MODEL_DIR / "model_index.json").exists():
        pipe = load_pipeline(DEFAULT_MODEL_DIR, torch_dtype=torch_dtype)
    else:
        config = TinyConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["tiny_config"].items()})
        with tempfile.TemporaryDirectory() as tokenizer_dir:
            components = tiny_components(tokenizer_dir, config=config, seed=meta["seed"])
        pipe = AnimateLCMPipeline(**components)
        if torch_dtype is not None:
            pipe.to(dtype=torch_dtype)
    if device is not None:
        pipe.to(device)
    return DefaultModel(pipe=pipe, trained=bool(meta.get("trained")), description=meta["description"],
                        height=meta["height"], width=meta["width"], fps=meta["fps"])
