"""Lazy access to the compiled module ``animatelcm._C`` and the raw-pointer calling convention.

_C holds no torch headers: it takes data pointers, element counts and a scalar-type code. This file owns the
translation from tensors to those arguments, so no other module touches pointers.
"""

from __future__ import annotations

import functools
import glob
import importlib
import os

import torch

# Same codes as csrc/scalar_types.h.
SCALAR_TYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@functools.lru_cache(maxsize=None)
def _load():
    try:
        return importlib.import_module("animatelcm._C"), None
    except ImportError as error:  # not built (pure-Python install) or built for another platform
        return None, f"animatelcm._C could not be imported ({error}); reinstall with `pip install .` to build it"


def native_module():
    """The compiled module, or None when it is not available (see :func:`native_unavailable_reason`)."""
    return _load()[0]


def native_unavailable_reason() -> str | None:
    """Why ``animatelcm._C`` is missing, or None when it loaded."""
    return _load()[1]


def build_info() -> dict:
    """How _C was built (version, compiler, OpenMP, CUDA version and archs); ``{"native": False, ...}`` if absent."""
    module = native_module()
    if module is None:
        return {"native": False, "reason": native_unavailable_reason()}
    return {"native": True, **module.build_info()}


@functools.lru_cache(maxsize=None)
def has_cuda_kernels() -> bool:
    """Whether _C was compiled with its CUDA part (asked once: every GPU dispatch asks, and _C's answer, a dict
    built per call, does not change)."""
    module = native_module()
    return module is not None and bool(module.build_info()["cuda"])


@functools.lru_cache(maxsize=None)
def last_level_cache_bytes() -> int:
    """Size of this host's last-level CPU cache as the OS reports it (L3, else L2), or 32 MiB where it does not."""
    for name in ("SC_LEVEL3_CACHE_SIZE", "SC_LEVEL2_CACHE_SIZE"):
        try:
            size = os.sysconf(name)
        except (ValueError, OSError):
            continue
        if size > 0:
            return size
    return 32 << 20


@functools.lru_cache(maxsize=None)
def core_cache_bytes() -> int:
    """Size of one core's level-2 CPU cache (Linux sysfs, else sysconf), or 1 MiB where neither reports it: the
    working set a blocked CPU loop keeps resident between its passes."""
    try:
        for index in sorted(glob.glob("/sys/devices/system/cpu/cpu0/cache/index*")):
            with open(os.path.join(index, "level")) as level, open(os.path.join(index, "type")) as kind:
                if level.read().strip() != "2" or kind.read().strip() not in ("Unified", "Data"):
                    continue
            with open(os.path.join(index, "size")) as size:
                text = size.read().strip().upper()
            units = {"K": 1 << 10, "M": 1 << 20}
            return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
    except (OSError, ValueError):
        pass
    try:
        size = os.sysconf("SC_LEVEL2_CACHE_SIZE")
        if size > 0:
            return size
    except (ValueError, OSError):
        pass
    return 1 << 20


def exceeds_last_level_cache(*tensors: torch.Tensor) -> bool:
    """Whether the tensors' storage together is larger than the last-level cache: an output written by such a call
    is evicted before its consumer reads it, so a CPU kernel may write it with streaming stores."""
    return sum(t.numel() * t.element_size() for t in tensors) > last_level_cache_bytes()


def small_for_triton(min_elements: int):
    """An Implementation.pass_over for a Triton kernel with a CUDA C++ twin: a first input of fewer than
    ``min_elements`` elements goes to the twin when it can run it. Triton's Python launcher costs the host about
    30 us a call more than a _C launch (run 10 on an H100, benchmarks/results/gpu_runs.md), which decides a call
    that the GPU runs in less time than that anyway, and every call of a host-bound pipeline."""
    reject_cuda = reject_unless_native("cuda")

    def pass_over(tensor, *rest):
        if tensor.numel() >= min_elements or cuda_kernels_unavailable_reason() or reject_cuda(tensor):
            return None
        return (f"{tensor.numel()} elements, fewer than {min_elements}: the CUDA C++ kernel, whose launch costs the "
                "host less, is the faster there (backend='triton' still runs it)")
    return pass_over


def pointer(tensor: torch.Tensor | None) -> int:
    """Data pointer of a tensor as an int for _C; 0 for None (an optional input left out)."""
    return 0 if tensor is None else tensor.data_ptr()


def cuda_stream_handle(device: torch.device) -> int:
    """The cudaStream_t of torch's current stream on ``device``, as an int for _C's CUDA launchers."""
    return torch.cuda.current_stream(device).cuda_stream


def cuda_kernels_unavailable_reason() -> str | None:
    """Why _C's CUDA kernels cannot run in this process, or None."""
    if native_module() is None:
        return native_unavailable_reason()
    if not has_cuda_kernels():
        return "animatelcm._C was built without CUDA (no nvcc at build time, or ANIMATELCM_CUDA=0)"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return None


def reject_unless_native(*device_types):
    """An Implementation.reject for _C kernels: the first argument must be a float32/float16/bfloat16 tensor on one
    of ``device_types`` (the ops' own checks have made the other tensors agree with it)."""
    def reject(tensor, *rest):
        if tensor.device.type not in device_types:
            return f"needs {' or '.join(device_types)} tensors, got {tensor.device.type}"
        if tensor.dtype not in SCALAR_TYPE_CODES:
            return f"supports float32/float16/bfloat16, got {tensor.dtype}"
        return None
    return reject
