// CUDA consistency step: grid-stride elementwise kernel, coefficients read from device memory (no host sync).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "../consistency_step.h"
#include "../cpu/cpu_kernels.h"
#include "../scalar_types.h"
#include "cuda_kernels.h"

namespace animatelcm {
namespace {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

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
  const int64_t wanted = (a.numel + kThreads - 1) / kThreads;
  const int blocks = static_cast<int>(wanted < 65535 * 8 ? (wanted > 0 ? wanted : 1) : 65535 * 8);
  consistency_step_kernel<T><<<blocks, kThreads, 0, stream>>>(
      static_cast<T*>(a.prev_sample), static_cast<T*>(a.denoised), static_cast<const T*>(a.model_output),
      static_cast<const T*>(a.sample), static_cast<const T*>(a.noise),
      static_cast<const StepCoefficients*>(a.coefficients), a.numel, a.prediction_type, a.clip, a.clip_range);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("consistency_step CUDA launch: ") + cudaGetErrorString(err));
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
