"""GEGLU activation: ``x [..., 2*I]`` -> ``x[..., :I] * gelu(x[..., I:])`` (exact, erf GELU) in one pass.

diffusers' ``GEGLU`` splits the projection output, materialises ``gelu(gate)`` and then the product; the fused op
reads the projection output once and writes the result once. Arithmetic in float32; NaN propagates elementwise.
Autograd by the reference formulas.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .dispatch import Implementation, eager_fast_path, select
from .native import (
    SCALAR_TYPE_CODES,
    cuda_kernels_unavailable_reason,
    cuda_stream_handle,
    native_module,
    native_unavailable_reason,
    pointer,
    reject_unless_native,
)

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def geglu_reference(x):
    """Eager GEGLU: ``x [..., 2*I]`` -> ``[..., I]`` in x's dtype (float32 math; float64 stays)."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    hidden, gate = x.to(compute).chunk(2, dim=-1)
    return (hidden * F.gelu(gate)).to(x.dtype)


def _eager(x):
    return geglu_reference(x).contiguous()


def _native(kernel_name, extra, x):
    x = x.contiguous()
    inner = x.shape[-1] // 2
    out = torch.empty((*x.shape[:-1], inner), dtype=x.dtype, device=x.device)
    if out.numel():
        getattr(native_module(), kernel_name)(pointer(x), pointer(out), x.numel() // x.shape[-1], inner,
                                              SCALAR_TYPE_CODES[x.dtype], *extra(x))
    return out


IMPLEMENTATIONS = [
    Implementation("cuda", lambda x: _native("geglu_cuda", lambda t: (cuda_stream_handle(t.device),), x),
                   cuda_kernels_unavailable_reason, reject_unless_native("cuda")),
    Implementation("cpp", lambda x: _native("geglu_cpu", lambda t: (), x), native_unavailable_reason,
                   reject_unless_native("cpu")),
    Implementation("eager", _eager, lambda: None, lambda *a: None),
]


@torch.library.custom_op("animatelcm::geglu", mutates_args=())
def _geglu_op(x: torch.Tensor, backend: str) -> torch.Tensor:
    return select("geglu", IMPLEMENTATIONS, x, backend=backend).run(x)


@_geglu_op.register_fake
def _(x, backend):
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward(ctx, grad):
    (x,) = ctx.saved_tensors
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    hidden, gate = x.to(compute).chunk(2, dim=-1)
    g = grad.to(compute)
    cdf = 0.5 * (1.0 + torch.erf(gate / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * gate * gate) / math.sqrt(2.0 * math.pi)
    grad_hidden = g * gate * cdf
    grad_gate = g * hidden * (cdf + gate * pdf)
    return torch.cat([grad_hidden, grad_gate], dim=-1).to(x.dtype), None


_geglu_op.register_autograd(_backward, setup_context=_setup)


def geglu(x, backend="auto"):
    """``x [..., 2*I]`` -> ``x[..., :I] * gelu(x[..., I:])`` (contiguous output); ``backend`` picks one."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"geglu: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"geglu: x must be float32/float16/bfloat16/float64, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] % 2:
        raise ValueError(f"geglu: the last dimension must be even (hidden and gate halves), got shape {tuple(x.shape)}")
    if eager_fast_path(x):
        return select("geglu", IMPLEMENTATIONS, x, backend=backend).run(x)
    return _geglu_op(x, backend)
