"""The consistency (LCM) sampling step as one fused op.

Given the model output at timestep t, the current sample x_t, a row of precomputed coefficients and (except at the
final step) the noise z, it computes in one pass over memory

    x0       = predict_x0(model_output, x_t)                       (epsilon / sample / v_prediction)
    x0       = clamp(x0, -clip_range, clip_range)                  (only when clip_range is given)
    denoised = c_out * x0 + c_skip * x_t
    prev     = sqrt(ab_prev) * denoised + sqrt(1 - ab_prev) * z    (prev = denoised when z is None)

NaN policy: NaN and inf propagate elementwise exactly as in the eager formula; nothing is checked or replaced.
"""

from __future__ import annotations

import torch

from .dispatch import FLOAT_DTYPES, Implementation, eager_fast_path, explain, select
from .native import (
    SCALAR_TYPE_CODES,
    cuda_kernels_unavailable_reason,
    cuda_stream_handle,
    native_module,
    native_unavailable_reason,
    pointer,
    reject_unless_native,
)

PREDICTION_TYPES = {"epsilon": 0, "sample": 1, "v_prediction": 2}
# Order of the coefficient row, shared with csrc/consistency_step.h (struct StepCoefficients).
COEFFICIENT_NAMES = ("c_skip", "c_out", "sqrt_alpha", "sqrt_one_minus_alpha", "sqrt_alpha_prev", "sqrt_one_minus_alpha_prev")


def check_step_inputs(model_output, sample, coefficients, noise, prediction_type) -> None:
    """Raise ValueError/TypeError naming the problem when the step's inputs do not fit together."""
    for name, tensor in (("model_output", model_output), ("sample", sample), ("coefficients", coefficients)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"consistency_step: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    if model_output.shape != sample.shape:
        raise ValueError(f"consistency_step: model_output shape {tuple(model_output.shape)} does not match "
                         f"sample shape {tuple(sample.shape)}")
    if sample.dtype not in FLOAT_DTYPES or model_output.dtype != sample.dtype:
        raise TypeError(f"consistency_step: model_output and sample must share one floating dtype "
                        f"(float32/float16/bfloat16/float64); got {model_output.dtype} and {sample.dtype}")
    if model_output.device != sample.device or coefficients.device != sample.device:
        raise ValueError(f"consistency_step: tensors are on different devices (model_output {model_output.device}, "
                         f"sample {sample.device}, coefficients {coefficients.device}); move them to one device")
    if coefficients.shape != (len(COEFFICIENT_NAMES),) or coefficients.dtype != torch.float32:
        raise ValueError(f"consistency_step: coefficients must be a float32 tensor of shape ({len(COEFFICIENT_NAMES)},) "
                         f"ordered {COEFFICIENT_NAMES}; got {coefficients.dtype} {tuple(coefficients.shape)}")
    if noise is not None:
        if not isinstance(noise, torch.Tensor) or noise.shape != sample.shape or noise.dtype != sample.dtype \
                or noise.device != sample.device:
            raise ValueError("consistency_step: noise must be a tensor with the sample's shape, dtype and device "
                             f"({tuple(sample.shape)}, {sample.dtype}, {sample.device})")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"consistency_step: prediction_type {prediction_type!r} is not one of {sorted(PREDICTION_TYPES)}")


def predicted_original_sample(model_output, sample, sqrt_alpha, sqrt_one_minus_alpha, prediction_type="epsilon"):
    """x0 from the network output (broadcasting tensors or numbers for the square roots of alpha_bar_t and
    1 - alpha_bar_t); the operation order is diffusers' LCMScheduler.step, so float32 results agree bitwise."""
    if prediction_type == "epsilon":
        return (sample - sqrt_one_minus_alpha * model_output) / sqrt_alpha
    if prediction_type == "sample":
        return model_output
    if prediction_type == "v_prediction":
        return sqrt_alpha * sample - sqrt_one_minus_alpha * model_output
    raise ValueError(f"prediction_type {prediction_type!r} is not one of {sorted(PREDICTION_TYPES)}")


def consistency_step_reference(model_output, sample, coefficients, noise=None, prediction_type="epsilon",
                               clip_range=None):
    """Eager PyTorch consistency step, the source of truth for the kernels.

    Args:
        model_output: ``[*]`` the network output at timestep t (epsilon, x0 or v, per ``prediction_type``).
        sample: ``[*]`` the current sample x_t, same shape and dtype.
        coefficients: ``[6]`` float32, ordered as ``COEFFICIENT_NAMES``, on the sample's device.
        noise: ``[*]`` z for the next sample, or None at the final step.
        prediction_type: ``"epsilon"``, ``"sample"`` or ``"v_prediction"``.
        clip_range: clamp x0 to ``[-clip_range, clip_range]`` when given.

    Returns:
        ``(prev_sample, denoised)``, both ``[*]`` in the sample's dtype; arithmetic in float32 (float64 inputs stay
        float64).
    """
    compute = torch.float64 if sample.dtype == torch.float64 else torch.float32
    c_skip, c_out, sqrt_alpha, sqrt_one_minus, sqrt_alpha_prev, sqrt_one_minus_prev = coefficients.to(compute).unbind()
    x = sample.to(compute)
    x0 = predicted_original_sample(model_output.to(compute), x, sqrt_alpha, sqrt_one_minus, prediction_type)
    if clip_range is not None:
        x0 = x0.clamp(-clip_range, clip_range)
    denoised = c_out * x0 + c_skip * x
    prev = denoised if noise is None else sqrt_alpha_prev * denoised + sqrt_one_minus_prev * noise.to(compute)
    return prev.to(sample.dtype).contiguous(), denoised.to(sample.dtype).contiguous()


def _eager(model_output, sample, coefficients, noise, prediction_type, clip_range):
    prev, denoised = consistency_step_reference(model_output, sample, coefficients, noise, prediction_type, clip_range)
    return (prev.clone() if prev is denoised else prev), denoised  # custom ops may not return aliased outputs


def _native_call(kernel_name, extra_args, model_output, sample, coefficients, noise, prediction_type, clip_range):
    kernel = getattr(native_module(), kernel_name)
    model_output, sample = model_output.contiguous(), sample.contiguous()
    noise = None if noise is None else noise.contiguous()
    coefficients = coefficients.contiguous()
    prev = torch.empty_like(sample)
    denoised = torch.empty_like(sample)
    kernel(pointer(prev), pointer(denoised), pointer(model_output), pointer(sample), pointer(noise),
           pointer(coefficients), sample.numel(), SCALAR_TYPE_CODES[sample.dtype], PREDICTION_TYPES[prediction_type],
           clip_range is not None, float(clip_range or 0.0), *extra_args(sample))
    return prev, denoised


def _cpp(*args):
    return _native_call("consistency_step_cpu", lambda sample: (), *args)


def _cuda(*args):
    return _native_call("consistency_step_cuda", lambda sample: (cuda_stream_handle(sample.device),), *args)


IMPLEMENTATIONS = [
    Implementation("cuda", _cuda, cuda_kernels_unavailable_reason, reject_unless_native("cuda")),
    Implementation("cpp", _cpp, native_unavailable_reason, reject_unless_native("cpu")),
    Implementation("eager", _eager, lambda: None, lambda *a, **k: None),
]


@torch.library.custom_op("animatelcm::consistency_step", mutates_args=())
def _consistency_step_op(model_output: torch.Tensor, sample: torch.Tensor, coefficients: torch.Tensor,
                         noise: torch.Tensor | None, prediction_type: str, clip_range: float | None,
                         backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    args = (model_output, sample, coefficients, noise, prediction_type, clip_range)
    return select("consistency_step", IMPLEMENTATIONS, *args, backend=backend).run(*args)


@_consistency_step_op.register_fake
def _(model_output, sample, coefficients, noise, prediction_type, clip_range, backend):
    return (torch.empty_like(sample, memory_format=torch.contiguous_format),
            torch.empty_like(sample, memory_format=torch.contiguous_format))


def consistency_step(model_output, sample, coefficients, noise=None, prediction_type="epsilon", clip_range=None,
                     backend="auto"):
    """Fused consistency step; same contract as :func:`consistency_step_reference` (shapes ``[*]``, coefficients
    ``[6]`` float32, outputs contiguous). ``backend`` picks one (``"auto"``: the dispatcher's choice)."""
    check_step_inputs(model_output, sample, coefficients, noise, prediction_type)
    clip_range = None if clip_range is None else float(clip_range)
    if eager_fast_path(model_output, sample, coefficients, noise):
        args = (model_output, sample, coefficients, noise, prediction_type, clip_range)
        return select("consistency_step", IMPLEMENTATIONS, *args, backend=backend).run(*args)
    return _consistency_step_op(model_output, sample, coefficients, noise, prediction_type, clip_range, backend)


def explain_consistency_step(model_output, sample, coefficients, noise=None, prediction_type="epsilon",
                             clip_range=None):
    """[(backend, reason or None)] for these inputs: which backends would run them and why the others would not."""
    return explain(IMPLEMENTATIONS, model_output, sample, coefficients, noise, prediction_type, clip_range)
