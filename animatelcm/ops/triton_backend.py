"""Glue between the ops and the Triton kernels in ``animatelcm.kernels``: availability and launches.

Triton runs on CUDA devices, or on the CPU when ``TRITON_INTERPRET=1`` is set before the first Triton kernel is
used (the interpreter is slow: for tests on small shapes).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from .layout import plan_attention


def triton_unavailable_reason() -> str | None:
    """Why the Triton backend cannot run in this process, or None."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 to run the Triton kernels in the CPU interpreter)"
    return None


@functools.lru_cache(maxsize=None)
def _attention_kernel():
    from ..kernels.temporal_attention import temporal_attention_kernel

    return temporal_attention_kernel


def _fp32_dot(dtype) -> bool:
    """Whether the kernel's dots run on float32 operands: for float32 inputs (IEEE, no TF32), and for bfloat16 under
    the interpreter, whose tl.dot gives wrong results on bfloat16 operands (numpy has no bfloat16)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1")


def _block(n: int) -> int:
    return max(16, 1 << (max(n, 1) - 1).bit_length())


def triton_attention(q, k, v, scale):
    """Launch the Triton temporal attention on q, k, v ``[..., F, D]`` (one shape); output has q's layout."""
    q, k, v, out, (batch0, batch1), strides = plan_attention(q, k, v)
    frames, head_dim = q.shape[-2], q.shape[-1]
    if batch0 * batch1 == 0:
        return out
    _attention_kernel()[(batch0 * batch1,)](
        q, k, v, out, batch1, frames, head_dim, float(scale), *strides[0], *strides[1], *strides[2], *strides[3],
        BLOCK_F=_block(frames), BLOCK_D=_block(head_dim), FP32_DOT=_fp32_dot(q.dtype),
        num_warps=4 if head_dim > 64 else 2,
    )
    return out
