// The arithmetic of one LCM / consistency sampling step, shared by the CPU loop and the CUDA kernel so the math
// CI runs on the CPU is the math the GPU runs.
#pragma once

#if defined(__CUDACC__)
#define ALCM_HD __host__ __device__ __forceinline__
#else
#define ALCM_HD inline
#endif

namespace animatelcm {
// Internal linkage: every per-ISA build of the CPU kernels keeps its own copy (no cross-ISA ODR merging).
namespace {

// How the model output is read (diffusers' `prediction_type`).
enum PredictionType : int { kEpsilon = 0, kSample = 1, kVPrediction = 2 };

// Per-step coefficients, precomputed in fp32 on the tensors' device by the scheduler (one row of its table).
struct StepCoefficients {
  float c_skip;           // sd^2 / ((s t)^2 + sd^2)
  float c_out;            // (s t) / sqrt((s t)^2 + sd^2)
  float sqrt_alpha;       // sqrt(alpha_bar_t)
  float sqrt_one_minus;   // sqrt(1 - alpha_bar_t)
  float sqrt_alpha_prev;  // sqrt(alpha_bar_prev)
  float sqrt_one_minus_prev;
};
constexpr int kNumStepCoefficients = 6;

// x0 from the model output; the operation order follows diffusers' LCMScheduler.step so fp32 results agree to
// rounding.
ALCM_HD float predict_original(float model_output, float sample, const StepCoefficients& c, int prediction_type) {
  if (prediction_type == kSample) return model_output;
  if (prediction_type == kVPrediction) return c.sqrt_alpha * sample - c.sqrt_one_minus * model_output;
  return (sample - c.sqrt_one_minus * model_output) / c.sqrt_alpha;
}

// One element: denoised = c_out * clip(x0) + c_skip * x; prev = sqrt(ab_prev) * denoised + sqrt(1 - ab_prev) * z.
ALCM_HD void consistency_update(float model_output, float sample, float noise, bool has_noise,
                                const StepCoefficients& c, int prediction_type, bool clip, float clip_range,
                                float* prev_sample, float* denoised) {
  float x0 = predict_original(model_output, sample, c, prediction_type);
  if (clip) x0 = x0 < -clip_range ? -clip_range : (x0 > clip_range ? clip_range : x0);
  const float d = c.c_out * x0 + c.c_skip * sample;
  *denoised = d;
  *prev_sample = has_noise ? c.sqrt_alpha_prev * d + c.sqrt_one_minus_prev * noise : d;
}

}  // namespace
}  // namespace animatelcm
