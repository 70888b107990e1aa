"""diffusers' per-call model properties with the same answers, without their walks over every module.

Three properties that diffusers reads on every call look at every module of a model for hooks. Each looks with
``hasattr``, and a miss raises and catches an exception inside ``nn.Module.__getattr__``:

- ``ModelMixin.dtype`` (``get_parameter_dtype``, which checks for a layerwise-casting hook). The UNet reads it on
  every forward. It takes 3.2-3.4 ms for SD1.5's UNet with motion modules on one AMD EPYC core.
- ``ModelMixin.device`` (``get_parameter_device``, which checks for a group-offloading hook).
- ``DiffusionPipeline._execution_device``. A pipeline reads it once per call. It makes that check for every
  component and then reads each component's ``device``: 13.7-14.3 ms for an SD1.5 AnimateDiff pipeline.

On a GPU a call whose time is the host's waits for all of it (guidance 1 without CUDA graphs). Where no module
carries a hook, that is, neither diffusers' ``_diffusers_hook`` nor accelerate's ``_hf_hook`` is in any module's
``__dict__``, the answers are:

- ``dtype`` and ``device``: those of the first parameter (else buffer);
- ``_execution_device``: the pipeline's ``device``.

Checking for the hooks takes one walk over a dict per module (0.27-0.4 ms for the UNet). Anything else goes to
diffusers' own code: a hook, ``_keep_in_fp32_modules``, a model without tensors, or a call traced by torch.compile.
A pipeline call walks each component once, when it starts: within the call the UNet's ``dtype`` on each forward and
the ``_execution_device`` use that answer (offload hooks are installed before a call; one installed during a call,
by a step callback say, is seen from the next call on).

:func:`install` gives an object a subclass of its class that differs only in those properties. The subclass has
the same name and module, so saved configs and the pipeline's registry name the original class.
:func:`restore` puts the original class back. A pipeline keeps its subclass while patched; its models get theirs
only for the duration of each call (the pipeline's ``__call__`` installs and restores them), so outside a call
every model is of its own class, as code that compares exact types expects (diffusers' ``from_pipe`` does).
"""

from __future__ import annotations

import contextvars
import functools
import itertools

import torch
from torch import nn


def has_own_hook(module: nn.Module) -> bool:
    """Whether ``module`` itself carries a diffusers hook registry (``_diffusers_hook``: layerwise casting, group
    offloading, ...) or an accelerate hook (``_hf_hook``: CPU offloading, ...). Such hooks wrap the module's
    forward, and may cast or move its weights there."""
    attributes = module.__dict__
    return "_diffusers_hook" in attributes or "_hf_hook" in attributes


def carries_hooks(model: nn.Module) -> bool:
    """Whether ``model`` or any module under it :func:`has_own_hook`."""
    stack = [model]
    while stack:
        module = stack.pop()
        if has_own_hook(module):
            return True
        stack.extend(child for child in module._modules.values() if child is not None)  # None: an emptied slot
    return False


# ids of the models a running pipeline call found without hooks when it started (see :func:`_scanned_call`)
_HOOK_FREE_IN_CALL: contextvars.ContextVar[frozenset] = contextvars.ContextVar("animatelcm_hook_free",
                                                                               default=frozenset())


def _hooked_model(model: nn.Module) -> bool:
    """:func:`carries_hooks`, answered without a walk for a model the running pipeline call found hook-free."""
    return id(model) not in _HOOK_FREE_IN_CALL.get() and carries_hooks(model)


def _scanned_call(base: type):
    """A ``__call__`` for a subclass of the pipeline class ``base``: for the duration of the call the pipeline's
    models get their fast classes (:func:`install`) and each is walked for hooks once, for the properties read
    during the call; then ``base.__call__`` (looked up at each call) runs. Same signature and result."""
    @functools.wraps(base.__call__)
    def __call__(self, *args, **kwargs):
        models = list(dict.fromkeys(m for m in vars(self).values() if isinstance(m, nn.Module)))
        installed = []
        for model in models:
            install(model, installed)
        token = _HOOK_FREE_IN_CALL.set(frozenset(id(m) for m in models if not carries_hooks(m)))
        try:
            return base.__call__(self, *args, **kwargs)
        finally:
            _HOOK_FREE_IN_CALL.reset(token)
            restore(installed)
    return __call__


def _first_tensor(model: nn.Module, floating: bool):
    """The first parameter (else buffer) of ``model``, the first floating-point one with ``floating``; None if
    there is none or diffusers' own function must answer (hooks, ``_keep_in_fp32_modules``, torch.compile)."""
    if torch.compiler.is_compiling() or getattr(model, "_keep_in_fp32_modules", None) or _hooked_model(model):
        return None
    return next((t for t in itertools.chain(model.parameters(), model.buffers())
                 if not floating or t.is_floating_point()), None)


def model_dtype(model) -> torch.dtype:
    """diffusers' ``ModelMixin.dtype`` for ``model`` (``get_parameter_dtype``'s answer)."""
    from diffusers.models import modeling_utils

    tensor = _first_tensor(model, floating=True)
    return modeling_utils.get_parameter_dtype(model) if tensor is None else tensor.dtype


def model_device(model) -> torch.device:
    """diffusers' ``ModelMixin.device`` for ``model`` (``get_parameter_device``'s answer)."""
    from diffusers.models import modeling_utils

    tensor = _first_tensor(model, floating=False)
    return modeling_utils.get_parameter_device(model) if tensor is None else tensor.device


def execution_device(pipe) -> torch.device:
    """diffusers' ``DiffusionPipeline._execution_device`` for ``pipe``. Without hooks (no offloading of either
    kind) diffusers answers with the pipeline's ``device``."""
    from diffusers import DiffusionPipeline

    models = [m for m in pipe.components.values() if isinstance(m, nn.Module)]
    if any(_hooked_model(model) for model in models):
        return DiffusionPipeline._execution_device.fget(pipe)
    return pipe.device


def _overrides(base: type) -> dict:
    """The properties :func:`install` replaces on ``base``: those it inherits unchanged from diffusers'
    ``ModelMixin`` or ``DiffusionPipeline`` (a class with its own keeps it)."""
    from diffusers import DiffusionPipeline
    from diffusers.models.modeling_utils import ModelMixin

    candidates = []
    if issubclass(base, ModelMixin):
        candidates += [(ModelMixin, "dtype", model_dtype), (ModelMixin, "device", model_device)]
    if issubclass(base, DiffusionPipeline):
        candidates.append((DiffusionPipeline, "_execution_device", execution_device))
    overrides = {name: property(function, doc=getattr(owner, name).__doc__) for owner, name, function in candidates
                 if getattr(base, name) is getattr(owner, name)}
    if "_execution_device" in overrides and any("__call__" in vars(cls) for cls in base.__mro__):
        overrides["__call__"] = _scanned_call(base)
    return overrides


_FAST_CLASSES: dict = {}


def fast_class(base: type) -> type | None:
    """The subclass of ``base`` with the fast properties (one per class), or None when ``base`` inherits none of
    them from diffusers (it is already one, or defines its own)."""
    if base not in _FAST_CLASSES:
        overrides = _overrides(base)
        _FAST_CLASSES[base] = type(base)(base.__name__, (base,), {
            **overrides, "__module__": base.__module__, "__qualname__": base.__qualname__,
            "__doc__": base.__doc__}) if overrides else None
    return _FAST_CLASSES[base]


def install(obj, installed: list) -> None:
    """Give ``obj`` (a diffusers model or pipeline) the fast properties, appending ``(obj, its class)`` to
    ``installed`` for :func:`restore`; nothing happens where :func:`fast_class` has none."""
    base = type(obj)
    cls = fast_class(base)
    if cls is not None:
        installed.append((obj, base))
        obj.__class__ = cls


def restore(installed: list) -> None:
    """Undo :func:`install` for each ``(obj, class)``, unless something has changed the class since."""
    for obj, base in reversed(installed):
        if type(obj) is _FAST_CLASSES.get(base):
            obj.__class__ = base
