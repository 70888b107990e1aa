"""CUDA-graph replay of a UNet's forward for fixed shapes (``patch_pipeline(pipe, cuda_graph=True)``).

A denoising loop calls the UNet with the same shapes every step; on a GPU at batch 1 much of a call is kernel launch
overhead. :class:`GraphedForward` replaces ``unet.forward``: the first call with a new input signature (the shapes,
dtypes and devices of every tensor argument, the values of the others, and the autocast dtype, if any) warms the
forward up on a side stream and captures it into a CUDA graph whose inputs are static buffers; later calls copy
their tensors into those buffers, replay the graph and return a copy of its output. Calls it cannot serve run the original forward: CPU inputs,
gradients enabled, a model with accelerate offload hooks, an argument that is neither a tensor nor a hashable
value, ``torch.compile`` tracing, or a PyTorch forward hook (or pre-hook) on the model or any module in it, or a
global one: a hook's inputs are not the forward's arguments (the image adapter's features, added by pre-hooks on
the motion modules during a pipeline call), so a replay would read the tensors of the call that was captured.

A graph bakes in more than its inputs: the memory its weights had, the modules and attention processors that
ran, and the Python numbers they used (a LoRA's scale, FreeU's factors). Each call compares a fingerprint of those
(:func:`capture_state`) with the one of the captures and, where it changed, drops every graph and captures anew:
loading or unloading a LoRA, ``set_adapters`` and its scales, ``fuse_lora`` / ``unfuse_lora``, an IP-Adapter's or
any other processor, ``enable_freeu``, a module swapped, a parameter given new memory (``p.data = ...``, the model
moved). Changes the fingerprint does not see (an attribute of one's own that a forward reads) need
:meth:`GraphedForward.reset`. Values written into the weights in place are read by every replay as they are.
Timesteps given as Python numbers or CPU tensors are moved into a device buffer first, so each replay sees its own
step's.

Only the UNet is captured, not the scheduler step: the step's Python bookkeeping (the step index picking the
coefficients) runs once at capture and would be frozen into a graph.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils import _pytree as pytree

from .ops.dispatch import autocast_dtype

WARMUP_CALLS = 2


# Python numbers diffusers' modules read in their forwards that a capture would freeze: FreeU's factors (set on
# the up blocks by ``enable_freeu``).
FROZEN_NUMBERS = ("s1", "s2", "b1", "b2")


def _scale_key(value):
    """A LoRA scale as the fingerprint compares it: a float to 9 significant digits (a call with
    ``cross_attention_kwargs={"scale": s}`` multiplies every scale by s and divides it back, which can leave it an
    ulp off: not a change worth a new capture), any other value by identity."""
    if isinstance(value, float):
        return float(f"{value:.9g}")
    return value if isinstance(value, (int, str)) else id(value)


def _peft_state(module):
    """The state of a peft tuner layer (a LoRA-wrapped linear or convolution) its forward depends on, or None for
    another module: the scales, the active adapters, the merged ones and whether adapters are disabled."""
    scaling = module.__dict__.get("scaling")
    if not isinstance(scaling, dict):
        return None
    return (tuple((name, _scale_key(value)) for name, value in scaling.items()),
            tuple(getattr(module, "active_adapters", ())), tuple(getattr(module, "merged_adapters", ())),
            getattr(module, "disable_adapters", None))


def capture_state(model: torch.nn.Module):
    """None where a forward of ``model`` runs PyTorch forward hooks or pre-hooks (its own, any submodule's, or
    global ones: ``register_module_forward_hook``), which a replay cannot run; else a fingerprint of what a captured
    forward bakes in besides its inputs. Per module, in one walk: its identity and training mode, its attention
    processor's identity, its parameters' and buffers' memory, a peft layer's adapter state and FreeU's factors
    (``FROZEN_NUMBERS``). Equal fingerprints: a replay computes the forward. About 2 ms for the 1,347 modules of
    SD1.5's UNet with motion modules on one Intel Xeon core (0.7 ms of it the walk that looks for hooks), host time
    that a replayed step, which waits on the GPU, hides."""
    from torch.nn.modules import module as module_state

    if module_state._global_forward_hooks or module_state._global_forward_pre_hooks:
        return None
    parts = []
    append = parts.append
    stack = [model]
    while stack:
        module = stack.pop()
        attributes = module.__dict__
        if attributes["_forward_hooks"] or attributes["_forward_pre_hooks"]:
            return None
        append(id(module))
        append(attributes["training"])
        for tensors in (attributes["_parameters"], attributes["_buffers"]):
            for tensor in tensors.values():
                if tensor is not None:
                    append(tensor.data_ptr())
        if "processor" in attributes:
            append(("processor", id(attributes["processor"])))
        if "scaling" in attributes:
            append(("peft", _peft_state(module)))
        for name in FROZEN_NUMBERS:
            if name in attributes:
                append((name, attributes[name]))
        stack.extend(child for child in attributes["_modules"].values() if child is not None)
    return tuple(parts)


def runs_forward_hooks(model: torch.nn.Module) -> bool:
    """Whether a forward of ``model`` runs PyTorch forward hooks or pre-hooks (see :func:`capture_state`)."""
    return capture_state(model) is None


def _current_device(device: torch.device):
    """A context making CUDA ``device`` the current device (``torch.cuda.device``), or doing nothing for another
    device type (the tests' stand-in graphs run on the CPU)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class _CudaGraph:
    """One ``torch.cuda.CUDAGraph``: ``capture(fn)`` runs ``fn`` under capture and returns its outputs."""

    def __init__(self, pool):
        self.graph = torch.cuda.CUDAGraph()
        self.pool = pool

    def warm_up(self, fn):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_CALLS):
                fn()
        torch.cuda.current_stream().wait_stream(stream)

    def capture(self, fn):
        with torch.cuda.graph(self.graph, pool=self.pool):
            return fn()

    def replay(self):
        self.graph.replay()


class _Entry:
    def __init__(self, graph, static_inputs, outputs):
        self.graph, self.static_inputs, self.outputs = graph, static_inputs, outputs


class GraphedForward:
    """``unet.forward`` with CUDA-graph replay (see the module docstring).

    ``original`` is the forward it replaces (called as ``original(*args, **kwargs)``). ``graph_factory(pool)``
    makes the capture object; the default is a ``torch.cuda.CUDAGraph`` sharing one memory pool across signatures.
    """

    def __init__(self, module, original, graph_factory=None):
        self.module = module
        self.original = original
        self.graph_factory = graph_factory or _CudaGraph
        self.entries: dict = {}
        self._pool = None
        self._state = None  # capture_state of the model when the entries were captured

    def reset(self):
        """Forget every captured graph (the next call per signature captures again)."""
        self.entries.clear()
        self._pool = None
        self._state = None

    def __call__(self, sample, timestep, *args, **kwargs):
        state = capture_state(self.module) if self._eligible(sample) else None
        if state is None:
            return self.original(sample, timestep, *args, **kwargs)
        if state != self._state:  # the model changed since the captures (see the module docstring)
            self.reset()
            self._state = state
        if not torch.is_tensor(timestep) or timestep.device != sample.device:
            timestep = torch.as_tensor(timestep, device=sample.device)
        leaves, spec = pytree.tree_flatten(((sample, timestep, *args), kwargs))
        key = self._signature(leaves, spec)
        if key is None:
            return self.original(sample, timestep, *args, **kwargs)
        key = (key, autocast_dtype(sample))  # autocast changes the kernels and dtypes a capture records
        with _current_device(sample.device):  # the side stream, capture and replay on the model's GPU
            entry = self.entries.get(key)
            if entry is None:
                entry = self.entries[key] = self._capture(leaves, spec)
            else:
                for static, value in zip(entry.static_inputs, leaves):
                    if torch.is_tensor(value):
                        static.copy_(value)
                entry.graph.replay()
        return pytree.tree_map(lambda t: t.clone() if torch.is_tensor(t) else t, entry.outputs)

    def _eligible(self, sample) -> bool:
        return (torch.is_tensor(sample) and sample.is_cuda and not torch.is_grad_enabled()
                and not torch.compiler.is_compiling() and getattr(self.module, "_hf_hook", None) is None)

    @staticmethod
    def _signature(leaves, spec):
        parts = []
        for value in leaves:
            if torch.is_tensor(value):
                parts.append(("tensor", tuple(value.shape), value.stride(), value.dtype, value.device))
            else:
                try:
                    hash(value)
                except TypeError:
                    return None
                parts.append(("value", value))
        return spec, tuple(parts)

    def _capture(self, leaves, spec):
        if self._pool is None and self.graph_factory is _CudaGraph:
            self._pool = torch.cuda.graph_pool_handle()
        graph = self.graph_factory(self._pool)
        static_inputs = [value.clone() if torch.is_tensor(value) else value for value in leaves]
        (sample, timestep, *args), kwargs = pytree.tree_unflatten(static_inputs, spec)
        autocast = autocast_dtype(sample)

        def call():
            if autocast is None:
                return self.original(sample, timestep, *args, **kwargs)
            # without autocast's cache of cast weights: the graph records the casts, and reads no tensor that the
            # cache frees when the caller's autocast context ends
            with torch.autocast(sample.device.type, dtype=autocast, cache_enabled=False):
                return self.original(sample, timestep, *args, **kwargs)

        graph.warm_up(call)
        outputs = graph.capture(call)
        graph.replay()  # capture records the kernels without running them
        return _Entry(graph, static_inputs, outputs)
