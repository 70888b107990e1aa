// CUDA consistency step: grid-stride elementwise kernel with 16-byte loads and stores, coefficients read from device
// memory (no host sync).
#include <stdexcept>

#include "../consistency_step.h"
#include "../cpu/cpu_kernels.h"
#include "../scalar_types.h"
#include "cuda_kernels.h"
#include "device_scalars.cuh"

namespace animatelcm {
namespace {

// V consecutive elements per access (16-byte packs for V = kVector<T>; V = 1 for unaligned buffers and the tail).
template <typename T, int V>
__global__ void consistency_step_kernel(T* __restrict__ prev, T* __restrict__ denoised, const T* __restrict__ model_output,
                                        const T* __restrict__ sample, const T* __restrict__ noise,
                                        const StepCoefficients* __restrict__ coefficients, int64_t vectors,
                                        int prediction_type, bool clip, float clip_range) {
  using P = Pack<T, V>;
  const StepCoefficients c = *coefficients;
  const bool has_noise = noise != nullptr;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < vectors;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const P m = reinterpret_cast<const P*>(model_output)[i];
    const P x = reinterpret_cast<const P*>(sample)[i];
    P z{};
    if (has_noise) z = reinterpret_cast<const P*>(noise)[i];
    P p, d;
#pragma unroll
    for (int l = 0; l < V; ++l) {
      float pl, dl;
      consistency_update(to_float(m.v[l]), to_float(x.v[l]), has_noise ? to_float(z.v[l]) : 0.f, has_noise, c,
                         prediction_type, clip, clip_range, &pl, &dl);
      p.v[l] = from_float<T>(pl);
      d.v[l] = from_float<T>(dl);
    }
    reinterpret_cast<P*>(prev)[i] = p;
    reinterpret_cast<P*>(denoised)[i] = d;
  }
}

// Elements [first, first + count) with V elements per access.
template <typename T, int V>
void launch_range(const ConsistencyStepArgs& a, int64_t first, int64_t count, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t vectors = count / V;
  consistency_step_kernel<T, V><<<grid_for(vectors, kThreads), kThreads, 0, stream>>>(
      static_cast<T*>(a.prev_sample) + first, static_cast<T*>(a.denoised) + first,
      static_cast<const T*>(a.model_output) + first, static_cast<const T*>(a.sample) + first,
      a.noise != nullptr ? static_cast<const T*>(a.noise) + first : nullptr,
      static_cast<const StepCoefficients*>(a.coefficients), vectors, a.prediction_type, a.clip, a.clip_range);
  check_launch("consistency_step");
}

// 16-byte packs over the largest multiple of the pack when every buffer is 16-byte aligned, then the rest one
// element at a time (one launch when the element count is a multiple of the pack, as latents are).
template <typename T>
void launch(const ConsistencyStepArgs& a, cudaStream_t stream) {
  constexpr int V = kVector<T>;
  const bool vectorised = aligned16(a.prev_sample) && aligned16(a.denoised) && aligned16(a.model_output) &&
                          aligned16(a.sample) && (a.noise == nullptr || aligned16(a.noise));
  const int64_t packed = vectorised ? a.numel / V * V : 0;
  if (packed > 0) launch_range<T, V>(a, 0, packed, stream);
  if (packed < a.numel) launch_range<T, 1>(a, packed, a.numel - packed, stream);
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
