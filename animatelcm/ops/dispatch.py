"""Backend selection shared by every op family.

Each op family keeps an ordered list of :class:`Implementation` s (fastest first, the eager reference last). An
implementation declares what it supports through ``reject(*args) -> str | None``: None means "I can run this", a
string says why not. The dispatcher picks the first that accepts, unless ``ANIMATELCM_BACKEND`` forces one, and can
report the reasons for every rejection (``explain``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

BACKENDS = ("eager", "cpp", "cuda", "triton")
BACKEND_ENV = "ANIMATELCM_BACKEND"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # what every op accepts


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the eager references compute in: float64 for float64 input, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run the requested op on the given inputs."""


@dataclass(frozen=True)
class Implementation:
    """One backend's implementation of one op.

    ``available()`` says whether the backend exists in this process (returns a reason string when not);
    ``reject(*args, **kwargs)`` says whether it can handle these particular inputs; ``pass_over(*args)`` (optional)
    says why the automatic choice should skip inputs the backend can handle, because a later backend was measured
    faster on them (a forced backend ignores it).
    """

    backend: str
    run: Callable
    available: Callable[[], str | None]
    reject: Callable[..., str | None]
    pass_over: Callable[..., str | None] = lambda *args: None

    def __post_init__(self):
        if self.backend in GPU_BACKENDS:
            object.__setattr__(self, "run", on_the_inputs_device(self.run))


GPU_BACKENDS = ("cuda", "triton")


def on_the_inputs_device(run: Callable) -> Callable:
    """``run(x, *rest)`` with ``x``'s CUDA device made the current one for the call where it is not: Triton launches
    on the current device, and _C's CUDA launchers do too, so inputs on ``cuda:1`` while ``cuda:0`` is current (a
    pipeline moved there, ``--device cuda:1``) would reach kernels on the wrong GPU. Every GPU implementation's
    ``run`` is wrapped (the ops' checks have put all tensors of a call on one device)."""
    def guarded(x, *rest):
        device = getattr(x, "device", None)
        if device is not None and device.type == "cuda" and device.index != torch.cuda.current_device():
            with torch.cuda.device(device):
                return run(x, *rest)
        return run(x, *rest)
    guarded.__wrapped__ = run
    return guarded


def forced_backend() -> str | None:
    """The backend named by ``ANIMATELCM_BACKEND`` (None for unset or ``auto``); raises on an unknown name. Read on
    every op call, so a change takes effect at once."""
    value = os.environ.get(BACKEND_ENV)
    if value is None or value.strip().lower() in ("", "auto"):
        return None
    value = value.strip().lower()
    if value not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={value!r} is not a backend; use one of auto, {', '.join(BACKENDS)}")
    return value


def explain(implementations: list[Implementation], *args, **kwargs) -> list[tuple[str, str | None]]:
    """For each implementation in order: (backend, None if the automatic choice would take it for these inputs else
    the reason it does not)."""
    report = []
    for impl in implementations:
        reason = impl.available() or impl.reject(*args, **kwargs) or impl.pass_over(*args, **kwargs)
        report.append((impl.backend, reason))
    return report


def select(op_name: str, implementations: list[Implementation], *args, backend: str = "auto") -> Implementation:
    """The implementation to run for ``args``.

    ``backend`` (the ops' argument) other than ``"auto"`` is strict: that backend or an error saying why not.
    ``ANIMATELCM_BACKEND`` forces a backend for every op that implements it (an error if it cannot run these
    inputs); ops without that backend at all keep the automatic choice, so forcing e.g. ``triton`` for a whole
    pipeline does not break the ops Triton has no kernel for. Otherwise the first implementation that accepts and
    does not pass the inputs over to a faster one.
    """
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"{op_name}: backend={backend!r} is not one of auto, {', '.join(BACKENDS)}")
    explicit = backend != "auto"
    forced = backend if explicit else forced_backend()
    if forced is not None:
        impl = next((i for i in implementations if i.backend == forced), None)
        if impl is None and explicit:
            raise BackendUnavailableError(
                f"{op_name} has no {forced} implementation (it has: "
                f"{', '.join(i.backend for i in implementations)}); pick one of those or backend='auto'")
        if impl is not None:
            reason = impl.available() or impl.reject(*args)
            if reason:
                source = f"backend={forced!r}" if explicit else f"{BACKEND_ENV}={forced}"
                raise BackendUnavailableError(
                    f"{op_name}: {source} cannot run these inputs: {reason}. "
                    f"Use backend='auto' (and unset {BACKEND_ENV}) to fall back automatically.")
            return impl
    for impl in implementations:
        if not (impl.available() or impl.reject(*args) or impl.pass_over(*args)):
            return impl
    raise RuntimeError(f"{op_name}: no implementation accepted the inputs, not even the eager reference")


def autocast_dtype(tensor: torch.Tensor) -> torch.dtype | None:
    """The dtype ``torch.autocast`` gives matrix products on ``tensor``'s device type, or None where it is off."""
    try:
        enabled = torch.is_autocast_enabled(tensor.device.type)
    except RuntimeError:  # a device type autocast does not know (meta)
        return None
    return torch.get_autocast_dtype(tensor.device.type) if enabled else None


PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def plain_inference_call(*tensors) -> bool:
    """Whether a call on ``tensors`` (None entries skipped) needs no autograd and no tracing: only plain tensors,
    no gradient needed, not being traced by torch.compile."""
    if torch.compiler.is_compiling():
        return False
    grad_enabled = torch.is_grad_enabled()
    for tensor in tensors:
        if tensor is None:
            continue
        if type(tensor) not in PLAIN_TENSOR_TYPES or (grad_enabled and tensor.requires_grad):
            return False
    return True


def eager_fast_path(*tensors) -> bool:
    """Whether an op call may skip the torch.library layer (its dispatch costs ~20 us a call): a
    :func:`plain_inference_call` while no profiler records (so torch.profiler sees the op by its name). Everything
    else goes through the registered custom op, which carries the fake implementation and autograd."""
    return plain_inference_call(*tensors) and not torch._C._autograd._profiler_enabled()
