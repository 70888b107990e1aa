// Entry points of the CPU kernels, called by the pybind11 module with raw pointers validated in Python.
#pragma once
#include <cstdint>

namespace animatelcm {

// Pointers to contiguous storage of `numel` elements of `scalar_type` (see scalar_types.h); `noise` may be null
// (final step); `coefficients` points to one StepCoefficients row (fp32) on the tensors' device.
struct ConsistencyStepArgs {
  void* prev_sample;
  void* denoised;
  const void* model_output;
  const void* sample;
  const void* noise;
  const void* coefficients;
  int64_t numel;
  int scalar_type;
  int prediction_type;
  bool clip;
  float clip_range;
};

void consistency_step_cpu(const ConsistencyStepArgs& args);

}  // namespace animatelcm
