// CUDA GroupNorm family (same contract as csrc/cpu/group_norm.cpp), three launches for a norm:
//   partials: per (batch, group), the F segments of C/G x S contiguous elements are cut into chunks, one block per
//             chunk (grid (batch * groups, frames * chunks), so even two batches x 32 groups fill the GPU); each sums
//             x - shift and its square (shift: the group's first element) in fp32 per thread, fp64 across the block;
//             16-byte loads when the segment length and x allow.
//   finalize: one thread per group adds its partials in fp64: mean and rstd to the stats buffer.
//   apply:    [N, C, S] -> [N, C, S]: row-wise launch (a row is one channel's S positions, one scale and shift),
//             16-byte loads and stores when S and the buffers allow; or the motion module's [B*F, C, S] ->
//             [B, S, F, C], a 32 x 32 tile transpose through shared memory so reads and writes are both coalesced.
//   unpermute: out [B*F, C, S] = permute(y [B*S, F, C]) + residual, the same tile transpose the other way.
// A plain [N, C, S] GroupNorm whose groups fit in shared memory (SD1.5's UNet in fp16: 5-80 KB a group), with enough
// groups to fill the GPU, runs as one launch instead: one block per group reads it from memory once into shared
// memory, takes the mean and the variance about it from there, and writes the output (one read and one write of x,
// where the three launches read it twice). On Hopper (sm_90), asked for (cluster_packs > 0), such a GroupNorm takes
// a cluster of up to 8 blocks a group instead: the group lives in the cluster's registers (a few 16-byte packs a
// thread, all read at once), the blocks add their partial sums through distributed shared memory, and each writes
// its part: the same single read, with many small blocks an SM in flight instead of two large ones. On an H100 it
// was slower than the shared-memory path on 13 of 18 SD1.5 shapes (run 10, benchmarks/results/
// tune_group_norm_cuda.md), so it is not the default; the tuning script times it.
#include <cooperative_groups.h>

#include <algorithm>
#include <atomic>
#include <stdexcept>

#include "../fast_math.h"
#include "../scalar_types.h"
#include "cuda_kernels.h"
#include "device_scalars.cuh"

namespace animatelcm {
namespace {

constexpr int kStatsThreads = 256;
constexpr int64_t kChunk = 8192;  // elements per statistics block (a multiple of every vector width)
constexpr int kTile = 32, kTileRows = 8;

// Chunks per (batch, group, frame) segment and their length; frames * chunks blocks go on grid axis y (<= 65535).
struct StatsPlan {
  int64_t chunk, chunks;
};
StatsPlan stats_plan(int64_t frames, int64_t channels, int64_t spatial, int64_t groups) {
  if (frames > 65535) throw std::invalid_argument("group_norm: more than 65535 frames per group");
  const int64_t length = channels / groups * spatial;
  int64_t chunk = kChunk, chunks = std::max<int64_t>(1, (length + chunk - 1) / chunk);
  const int64_t most = std::max<int64_t>(1, 65535 / frames);
  if (chunks > most) {
    chunk = ((length + most - 1) / most + 7) / 8 * 8;
    chunks = (length + chunk - 1) / chunk;
  }
  return {chunk, chunks};
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T>
__device__ __forceinline__ const T* group_start(const T* x, int64_t bg, int64_t frames, int64_t channels,
                                                int64_t spatial, int64_t groups) {
  const int64_t b = bg / groups, g = bg % groups;
  return x + (b * frames * channels + g * (channels / groups)) * spatial;
}

template <typename T, int V>
__global__ void group_partials_kernel(const T* __restrict__ x, double* __restrict__ partials, int64_t frames,
                                      int64_t channels, int64_t spatial, int64_t groups, int64_t chunk,
                                      int64_t chunks) {
  const int64_t bg = blockIdx.x, f = blockIdx.y / chunks, piece = blockIdx.y % chunks;
  const int64_t length = channels / groups * spatial;
  const T* first = group_start(x, bg, frames, channels, spatial, groups);
  const float shift = to_float(first[0]);
  const T* segment = first + f * channels * spatial;
  const int64_t begin = piece * chunk, end = begin + chunk < length ? begin + chunk : length;
  float sum = 0.f, squares = 0.f;
  for (int64_t i = begin + threadIdx.x * V; i < end; i += kStatsThreads * V) {
    const Pack<T, V> p = *reinterpret_cast<const Pack<T, V>*>(segment + i);
#pragma unroll
    for (int l = 0; l < V; ++l) {
      const float centred = to_float(p.v[l]) - shift;
      sum += centred;
      squares += centred * centred;
    }
  }
  sum = warp_sum(sum);
  squares = warp_sum(squares);
  __shared__ double warp_sums[kStatsThreads / 32], warp_squares[kStatsThreads / 32];
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 == 0) {
    warp_sums[warp] = sum;
    warp_squares[warp] = squares;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0, total_squares = 0.0;
    for (int w = 0; w < kStatsThreads / 32; ++w) {
      total += warp_sums[w];
      total_squares += warp_squares[w];
    }
    double* out = partials + 2 * (bg * gridDim.y + blockIdx.y);
    out[0] = total;
    out[1] = total_squares;
  }
}

template <typename T>
__global__ void group_finalize_kernel(const T* __restrict__ x, const double* __restrict__ partials,
                                      float* __restrict__ stats, int64_t batch_groups, int64_t per_group,
                                      int64_t frames, int64_t channels, int64_t spatial, int64_t groups, float eps) {
  const int64_t bg = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (bg >= batch_groups) return;
  double sum = 0.0, squares = 0.0;
  for (int64_t i = 0; i < per_group; ++i) {
    sum += partials[2 * (bg * per_group + i)];
    squares += partials[2 * (bg * per_group + i) + 1];
  }
  const double count = static_cast<double>(frames * (channels / groups) * spatial);
  const double mean_shifted = sum / count;
  const double variance = squares / count - mean_shifted * mean_shifted;
  stats[2 * bg] = static_cast<float>(mean_shifted + to_float(group_start(x, bg, frames, channels, spatial, groups)[0]));
  stats[2 * bg + 1] = rsqrtf(static_cast<float>(variance > 0.0 ? variance : 0.0) + eps);
}

// GroupNorm's weight and bias (either may be absent) read as stored, float32, float16 or bfloat16 (`type`), so the
// host launches no conversion.
struct AffineParams {
  const void* weight;
  const void* bias;
  int type;

  __device__ __forceinline__ float load(const void* p, int64_t c) const {
    if (type == kFloat16) return __half2float(static_cast<const __half*>(p)[c]);
    if (type == kBFloat16) return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[c]);
    return static_cast<const float*>(p)[c];
  }
  __device__ __forceinline__ float weight_at(int64_t c) const { return weight != nullptr ? load(weight, c) : 1.0f; }
  __device__ __forceinline__ float bias_at(int64_t c) const { return bias != nullptr ? load(bias, c) : 0.0f; }
};

AffineParams affine_params(const GroupNormArgs& a) { return {a.weight, a.bias, a.affine_scalar_type}; }

// y = x * scale + shift for channel c of batch b (scale and shift fold the statistics and the affine).
__device__ __forceinline__ void channel_affine(const float* stats, const AffineParams& affine, int64_t b, int64_t c,
                                               int64_t channels, int64_t groups, float& scale, float& shift) {
  const int64_t stat = 2 * (b * groups + c / (channels / groups));
  scale = stats[stat + 1] * affine.weight_at(c);
  shift = affine.bias_at(c) - stats[stat] * scale;
}

template <bool kSilu>
__device__ __forceinline__ float activate(float v) {
  return kSilu ? silu(v) : v;
}

template <typename T, int V, bool kSilu>
__global__ void group_apply_rows_kernel(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ stats,
                                        AffineParams affine,
                                        int64_t rows, int64_t frames, int64_t channels, int64_t spatial,
                                        int64_t groups, int threads_per_row) {
  const RowSlot slot = row_slot(threads_per_row);
  if (slot.row >= rows) return;
  const int64_t c = slot.row % channels, b = slot.row / channels / frames;
  float scale, shift;
  channel_affine(stats, affine, b, c, channels, groups, scale, shift);
  const T* in = x + slot.row * spatial;
  T* out = y + slot.row * spatial;
  for (int64_t v = slot.first; v < spatial / V; v += slot.stride) {
    const Pack<T, V> p = *reinterpret_cast<const Pack<T, V>*>(in + v * V);
    Pack<T, V> r;
#pragma unroll
    for (int l = 0; l < V; ++l) r.v[l] = from_float<T>(activate<kSilu>(to_float(p.v[l]) * scale + shift));
    *reinterpret_cast<Pack<T, V>*>(out + v * V) = r;
  }
}

// x [B*F, C, S] -> y [B, S, F, C]: blocks of kTile x kTileRows threads over (S tile, C tile, B*F).
template <typename T, bool kSilu>
__global__ void group_apply_permute_kernel(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ stats,
                                           AffineParams affine,
                                           int64_t batch_frames, int64_t frames, int64_t channels, int64_t spatial,
                                           int64_t groups) {
  __shared__ float tile[kTile][kTile + 1];
  const int64_t s0 = static_cast<int64_t>(blockIdx.x) * kTile, c0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t c_out = c0 + threadIdx.x;
  for (int64_t bf = blockIdx.z; bf < batch_frames; bf += gridDim.z) {
    const int64_t b = bf / frames, f = bf % frames;
    for (int j = threadIdx.y; j < kTile; j += kTileRows) {  // read along s
      const int64_t c = c0 + j, s = s0 + threadIdx.x;
      if (c < channels && s < spatial) tile[j][threadIdx.x] = to_float(x[(bf * channels + c) * spatial + s]);
    }
    __syncthreads();
    if (c_out < channels) {  // write along c
      float scale, shift;
      channel_affine(stats, affine, b, c_out, channels, groups, scale, shift);
      for (int j = threadIdx.y; j < kTile; j += kTileRows) {
        const int64_t s = s0 + j;
        if (s < spatial) {
          y[((b * spatial + s) * frames + f) * channels + c_out] =
              from_float<T>(activate<kSilu>(tile[threadIdx.x][j] * scale + shift));
        }
      }
    }
    __syncthreads();
  }
}

// out [B*F, C, S] = permute(y [B*S, F, C]) + residual: blocks over (S tile, C tile, B*F).
template <typename T>
__global__ void unpermute_residual_kernel(const T* __restrict__ y, const T* __restrict__ residual, T* __restrict__ out,
                                          int64_t batch_frames, int64_t frames, int64_t channels, int64_t spatial) {
  __shared__ float tile[kTile][kTile + 1];
  const int64_t s0 = static_cast<int64_t>(blockIdx.x) * kTile, c0 = static_cast<int64_t>(blockIdx.y) * kTile;
  for (int64_t bf = blockIdx.z; bf < batch_frames; bf += gridDim.z) {
    const int64_t b = bf / frames, f = bf % frames;
    for (int j = threadIdx.y; j < kTile; j += kTileRows) {  // read along c
      const int64_t s = s0 + j, c = c0 + threadIdx.x;
      if (s < spatial && c < channels) tile[j][threadIdx.x] = to_float(y[((b * spatial + s) * frames + f) * channels + c]);
    }
    __syncthreads();
    for (int j = threadIdx.y; j < kTile; j += kTileRows) {  // write along s
      const int64_t c = c0 + j, s = s0 + threadIdx.x;
      if (c < channels && s < spatial) {
        const int64_t o = (bf * channels + c) * spatial + s;
        out[o] = from_float<T>(tile[threadIdx.x][j] + to_float(residual[o]));
      }
    }
    __syncthreads();
  }
}

constexpr int kResidentThreads = 512;
constexpr int kResidentLoads = 8;  // 16-byte loads a thread keeps in flight while reading its group
// Largest group kept in shared memory: two blocks an SM on an H100 (228 KB of shared memory an SM), one on an A100.
constexpr int64_t kResidentMaxBytes = 100 * 1024;

// Sum of every thread's v, returned to all kThreads threads of the block; `scratch` holds kThreads / 32 + 1 doubles
// and is reused.
template <int kThreads>
__device__ __forceinline__ float block_sum(float v, double* scratch) {
  v = warp_sum(v);
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 == 0) scratch[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int w = 0; w < kThreads / 32; ++w) total += scratch[w];
    scratch[kThreads / 32] = total;
  }
  __syncthreads();
  const float total = static_cast<float>(scratch[kThreads / 32]);
  __syncthreads();  // scratch is written again by the next call
  return total;
}

// x, y [N, C, S] contiguous: block bg normalises group bg (C/G channels x S positions), held in dynamic shared
// memory as V-wide (16-byte) packs (S % V == 0, x and y 16-byte aligned): one read from memory, then the mean, the
// variance about it and the output from shared memory.
template <typename T, int V, bool kSilu>
__global__ void __launch_bounds__(kResidentThreads, 2) group_norm_resident_kernel(
    const T* __restrict__ x, T* __restrict__ y, AffineParams affine,
    int64_t channels, int64_t spatial, int64_t groups, float eps) {
  extern __shared__ __align__(16) unsigned char resident_bytes[];
  __shared__ double scratch[kResidentThreads / 32 + 1];
  auto* group = reinterpret_cast<Pack<T, V>*>(resident_bytes);
  const int64_t bg = blockIdx.x, per_group = channels / groups;
  const int packs = static_cast<int>(per_group * spatial / V), packs_per_channel = static_cast<int>(spatial / V);
  const auto* in = reinterpret_cast<const Pack<T, V>*>(x + bg * per_group * spatial);
  auto* out = reinterpret_cast<Pack<T, V>*>(y + bg * per_group * spatial);
  const float count = static_cast<float>(per_group * spatial);

  // The group into shared memory, kResidentLoads 16-byte reads in flight a thread (raw words: an array of bf16
  // packs would live in local memory).
  const auto* raw_in = reinterpret_cast<const uint4*>(in);
  auto* raw_group = reinterpret_cast<uint4*>(group);
  for (int first = threadIdx.x; first < packs; first += kResidentThreads * kResidentLoads) {
    uint4 words[kResidentLoads];
#pragma unroll
    for (int u = 0; u < kResidentLoads; ++u) {
      if (first + u * kResidentThreads < packs) words[u] = raw_in[first + u * kResidentThreads];
    }
#pragma unroll
    for (int u = 0; u < kResidentLoads; ++u) {
      if (first + u * kResidentThreads < packs) raw_group[first + u * kResidentThreads] = words[u];
    }
  }
  __syncthreads();
  float sum = 0.f;
  for (int i = threadIdx.x; i < packs; i += kResidentThreads) {
    const Pack<T, V> p = group[i];
#pragma unroll
    for (int l = 0; l < V; ++l) sum += to_float(p.v[l]);
  }
  const float mean = block_sum<kResidentThreads>(sum, scratch) / count;

  float squares = 0.f;
  for (int i = threadIdx.x; i < packs; i += kResidentThreads) {
    const Pack<T, V> p = group[i];
#pragma unroll
    for (int l = 0; l < V; ++l) {
      const float centred = to_float(p.v[l]) - mean;
      squares += centred * centred;
    }
  }
  const float rstd = rsqrtf(block_sum<kResidentThreads>(squares, scratch) / count + eps);

  const int64_t first_channel = (bg % groups) * per_group;
  for (int i = threadIdx.x; i < packs; i += kResidentThreads) {
    const int64_t c = first_channel + i / packs_per_channel;
    const float scale = rstd * affine.weight_at(c);
    const float shift = affine.bias_at(c) - mean * scale;
    const Pack<T, V> p = group[i];
    Pack<T, V> r;
#pragma unroll
    for (int l = 0; l < V; ++l) r.v[l] = from_float<T>(activate<kSilu>(to_float(p.v[l]) * scale + shift));
    out[i] = r;
  }
}

// Dynamic shared memory above 48 KB must be allowed once per kernel and device (`limit`: kResidentMaxBytes, or less
// where the device offers less); false if the device refuses.
template <typename T, bool kSilu>
bool allow_resident_shared_memory(int device, int64_t limit) {
  static std::atomic<uint64_t> allowed_devices{0};
  const uint64_t bit = device >= 0 && device < 64 ? (uint64_t{1} << device) : 0;
  if (bit != 0 && (allowed_devices.load() & bit)) return true;
  if (cudaFuncSetAttribute(group_norm_resident_kernel<T, kVector<T>, kSilu>,
                           cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(limit)) != cudaSuccess) {
    cudaGetLastError();  // clear it: the three launches run instead
    return false;
  }
  allowed_devices.fetch_or(bit);
  return true;
}

// Whether the resident kernel takes this GroupNorm: a plain [N, C, S] one with 16-byte packs, groups that fit in
// kResidentMaxBytes (and the device's shared memory), and at least two groups an SM (fewer would leave SMs idle,
// where the three launches split each group over many blocks).
template <typename T>
bool resident_fits(const GroupNormArgs& a, int64_t& group_bytes) {
  group_bytes = a.channels / a.groups * a.spatial * static_cast<int64_t>(sizeof(T));
  if (!a.resident_groups || a.permute_output || a.frames != 1 || a.spatial % kVector<T> || !aligned16(a.x) ||
      !aligned16(a.y) || group_bytes > kResidentMaxBytes) {
    return false;
  }
  int device = 0, sms = 0, optin = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  const int64_t static_bytes = (kResidentThreads / 32 + 1) * static_cast<int64_t>(sizeof(double));
  if (group_bytes + static_bytes > optin || a.batch * a.groups < 2 * static_cast<int64_t>(sms)) return false;
  const int64_t limit = std::min<int64_t>(kResidentMaxBytes, optin - static_bytes);
  return a.silu ? allow_resident_shared_memory<T, true>(device, limit)
                : allow_resident_shared_memory<T, false>(device, limit);
}

template <typename T, bool kSilu>
void resident_launch(const GroupNormArgs& a, int64_t group_bytes, cudaStream_t stream) {
  group_norm_resident_kernel<T, kVector<T>, kSilu>
      <<<static_cast<unsigned>(a.batch * a.groups), kResidentThreads, static_cast<size_t>(group_bytes), stream>>>(
          static_cast<const T*>(a.x), static_cast<T*>(a.y), affine_params(a), a.channels, a.spatial, a.groups, a.eps);
  check_launch("group_norm (resident)");
}

constexpr int kClusterThreads = 256;
constexpr int kClusterMaxPacks = 8;  // 16-byte packs a thread holds at most (its registers)
constexpr int kClusterMaxSize = 8;   // blocks a cluster at most (the portable limit)

// A 16-byte pack's V values as floats, and back.
template <typename T, int V>
__device__ __forceinline__ void unpack(const uint4& words, float (&v)[V]) {
  Pack<T, V> p;
  memcpy(&p, &words, sizeof(words));
#pragma unroll
  for (int l = 0; l < V; ++l) v[l] = to_float(p.v[l]);
}
template <typename T, int V>
__device__ __forceinline__ uint4 pack(const float (&v)[V]) {
  Pack<T, V> p;
#pragma unroll
  for (int l = 0; l < V; ++l) p.v[l] = from_float<T>(v[l]);
  uint4 words;
  memcpy(&words, &p, sizeof(words));
  return words;
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
// Sum of every thread's v over the cluster's blocks, returned to all their threads: each block's total goes into its
// shared `slot`, and after a cluster barrier every thread adds the cluster's slots in rank order (one order for all,
// so every block gets the same bits). A slot may be read by the other blocks until the cluster's next barrier.
__device__ __forceinline__ float cluster_sum(float v, double* scratch, float* slot,
                                             const cooperative_groups::cluster_group& cluster) {
  const float block_total = block_sum<kClusterThreads>(v, scratch);
  if (threadIdx.x == 0) *slot = block_total;
  cluster.sync();
  float total = 0.f;
  for (unsigned r = 0; r < cluster.num_blocks(); ++r) total += *cluster.map_shared_rank(slot, r);
  return total;
}
#endif

// x, y [N, C, S] contiguous, S % V == 0, x and y 16-byte aligned (sm_90: thread block clusters): the cluster of
// blocks blockIdx.x / size * size ... + size - 1 normalises group blockIdx.x / size. Its threads hold the group's
// 16-byte packs in registers, kPacks each at most (pack rank * kClusterThreads + thread + j * size *
// kClusterThreads: consecutive threads read consecutive packs), all loaded at once: one read of x, the mean and the
// variance about it from the registers, the blocks' partial sums added through distributed shared memory.
template <typename T, int V, int kPacks, bool kSilu>
__global__ void __launch_bounds__(kClusterThreads, 3) group_norm_cluster_kernel(
    const T* __restrict__ x, T* __restrict__ y, AffineParams affine,
    int64_t channels, int64_t spatial, int64_t groups, float eps) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  const cg::cluster_group cluster = cg::this_cluster();
  __shared__ double scratch[kClusterThreads / 32 + 1];
  __shared__ float slots[2];  // this block's part of the sum, then of the squared deviations
  const unsigned size = cluster.num_blocks();
  const int64_t bg = blockIdx.x / size, per_group = channels / groups, count = per_group * spatial;
  const int packs = static_cast<int>(count / V), packs_per_channel = static_cast<int>(spatial / V);
  const int first = static_cast<int>(cluster.block_rank()) * kClusterThreads + threadIdx.x;
  const int stride = static_cast<int>(size) * kClusterThreads;
  const auto* in = reinterpret_cast<const uint4*>(x + bg * count);
  auto* out = reinterpret_cast<uint4*>(y + bg * count);

  uint4 words[kPacks];
#pragma unroll
  for (int j = 0; j < kPacks; ++j) {
    if (first + j * stride < packs) words[j] = in[first + j * stride];
  }
  float sum = 0.f;
#pragma unroll
  for (int j = 0; j < kPacks; ++j) {
    if (first + j * stride < packs) {
      float v[V];
      unpack<T, V>(words[j], v);
#pragma unroll
      for (int l = 0; l < V; ++l) sum += v[l];
    }
  }
  const float mean = cluster_sum(sum, scratch, &slots[0], cluster) / static_cast<float>(count);
  float squares = 0.f;
#pragma unroll
  for (int j = 0; j < kPacks; ++j) {
    if (first + j * stride < packs) {
      float v[V];
      unpack<T, V>(words[j], v);
#pragma unroll
      for (int l = 0; l < V; ++l) squares += (v[l] - mean) * (v[l] - mean);
    }
  }
  const float rstd = rsqrtf(cluster_sum(squares, scratch, &slots[1], cluster) / static_cast<float>(count) + eps);

  const int64_t first_channel = (bg % groups) * per_group;
#pragma unroll
  for (int j = 0; j < kPacks; ++j) {
    const int i = first + j * stride;
    if (i < packs) {
      const int64_t c = first_channel + i / packs_per_channel;  // a pack lies within one channel (S % V == 0)
      const float scale = rstd * affine.weight_at(c);
      const float shift = affine.bias_at(c) - mean * scale;
      float v[V];
      unpack<T, V>(words[j], v);
#pragma unroll
      for (int l = 0; l < V; ++l) v[l] = activate<kSilu>(v[l] * scale + shift);
      out[i] = pack<T, V>(v);
    }
  }
  cluster.sync();  // the other blocks may still be reading this block's slots[1]
#endif
}

// Whether this build's cluster kernels were compiled for sm_90 or newer (an sm_80-only build JIT-compiled for a newer
// device has them empty): the first call's answer, from the PTX version of one of them.
template <typename T>
bool cluster_kernels_built() {
  static const bool built = [] {
    cudaFuncAttributes attributes = {};
    if (cudaFuncGetAttributes(&attributes, group_norm_cluster_kernel<T, kVector<T>, 1, true>) != cudaSuccess) {
      cudaGetLastError();
      return false;
    }
    return attributes.ptxVersion >= 90;
  }();
  return built;
}

// The cluster kernel's launch for a GroupNorm: blocks a cluster and packs a thread (0: it does not take this norm).
struct ClusterPlan {
  int size = 0, packs = 0;
};

// Whether the cluster kernel takes this GroupNorm: a plain [N, C, S] one with 16-byte packs on an sm_90 or newer
// device, groups that a cluster of at most kClusterMaxSize blocks holds in kClusterMaxPacks packs a thread, and at
// least two blocks an SM. The cluster is the smallest whose threads hold about a.cluster_packs packs each.
template <typename T>
ClusterPlan cluster_plan(const GroupNormArgs& a) {
  constexpr int V = kVector<T>;
  const int64_t packs = a.channels / a.groups * a.spatial / V;
  if (a.cluster_packs <= 0 || a.permute_output || a.frames != 1 || a.spatial % V || !aligned16(a.x) ||
      !aligned16(a.y) || packs > int64_t{kClusterMaxSize} * kClusterThreads * kClusterMaxPacks) {
    return {};
  }
  int device = 0, major = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    cudaGetLastError();
    return {};
  }
  const int64_t per_thread = std::clamp<int64_t>(a.cluster_packs, 1, kClusterMaxPacks);
  const int64_t size = std::clamp<int64_t>((packs + kClusterThreads * per_thread - 1) / (kClusterThreads * per_thread),
                                           1, kClusterMaxSize);
  const int64_t blocks = a.batch * a.groups * size;
  if (major < 9 || blocks < 2 * static_cast<int64_t>(sms) || blocks > 0x7fffffffLL || !cluster_kernels_built<T>()) {
    return {};
  }
  return {static_cast<int>(size), static_cast<int>((packs + size * kClusterThreads - 1) / (size * kClusterThreads))};
}

// Launches the cluster kernel; false (the error cleared) where the device cannot run such a cluster, so the caller
// takes another path.
template <typename T, int kPacks, bool kSilu>
bool cluster_launch_with(const GroupNormArgs& a, int size, cudaStream_t stream) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(a.batch * a.groups * size));
  config.blockDim = dim3(kClusterThreads);
  config.stream = stream;
  cudaLaunchAttribute attribute = {};
  attribute.id = cudaLaunchAttributeClusterDimension;
  attribute.val.clusterDim.x = static_cast<unsigned>(size);
  attribute.val.clusterDim.y = 1;
  attribute.val.clusterDim.z = 1;
  config.attrs = &attribute;
  config.numAttrs = 1;
  const cudaError_t err = cudaLaunchKernelEx(&config, group_norm_cluster_kernel<T, kVector<T>, kPacks, kSilu>,
                                             static_cast<const T*>(a.x), static_cast<T*>(a.y), affine_params(a),
                                             a.channels, a.spatial, a.groups, a.eps);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return true;
}

template <typename T, bool kSilu>
bool cluster_launch(const GroupNormArgs& a, const ClusterPlan& plan, cudaStream_t stream) {
  switch (plan.packs) {
    case 1: return cluster_launch_with<T, 1, kSilu>(a, plan.size, stream);
    case 2: return cluster_launch_with<T, 2, kSilu>(a, plan.size, stream);
    case 3: return cluster_launch_with<T, 3, kSilu>(a, plan.size, stream);
    case 4: return cluster_launch_with<T, 4, kSilu>(a, plan.size, stream);
    case 5: return cluster_launch_with<T, 5, kSilu>(a, plan.size, stream);
    case 6: return cluster_launch_with<T, 6, kSilu>(a, plan.size, stream);
    case 7: return cluster_launch_with<T, 7, kSilu>(a, plan.size, stream);
    case 8: return cluster_launch_with<T, 8, kSilu>(a, plan.size, stream);
    default: return false;
  }
}

dim3 tile_grid(int64_t batch_frames, int64_t channels, int64_t spatial) {
  const int64_t gx = (spatial + kTile - 1) / kTile, gy = (channels + kTile - 1) / kTile;
  if (gx > 0x7fffffffLL || gy > 65535) throw std::invalid_argument("group_norm: too many channels for one launch");
  return dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy),
              static_cast<unsigned>(std::min<int64_t>(batch_frames, 65535)));
}

template <typename T>
void group_norm_launch(const GroupNormArgs& a, double* workspace, cudaStream_t stream) {
  const ClusterPlan cluster = cluster_plan<T>(a);
  if (cluster.size > 0 &&
      (a.silu ? cluster_launch<T, true>(a, cluster, stream) : cluster_launch<T, false>(a, cluster, stream))) {
    return;
  }
  int64_t group_bytes = 0;
  if (resident_fits<T>(a, group_bytes)) {
    return a.silu ? resident_launch<T, true>(a, group_bytes, stream) : resident_launch<T, false>(a, group_bytes, stream);
  }
  const auto* x = static_cast<const T*>(a.x);
  auto* y = static_cast<T*>(a.y);
  const StatsPlan plan = stats_plan(a.frames, a.channels, a.spatial, a.groups);
  const int64_t batch_groups = a.batch * a.groups, per_group = a.frames * plan.chunks;
  float* stats = reinterpret_cast<float*>(workspace);  // 2 floats per group in the first batch_groups doubles
  double* partials = workspace + batch_groups;
  const dim3 stats_grid(static_cast<unsigned>(batch_groups), static_cast<unsigned>(per_group));
  constexpr int V = kVector<T>;
  if ((a.channels / a.groups * a.spatial) % V == 0 && aligned16(x)) {
    group_partials_kernel<T, V><<<stats_grid, kStatsThreads, 0, stream>>>(x, partials, a.frames, a.channels, a.spatial,
                                                                          a.groups, plan.chunk, plan.chunks);
  } else {
    group_partials_kernel<T, 1><<<stats_grid, kStatsThreads, 0, stream>>>(x, partials, a.frames, a.channels, a.spatial,
                                                                          a.groups, plan.chunk, plan.chunks);
  }
  check_launch("group_norm partial sums");
  group_finalize_kernel<T><<<static_cast<unsigned>((batch_groups + 127) / 128), 128, 0, stream>>>(
      x, partials, stats, batch_groups, per_group, a.frames, a.channels, a.spatial, a.groups, a.eps);
  check_launch("group_norm statistics");
  if (a.permute_output) {
    const dim3 grid = tile_grid(a.batch * a.frames, a.channels, a.spatial), block(kTile, kTileRows);
    if (a.silu) {
      group_apply_permute_kernel<T, true><<<grid, block, 0, stream>>>(x, y, stats, affine_params(a), a.batch * a.frames,
                                                                      a.frames, a.channels, a.spatial, a.groups);
    } else {
      group_apply_permute_kernel<T, false><<<grid, block, 0, stream>>>(x, y, stats, affine_params(a),
                                                                       a.batch * a.frames, a.frames, a.channels,
                                                                       a.spatial, a.groups);
    }
  } else {
    const int64_t rows = a.batch * a.frames * a.channels;
    const bool vectorised = a.spatial % V == 0 && aligned16(x) && aligned16(y);
    const RowGrid rg = row_grid(rows, vectorised ? a.spatial / V : a.spatial);
#define ALCM_APPLY_ROWS(width, silu_on)                                                                            \
  group_apply_rows_kernel<T, width, silu_on><<<rg.grid, kRowThreads, 0, stream>>>(                                 \
      x, y, stats, affine_params(a), rows, a.frames, a.channels, a.spatial, a.groups, rg.threads_per_row)
    if (vectorised) {
      if (a.silu) ALCM_APPLY_ROWS(V, true); else ALCM_APPLY_ROWS(V, false);
    } else {
      if (a.silu) ALCM_APPLY_ROWS(1, true); else ALCM_APPLY_ROWS(1, false);
    }
#undef ALCM_APPLY_ROWS
  }
  check_launch("group_norm apply");
}

template <typename T>
void unpermute_launch(const UnpermuteResidualArgs& a, cudaStream_t stream) {
  unpermute_residual_kernel<T><<<tile_grid(a.batch * a.frames, a.channels, a.spatial), dim3(kTile, kTileRows), 0,
                                 stream>>>(static_cast<const T*>(a.y), static_cast<const T*>(a.residual),
                                           static_cast<T*>(a.out), a.batch * a.frames, a.frames, a.channels,
                                           a.spatial);
  check_launch("unpermute_residual");
}

}  // namespace

int64_t group_norm_cuda_workspace_doubles(int64_t batch, int64_t frames, int64_t channels, int64_t spatial,
                                          int64_t groups) {
  if (groups <= 0 || channels % groups) throw std::invalid_argument("group_norm: bad group count");
  const StatsPlan plan = stats_plan(frames, channels, spatial, groups);
  return batch * groups * (1 + 2 * frames * plan.chunks);
}

void group_norm_cuda(const GroupNormArgs& args, double* workspace, std::uintptr_t stream) {
  if (args.groups <= 0 || args.channels % args.groups) throw std::invalid_argument("group_norm: bad group count");
  if (args.batch * args.groups > 0x7fffffffLL) throw std::invalid_argument("group_norm: too many groups for one launch");
  auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (args.scalar_type) {
    case kFloat32: return group_norm_launch<float>(args, workspace, s);
    case kFloat16: return group_norm_launch<__half>(args, workspace, s);
    case kBFloat16: return group_norm_launch<__nv_bfloat16>(args, workspace, s);
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
