"""GroupNorm family for the inflated UNet:

- ``group_norm_silu(x, num_groups, weight, bias, eps, silu=True)``: ``x [N, C, *]`` -> same shape,
  ``F.silu(F.group_norm(x, ...))`` (or plain GroupNorm with ``silu=False``) in one pass per group; a channels-last
  ``x`` keeps its layout (on the CPU: statistics vectorised across the contiguous channels, no layout copy).
- ``temporal_group_norm(x, num_frames, num_groups, weight, bias, eps)``: the motion module's frame-spanning norm:
  ``x [B*F, C, H, W]`` -> ``[B*H*W, F, C]``, statistics per (batch, group) over (C/G, F, H, W), fused with the
  permute diffusers does after it.
- ``temporal_unpermute_residual(y, residual, num_frames)``: ``y [B*H*W, F, C]`` -> ``[B*F, C, H, W]`` plus
  ``residual [B*F, C, H, W]``: the layout change back fused with the residual add.

Arithmetic in float32 (float64 stays float64); weight and bias may be None. NaN propagates through the statistics
of its group. Autograd works (backward by the reference formulas).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .dispatch import FLOAT_DTYPES, Implementation, compute_dtype, eager_fast_path, explain, select
from .native import (
    SCALAR_TYPE_CODES,
    cuda_kernels_unavailable_reason,
    cuda_stream_handle,
    exceeds_last_level_cache,
    native_module,
    native_unavailable_reason,
    pointer,
    reject_unless_native,
    small_for_triton,
)
from .triton_backend import (
    reject_unless_triton,
    triton_group_norm_silu,
    triton_temporal_group_norm,
    triton_unavailable_reason,
    triton_unpermute_residual,
)


# ---- checks ----------------------------------------------------------------------------------------------------

def _check_tensor(name, label, x, layout, exact_dim=None, min_dim=2):
    """x must be a float tensor shaped like `layout` (exactly `exact_dim` dims, or at least `min_dim`)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: {label} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: {label} must be float32/float16/bfloat16/float64, got {x.dtype}")
    if (x.dim() != exact_dim) if exact_dim is not None else (x.dim() < min_dim):
        raise ValueError(f"{name}: {label} must be {layout}, got shape {tuple(x.shape)}")


def _check_affine(name, x, channels, weight, bias):
    for label, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if not isinstance(p, torch.Tensor) or p.shape != (channels,):
            raise ValueError(f"{name}: {label} must be a tensor of shape ({channels},), got "
                             f"{tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__}")
        if p.device != x.device:
            raise ValueError(f"{name}: {label} is on {p.device} but x is on {x.device}; move them to one device")
        if not p.is_floating_point():
            raise TypeError(f"{name}: {label} must be floating point, got {p.dtype}")


def _check_groups(name, channels, num_groups, eps):
    if not isinstance(num_groups, int) or num_groups < 1 or channels % num_groups:
        raise ValueError(f"{name}: num_groups={num_groups!r} must be a positive divisor of the {channels} channels")
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"{name}: eps must be a non-negative number, got {eps!r}")


def _check_frames(name, batch_frames, num_frames):
    if not isinstance(num_frames, int) or num_frames < 1 or batch_frames % num_frames:
        raise ValueError(f"{name}: num_frames={num_frames!r} must be a positive divisor of the leading dimension "
                         f"{batch_frames} (batch * frames)")


# ---- references ------------------------------------------------------------------------------------------------

def group_norm_silu_reference(x, num_groups, weight=None, bias=None, eps=1e-5, silu=True):
    """Eager ``F.silu(F.group_norm(x))``: ``x [N, C, *]`` -> same shape and dtype."""
    compute = compute_dtype(x)
    y = F.group_norm(x.to(compute), num_groups, None if weight is None else weight.to(compute),
                     None if bias is None else bias.to(compute), eps)
    return (F.silu(y) if silu else y).to(x.dtype)


def temporal_group_norm_reference(x, num_frames, num_groups, weight=None, bias=None, eps=1e-6):
    """Eager motion-module norm as diffusers writes it: ``x [B*F, C, H, W]`` -> ``[B*H*W, F, C]``."""
    batch_frames, channels, height, width = x.shape
    batch = batch_frames // num_frames
    compute = compute_dtype(x)
    h = x.to(compute).reshape(batch, num_frames, channels, height, width).permute(0, 2, 1, 3, 4)
    h = F.group_norm(h, num_groups, None if weight is None else weight.to(compute),
                     None if bias is None else bias.to(compute), eps)
    rows = h.permute(0, 3, 4, 2, 1).reshape(batch * height * width, num_frames, channels)
    return rows.to(x.dtype).contiguous()  # (a 1x1 frame's reshape is a strided view; the op promises contiguous)


def rows_to_frames(y, num_frames, height, width):
    """``[B*H*W, F, C]`` -> ``[B*F, C, H, W]`` (the motion module's layout back to the UNet's)."""
    channels = y.shape[-1]
    batch = y.shape[0] // (height * width)
    back = y.reshape(batch, height, width, num_frames, channels).permute(0, 3, 4, 1, 2)
    return back.reshape(batch * num_frames, channels, height, width)


def frames_to_rows(x, num_frames):
    """``[B*F, C, H, W]`` -> ``[B*H*W, F, C]`` (the UNet's layout to the motion module's)."""
    batch_frames, channels = x.shape[:2]
    rows = x.reshape(batch_frames // num_frames, num_frames, channels, -1).permute(0, 3, 1, 2)
    return rows.reshape(-1, num_frames, channels)


def temporal_unpermute_residual_reference(y, residual, num_frames):
    """Eager layout change back plus residual: ``y [B*H*W, F, C]``, ``residual [B*F, C, H, W]`` -> contiguous
    ``[B*F, C, H, W]`` (the add alone would take y's channels-last strides when F = 1)."""
    out = rows_to_frames(y, num_frames, *residual.shape[2:]) + residual
    return out.to(residual.dtype).contiguous()


def _group_norm_backward(x, weight, num_groups, eps, silu, grad, bias):
    """Gradients (x, weight, bias) of silu?(group_norm(x)) for ``x [N, C, S]`` (float32 math)."""
    compute = compute_dtype(x)
    n, c = x.shape[:2]
    xg = x.to(compute).reshape(n, num_groups, -1)
    mean = xg.mean(dim=-1, keepdim=True)
    rstd = (xg.var(dim=-1, unbiased=False, keepdim=True) + eps).rsqrt()
    x_hat = ((xg - mean) * rstd).reshape(n, c, -1)
    w = torch.ones(c, dtype=compute, device=x.device) if weight is None else weight.to(compute)
    b = torch.zeros(c, dtype=compute, device=x.device) if bias is None else bias.to(compute)
    g = grad.to(compute).reshape(n, c, -1)
    if silu:
        y = x_hat * w[None, :, None] + b[None, :, None]
        sig = torch.sigmoid(y)
        g = g * sig * (1 + y * (1 - sig))
    grad_weight = None if weight is None else (g * x_hat).sum(dim=(0, 2)).to(weight.dtype)
    grad_bias = None if bias is None else g.sum(dim=(0, 2)).to(bias.dtype)
    d_hat = (g * w[None, :, None]).reshape(n, num_groups, -1)
    x_hat_g = x_hat.reshape(n, num_groups, -1)
    grad_x = rstd * (d_hat - d_hat.mean(dim=-1, keepdim=True)
                     - x_hat_g * (d_hat * x_hat_g).mean(dim=-1, keepdim=True))
    return grad_x.reshape(x.shape).to(x.dtype), grad_weight, grad_bias


# ---- native launches -------------------------------------------------------------------------------------------

def _affine_fp32(p):
    """A weight or bias as the contiguous float32 vector the native kernels read (the tensor itself when it is one)."""
    if p is None or (p.dtype is torch.float32 and p.is_contiguous()):
        return p
    return p.detach().to(torch.float32).contiguous()


def _affine_as_stored(weight, bias):
    """(weight, bias, scalar type code) for the CUDA kernels, which read fp32, fp16 or bf16 parameters as stored:
    the tensors themselves when contiguous and of one such dtype (no conversion launches), else both as fp32."""
    given = [p for p in (weight, bias) if p is not None]
    dtypes = {p.dtype for p in given}
    if len(dtypes) == 1 and next(iter(dtypes)) in SCALAR_TYPE_CODES and all(p.is_contiguous() for p in given):
        return weight, bias, SCALAR_TYPE_CODES[next(iter(dtypes))]
    return _affine_fp32(weight), _affine_fp32(bias), SCALAR_TYPE_CODES[torch.float32]


def _native_group_norm(kernel_name, extra, x, batch, frames, num_groups, weight, bias, eps, silu, permute,
                       **options):
    """The native GroupNorm kernel ``kernel_name`` on ``x [batch * frames, C, *]`` (made contiguous): ``[B*F, C,
    *]`` out, or ``[B * S, F, C]`` with ``permute``. ``options`` go to the kernel by name (the CUDA kernel's
    ``cluster_packs`` and ``resident_groups`` pick its paths, for the tuning script: both off, its three launches)."""
    x = x.contiguous()
    channels = x.shape[1]
    spatial = math.prod(x.shape[2:])
    if permute:
        out = torch.empty((batch * spatial, frames, channels), dtype=x.dtype, device=x.device)
    else:
        out = torch.empty_like(x)
    if x.is_cuda:
        weight, bias, options["affine_scalar_type"] = _affine_as_stored(weight, bias)
    else:
        weight, bias = _affine_fp32(weight), _affine_fp32(bias)
    if out.numel():
        # The CUDA kernels need a workspace (partial sums, then mean and rstd per group), alive until enqueued.
        workspace = torch.empty(native_module().group_norm_cuda_workspace_doubles(
            batch, frames, channels, spatial, num_groups), dtype=torch.float64, device=x.device) if x.is_cuda else None
        getattr(native_module(), kernel_name)(
            pointer(x), pointer(out), pointer(weight), pointer(bias), batch, frames, channels, spatial, num_groups,
            float(eps), bool(silu), bool(permute), SCALAR_TYPE_CODES[x.dtype],
            *(() if workspace is None else (pointer(workspace),)), *extra(x), **options)
    return out


def is_channels_last(x) -> bool:
    """A 4-D tensor laid out channels-last (and not also contiguous, as a one-channel or 1x1 tensor is)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _output_format(x):
    """group_norm_silu's output layout: channels-last for a channels-last x (as PyTorch's), else contiguous."""
    return torch.channels_last if is_channels_last(x) else torch.contiguous_format


def _native_group_norm_silu(kernel_name, extra, x, num_groups, weight, bias, eps, silu):
    """A channels-last x on the CPU runs the channels-last kernel (no layout copy); any other x is made contiguous
    for the [N, C, S] kernels, and the result takes x's layout back."""
    if kernel_name == "group_norm_cpu" and is_channels_last(x):
        out = torch.empty_like(x, memory_format=torch.channels_last)
        weight, bias = _affine_fp32(weight), _affine_fp32(bias)  # held here: the kernel reads them by address
        if out.numel():
            native_module().group_norm_channels_last_cpu(
                pointer(x), pointer(out), pointer(weight), pointer(bias), x.shape[0],
                x.shape[1], x.shape[2] * x.shape[3], num_groups, float(eps), bool(silu), SCALAR_TYPE_CODES[x.dtype])
        return out
    out = _native_group_norm(kernel_name, extra, x, x.shape[0], 1, num_groups, weight, bias, eps, silu, False)
    return out if x.is_contiguous() else out.contiguous(memory_format=_output_format(x))


def _native_unpermute(kernel_name, extra, y, residual, num_frames):
    y, residual = y.contiguous(), residual.contiguous()
    batch_frames, channels = residual.shape[:2]
    out = torch.empty_like(residual)
    if out.numel():
        getattr(native_module(), kernel_name)(
            pointer(y), pointer(residual), pointer(out), batch_frames // num_frames, num_frames, channels,
            residual[0, 0].numel(), SCALAR_TYPE_CODES[residual.dtype], *extra(residual))
    return out


def _no_extra(x):
    return ()


def _cpu_extra(x):
    """The CPU kernel's stream_output flag: x and an output of its size exceed the last-level cache."""
    return (exceeds_last_level_cache(x, x),)


def _cuda_extra(x):
    return (cuda_stream_handle(x.device),)


def _reject_triton(x, *rest):
    """The Triton kernels index a group's elements in 32-bit arithmetic."""
    reason = reject_unless_triton(x)
    if reason is None and x.numel() >= 2**31:
        return f"supports tensors of fewer than 2**31 elements, got {x.numel()}"
    return reason


# cpp first (CPU tensors only; Triton takes CPU tensors only under TRITON_INTERPRET=1, as in CI's tests), then Triton
# ahead of the CUDA C++ kernels on large inputs: on an H100 the Triton kernels take 0.28-0.83x the CUDA ones' GPU time
# per call (benchmarks/results/kernels_gpu.md, tune_group_norm_cuda.md), which pays for their costlier launch above
# about 2**24 elements (GroupNorm+SiLU: 1.4 us of GPU time saved per million fp16 elements), 2**22 (channels-last:
# 10 us per million) and 2**23 (the frame-spanning GroupNorm and its way back: 4.6 us per million); smaller ones go to
# CUDA C++ (small_for_triton). CUDA C++ also keeps what Triton declines (float64, 2**31 elements).
TEMPORAL_TRITON_MIN_ELEMENTS = 2**23


def _group_norm_silu_small_for_triton():
    planar, channels_last = small_for_triton(2**24), small_for_triton(2**22)
    return lambda x, *rest: (channels_last if is_channels_last(x) else planar)(x, *rest)


def _gn_impls(reference, run_native, run_triton, triton_pass_over):
    return [
        Implementation("cpp", lambda *a: run_native("group_norm_cpu", _cpu_extra, *a), native_unavailable_reason,
                       reject_unless_native("cpu")),
        Implementation("triton", run_triton, triton_unavailable_reason, _reject_triton, triton_pass_over),
        Implementation("cuda", lambda *a: run_native("group_norm_cuda", _cuda_extra, *a), cuda_kernels_unavailable_reason,
                       reject_unless_native("cuda")),
        Implementation("eager", reference, lambda: None, lambda *a: None),
    ]


GROUP_NORM_SILU = _gn_impls(
    lambda x, g, w, b, eps, silu: group_norm_silu_reference(x, g, w, b, eps, silu).contiguous(
        memory_format=_output_format(x)),
    _native_group_norm_silu,
    lambda x, g, w, b, eps, silu: triton_group_norm_silu(x, g, w, b, eps, silu, is_channels_last(x)),
    _group_norm_silu_small_for_triton())
TEMPORAL_GROUP_NORM = _gn_impls(
    lambda x, f, g, w, b, eps: temporal_group_norm_reference(x, f, g, w, b, eps),
    lambda kernel, extra, x, f, g, w, b, eps: _native_group_norm(kernel, extra, x, x.shape[0] // f, f, g, w, b, eps,
                                                                 False, True),
    triton_temporal_group_norm, small_for_triton(TEMPORAL_TRITON_MIN_ELEMENTS))
UNPERMUTE_RESIDUAL = [
    Implementation("cpp", lambda *a: _native_unpermute("unpermute_residual_cpu", _no_extra, *a),
                   native_unavailable_reason, reject_unless_native("cpu")),
    Implementation("triton", triton_unpermute_residual, triton_unavailable_reason, _reject_triton,
                   small_for_triton(TEMPORAL_TRITON_MIN_ELEMENTS)),
    Implementation("cuda", lambda *a: _native_unpermute("unpermute_residual_cuda", _cuda_extra, *a),
                   cuda_kernels_unavailable_reason, reject_unless_native("cuda")),
    Implementation("eager", temporal_unpermute_residual_reference, lambda: None, lambda *a: None),
]


# ---- custom ops ------------------------------------------------------------------------------------------------

@torch.library.custom_op("animatelcm::group_norm_silu", mutates_args=())
def _group_norm_silu_op(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                        eps: float, silu: bool, backend: str) -> torch.Tensor:
    args = (x, num_groups, weight, bias, eps, silu)
    return select("group_norm_silu", GROUP_NORM_SILU, *args, backend=backend).run(*args)


@_group_norm_silu_op.register_fake
def _(x, num_groups, weight, bias, eps, silu, backend):
    return torch.empty_like(x, memory_format=_output_format(x))


def _gn_setup(ctx, inputs, output):
    x, num_groups, weight, bias, eps, silu, _ = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.num_groups, ctx.eps, ctx.silu = num_groups, eps, silu


def _gn_backward(ctx, grad):
    x, weight, bias = ctx.saved_tensors
    grad_x, grad_w, grad_b = _group_norm_backward(x.reshape(x.shape[0], x.shape[1], -1), weight, ctx.num_groups,
                                                  ctx.eps, ctx.silu, grad, bias)
    return grad_x.reshape(x.shape), None, grad_w, grad_b, None, None, None


_group_norm_silu_op.register_autograd(_gn_backward, setup_context=_gn_setup)


def _to_channel_groups(t, batch, frames):
    """[B*F, C, H, W] -> [B, C, F*H*W] (frame-spanning groups become ordinary groups)."""
    channels = t.shape[1]
    return t.reshape(batch, frames, channels, -1).transpose(1, 2).reshape(batch, channels, -1)


@torch.library.custom_op("animatelcm::temporal_group_norm", mutates_args=())
def _temporal_group_norm_op(x: torch.Tensor, num_frames: int, num_groups: int, weight: torch.Tensor | None,
                            bias: torch.Tensor | None, eps: float, backend: str) -> torch.Tensor:
    args = (x, num_frames, num_groups, weight, bias, eps)
    return select("temporal_group_norm", TEMPORAL_GROUP_NORM, *args, backend=backend).run(*args)


@_temporal_group_norm_op.register_fake
def _(x, num_frames, num_groups, weight, bias, eps, backend):
    batch_frames, channels = x.shape[:2]
    spatial = x.shape[2] * x.shape[3]
    return x.new_empty((batch_frames // num_frames * spatial, num_frames, channels))


def _tgn_setup(ctx, inputs, output):
    x, num_frames, num_groups, weight, bias, eps, _ = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.num_frames, ctx.num_groups, ctx.eps = num_frames, num_groups, eps


def _tgn_backward(ctx, grad):
    x, weight, bias = ctx.saved_tensors
    frames = ctx.num_frames
    batch_frames, channels, height, width = x.shape
    batch = batch_frames // frames
    # grad [B*H*W, F, C] -> [B*F, C, H, W], then both to [B, C, F*H*W]
    grad_x_layout = rows_to_frames(grad, frames, height, width)
    grad_x, grad_w, grad_b = _group_norm_backward(_to_channel_groups(x, batch, frames), weight, ctx.num_groups,
                                                  ctx.eps, False, _to_channel_groups(grad_x_layout, batch, frames),
                                                  bias)
    grad_x = grad_x.reshape(batch, channels, frames, height * width).transpose(1, 2).reshape(x.shape)
    return grad_x, None, None, grad_w, grad_b, None, None


_temporal_group_norm_op.register_autograd(_tgn_backward, setup_context=_tgn_setup)


@torch.library.custom_op("animatelcm::temporal_unpermute_residual", mutates_args=())
def _unpermute_residual_op(y: torch.Tensor, residual: torch.Tensor, num_frames: int, backend: str) -> torch.Tensor:
    args = (y, residual, num_frames)
    return select("temporal_unpermute_residual", UNPERMUTE_RESIDUAL, *args, backend=backend).run(*args)


@_unpermute_residual_op.register_fake
def _(y, residual, num_frames, backend):
    return torch.empty_like(residual, memory_format=torch.contiguous_format)


def _unpermute_setup(ctx, inputs, output):
    ctx.num_frames = inputs[2]


def _unpermute_backward(ctx, grad):
    return frames_to_rows(grad, ctx.num_frames), grad, None, None


_unpermute_residual_op.register_autograd(_unpermute_backward, setup_context=_unpermute_setup)


# ---- public API ------------------------------------------------------------------------------------------------

def group_norm_silu(x, num_groups, weight=None, bias=None, eps=1e-5, silu=True, backend="auto"):
    """GroupNorm (+ SiLU) of ``x [N, C, *]`` -> same shape; see the module docstring. ``backend`` picks one.
    The result is channels-last when ``x`` is a channels-last 4-D tensor (as PyTorch's is), else contiguous; the
    CPU kernel reads and writes that layout directly."""
    _check_tensor("group_norm_silu", "x", x, "[N, C, *]")
    _check_groups("group_norm_silu", x.shape[1], num_groups, eps)
    _check_affine("group_norm_silu", x, x.shape[1], weight, bias)
    args = (x, num_groups, weight, bias, float(eps), bool(silu))
    if eager_fast_path(x, weight, bias):
        return select("group_norm_silu", GROUP_NORM_SILU, *args, backend=backend).run(*args)
    return _group_norm_silu_op(*args, backend)


def temporal_group_norm(x, num_frames, num_groups, weight=None, bias=None, eps=1e-6, backend="auto"):
    """Frame-spanning GroupNorm of ``x [B*F, C, H, W]`` written as ``[B*H*W, F, C]``."""
    _check_tensor("temporal_group_norm", "x", x, "[B*F, C, H, W]", exact_dim=4)
    _check_frames("temporal_group_norm", x.shape[0], num_frames)
    _check_groups("temporal_group_norm", x.shape[1], num_groups, eps)
    _check_affine("temporal_group_norm", x, x.shape[1], weight, bias)
    args = (x, num_frames, num_groups, weight, bias, float(eps))
    if eager_fast_path(x, weight, bias):
        return select("temporal_group_norm", TEMPORAL_GROUP_NORM, *args, backend=backend).run(*args)
    return _temporal_group_norm_op(*args, backend)


def temporal_unpermute_residual(y, residual, num_frames, backend="auto"):
    """``y [B*H*W, F, C]`` back to ``[B*F, C, H, W]`` plus ``residual`` (that shape)."""
    _check_tensor("temporal_unpermute_residual", "residual", residual, "[B*F, C, H, W]", exact_dim=4)
    _check_tensor("temporal_unpermute_residual", "y", y, "[B*H*W, F, C]", exact_dim=3)
    _check_frames("temporal_unpermute_residual", residual.shape[0], num_frames)
    batch_frames, channels, height, width = residual.shape
    expected = (batch_frames // num_frames * height * width, num_frames, channels)
    if tuple(y.shape) != expected:
        raise ValueError(f"temporal_unpermute_residual: y must be {expected} for residual {tuple(residual.shape)} "
                         f"and num_frames={num_frames}, got {tuple(y.shape)}")
    if y.dtype != residual.dtype or y.device != residual.device:
        raise ValueError(f"temporal_unpermute_residual: y ({y.dtype}, {y.device}) and residual ({residual.dtype}, "
                         f"{residual.device}) must share dtype and device")
    if eager_fast_path(y, residual):
        return select("temporal_unpermute_residual", UNPERMUTE_RESIDUAL, y, residual, num_frames,
                      backend=backend).run(y, residual, num_frames)
    return _unpermute_residual_op(y, residual, num_frames, backend)


def explain_group_norm_silu(x, num_groups, weight=None, bias=None, eps=1e-5, silu=True):
    """[(backend, reason or None)] for these inputs."""
    return explain(GROUP_NORM_SILU, x, num_groups, weight, bias, eps, silu)
