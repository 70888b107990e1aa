"""``animatelcm.LCMScheduler``: diffusers' LCMScheduler with a fused, synchronisation-free ``step``."""

from __future__ import annotations

import concurrent.futures
import numbers
import os
import threading

import torch
from diffusers import LCMScheduler as DiffusersLCMScheduler
from diffusers.schedulers.scheduling_lcm import LCMSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from .ops import consistency_step
from .ops.consistency import predicted_original_sample

SIGMA_DATA = 0.5  # diffusers' LCMScheduler boundary-condition constant


class _PinnedStaging(threading.local):
    """Page-locked host buffers that carry host tensors to a CUDA device without a sync, kept per thread for the
    last few (shape, dtype) pairs and reused once the copy that last read them is done. ``Tensor.pin_memory()`` per
    draw page-locks fresh memory each time (``cudaHostAlloc``: 20 ms over the three noise draws of a 4-step call at
    SD1.5's 16x512x512 latents on an H100's host, run 10 in benchmarks/results/gpu_runs.md). A buffer whose copy is
    still queued is never waited for: another one is pinned beside it."""

    SHAPES_KEPT = 4

    def __init__(self):
        self.slots = {}  # (shape, dtype) -> [[pinned buffer, event recorded after its last copy or None], ...]

    def to_device(self, host: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``host`` (a CPU tensor) as a new tensor on CUDA ``device``, copied asynchronously on the device's current
        stream; ``host`` may be changed or freed as soon as this returns."""
        key = (tuple(host.shape), host.dtype)
        slots = self.slots.pop(key, [])
        self.slots[key] = slots  # the most recently used shapes last
        while len(self.slots) > self.SHAPES_KEPT:  # a dropped buffer still being read is freed once its copy is done
            del self.slots[next(iter(self.slots))]
        slot = next((slot for slot in slots if slot[1] is None or slot[1].query()), None)
        if slot is None:
            slot = [torch.empty(host.shape, dtype=host.dtype, pin_memory=True), None]
            slots.append(slot)
        slot[0].copy_(host)
        out = slot[0].to(device, non_blocking=True)
        slot[1] = torch.cuda.Event()
        slot[1].record(torch.cuda.current_stream(device))
        return out


_pinned_staging = _PinnedStaging()


def _on_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host draw on ``device``: through a reused page-locked buffer and an asynchronous copy for a CUDA device."""
    return _pinned_staging.to_device(host, device) if device.type == "cuda" else host.to(device)


def _cpu_generators(generator) -> list | None:
    """``generator`` (one or a list) as a list when every one is a CPU generator, else None."""
    generators = generator if isinstance(generator, list) else [generator]
    return generators if generators and all(g is not None and g.device.type == "cpu" for g in generators) else None


def draw_step_noise(shape, generator, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Standard normal noise ``shape`` on ``device``, the values :func:`diffusers.utils.torch_utils.randn_tensor`
    draws for the same arguments, without its host synchronisation: a CPU generator (or list of them) draws on the
    host as diffusers does, and the draw reaches a CUDA device through a reused page-locked buffer and an
    asynchronous copy (``randn_tensor`` copies from pageable memory, which waits for every queued kernel to
    finish)."""
    if _cpu_generators(generator) is None or device.type != "cuda":
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    return _on_device(randn_tensor(shape, generator=generator, device=torch.device("cpu"), dtype=dtype), device)


_draw_thread = None  # (process id, executor): a forked child makes its own (the parent's thread is not in it)


class _DrawAhead:
    """The next step's noise, drawn from CPU generator(s) on a background thread while the host queues the next
    UNet call (torch draws without holding the GIL). :meth:`take` hands it over when the next step asks for the same
    shape, dtype and generators and nothing else has drawn from them since; any other request, or :meth:`cancel`,
    puts the generators back where they were before the draw (unless something else has moved them since)."""

    def __init__(self, shape, generator, dtype: torch.dtype):
        global _draw_thread
        if _draw_thread is None or _draw_thread[0] != os.getpid():
            _draw_thread = os.getpid(), concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="animatelcm-noise")
        self.request = (tuple(shape), dtype)
        self.generators = _cpu_generators(generator)
        self.states = [g.get_state() for g in self.generators]
        self.future = _draw_thread[1].submit(self._draw, shape, generator, dtype)

    def _draw(self, shape, generator, dtype):
        host = randn_tensor(shape, generator=generator, device=torch.device("cpu"), dtype=dtype)
        return host, [g.get_state() for g in self.generators]

    def _untouched_since(self) -> bool:
        """The draw finished and left the generators as they are now."""
        if self.future.exception() is not None:
            return False
        _, states_after = self.future.result()
        return all(torch.equal(g.get_state(), state) for g, state in zip(self.generators, states_after))

    def take(self, shape, generator, dtype: torch.dtype) -> torch.Tensor | None:
        """The host draw if ``(shape, generator, dtype)`` is what was drawn ahead, else None (generators put back)."""
        generators = _cpu_generators(generator)
        asked_for = ((tuple(shape), dtype) == self.request and generators is not None
                     and len(generators) == len(self.generators)
                     and all(a is b for a, b in zip(generators, self.generators)))
        if asked_for and self._untouched_since():
            return self.future.result()[0]
        self.cancel()
        return None

    def cancel(self) -> None:
        """Wait for the draw and put the generators back in the state it started from, unless they moved since."""
        if self._untouched_since():
            for g, state in zip(self.generators, self.states):
                g.set_state(state)


def boundary_condition_scalings(timesteps: torch.Tensor, timestep_scaling: float = 10.0):
    """(c_skip, c_out) of the consistency parameterisation f = c_skip * x_t + c_out * x0 for integer
    ``timesteps [*]``, in float32 exactly as diffusers computes them: c_skip -> 1 and c_out -> 0 as t -> 0."""
    scaled = timesteps * timestep_scaling
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
    return c_skip, c_out


class LCMScheduler(DiffusersLCMScheduler):
    """Drop-in for :class:`diffusers.LCMScheduler` (same config, timesteps, noise draws and results).

    ``set_timesteps`` precomputes one row of coefficients per step (c_skip, c_out, sqrt(ab_t), sqrt(1-ab_t),
    sqrt(ab_prev), sqrt(1-ab_prev)) in float32 on the target device, with the same float32 arithmetic diffusers uses;
    ``step`` then runs :func:`animatelcm.ops.consistency_step` (one fused pass) reading its row from device memory.
    ``step`` does not synchronise with the device when the timestep is a Python number, a CPU tensor, or an element
    of ``self.timesteps`` (what pipelines pass); for any other device tensor the coefficients are gathered on the
    device, still without a sync, except that the very first call without ``set_begin_index`` must look the
    timestep up once, exactly as diffusers does. A CPU generator's noise reaches the device without a sync too
    (:func:`draw_step_noise`), so the host can queue the next UNet call while the GPU still runs this one.

    With ``draw_noise_ahead = True`` (what :func:`animatelcm.patch_pipeline` sets), each step that draws noise from
    CPU generator(s) also starts drawing the next step's on a background thread, off the host's critical path
    (about 7 ms a draw of SD1.5's 16-frame latents in float16 on an H100 machine's host); the values are the same as
    drawn in turn. A next step that asks for another shape, dtype or generator gets a fresh draw, with the
    generators put back first, as does ``set_timesteps`` (a loop left early). Nothing else may draw from those
    generators between two steps: what it drew would come from the state after the draw ahead.
    """

    draw_noise_ahead = False
    _draw_ahead = None

    def set_timesteps(self, num_inference_steps=None, device=None, original_inference_steps=None, timesteps=None,
                      strength: float = 1.0) -> None:
        """As :meth:`diffusers.LCMScheduler.set_timesteps`, plus the per-step coefficient table on ``device``."""
        self._cancel_draw_ahead()
        super().set_timesteps(num_inference_steps=num_inference_steps, device=None,
                              original_inference_steps=original_inference_steps, timesteps=timesteps,
                              strength=strength)
        host_timesteps = self.timesteps  # int64 [n] on the CPU
        self._host_timesteps = host_timesteps.tolist()
        self._coefficient_tables = {}
        table = self._coefficient_rows(host_timesteps, self._previous_timesteps(host_timesteps))
        self._coefficient_tables[torch.device("cpu")] = table
        if device is not None:
            self.timesteps = host_timesteps.to(device)
            self._coefficient_table_on(torch.device(device))

    @staticmethod
    def _previous_timesteps(timesteps):
        # diffusers: the previous timestep is the next entry of the schedule; the last step reuses its own timestep.
        return torch.cat([timesteps[1:], timesteps[-1:]])

    def _coefficient_rows(self, timesteps, previous):
        """[n, 6] float32 coefficients for timesteps ``[n]`` (int64, any device) and their previous timesteps
        ``[n]``, computed with the same float32 operations as diffusers' ``step``."""
        alphas_cumprod = self.alphas_cumprod.to(timesteps.device)
        alpha = alphas_cumprod[timesteps]
        alpha_prev = torch.where(previous >= 0, alphas_cumprod[previous.clamp(min=0)],
                                 self.final_alpha_cumprod.to(timesteps.device))
        c_skip, c_out = boundary_condition_scalings(timesteps, self.config.timestep_scaling)
        rows = [c_skip, c_out, alpha.sqrt(), (1 - alpha).sqrt(), alpha_prev.sqrt(), (1 - alpha_prev).sqrt()]
        return torch.stack([r.to(torch.float32) for r in rows], dim=-1)

    def _coefficient_table_on(self, device: torch.device) -> torch.Tensor:
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        table = self._coefficient_tables.get(device)
        if table is None:
            table = self._coefficient_tables[torch.device("cpu")].to(device)
            self._coefficient_tables[device] = table
        return table

    def _schedule_position(self, timestep) -> int | None:
        """Index of ``timestep`` in the schedule, found without a device sync, or None if that needs one."""
        if isinstance(timestep, torch.Tensor) and timestep.dim() == 0 and timestep.device.type != "cpu":
            schedule = self.timesteps
            same_storage = (schedule.device == timestep.device and timestep.dtype == schedule.dtype
                            and timestep.untyped_storage().data_ptr() == schedule.untyped_storage().data_ptr())
            if same_storage:
                return timestep.storage_offset() - schedule.storage_offset()
            return None
        value = int(timestep.item() if isinstance(timestep, torch.Tensor) else timestep)
        matches = [i for i, t in enumerate(self._host_timesteps) if t == value]
        if not matches:
            return None
        return matches[1] if len(matches) > 1 else matches[0]

    def _init_step_index(self, timestep) -> None:
        if self.begin_index is not None:
            self._step_index = self._begin_index
            return
        position = self._schedule_position(timestep)
        if position is None:
            super()._init_step_index(timestep)  # one lookup with a sync, as in diffusers
        else:
            self._step_index = position

    def _coefficients(self, timestep, device: torch.device) -> torch.Tensor:
        """[6] float32 on ``device`` for the current step: a row of the table when ``timestep`` is the scheduled
        one, otherwise computed from ``timestep`` on the device (diffusers' semantics: alphas of the given
        timestep, previous alphas of the next scheduled one)."""
        index = self._step_index
        table = self._coefficient_table_on(device)
        position = self._schedule_position(timestep)
        if position == index and index < len(self._host_timesteps):
            return table[index]
        schedule = self.timesteps.to(device)
        current = torch.as_tensor(timestep, device=device).to(torch.int64).reshape(1)
        previous = schedule[index + 1].reshape(1) if index + 1 < len(schedule) else current
        return self._coefficient_rows(current, previous)[0]

    def _cancel_draw_ahead(self) -> None:
        ahead, self._draw_ahead = self._draw_ahead, None
        if ahead is not None:
            ahead.cancel()

    def _step_noise(self, shape, generator, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """This step's noise on ``device`` (:func:`draw_step_noise`'s values, taken from the draw ahead where one
        was started for it); with ``draw_noise_ahead``, the next step's draw starts when that step will draw too."""
        ahead, self._draw_ahead = self._draw_ahead, None
        host = ahead.take(shape, generator, dtype) if ahead is not None else None
        noise = draw_step_noise(shape, generator, device, dtype) if host is None else _on_device(host, device)
        following = self._step_index + 1
        if (self.draw_noise_ahead and _cpu_generators(generator) is not None and following < len(self.timesteps)
                and following != self.num_inference_steps - 1):
            self._draw_ahead = _DrawAhead(shape, generator, dtype)
        return noise

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: torch.Generator | None = None, return_dict: bool = True):
        """One consistency step, as :meth:`diffusers.LCMScheduler.step` but fused and sync-free.

        Args:
            model_output: ``[B, C, F, H, W]`` (any shape) network output at ``timestep``.
            timestep: the current timestep (int, or a 0-dim tensor, typically an element of ``self.timesteps``).
            sample: the current sample x_t, same shape as ``model_output``.
            generator: random generator for the noise injected before the next step (not used at the last step).
        Returns:
            :class:`LCMSchedulerOutput` ``(prev_sample, denoised)`` or the tuple when ``return_dict=False``.
        """
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating "
                             "the scheduler")
        if not isinstance(timestep, (numbers.Integral, torch.Tensor)):
            raise TypeError(f"LCMScheduler.step: timestep must be an int or a 0-dim tensor, got {type(timestep).__name__}")
        if self.step_index is None:
            self._init_step_index(timestep)
        dtype = torch.promote_types(model_output.dtype, sample.dtype)
        model_output, sample = model_output.to(dtype), sample.to(dtype)
        coefficients = self._coefficients(timestep, sample.device)
        prediction_type = self.config.prediction_type
        if prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise ValueError(f"prediction_type given as {prediction_type} must be one of `epsilon`, `sample` or"
                             " `v_prediction` for `LCMScheduler`.")
        if self.config.thresholding:
            # Dynamic thresholding needs a per-sample quantile of x0 first; the fused op then mixes the result.
            sqrt_alpha, sqrt_one_minus = coefficients[2:4].unbind()
            x0 = predicted_original_sample(model_output, sample, sqrt_alpha, sqrt_one_minus, prediction_type)
            model_output, prediction_type, clip_range = self._threshold_sample(x0), "sample", None
        else:
            clip_range = self.config.clip_sample_range if self.config.clip_sample else None

        noise = None
        if self.step_index != self.num_inference_steps - 1:
            noise = self._step_noise(model_output.shape, generator, model_output.device, dtype)
        prev_sample, denoised = consistency_step(model_output, sample, coefficients, noise=noise,
                                                 prediction_type=prediction_type, clip_range=clip_range)
        self._step_index += 1
        if not return_dict:
            return prev_sample, denoised
        return LCMSchedulerOutput(prev_sample=prev_sample, denoised=denoised)


IMAGE_TO_VIDEO_ORIGINAL_STEPS = 200  # AnimateLCM's image-to-video configs (configs/inference-i2v.yaml)
IMAGE_TO_VIDEO_BETA_END = 0.014  # AnimateLCM-I2V's demo default (app-i2v.py): "a tricky way for selecting noisy steps"


def animatelcm_scheduler(**overrides) -> LCMScheduler:
    """The scheduler AnimateLCM's text-to-video models were distilled with: linear betas 0.00085..0.012 over 1000
    steps, ``original_inference_steps=100`` (:data:`IMAGE_TO_VIDEO_ORIGINAL_STEPS` for image-to-video).
    ``overrides`` replace config entries."""
    config = dict(beta_schedule="linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
                  original_inference_steps=100, clip_sample=False, set_alpha_to_one=True, steps_offset=0,
                  timestep_spacing="leading", prediction_type="epsilon")
    config.update(overrides)
    return LCMScheduler(**config)


def lcm_scheduler_like(scheduler, **overrides) -> LCMScheduler:
    """An :class:`LCMScheduler` for sampling a model whose scheduler is ``scheduler``, with ``overrides`` replacing
    config entries (``original_inference_steps``, ``beta_end``, ...).

    An LCM scheduler (this package's or diffusers') keeps its whole config: ``scheduler`` itself when there is
    nothing to override. Any other (DDIM, Euler, ...) gives AnimateLCM's scheduler (:func:`animatelcm_scheduler`) on
    its noise schedule and prediction type: ``beta_schedule``, ``beta_start``, ``beta_end``,
    ``num_train_timesteps``, ``trained_betas``, ``rescale_betas_zero_snr``, ``prediction_type``, and
    ``original_inference_steps`` when it has one."""
    if isinstance(scheduler, LCMScheduler) and not overrides:
        return scheduler
    config = scheduler.config
    if isinstance(scheduler, DiffusersLCMScheduler):
        return LCMScheduler.from_config(config, **overrides)
    keep = {k: config[k] for k in ("beta_schedule", "beta_start", "beta_end", "num_train_timesteps", "trained_betas",
                                   "rescale_betas_zero_snr", "prediction_type", "original_inference_steps")
            if k in config}
    keep.update(overrides)
    return animatelcm_scheduler(**keep)
