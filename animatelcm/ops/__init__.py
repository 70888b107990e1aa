"""Fused ops with an eager reference, C++ (CPU), CUDA and Triton kernels behind one dispatcher
(``ANIMATELCM_BACKEND=auto|eager|cpp|cuda|triton`` forces one). Each op is a ``torch.library`` custom op
(``torch.ops.animatelcm.*``) with a fake implementation, so ``torch.compile`` traces through it.
See :mod:`animatelcm.ops.dispatch` for how a backend is chosen."""

from .attention import explain_temporal_attention, temporal_attention, temporal_attention_reference
from .consistency import (
    COEFFICIENT_NAMES,
    PREDICTION_TYPES,
    consistency_step,
    consistency_step_reference,
    explain_consistency_step,
)
from .dispatch import BACKENDS, BackendUnavailableError
from .geglu import geglu, geglu_reference, linear_geglu, linear_geglu_reference
from .layer_norm import (
    explain_layer_norm,
    layer_norm,
    layer_norm_reference,
    residual_layer_norm,
    residual_layer_norm_reference,
)
from .linear import cpu_gemm_library, linear
from .group_norm import (
    explain_group_norm_silu,
    group_norm_silu,
    group_norm_silu_reference,
    temporal_group_norm,
    temporal_group_norm_reference,
    temporal_unpermute_residual,
    temporal_unpermute_residual_reference,
)
from .native import build_info


def _implementations():
    from . import attention, consistency, group_norm
    from .geglu import IMPLEMENTATIONS as GEGLU_IMPLEMENTATIONS  # `geglu` here is the function
    from .geglu import LINEAR_GEGLU_IMPLEMENTATIONS
    from .layer_norm import IMPLEMENTATIONS as LAYER_NORM_IMPLEMENTATIONS  # `layer_norm` here is the function

    return {
        "temporal_attention": attention.IMPLEMENTATIONS,
        "group_norm_silu": group_norm.GROUP_NORM_SILU,
        "temporal_group_norm": group_norm.TEMPORAL_GROUP_NORM,
        "temporal_unpermute_residual": group_norm.UNPERMUTE_RESIDUAL,
        "consistency_step": consistency.IMPLEMENTATIONS,
        "geglu": GEGLU_IMPLEMENTATIONS,
        "linear_geglu": LINEAR_GEGLU_IMPLEMENTATIONS,
        "layer_norm": LAYER_NORM_IMPLEMENTATIONS,  # residual_layer_norm's too
    }


def backend_report() -> dict[str, str | None]:
    """{backend: None if usable in this process, else why not} for every backend name; a backend is usable when
    it exists here, whatever inputs it would accept (``ops_by_backend`` says which ops each implements)."""
    report = {name: "no op implements it" for name in BACKENDS}
    for implementations in _implementations().values():
        for impl in implementations:
            reason = impl.available()
            if report[impl.backend] is not None:
                report[impl.backend] = reason
    return report


def available_backends() -> list[str]:
    """Names of the backends usable in this process (``backend_report`` gives the reasons for the others)."""
    return [name for name, reason in backend_report().items() if reason is None]


def ops_by_backend() -> dict[str, list[str]]:
    """{backend: [ops it implements]}."""
    table = {name: [] for name in BACKENDS}
    for op, implementations in _implementations().items():
        for impl in implementations:
            table[impl.backend].append(op)
    return table


__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "COEFFICIENT_NAMES",
    "PREDICTION_TYPES",
    "available_backends",
    "backend_report",
    "build_info",
    "consistency_step",
    "cpu_gemm_library",
    "consistency_step_reference",
    "explain_consistency_step",
    "explain_group_norm_silu",
    "explain_layer_norm",
    "explain_temporal_attention",
    "geglu",
    "geglu_reference",
    "group_norm_silu",
    "group_norm_silu_reference",
    "layer_norm",
    "layer_norm_reference",
    "linear",
    "linear_geglu",
    "linear_geglu_reference",
    "ops_by_backend",
    "residual_layer_norm",
    "residual_layer_norm_reference",
    "temporal_attention",
    "temporal_attention_reference",
    "temporal_group_norm",
    "temporal_group_norm_reference",
    "temporal_unpermute_residual",
    "temporal_unpermute_residual_reference",
]
