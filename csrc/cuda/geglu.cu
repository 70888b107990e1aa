// CUDA GEGLU: out[m, i] = h * gelu(g) with h, g the two halves of row m (+ the optional fp32 bias), the same gelu()
// as the CPU kernel. Row-wise launch (row_grid) with 16-byte loads and stores when the half width and the buffers
// allow, one element at a time otherwise.
#include <stdexcept>

#include "../fast_math.h"
#include "../scalar_types.h"
#include "cuda_kernels.h"
#include "device_scalars.cuh"

namespace animatelcm {
namespace {

template <typename T, int V>
__global__ void geglu_kernel(const T* __restrict__ x, const float* __restrict__ bias, T* __restrict__ out,
                             int64_t rows, int64_t inner, int threads_per_row) {
  const RowSlot slot = row_slot(threads_per_row);
  if (slot.row >= rows) return;
  const T* hidden_row = x + slot.row * 2 * inner;
  const T* gate_row = hidden_row + inner;
  T* out_row = out + slot.row * inner;
  for (int64_t v = slot.first; v < inner / V; v += slot.stride) {
    const Pack<T, V> hidden = *reinterpret_cast<const Pack<T, V>*>(hidden_row + v * V);
    const Pack<T, V> gate = *reinterpret_cast<const Pack<T, V>*>(gate_row + v * V);
    Pack<T, V> result;
#pragma unroll
    for (int l = 0; l < V; ++l) {
      const int64_t i = v * V + l;
      const float h = to_float(hidden.v[l]) + (bias != nullptr ? bias[i] : 0.0f);
      const float g = to_float(gate.v[l]) + (bias != nullptr ? bias[inner + i] : 0.0f);
      result.v[l] = from_float<T>(h * gelu(g));
    }
    *reinterpret_cast<Pack<T, V>*>(out_row + v * V) = result;
  }
}

template <typename T>
void launch(const GegluArgs& a, cudaStream_t stream) {
  constexpr int V = kVector<T>;
  const bool vectorised = a.inner % V == 0 && aligned16(a.x) && aligned16(a.out);
  const RowGrid rg = row_grid(a.rows, vectorised ? a.inner / V : a.inner);
  if (vectorised) {
    geglu_kernel<T, V><<<rg.grid, kRowThreads, 0, stream>>>(static_cast<const T*>(a.x), a.bias, static_cast<T*>(a.out),
                                                            a.rows, a.inner, rg.threads_per_row);
  } else {
    geglu_kernel<T, 1><<<rg.grid, kRowThreads, 0, stream>>>(static_cast<const T*>(a.x), a.bias, static_cast<T*>(a.out),
                                                            a.rows, a.inner, rg.threads_per_row);
  }
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
