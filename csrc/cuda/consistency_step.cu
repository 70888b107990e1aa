// CUDA consistency step: grid-stride elementwise kernel, coefficients read from device memory (no host sync).
#include <stdexcept>

#include "../consistency_step.h"
#include "../cpu/cpu_kernels.h"
#include "../scalar_types.h"
#include "cuda_kernels.h"
#include "device_scalars.cuh"

namespace animatelcm {
namespace {

template <typename T>
__global__ void consistency_step_kernel(T* __restrict__ prev, T* __restrict__ denoised, const T* __restrict__ model_output,
                                        const T* __restrict__ sample, const T* __restrict__ noise,
                                        const StepCoefficients* __restrict__ coefficients, int64_t numel,
                                        int prediction_type, bool clip, float clip_range) {
  const StepCoefficients c = *coefficients;
  const bool has_noise = noise != nullptr;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float p, d;
    consistency_update(to_float(model_output[i]), to_float(sample[i]), has_noise ? to_float(noise[i]) : 0.f, has_noise,
                       c, prediction_type, clip, clip_range, &p, &d);
    prev[i] = from_float<T>(p);
    denoised[i] = from_float<T>(d);
  }
}

template <typename T>
void launch(const ConsistencyStepArgs& a, cudaStream_t stream) {
  constexpr int kThreads = 256;
  consistency_step_kernel<T><<<grid_for(a.numel, kThreads), kThreads, 0, stream>>>(
      static_cast<T*>(a.prev_sample), static_cast<T*>(a.denoised), static_cast<const T*>(a.model_output),
      static_cast<const T*>(a.sample), static_cast<const T*>(a.noise),
      static_cast<const StepCoefficients*>(a.coefficients), a.numel, a.prediction_type, a.clip, a.clip_range);
  check_launch("consistency_step");
}

}  // namespace

void consistency_step_cuda(const ConsistencyStepArgs& args, std::uintptr_t stream) {
  auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (args.scalar_type) {
    case kFloat32: return launch<float>(args, s);
    case kFloat16: return launch<__half>(args, s);
    case kBFloat16: return launch<__nv_bfloat16>(args, s);
    default: throw std::invalid_argument("consistency_step: unsupported scalar type code");
  }
}

}  // namespace animatelcm
