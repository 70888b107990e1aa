"""Temporal attention: ``softmax(q k^T * scale) v`` over short sequences (the frames of a clip).

Same semantics as ``torch.nn.functional.scaled_dot_product_attention`` without mask or dropout: q ``[..., L, D]``,
k ``[..., S, D]``, v ``[..., S, Dv]`` whose leading dims broadcast -> ``[..., L, Dv]``. The kernels are specialised for
self-attention over frames, q, k, v of one shape ``[..., F, D]`` (e.g. ``[N, heads, F, D]``), F = 1..64 and D <= 160;
other shapes (S != L or Dv != D) run on the eager reference. The C++ (CPU) kernel also
takes longer sequences (a streaming-softmax path; ``patch_pipeline`` runs the spatial self-attention on it on the
CPU); the GPU kernels stop at 64 and leave longer ones to the eager reference. Strided views (the
``[N, F, heads, D]`` projection layout seen through a transpose) are read in place; the output has q's layout.
NaN policy: a NaN in q, k or v reaches every output row that attends to it; nothing is checked or replaced.
Autograd: the backward uses the reference math (recomputes the softmax in float32).
"""

from __future__ import annotations

import math

import torch

from .dispatch import FLOAT_DTYPES, Implementation, eager_fast_path, explain, select
from .layout import plan_attention
from .native import SCALAR_TYPE_CODES, exceeds_last_level_cache, native_module, native_unavailable_reason, pointer, reject_unless_native
from .triton_backend import triton_attention, triton_device_types, triton_unavailable_reason

MAX_FRAMES = 64
MAX_HEAD_DIM = 160


def broadcast_leading_dims(q, k, v) -> torch.Size | None:
    """The leading dims (all but the last two) that q, k, v broadcast to, as SDPA broadcasts them, or None when
    they do not broadcast."""
    try:
        return torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    except RuntimeError:
        return None


def check_attention_inputs(q, k, v, scale) -> None:
    """Raise TypeError/ValueError naming the problem when q, k, v do not fit together."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"temporal_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(f"temporal_attention: {name} must be [..., frames, head_dim], got shape {tuple(t.shape)}")
    if not (q.shape[-1] == k.shape[-1] and k.shape[-2] == v.shape[-2]
            and (q.shape[:-2] == k.shape[:-2] == v.shape[:-2] or broadcast_leading_dims(q, k, v) is not None)):
        raise ValueError(f"temporal_attention: q, k, v must be [..., L, D], [..., S, D], [..., S, Dv] with leading "
                         f"dims that broadcast (self-attention: one shape [..., frames, head_dim]); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype not in FLOAT_DTYPES or not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"temporal_attention: q, k, v must share one floating dtype (float32/float16/bfloat16/"
                        f"float64); got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"temporal_attention: q, k, v are on different devices ({q.device}, {k.device}, "
                         f"{v.device}); move them to one device")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"temporal_attention: scale must be a finite number or None, got {scale!r}")
    if scale is None and q.shape[-1] == 0:
        raise ValueError("temporal_attention: head_dim is 0, so the default scale 1/sqrt(head_dim) is undefined; "
                         "pass scale explicitly")


def temporal_attention_reference(q, k, v, scale=None):
    """Eager attention: q ``[..., L, D]``, k ``[..., S, D]``, v ``[..., S, Dv]`` -> ``[..., L, Dv]`` in q's dtype
    (float32 math; float64 stays)."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q.to(compute) @ k.to(compute).transpose(-1, -2)) * scale
    return (scores.softmax(dim=-1) @ v.to(compute)).to(q.dtype)


def _output_like_q(q, v):
    """The output buffer: q's layout when the shapes allow it (self-attention), else contiguous ``[..., L, Dv]``."""
    if v.shape == q.shape:
        return torch.empty_like(q)
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _eager(q, k, v, scale):
    out = _output_like_q(q, v)
    out.copy_(temporal_attention_reference(q, k, v, scale))
    return out


def _cpp(q, k, v, scale):
    q, k, v, out, (batch0, batch1), strides = plan_attention(q, k, v)
    native_module().temporal_attention_cpu(
        pointer(q), pointer(k), pointer(v), pointer(out), batch0, batch1, q.shape[-2], q.shape[-1], *strides,
        float(scale), SCALAR_TYPE_CODES[q.dtype], exceeds_last_level_cache(q, k, v, out))
    return out


def _reject_native(device_types, max_frames):
    device_and_dtype = reject_unless_native(*device_types)

    def reject(q, k, v, scale):
        reason = device_and_dtype(q)
        if reason is None and not (q.shape == k.shape == v.shape):
            return "supports self-attention only (q, k, v of one shape)"
        if reason is None and q.shape[-1] > MAX_HEAD_DIM:
            return f"supports head_dim <= {MAX_HEAD_DIM}, got {q.shape[-1]}"
        if reason is None and max_frames is not None and q.shape[-2] > max_frames:
            return f"supports frames <= {max_frames}, got {q.shape[-2]}"
        return reason
    return reject


_REJECT_TRITON = {devices: _reject_native(devices, MAX_FRAMES) for devices in (("cuda",), ("cuda", "cpu"))}


def _reject_triton(q, k, v, scale):
    return _REJECT_TRITON[triton_device_types()](q, k, v, scale)


# cpp first: it takes only CPU tensors, so on a GPU the order gives triton, and on a CPU the C++ kernel wins over
# the Triton interpreter (which accepts CPU tensors when TRITON_INTERPRET=1, for forced testing only).
IMPLEMENTATIONS = [
    Implementation("cpp", _cpp, native_unavailable_reason, _reject_native(("cpu",), None)),
    Implementation("triton", triton_attention, triton_unavailable_reason, _reject_triton),
    Implementation("eager", _eager, lambda: None, lambda *a: None),
]


@torch.library.custom_op("animatelcm::temporal_attention", mutates_args=())
def _temporal_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                           backend: str) -> torch.Tensor:
    return select("temporal_attention", IMPLEMENTATIONS, q, k, v, scale, backend=backend).run(q, k, v, scale)


@_temporal_attention_op.register_fake
def _(q, k, v, scale, backend):
    return _output_like_q(q, v)


def _setup_context(ctx, inputs, output):
    q, k, v, scale, _ = inputs
    ctx.save_for_backward(q, k, v)
    ctx.scale = scale


def _backward(ctx, grad):
    q, k, v = ctx.saved_tensors
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf, g = q.to(compute), k.to(compute), v.to(compute), grad.to(compute)
    probabilities = ((qf @ kf.transpose(-1, -2)) * ctx.scale).softmax(dim=-1)
    grad_v = probabilities.transpose(-1, -2) @ g
    grad_p = g @ vf.transpose(-1, -2)
    grad_s = probabilities * (grad_p - (grad_p * probabilities).sum(dim=-1, keepdim=True))
    grad_q = (grad_s @ kf) * ctx.scale
    grad_k = (grad_s.transpose(-1, -2) @ qf) * ctx.scale
    return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), None, None


_temporal_attention_op.register_autograd(_backward, setup_context=_setup_context)


def temporal_attention(q, k, v, scale=None, backend="auto"):
    """Attention over frames: q, k, v ``[..., F, D]`` (one shape) -> ``[..., F, D]`` with q's layout; ``scale``
    defaults to ``D ** -0.5``; ``backend`` picks one (``"auto"``: the dispatcher's choice). As SDPA, it also takes
    k, v of another length S and v of another width Dv (q ``[..., L, D]``, k ``[..., S, D]``, v ``[..., S, Dv]`` ->
    ``[..., L, Dv]``); those run on the eager reference. Leading dims broadcast as SDPA's do (a k, v of batch 1
    against a q of batch N: stride-0 views, no copies)."""
    check_attention_inputs(q, k, v, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not q.shape[:-2] == k.shape[:-2] == v.shape[:-2]:  # (torch.broadcast_shapes costs ~40 us: only here)
        leading = broadcast_leading_dims(q, k, v)
        q, k, v = (t.expand(*leading, *t.shape[-2:]) for t in (q, k, v))  # stride-0 views, no copies
    if eager_fast_path(q, k, v):
        return select("temporal_attention", IMPLEMENTATIONS, q, k, v, scale, backend=backend).run(q, k, v, scale)
    return _temporal_attention_op(q, k, v, scale, backend)


def explain_temporal_attention(q, k, v, scale=None):
    """[(backend, reason or None)] for these inputs."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return explain(IMPLEMENTATIONS, q, k, v, scale)
