// CUDA GEGLU: out[m, i] = x[m, i] * gelu(x[m, inner + i]), grid-stride, the same gelu() as the CPU kernel.
#include <stdexcept>

#include "../fast_math.h"
#include "../scalar_types.h"
#include "cuda_kernels.h"
#include "device_scalars.cuh"

namespace animatelcm {
namespace {

template <typename T>
__global__ void geglu_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t rows, int64_t inner) {
  const int64_t total = rows * inner;
  for (int64_t o = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; o < total;
       o += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = o / inner, i = o % inner;
    const T* row = x + m * 2 * inner;
    out[o] = from_float<T>(to_float(row[i]) * gelu(to_float(row[inner + i])));
  }
}

template <typename T>
void launch(const GegluArgs& a, cudaStream_t stream) {
  constexpr int kThreads = 256;
  geglu_kernel<T><<<grid_for(a.rows * a.inner, kThreads), kThreads, 0, stream>>>(
      static_cast<const T*>(a.x), static_cast<T*>(a.out), a.rows, a.inner);
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
