// Shared by the CUDA kernels: float <-> storage conversions for fp32/fp16/bf16, 16-byte vector packs, grid sizing
// (flat grid-stride and row-wise), launch checks.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace animatelcm {
namespace {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Blocks for a grid-stride loop over `total` elements (capped; the loop covers the rest).
inline int grid_for(int64_t total, int threads) {
  const int64_t wanted = (total + threads - 1) / threads;
  return static_cast<int>(wanted < 65535LL * 16 ? (wanted > 0 ? wanted : 1) : 65535LL * 16);
}

// V consecutive elements moved as one access (16 bytes for V = kVector<T>), and the test for that width.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};
template <typename T>
constexpr int kVector = 16 / static_cast<int>(sizeof(T));
inline bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

// Work made of `rows` rows of `vectors` independent vectors each (a GroupNorm channel over its positions, a GEGLU
// row): a block of kRowThreads threads covers whole rows with threads_per_row threads each (the smallest power of
// two >= vectors, at most kRowThreads), so short rows do not leave most threads idle; grid.y splits long rows.
constexpr int kRowThreads = 256;
struct RowGrid {
  int threads_per_row;
  dim3 grid;
};
inline RowGrid row_grid(int64_t rows, int64_t vectors) {
  int per_row = 1;
  while (per_row < vectors && per_row < kRowThreads) per_row *= 2;
  const int64_t rows_per_block = kRowThreads / per_row;
  const int64_t gx = (rows + rows_per_block - 1) / rows_per_block;
  const int64_t per_block_y = static_cast<int64_t>(per_row) * 4;  // about four vectors per thread
  int64_t gy = (vectors + per_block_y - 1) / per_block_y;
  gy = gy < 1 ? 1 : (gy > 65535 ? 65535 : gy);
  if (gx > 0x7fffffffLL) throw std::invalid_argument("too many rows for one CUDA launch");
  return {per_row, dim3(static_cast<unsigned>(gx > 0 ? gx : 1), static_cast<unsigned>(gy))};
}

// Inside a row_grid launch: this thread's row (>= rows: nothing to do), first vector and vector stride.
struct RowSlot {
  int64_t row, first, stride;
};
__device__ __forceinline__ RowSlot row_slot(int threads_per_row) {
  const int lane = threadIdx.x & (threads_per_row - 1);
  return {static_cast<int64_t>(blockIdx.x) * (blockDim.x / threads_per_row) + threadIdx.x / threads_per_row,
          static_cast<int64_t>(blockIdx.y) * threads_per_row + lane,
          static_cast<int64_t>(gridDim.y) * threads_per_row};
}

inline void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + " CUDA launch: " + cudaGetErrorString(err));
}

}  // namespace
}  // namespace animatelcm
