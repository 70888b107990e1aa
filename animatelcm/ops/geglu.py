"""GEGLU activation: ``x [..., 2*I]`` -> ``x[..., :I] * gelu(x[..., I:])`` (exact, erf GELU) in one pass, with an
optional bias ``[2*I]`` added to x first.

diffusers' ``GEGLU`` splits the projection output, materialises ``gelu(gate)`` and then the product; the fused op
reads the projection output once and writes the result once. With the bias, the projection before it can run as a
plain matrix product: PyTorch's CPU ``addmm`` first copies the bias into every output row (a full extra pass over
the largest activation of the block). Arithmetic in float32; NaN propagates elementwise. Autograd by the
reference formulas.
"""

from __future__ import annotations

import math
from typing import Optional

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


def _compute_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _biased(x, bias):
    """x (+ bias) in the compute dtype."""
    x = x.to(_compute_dtype(x))
    return x if bias is None else x + bias.to(x.dtype)


def geglu_reference(x, bias=None):
    """Eager GEGLU: ``x [..., 2*I]`` (+ ``bias [2*I]``) -> ``[..., I]`` in x's dtype (float32 math; float64 stays)."""
    hidden, gate = _biased(x, bias).chunk(2, dim=-1)
    return (hidden * F.gelu(gate)).to(x.dtype)


def _eager(x, bias):
    return geglu_reference(x, bias).contiguous()


def _native(kernel_name, extra, x, bias):
    x = x.contiguous()
    inner = x.shape[-1] // 2
    out = torch.empty((*x.shape[:-1], inner), dtype=x.dtype, device=x.device)
    bias = None if bias is None else bias.detach().to(torch.float32).contiguous()
    if out.numel():
        getattr(native_module(), kernel_name)(pointer(x), pointer(bias), pointer(out), x.numel() // x.shape[-1],
                                              inner, SCALAR_TYPE_CODES[x.dtype], *extra(x))
    return out


IMPLEMENTATIONS = [
    Implementation("cuda", lambda x, bias: _native("geglu_cuda", lambda t: (cuda_stream_handle(t.device),), x, bias),
                   cuda_kernels_unavailable_reason, reject_unless_native("cuda")),
    Implementation("cpp", lambda x, bias: _native("geglu_cpu", lambda t: (), x, bias), native_unavailable_reason,
                   reject_unless_native("cpu")),
    Implementation("eager", _eager, lambda: None, lambda *a: None),
]


@torch.library.custom_op("animatelcm::geglu", mutates_args=())
def _geglu_op(x: torch.Tensor, bias: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    return select("geglu", IMPLEMENTATIONS, x, bias, backend=backend).run(x, bias)


@_geglu_op.register_fake
def _(x, bias, backend):
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


def _setup(ctx, inputs, output):
    x, bias, _ = inputs
    ctx.has_bias = bias is not None
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(x, bias)


def _backward(ctx, grad):
    x, bias = ctx.saved_tensors
    hidden, gate = _biased(x, bias if ctx.has_bias else None).chunk(2, dim=-1)
    g = grad.to(hidden.dtype)
    cdf = 0.5 * (1.0 + torch.erf(gate / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * gate * gate) / math.sqrt(2.0 * math.pi)
    grad_x = torch.cat([g * gate * cdf, g * hidden * (cdf + gate * pdf)], dim=-1)
    grad_bias = grad_x.reshape(-1, grad_x.shape[-1]).sum(0).to(ctx.bias_dtype) if ctx.has_bias else None
    return grad_x.to(x.dtype), grad_bias, None


_geglu_op.register_autograd(_backward, setup_context=_setup)


def geglu(x, bias=None, backend="auto"):
    """``x [..., 2*I]`` -> ``h * gelu(g)`` with ``[h, g]`` the halves of ``x + bias`` (``bias [2*I]`` optional), a
    contiguous ``[..., I]`` in x's dtype; ``backend`` picks one."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"geglu: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"geglu: x must be float32/float16/bfloat16/float64, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] % 2:
        raise ValueError(f"geglu: the last dimension must be even (hidden and gate halves), got shape {tuple(x.shape)}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (x.shape[-1],) or bias.dtype not in FLOAT_DTYPES:
            raise ValueError(f"geglu: bias must be a float tensor of shape ({x.shape[-1]},) (x's last dimension), "
                             f"got {tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
        if bias.device != x.device:
            raise ValueError(f"geglu: bias is on {bias.device} but x is on {x.device}; move them to one device")
    if eager_fast_path(x, bias):
        return select("geglu", IMPLEMENTATIONS, x, bias, backend=backend).run(x, bias)
    return _geglu_op(x, bias, backend)
