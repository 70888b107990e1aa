"""``linear``: ``x @ weight.T + bias`` on the faster of the two GEMM libraries PyTorch ships for the CPU.

PyTorch's float32 ``F.linear`` on the CPU calls its BLAS (MKL in the x86-64 wheels). MKL picks its code by CPU
vendor: on AMD processors it runs its AVX2 kernels even where the CPU has AVX-512. oneDNN, which PyTorch also
ships (for its convolutions), picks kernels by instruction set. Measured on an AMD EPYC Zen 4 (2 cores, float32,
``torch.ops.mkldnn._linear_pointwise`` against ``F.linear``), oneDNN was 1.3x faster at ``[16384, 80] x [80, 80]``,
1.7x at ``[16384, 320] x [320, 80]``, 1.2-1.3x at the UNet's other large products, and slower below about
``2**25`` multiply-adds (0.4-0.9x at ``[64..1024, 80] x [80, 80]``: a fixed cost per call).

So ``linear`` sends a float32 CPU inference product of at least :data:`ONEDNN_MIN_MACS` multiply-adds to oneDNN when
:func:`cpu_gemm_library` says ``"onednn"``: by default on AMD CPUs with AVX-512 (where it was measured) whose
PyTorch uses MKL; ``ANIMATELCM_CPU_GEMM=onednn|torch|auto`` overrides. Everything else (other devices and dtypes,
autograd, ``torch.compile`` tracing, small products) is ``F.linear``. Results match ``F.linear`` to float32
rounding (the two libraries may sum in another order).
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from .dispatch import plain_inference_call

CPU_GEMM_ENV = "ANIMATELCM_CPU_GEMM"
CPU_GEMM_LIBRARIES = ("torch", "onednn")
ONEDNN_MIN_MACS = 1 << 25


@functools.lru_cache(maxsize=None)
def onednn_is_measured_faster() -> bool:
    """Whether this machine is one where oneDNN's float32 GEMM was measured faster than PyTorch's default: an AMD
    CPU with AVX-512 (read from ``/proc/cpuinfo``), with PyTorch built with both MKL and oneDNN."""
    if not (torch.backends.mkl.is_available() and torch.backends.mkldnn.is_available()):
        return False
    try:
        return is_amd_with_avx512(Path("/proc/cpuinfo").read_text())
    except OSError:
        return False


def is_amd_with_avx512(cpuinfo: str) -> bool:
    """Whether ``cpuinfo`` (the text of Linux's ``/proc/cpuinfo``) describes an AMD CPU with AVX-512."""
    vendor = re.search(r"^vendor_id\s*:\s*(\S+)", cpuinfo, re.MULTILINE)
    flags = re.search(r"^flags\s*:(.*)$", cpuinfo, re.MULTILINE)
    return bool(vendor and vendor.group(1) == "AuthenticAMD" and flags and "avx512f" in flags.group(1).split())


def cpu_gemm_library() -> str:
    """``"onednn"`` or ``"torch"``: the library :func:`linear` uses for large float32 CPU products, from
    ``ANIMATELCM_CPU_GEMM`` (``auto`` or unset: oneDNN where :func:`onednn_is_measured_faster`)."""
    value = os.environ.get(CPU_GEMM_ENV, "auto").strip().lower()
    if value in ("", "auto"):
        return "onednn" if onednn_is_measured_faster() else "torch"
    if value not in CPU_GEMM_LIBRARIES:
        raise ValueError(f"{CPU_GEMM_ENV}={value!r} is not a CPU GEMM library; use auto, torch or onednn")
    if value == "onednn" and not torch.backends.mkldnn.is_available():
        raise ValueError(f"{CPU_GEMM_ENV}=onednn, but this PyTorch is built without oneDNN (mkldnn); use auto or "
                         "torch")
    return value


def uses_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether :func:`linear` runs ``x [..., K] @ weight [N, K].T (+ bias [N])`` on oneDNN: contiguous float32 CPU
    tensors only (``torch.ops.mkldnn._linear_pointwise`` misreads some strided inputs, e.g. a slice of the last
    dimension; those get ``F.linear``), outside CPU autocast (where ``F.linear`` computes in autocast's dtype)."""
    # Cheapest tests first: most calls that fail, fail on size or device (this runs for every patched nn.Linear).
    return (x.numel() * weight.shape[0] >= ONEDNN_MIN_MACS and x.dtype is torch.float32
            and x.device.type == "cpu" and weight.dtype is torch.float32
            and weight.device.type == "cpu" and x.dim() >= 2 and weight.dim() == 2 and weight.shape[1] == x.shape[-1]
            and x.is_contiguous() and weight.is_contiguous()
            and (bias is None or (bias.dtype is torch.float32 and bias.dim() == 1 and bias.device.type == "cpu"
                                  and bias.is_contiguous()))
            and plain_inference_call(x, weight, bias) and not torch.is_autocast_enabled("cpu")
            and cpu_gemm_library() == "onednn")


@torch.library.custom_op("animatelcm::linear", mutates_args=())
def _linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """What a graph compiled with torch.compile calls for a float32 CPU inference product: the library is chosen
    when it runs, as in eager mode."""
    out = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "") if uses_onednn(x, weight, bias) \
        else F.linear(x, weight, bias)
    return out if out.is_contiguous() else out.contiguous()


@_linear_op.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: ``x [..., K]``, ``weight [N, K]``, ``bias [N]`` or None -> ``[..., N]``,
    on oneDNN when :func:`uses_onednn` (see the module docstring), else ``F.linear`` itself (which also raises
    PyTorch's errors for mismatched inputs). Traced by torch.compile without gradients, a float32 CPU product of
    at least ONEDNN_MIN_MACS multiply-adds becomes the custom op ``animatelcm::linear``, which makes the same choice
    when the compiled graph runs (inductor would call PyTorch's BLAS)."""
    if torch.compiler.is_compiling():
        if (not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu") and x.device.type == "cpu"
                and x.dtype is torch.float32
                and weight.dtype is torch.float32 and x.dim() >= 2 and weight.dim() == 2
                and x.numel() * weight.shape[0] >= ONEDNN_MIN_MACS):
            return _linear_op(x, weight, bias)
        return F.linear(x, weight, bias)
    if uses_onednn(x, weight, bias):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)
