// CUDA GEGLU: out[m, i] = h * gelu(g) with h, g the two halves of row m (+ the optional fp32 bias), grid-stride,
// the same gelu() as the CPU kernel.
#include <stdexcept>

#include "../fast_math.h"
#include "../scalar_types.h"
#include "cuda_kernels.h"
#include "device_scalars.cuh"

namespace animatelcm {
namespace {

template <typename T>
__global__ void geglu_kernel(const T* __restrict__ x, const float* __restrict__ bias, T* __restrict__ out,
                             int64_t rows, int64_t inner) {
  const int64_t total = rows * inner;
  for (int64_t o = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; o < total;
       o += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = o / inner, i = o % inner;
    const T* row = x + m * 2 * inner;
    const float hidden = to_float(row[i]) + (bias != nullptr ? bias[i] : 0.0f);
    const float gate = to_float(row[inner + i]) + (bias != nullptr ? bias[inner + i] : 0.0f);
    out[o] = from_float<T>(hidden * gelu(gate));
  }
}

template <typename T>
void launch(const GegluArgs& a, cudaStream_t stream) {
  constexpr int kThreads = 256;
  geglu_kernel<T><<<grid_for(a.rows * a.inner, kThreads), kThreads, 0, stream>>>(
      static_cast<const T*>(a.x), a.bias, static_cast<T*>(a.out), a.rows, a.inner);
  check_launch("geglu");
}

}  // namespace

void geglu_cuda(const GegluArgs& args, std::uintptr_t stream) {
  auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (args.scalar_type) {
    case kFloat32: return launch<float>(args, s);
    case kFloat16: return launch<__half>(args, s);
    case kBFloat16: return launch<__nv_bfloat16>(args, s);
    default: throw std::invalid_argument("geglu: unsupported scalar type code");
  }
}

}  // namespace animatelcm
