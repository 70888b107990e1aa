"""GEGLU activation: ``x [..., 2*I]`` -> ``x[..., :I] * gelu(x[..., I:])`` (exact, erf GELU) in one pass, with an
optional bias ``[2*I]`` added to x first.

diffusers' ``GEGLU`` splits the projection output, materialises ``gelu(gate)`` and then the product; the fused op
reads the projection output once and writes the result once. With the bias, the projection before it can run as a
plain matrix product: PyTorch's CPU ``addmm`` first copies the bias into every output row (a full extra pass over
the largest activation of the block). Arithmetic in float32; NaN propagates elementwise. Autograd by the
reference formulas.

``linear_geglu(x, weight, bias)`` is the projection and the activation together. On the CPU it runs in blocks of
rows (at least 1024, more if one core's L2 cache holds their projection output): that output, the largest tensor of a transformer block
(``[16384, 640]`` floats at 32x32 latents, 16 frames, width 80), is then never materialised, so it is neither
written to memory and read back nor allocated afresh (an allocation of more than glibc's 32 MiB mmap threshold
costs a page fault per 4 KiB page on every call). On a GPU the triton backend (``kernels/linear_geglu.py``, the
half-precision default) computes both in one kernel, never writing the projection; the cuda backend (the float32
default) runs cuBLAS and then the CUDA GEGLU kernel.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F

from .dispatch import FLOAT_DTYPES, Implementation, compute_dtype, eager_fast_path, select
from . import triton_backend
from .linear import linear, uses_onednn
from .native import (
    SCALAR_TYPE_CODES,
    core_cache_bytes,
    cuda_kernels_unavailable_reason,
    cuda_stream_handle,
    native_module,
    native_unavailable_reason,
    pointer,
    reject_unless_native,
    small_for_triton,
)


def _biased(x, bias):
    """x (+ bias) in the compute dtype."""
    x = x.to(compute_dtype(x))
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


def _pre_activation_grad(grad, pre):
    """Gradient of GEGLU's input ``pre [..., 2I]`` (the biased projection, compute dtype) from ``grad [..., I]``."""
    hidden, gate = pre.chunk(2, dim=-1)
    g = grad.to(hidden.dtype)
    cdf = 0.5 * (1.0 + torch.erf(gate / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * gate * gate) / math.sqrt(2.0 * math.pi)
    return torch.cat([g * gate * cdf, g * hidden * (cdf + gate * pdf)], dim=-1)


def _bias_grad(grad_pre, bias_dtype):
    return grad_pre.reshape(-1, grad_pre.shape[-1]).sum(0).to(bias_dtype)


def _backward(ctx, grad):
    x, bias = ctx.saved_tensors
    grad_x = _pre_activation_grad(grad, _biased(x, bias if ctx.has_bias else None))
    return grad_x.to(x.dtype), _bias_grad(grad_x, ctx.bias_dtype) if ctx.has_bias else None, None


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
    _check_bias("geglu", bias, x.shape[-1], "x's last dimension", x)
    if eager_fast_path(x, bias):
        return select("geglu", IMPLEMENTATIONS, x, bias, backend=backend).run(x, bias)
    return _geglu_op(x, bias, backend)


def _check_bias(op_name, bias, width, what, x):
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor) or bias.shape != (width,) or bias.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op_name}: bias must be a float tensor of shape ({width},) ({what}), "
                         f"got {tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
    if bias.device != x.device:
        raise ValueError(f"{op_name}: bias is on {bias.device} but x is on {x.device}; move them to one device")


# linear_geglu ---------------------------------------------------------------------------------------------------

# A block has at least MIN_BLOCK_ROWS rows (more when one core's L2 cache holds more), and blocks are used only when
# the whole projection output is at least MIN_BLOCKS of them: smaller GEMMs cost more than the blocking saves.
# Measured against diffusers' GEGLU on the two 2-core machines CI has run on: a Sapphire Rapids (2 MiB L2) with
# 819-row blocks gave 2.0x at [16384, 80] x [80, 640], 1.3x at [4096, 160] x [160, 1280] and 0.95x at
# [1024, 320] x [320, 2560]; an AMD EPYC Zen 4 (1 MiB L2, 32 MiB L3) gave, for 256 / 409 / 1024 / 2048-row blocks,
# 1.7 / 2.2 / 2.3 / 2.3x on the first, 1.04 / 1.06 / 1.20 / 1.10x on the second and 0.96-1.00x on the third.
MIN_BLOCK_ROWS = 1024
MIN_BLOCKS = 4


def linear_geglu_reference(x, weight, bias=None):
    """Eager ``geglu(x @ weight.T + bias)``: ``x [..., K]``, ``weight [2I, K]``, ``bias [2I]`` -> ``[..., I]``."""
    return geglu_reference(F.linear(x, weight), bias)


def _linear_geglu_cpu_blocked(x, weight, bias):
    """The CPU path: row blocks of ``x`` (those whose projection fits one core's L2 cache, and at least
    MIN_BLOCK_ROWS), each projected (:func:`animatelcm.ops.linear.linear`'s GEMM library: PyTorch's into one reused
    buffer, or oneDNN) and activated by the native GEGLU kernel straight into its rows of the output."""
    rows_total, width = x.numel() // x.shape[-1], weight.shape[0]
    block_rows = max(MIN_BLOCK_ROWS, core_cache_bytes() // (width * x.element_size()))
    if rows_total < MIN_BLOCKS * block_rows:
        return _native("geglu_cpu", lambda t: (), linear(x, weight), bias)
    flat = x.reshape(rows_total, x.shape[-1])
    out = torch.empty((*x.shape[:-1], width // 2), dtype=x.dtype, device=x.device)
    flat_out = out.view(rows_total, width // 2)
    bias = None if bias is None else bias.detach().to(torch.float32).contiguous()
    kernel, code = native_module().geglu_cpu, SCALAR_TYPE_CODES[x.dtype]
    if uses_onednn(flat[:block_rows], weight, None):
        project = functools.partial(linear, weight=weight)  # oneDNN has no out=: a block-sized allocation each
    else:
        buffer, weight_t = torch.empty((block_rows, width), dtype=x.dtype, device=x.device), weight.t()
        project = lambda block: torch.mm(block, weight_t, out=buffer[:len(block)])  # noqa: E731
    for first in range(0, rows_total, block_rows):
        rows = min(block_rows, rows_total - first)
        projected = project(flat[first:first + rows])
        kernel(pointer(projected), pointer(bias), pointer(flat_out[first:first + rows]), rows, width // 2, code)
    return out


_SMALL_FOR_TRITON_GEGLU = small_for_triton(2**24)


def _to_cublas(x, *rest) -> str | None:
    """The Triton GEGLU projection's pass_over: float32 runs exact (IEEE) dots, where cuBLAS's SGEMM + the CUDA
    GEGLU stay the default (only half precision was timed on a GPU); so do inputs of fewer than 2**24 elements, where
    the Triton launch's host cost outweighs its GPU time saved (60 us at [65536, 320], 21 million elements)."""
    if x.dtype == torch.float32 and x.is_cuda:
        return "float32 on a GPU goes to cuBLAS + the CUDA GEGLU (backend='triton' still runs it)"
    return _SMALL_FOR_TRITON_GEGLU(x)


LINEAR_GEGLU_IMPLEMENTATIONS = [
    Implementation("cpp", _linear_geglu_cpu_blocked, native_unavailable_reason, reject_unless_native("cpu")),
    # ahead of cuda in half precision on inputs of 2**24 elements or more: on an H100 in fp16 (run 9,
    # benchmarks/results/gpu_runs.md) 0.355 ms of GPU time against 0.415 for cuBLAS + the CUDA GEGLU at
    # [65536, 320] x [320, 2560]; smaller ones go to cuBLAS + the CUDA GEGLU (_to_cublas)
    Implementation("triton", lambda x, weight, bias: triton_backend.triton_linear_geglu(x, weight, bias),
                   triton_backend.triton_unavailable_reason, triton_backend.reject_unless_triton, _to_cublas),
    Implementation("cuda", lambda x, weight, bias: _native("geglu_cuda", lambda t: (cuda_stream_handle(t.device),),
                                                           F.linear(x, weight), bias),
                   cuda_kernels_unavailable_reason, reject_unless_native("cuda")),
    Implementation("eager", lambda x, weight, bias: linear_geglu_reference(x, weight, bias).contiguous(),
                   lambda: None, lambda *a: None),
]


@torch.library.custom_op("animatelcm::linear_geglu", mutates_args=())
def _linear_geglu_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     backend: str) -> torch.Tensor:
    return select("linear_geglu", LINEAR_GEGLU_IMPLEMENTATIONS, x, weight, bias, backend=backend).run(x, weight, bias)


@_linear_geglu_op.register_fake
def _(x, weight, bias, backend):
    return x.new_empty((*x.shape[:-1], weight.shape[0] // 2))


def _linear_setup(ctx, inputs, output):
    x, weight, bias, _ = inputs
    ctx.has_bias = bias is not None
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(x, weight, bias)


def _linear_backward(ctx, grad):
    """The projection is recomputed (as activation checkpointing would), not saved."""
    x, weight, bias = ctx.saved_tensors
    compute = compute_dtype(x)
    flat_x = x.reshape(-1, x.shape[-1]).to(compute)
    pre = F.linear(flat_x, weight.to(compute), None if bias is None else bias.to(compute))
    grad_pre = _pre_activation_grad(grad.reshape(-1, grad.shape[-1]), pre)
    grad_x = (grad_pre @ weight.to(compute)).reshape(x.shape).to(x.dtype)
    grad_weight = (grad_pre.t() @ flat_x).to(weight.dtype)
    return grad_x, grad_weight, _bias_grad(grad_pre, ctx.bias_dtype) if ctx.has_bias else None, None


_linear_geglu_op.register_autograd(_linear_backward, setup_context=_linear_setup)


def linear_geglu(x, weight, bias=None, backend="auto"):
    """``geglu(x @ weight.T + bias)`` (diffusers' ``GEGLU`` with a plain ``nn.Linear`` projection): ``x [..., K]``,
    ``weight [2I, K]`` in x's dtype, ``bias [2I]`` optional -> a contiguous ``[..., I]`` in x's dtype; ``backend``
    picks one. On the CPU the projection output is never materialised (see the module docstring)."""
    for name, tensor in (("x", x), ("weight", weight)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"linear_geglu: {name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype not in FLOAT_DTYPES:
            raise TypeError(f"linear_geglu: {name} must be float32/float16/bfloat16/float64, got {tensor.dtype}")
    if x.dim() < 1 or weight.dim() != 2 or weight.shape[1] != x.shape[-1] or weight.shape[0] % 2:
        raise ValueError(f"linear_geglu: weight must be [2I, K] with K = x's last dimension and an even number of "
                         f"rows (hidden and gate halves); got x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"linear_geglu: weight ({weight.dtype}, {weight.device}) must have x's dtype and device "
                         f"({x.dtype}, {x.device}); cast or move one of them")
    _check_bias("linear_geglu", bias, weight.shape[0], "weight's rows", x)
    if eager_fast_path(x, weight, bias):
        return select("linear_geglu", LINEAR_GEGLU_IMPLEMENTATIONS, x, weight, bias,
                      backend=backend).run(x, weight, bias)
    return _linear_geglu_op(x, weight, bias, backend)
