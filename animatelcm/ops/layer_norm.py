"""LayerNorm over the last dimension for the transformer blocks, with what surrounds it there fused in:

- ``layer_norm(x, weight, bias, eps, addend=None)``: ``x [..., C]`` -> ``F.layer_norm(x, (C,), weight, bias, eps)
  + addend`` (the motion modules' sinusoidal positional embedding ``[1, F, C]`` is added to the normed tokens);
- ``residual_layer_norm(x, residual, weight, bias, eps, addend=None)``: ``(x + residual, layer_norm(x + residual)
  (+ addend))``: the block's residual add (attention output + the residual stream) and the next norm in one pass,
  both results written.

The eager implementation is PyTorch's op sequence as diffusers runs it (each op rounding to x's dtype); the C++
kernel (``csrc/cpu/layer_norm.cpp``, CPU tensors) and the Triton one (``kernels/layer_norm.py``, GPU tensors) read
and write every element once, rounding where that sequence rounds. On a
GPU PyTorch's LayerNorm runs one row a thread block, slow on SD1.5's 320-1280-wide rows (run 11's profile:
469 LayerNorm calls, 18.4 ms of a 238 ms call's GPU time, about a third of the copy's bandwidth for the bytes they
move, benchmarks/results/end_to_end_profile_cuda.md), and the adds around it are passes of their own. NaN propagates
through its row. Autograd works (backward through the eager implementation, recomputed).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from .dispatch import Implementation, eager_fast_path, explain, select
from .group_norm import _affine_fp32, _check_affine, _check_tensor
from .native import SCALAR_TYPE_CODES, native_module, native_unavailable_reason, pointer, reject_unless_native
from .triton_backend import launch_layer_norm, reject_unless_triton, triton_unavailable_reason

# Rows longer than this stay on PyTorch (the Triton kernel holds a row in registers).
MAX_TRITON_COLUMNS = 16384
# Inputs of fewer elements stay on PyTorch under ``auto``. A fused call costs the host more than the two to four
# PyTorch ops it replaces (the op's checks and dispatch, and Triton's launcher: about 30 us a launch more than
# PyTorch's, run 10 in benchmarks/results/gpu_runs.md), which decides a host-bound call (guidance 1 without CUDA
# graphs); it saves the GPU a pass or more over the tokens. As for GroupNorm+SiLU, 2**24 elements: at 16 frames
# that is SD1.5's 64x64-latent blocks at guidance 1, and its 32x32 ones too at guidance 2. A first threshold, not
# yet timed end to end.
TRITON_MIN_ELEMENTS = 2**24


def _check_addend(name, x, addend):
    """``addend`` must broadcast against ``x [..., L, C]`` as ``[C]``, ``[1 or L, C]`` or ``[1, ..., 1 or L, C]``
    (what ``x + addend`` broadcasts without repeating anything but whole rows), in x's dtype and device."""
    if addend is None:
        return
    _check_tensor(name, "addend", addend, "[..., L, C]", min_dim=1)
    rows = addend.shape[-2] if addend.dim() >= 2 else 1
    leading_ones = all(size == 1 for size in addend.shape[:-2])
    fits = (addend.shape[-1] == x.shape[-1] and addend.dim() <= x.dim() and leading_ones
            and (rows == 1 or (x.dim() >= 2 and rows == x.shape[-2])))
    if not fits:
        raise ValueError(f"{name}: addend must be [C], [L, C] or [1, ..., L, C] with C = {x.shape[-1]} and L = 1 or "
                         f"x's second-to-last size; got addend {tuple(addend.shape)} for x {tuple(x.shape)}")
    if addend.dtype != x.dtype or addend.device != x.device:
        raise ValueError(f"{name}: addend ({addend.dtype}, {addend.device}) must have x's dtype and device "
                         f"({x.dtype}, {x.device}); cast or move it")


def _check(name, x, weight, bias, eps, addend, residual=None):
    _check_tensor(name, "x", x, "[..., C]", min_dim=1)
    if residual is not None:
        _check_tensor(name, "residual", residual, "x's shape", min_dim=1)
        if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
            raise ValueError(f"{name}: residual {tuple(residual.shape)} ({residual.dtype}, {residual.device}) must "
                             f"have x's shape, dtype and device: {tuple(x.shape)} ({x.dtype}, {x.device})")
    _check_affine(name, x, x.shape[-1], weight, bias)
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"{name}: eps must be a non-negative number, got {eps!r}")
    _check_addend(name, x, addend)


def residual_layer_norm_reference(x, residual, weight=None, bias=None, eps=1e-5, addend=None):
    """diffusers' op sequence: ``total = x + residual`` (``x`` itself with ``residual=None``), then
    ``F.layer_norm(total, (C,), weight, bias, eps) + addend``: ``x [..., C]`` -> ``(total, normed)``, x's dtype."""
    total = x if residual is None else x + residual
    normed = F.layer_norm(total, (x.shape[-1],), weight, bias, eps)
    return total, normed if addend is None else normed + addend


def layer_norm_reference(x, weight=None, bias=None, eps=1e-5, addend=None):
    """``F.layer_norm(x, (C,), weight, bias, eps) (+ addend)``: ``x [..., C]`` -> same shape and dtype."""
    return residual_layer_norm_reference(x, None, weight, bias, eps, addend)[1]


def _eager(x, residual, weight, bias, eps, addend):
    total, normed = residual_layer_norm_reference(x, residual, weight, bias, eps, addend)
    return (None if residual is None else total.contiguous()), normed.contiguous()


def run_kernel(launch, x, residual, weight, bias, eps, addend, **options):
    """A kernel's run for ``(x [..., C], residual or None, weight, bias, eps, addend or None)`` ->
    ``(total or None, normed)``: x and residual made contiguous, the outputs allocated in x's shape, the addend as
    ``[L, C]`` rows; ``launch(x, residual, total, out, weight, bias, addend, rows, cols, eps, **options)`` writes
    them (:func:`launch_layer_norm`, the Triton one, takes its tile as ``options``)."""
    cols = x.shape[-1]
    x = x.contiguous()
    residual = None if residual is None else residual.contiguous()
    out = torch.empty_like(x)
    total = None if residual is None else torch.empty_like(x)
    rows = x.numel() // cols if cols else 0
    if rows == 0 or cols == 0:
        if total is not None:
            torch.add(x, residual, out=total)
        return total, out
    addend = None if addend is None else addend.reshape(-1, cols).contiguous()
    launch(x, residual, total, out, weight, bias, addend, rows, cols, eps, **options)
    return total, out


def _launch_native(x, residual, total, out, weight, bias, addend, rows, cols, eps):
    """The C++ kernel on CPU rows: one at a time per thread, fp32 weight and bias."""
    weight, bias = _affine_fp32(weight), _affine_fp32(bias)  # held here: the kernel reads them by address
    native_module().layer_norm_cpu(pointer(x), pointer(residual), pointer(total), pointer(out), pointer(weight),
                                   pointer(bias), pointer(addend), rows, cols,
                                   1 if addend is None else addend.shape[0], float(eps), SCALAR_TYPE_CODES[x.dtype])


def _reject_triton(x, *rest):
    reason = reject_unless_triton(x)
    if reason is None and x.shape[-1] > MAX_TRITON_COLUMNS:
        return f"rows of at most {MAX_TRITON_COLUMNS} elements, got {x.shape[-1]}"
    if reason is None and x.numel() >= 2**31:
        return f"supports tensors of fewer than 2**31 elements, got {x.numel()}"
    return reason


def _pass_over_triton(x, *rest):
    if x.device.type == "cpu":
        return ("CPU tensors run the C++ kernel or PyTorch's own (the Triton interpreter is for tests; "
                "backend='triton' still runs it)")
    if x.numel() < TRITON_MIN_ELEMENTS:
        return (f"{x.numel()} elements, fewer than {TRITON_MIN_ELEMENTS}: PyTorch's LayerNorm, whose launch costs the "
                "host less (backend='triton' still runs it)")
    return None


# Both ops dispatch ``(x, residual or None, weight, bias, eps, addend)`` -> ``(total or None, normed)``.
IMPLEMENTATIONS = [
    Implementation("cpp", functools.partial(run_kernel, _launch_native), native_unavailable_reason,
                   reject_unless_native("cpu")),
    Implementation("triton", functools.partial(run_kernel, launch_layer_norm), triton_unavailable_reason,
                   _reject_triton, _pass_over_triton),
    Implementation("eager", _eager, lambda: None, lambda *a: None),
]


def _run(name, args, backend):
    return select(name, IMPLEMENTATIONS, *args, backend=backend).run(*args)


@torch.library.custom_op("animatelcm::layer_norm", mutates_args=())
def _layer_norm_op(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
                   addend: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    return _run("layer_norm", (x, None, weight, bias, eps, addend), backend)[1]


@_layer_norm_op.register_fake
def _(x, weight, bias, eps, addend, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("animatelcm::residual_layer_norm", mutates_args=())
def _residual_layer_norm_op(x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor],
                            bias: Optional[torch.Tensor], eps: float, addend: Optional[torch.Tensor],
                            backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _run("residual_layer_norm", (x, residual, weight, bias, eps, addend), backend)


@_residual_layer_norm_op.register_fake
def _(x, residual, weight, bias, eps, addend, backend):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format))


def _save(ctx, tensors):
    ctx.present = [t is not None for t in tensors]
    ctx.save_for_backward(*(t for t in tensors if t is not None))


def _saved(ctx):
    saved = iter(ctx.saved_tensors)
    return [next(saved) if present else None for present in ctx.present]


def _recomputed_grads(tensors, eps, grads_out):
    """Gradients of ``tensors`` = (x, residual, weight, bias, addend) (None entries stay None) by autograd through
    the eager implementation, recomputed; ``grads_out`` are those of (total or None, normed)."""
    with torch.enable_grad():
        leaves = [None if t is None else t.detach().requires_grad_(True) for t in tensors]
        x, residual, weight, bias, addend = leaves
        outputs = residual_layer_norm_reference(x, residual, weight, bias, eps, addend)
        pairs = [(out, grad) for out, grad in zip(outputs, grads_out) if grad is not None]
        wanted = [leaf for leaf in leaves if leaf is not None]
        grads = iter(torch.autograd.grad([out for out, _ in pairs], wanted, [grad for _, grad in pairs],
                                         allow_unused=True))
    return [None if leaf is None else next(grads) for leaf in leaves]


def _layer_norm_setup(ctx, inputs, output):
    x, weight, bias, eps, addend, _ = inputs
    ctx.eps = eps
    _save(ctx, (x, weight, bias, addend))


def _layer_norm_backward(ctx, grad):
    x, weight, bias, addend = _saved(ctx)
    grad_x, _, grad_w, grad_b, grad_a = _recomputed_grads((x, None, weight, bias, addend), ctx.eps, (None, grad))
    return grad_x, grad_w, grad_b, None, grad_a, None


_layer_norm_op.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup)


def _residual_setup(ctx, inputs, output):
    x, residual, weight, bias, eps, addend, _ = inputs
    ctx.eps = eps
    _save(ctx, (x, residual, weight, bias, addend))


def _residual_backward(ctx, grad_total, grad_normed):
    grads = _recomputed_grads(_saved(ctx), ctx.eps, (grad_total, grad_normed))
    return (*grads[:4], None, grads[4], None)


_residual_layer_norm_op.register_autograd(_residual_backward, setup_context=_residual_setup)


def layer_norm(x, weight=None, bias=None, eps=1e-5, addend=None, backend="auto"):
    """``F.layer_norm(x, (C,), weight, bias, eps)`` of ``x [..., C]`` (``weight``, ``bias`` ``[C]`` or None), plus
    ``addend`` (``[C]``, ``[L, C]`` or ``[1, ..., L, C]``, L = 1 or x's second-to-last size; x's dtype) if given:
    a contiguous tensor of x's shape and dtype. ``backend`` picks one."""
    _check("layer_norm", x, weight, bias, eps, addend)
    if eager_fast_path(x, weight, bias, addend):
        return _run("layer_norm", (x, None, weight, bias, float(eps), addend), backend)[1]
    return _layer_norm_op(x, weight, bias, float(eps), addend, backend)


def residual_layer_norm(x, residual, weight=None, bias=None, eps=1e-5, addend=None, backend="auto"):
    """``total = x + residual`` (both ``[..., C]``, one dtype) and :func:`layer_norm` of it (with ``addend``), in
    one pass: ``(total, normed)``, contiguous, x's shape and dtype. ``backend`` picks one."""
    _check("residual_layer_norm", x, weight, bias, eps, addend, residual)
    if eager_fast_path(x, residual, weight, bias, addend):
        return _run("residual_layer_norm", (x, residual, weight, bias, float(eps), addend), backend)
    return _residual_layer_norm_op(x, residual, weight, bias, float(eps), addend, backend)


def explain_layer_norm(x, weight=None, bias=None, eps=1e-5, addend=None, residual=None):
    """[(backend, reason or None)] for these inputs (``residual``: as :func:`residual_layer_norm` would get them)."""
    return explain(IMPLEMENTATIONS, x, residual, weight, bias, eps, addend)
