// CUDA GEGLU: out[m, i] = x[m, i] * gelu(x[m, inner + i]), grid-stride, the same gelu() as the CPU kernel.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "../fast_math.h"
#include "../scalar_types.h"
#include "cuda_kernels.h"

namespace animatelcm {
namespace {

__device__ __forceinline__ float as_float(float v) { return v; }
__device__ __forceinline__ float as_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float as_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
__global__ void geglu_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t rows, int64_t inner) {
  const int64_t total = rows * inner;
  for (int64_t o = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; o < total;
       o += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = o / inner, i = o % inner;
    const T* row = x + m * 2 * inner;
    out[o] = from_float<T>(as_float(row[i]) * gelu(as_float(row[inner + i])));
  }
}

template <typename T>
void launch(const GegluArgs& a, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t wanted = (a.rows * a.inner + kThreads - 1) / kThreads;
  const int blocks = static_cast<int>(wanted < 65535LL * 16 ? (wanted > 0 ? wanted : 1) : 65535LL * 16);
  geglu_kernel<T><<<blocks, kThreads, 0, stream>>>(static_cast<const T*>(a.x), static_cast<T*>(a.out), a.rows, a.inner);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("geglu CUDA launch: ") + cudaGetErrorString(err));
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
