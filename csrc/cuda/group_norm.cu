// CUDA GroupNorm family (same contract as csrc/cpu/group_norm.cpp):
//   statistics: one block per (batch, group) over (C/G, frames, spatial), shifted sums (x - first element) in fp32
//               per thread, combined in fp64 across the block; mean and rstd to a small device buffer.
//   apply:      grid-stride over the output, [N, C, S] or the permuted [B, S, F, C] layout, optional SiLU (the
//               same silu() as the CPU kernels).
//   unpermute:  out [B*F, C, S] = permute(y [B*S, F, C]) + residual.
#include <stdexcept>

#include "../fast_math.h"
#include "../scalar_types.h"
#include "cuda_kernels.h"
#include "device_scalars.cuh"

namespace animatelcm {
namespace {

constexpr int kStatsThreads = 512;

template <typename T>
__global__ void group_stats_kernel(const T* __restrict__ x, float* __restrict__ stats, int64_t frames,
                                   int64_t channels, int64_t spatial, int64_t groups, float eps) {
  const int64_t index = blockIdx.x;  // batch * groups + group
  const int64_t b = index / groups, g = index % groups, per_group = channels / groups;
  const int64_t block_len = per_group * spatial, count = frames * block_len;
  const T* base = x + (b * frames * channels + g * per_group) * spatial;
  const float shift = to_float(base[0]);
  float sum = 0.f, squares = 0.f;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) {
    const int64_t f = i / block_len, r = i % block_len;
    const float centred = to_float(base[f * channels * spatial + r]) - shift;
    sum += centred;
    squares += centred * centred;
  }
  __shared__ double shared_sum[kStatsThreads], shared_squares[kStatsThreads];
  shared_sum[threadIdx.x] = sum;
  shared_squares[threadIdx.x] = squares;
  __syncthreads();
  for (int width = blockDim.x / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) {
      shared_sum[threadIdx.x] += shared_sum[threadIdx.x + width];
      shared_squares[threadIdx.x] += shared_squares[threadIdx.x + width];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const double mean_shifted = shared_sum[0] / count;
    const double variance = shared_squares[0] / count - mean_shifted * mean_shifted;
    stats[2 * index] = static_cast<float>(mean_shifted + shift);
    stats[2 * index + 1] = rsqrtf(static_cast<float>(variance > 0.0 ? variance : 0.0) + eps);
  }
}

template <typename T, bool kSilu, bool kPermute>
__global__ void group_apply_kernel(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ stats,
                                   const float* __restrict__ weight, const float* __restrict__ bias, int64_t batch,
                                   int64_t frames, int64_t channels, int64_t spatial, int64_t groups) {
  const int64_t total = batch * frames * channels * spatial, per_group = channels / groups;
  for (int64_t o = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; o < total;
       o += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t b, f, c, s;
    if (kPermute) {  // o indexes [B, S, F, C]
      c = o % channels;
      f = (o / channels) % frames;
      s = (o / (channels * frames)) % spatial;
      b = o / (channels * frames * spatial);
    } else {  // o indexes [B*F, C, S]
      s = o % spatial;
      c = (o / spatial) % channels;
      const int64_t bf = o / (spatial * channels);
      b = bf / frames;
      f = bf % frames;
    }
    const int64_t stat = 2 * (b * groups + c / per_group);
    const float w = weight ? weight[c] : 1.f, bb = bias ? bias[c] : 0.f;
    const float scale = stats[stat + 1] * w, shift = bb - stats[stat] * scale;
    const float v = to_float(x[((b * frames + f) * channels + c) * spatial + s]) * scale + shift;
    y[o] = from_float<T>(kSilu ? silu(v) : v);
  }
}

template <typename T>
__global__ void unpermute_residual_kernel(const T* __restrict__ y, const T* __restrict__ residual, T* __restrict__ out,
                                          int64_t batch, int64_t frames, int64_t channels, int64_t spatial) {
  const int64_t total = batch * frames * channels * spatial;
  for (int64_t o = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; o < total;
       o += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t s = o % spatial, c = (o / spatial) % channels, bf = o / (spatial * channels);
    const int64_t b = bf / frames, f = bf % frames;
    out[o] = from_float<T>(to_float(y[((b * spatial + s) * frames + f) * channels + c]) + to_float(residual[o]));
  }
}

template <typename T>
void group_norm_launch(const GroupNormArgs& a, float* stats, cudaStream_t stream) {
  const auto* x = static_cast<const T*>(a.x);
  auto* y = static_cast<T*>(a.y);
  group_stats_kernel<T><<<static_cast<unsigned>(a.batch * a.groups), kStatsThreads, 0, stream>>>(
      x, stats, a.frames, a.channels, a.spatial, a.groups, a.eps);
  check_launch("group_norm statistics");
  constexpr int kThreads = 256;
  const int grid = grid_for(a.batch * a.frames * a.channels * a.spatial, kThreads);
#define ALCM_APPLY(silu_on, permute)                                                                           \
  group_apply_kernel<T, silu_on, permute><<<grid, kThreads, 0, stream>>>(x, y, stats, a.weight, a.bias, a.batch, \
                                                                         a.frames, a.channels, a.spatial, a.groups)
  if (a.permute_output) {
    if (a.silu) ALCM_APPLY(true, true); else ALCM_APPLY(false, true);
  } else {
    if (a.silu) ALCM_APPLY(true, false); else ALCM_APPLY(false, false);
  }
#undef ALCM_APPLY
  check_launch("group_norm apply");
}

template <typename T>
void unpermute_launch(const UnpermuteResidualArgs& a, cudaStream_t stream) {
  constexpr int kThreads = 256;
  unpermute_residual_kernel<T><<<grid_for(a.batch * a.frames * a.channels * a.spatial, kThreads), kThreads, 0, stream>>>(
      static_cast<const T*>(a.y), static_cast<const T*>(a.residual), static_cast<T*>(a.out), a.batch, a.frames,
      a.channels, a.spatial);
  check_launch("unpermute_residual");
}

}  // namespace

void group_norm_cuda(const GroupNormArgs& args, float* stats, std::uintptr_t stream) {
  if (args.groups <= 0 || args.channels % args.groups) throw std::invalid_argument("group_norm: bad group count");
  auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (args.scalar_type) {
    case kFloat32: return group_norm_launch<float>(args, stats, s);
    case kFloat16: return group_norm_launch<__half>(args, stats, s);
    case kBFloat16: return group_norm_launch<__nv_bfloat16>(args, stats, s);
    default: throw std::invalid_argument("group_norm: unsupported scalar type code");
  }
}

void unpermute_residual_cuda(const UnpermuteResidualArgs& args, std::uintptr_t stream) {
  auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (args.scalar_type) {
    case kFloat32: return unpermute_launch<float>(args, s);
    case kFloat16: return unpermute_launch<__half>(args, s);
    case kBFloat16: return unpermute_launch<__nv_bfloat16>(args, s);
    default: throw std::invalid_argument("unpermute_residual: unsupported scalar type code");
  }
}

}  // namespace animatelcm
