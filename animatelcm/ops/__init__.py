"""Fused ops with an eager reference, C++ and CUDA kernels behind one dispatcher (``ANIMATELCM_BACKEND`` forces
one). See :mod:`animatelcm.ops.dispatch` for how a backend is chosen."""

from .consistency import (
    COEFFICIENT_NAMES,
    PREDICTION_TYPES,
    consistency_step,
    consistency_step_reference,
    explain_consistency_step,
)
from .dispatch import BACKENDS, BackendUnavailableError
from .native import build_info


def available_backends() -> dict[str, str | None]:
    """{backend: None if usable in this process, else the reason it is not}."""
    from .consistency import IMPLEMENTATIONS

    report = {impl.backend: impl.available() for impl in IMPLEMENTATIONS}
    report.setdefault("triton", "no Triton kernels are registered yet")
    return {name: report.get(name) for name in BACKENDS}


__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "COEFFICIENT_NAMES",
    "PREDICTION_TYPES",
    "available_backends",
    "build_info",
    "consistency_step",
    "consistency_step_reference",
    "explain_consistency_step",
]
