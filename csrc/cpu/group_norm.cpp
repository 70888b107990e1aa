// CPU GroupNorm family:
//   group_norm_cpu            x [N, C, S] -> y [N, C, S]; statistics per (n, group) over (C/G, S) (frames = 1), or
//                             per (b, group) over (C/G, F, S) for x [B*F, C, S] when frames > 1; optional SiLU.
//                             With permute_output the result is written as [B, S, F, C] (the motion module's
//                             (B*H*W, F, C) layout) instead.
//   unpermute_residual_cpu    y [B*S, F, C] -> out [B*F, C, S] = y^T + residual.
// Statistics: one pass of shifted sums per group (see group_stats).
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

#include "../fast_math.h"
#include "../scalar_types.h"
#include "cpu_kernels.h"
#include "streaming.h"

namespace animatelcm {
namespace ALCM_CPU_ISA {
namespace {

// Mean and 1/sqrt(var + eps) over `blocks` runs of `block_len` elements, `block_stride` apart, in one pass: sums of
// x - x[0] and of its square (shifting by a sample keeps the variance from cancelling), fp32 per run, fp64 across.
// Two pairs of vector accumulators per run keep two independent add chains in flight: 1.8x faster than one pair
// from L1/L2 and 1.4x from memory, alone on one AMD EPYC (Zen 4) core (four pairs: no faster from cache).
template <typename S>
void group_stats(const typename S::type* x, int64_t blocks, int64_t block_len, int64_t block_stride, float eps,
                 float* mean_out, float* rstd_out) {
  const float shift = S::load(x, 0);
  double total = 0.0, total_squares = 0.0;
  for (int64_t b = 0; b < blocks; ++b) {
    const auto* p = x + b * block_stride;
    VecF sums[2] = {}, squares[2] = {};
    int64_t i = 0;
    for (; i + 2 * kLanes <= block_len; i += 2 * kLanes) {
      for (int k = 0; k < 2; ++k) {
        const VecF centred = load_vector<S>(p + i + k * kLanes) - shift;
        sums[k] += centred;
        squares[k] += centred * centred;
      }
    }
    for (; i + kLanes <= block_len; i += kLanes) {
      const VecF centred = load_vector<S>(p + i) - shift;
      sums[0] += centred;
      squares[0] += centred * centred;
    }
    float sum = horizontal_sum(sums[0] + sums[1]), square_sum = horizontal_sum(squares[0] + squares[1]);
    for (; i < block_len; ++i) {
      const float centred = S::load(p, i) - shift;
      sum += centred;
      square_sum += centred * centred;
    }
    total += sum;
    total_squares += square_sum;
  }
  const double count = static_cast<double>(blocks * block_len);
  const double mean_shifted = total / count;
  const double variance = total_squares / count - mean_shifted * mean_shifted;
  *mean_out = static_cast<float>(mean_shifted + shift);
  *rstd_out = 1.0f / std::sqrt(static_cast<float>(variance > 0.0 ? variance : 0.0) + eps);
}

// Per (batch, channel) affine coefficients: y = x * scale + shift.
void channel_affine(const GroupNormArgs& a, const float* mean, const float* rstd, int64_t batch_index, float* scale,
                    float* shift) {
  const int64_t per_group = a.channels / a.groups;
  for (int64_t c = 0; c < a.channels; ++c) {
    const int64_t g = batch_index * a.groups + c / per_group;
    const float w = a.weight ? static_cast<const float*>(a.weight)[c] : 1.0f;
    const float b = a.bias ? static_cast<const float*>(a.bias)[c] : 0.0f;
    scale[c] = rstd[g] * w;
    shift[c] = b - mean[g] * scale[c];
  }
}

template <bool kSilu>
inline float activate(float v) {
  return kSilu ? silu(v) : v;
}

// y[i] = act(x[i] * scale + shift) over one contiguous run, whole vectors then a scalar tail. Each vector also
// prefetches the element `prefetch_ahead` further on (the next group's data): the SiLU arithmetic on this group,
// which sits in L2, then overlaps the memory reads of the next instead of alternating with them (2.2x F.group_norm +
// F.silu at [16, 320, 32, 32] on the 2-core CI machine, against 1.3x without). The cache level of the hint does not
// matter: into L1, L2 or non-temporal timed within 2 % of each other on an AMD EPYC (80 interleaved rounds), and
// without the prefetch the call took 1.26-1.30x as long.
template <typename S, bool kSilu, bool kStream = false>
inline void normalize_run(const typename S::type* x, typename S::type* y, int64_t count, float scale, float shift,
                          int64_t prefetch_ahead) {
  int64_t i = 0;
  for (; i + kLanes <= count; i += kLanes) {
    __builtin_prefetch(x + i + prefetch_ahead);
    VecF v = load_vector<S>(x + i) * scale + shift;
    if constexpr (kSilu) v = silu(v);
    if constexpr (kStream) {
      stream_vector(y + i, v);
    } else {
      store_vector<S>(y + i, v);
    }
  }
  for (; i < count; ++i) S::store(y, i, activate<kSilu>(S::load(x, i) * scale + shift));
}

// Channels-last GroupNorm: x, y [N, S, C] in memory. Work items are blocks of kBlockPositions positions of one
// image. Pass 1: per item, per-channel sums of x - x[n, 0, c] and of its square over the block (fp32, vectorised
// across the contiguous channels), reduced per (n, group) in fp64. Pass 2: per item, y = act(x * scale + shift)
// with per-(n, channel) coefficients, kLanes channels at a time. Two reads and one write of x, against PyTorch's
// channels-last group_norm followed by a separate SiLU (three reads, two writes): what the VAE decoder's ResNet
// blocks receive from its convolutions.
template <int kType, bool kSilu>
void group_norm_channels_last_typed(const GroupNormArgs& a) {
  using S = Storage<kType>;
  using T = typename S::type;
  const auto* x = static_cast<const T*>(a.x);
  auto* y = static_cast<T*>(a.y);
  const int64_t N = a.batch, C = a.channels, G = a.groups, HW = a.spatial, per_group = C / G;
  constexpr int64_t kBlockPositions = 128;
  const int64_t blocks = (HW + kBlockPositions - 1) / kBlockPositions, items = N * blocks;
  std::vector<double> partial(items * 2 * C);  // per item: C shifted sums, then C shifted sums of squares
  std::vector<float> origin(N * C);            // the shift: each image's first position
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) origin[n * C + c] = S::load(x + n * HW * C, c);

#pragma omp parallel
  {
    std::vector<float> sum(C), squares(C);
#pragma omp for schedule(static)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t n = item / blocks, first = (item % blocks) * kBlockPositions;
      const int64_t last = std::min(HW, first + kBlockPositions);
      const float* shift = origin.data() + n * C;
      std::fill(sum.begin(), sum.end(), 0.0f);
      std::fill(squares.begin(), squares.end(), 0.0f);
      for (int64_t s = first; s < last; ++s) {
        const T* row = x + (n * HW + s) * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const float centred = S::load(row, c) - shift[c];
          sum[c] += centred;
          squares[c] += centred * centred;
        }
      }
      double* out = partial.data() + item * 2 * C;
      for (int64_t c = 0; c < C; ++c) out[c] = sum[c], out[C + c] = squares[c];
    }
  }

  // Per (n, group): the channels' shifted sums, each moved to the group's common shift (the first channel's origin).
  std::vector<float> scale(N * C), shift(N * C);
  const double count = static_cast<double>(HW * per_group);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t g = 0; g < G; ++g) {
      const double common = origin[n * C + g * per_group];
      double total = 0.0, total_squares = 0.0;
      for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) {
        double channel_sum = 0.0, channel_squares = 0.0;
        for (int64_t b = 0; b < blocks; ++b) {
          const double* item = partial.data() + (n * blocks + b) * 2 * C;
          channel_sum += item[c];
          channel_squares += item[C + c];
        }
        // sum (v - o)^2 with v - common = (v - o) + d, d = o - common
        const double d = origin[n * C + c] - common;
        total += channel_sum + HW * d;
        total_squares += channel_squares + 2.0 * d * channel_sum + HW * d * d;
      }
      const double mean_shifted = total / count;
      const double variance = total_squares / count - mean_shifted * mean_shifted;
      const float rstd = 1.0f / std::sqrt(static_cast<float>(variance > 0.0 ? variance : 0.0) + a.eps);
      const float mean = static_cast<float>(mean_shifted + common);
      for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) {
        const float w = a.weight ? static_cast<const float*>(a.weight)[c] : 1.0f;
        const float b = a.bias ? static_cast<const float*>(a.bias)[c] : 0.0f;
        scale[n * C + c] = rstd * w;
        shift[n * C + c] = b - mean * scale[n * C + c];
      }
    }
  }

#pragma omp parallel for schedule(static)
  for (int64_t item = 0; item < items; ++item) {
    const int64_t n = item / blocks, first = (item % blocks) * kBlockPositions;
    const int64_t last = std::min(HW, first + kBlockPositions);
    const float* scale_n = scale.data() + n * C;
    const float* shift_n = shift.data() + n * C;
    for (int64_t s = first; s < last; ++s) {
      const T* row = x + (n * HW + s) * C;
      T* out = y + (n * HW + s) * C;
      for (int64_t c0 = 0; c0 < C; c0 += kLanes) {
        VecF v = load_chunk<S>(row, c0, C) * load_chunk<Storage<kFloat32>>(scale_n, c0, C) +
                 load_chunk<Storage<kFloat32>>(shift_n, c0, C);
        if constexpr (kSilu) v = silu(v);
        store_chunk<S>(out, c0, C, v);
      }
    }
  }
}

template <int kType, bool kSilu>
void group_norm_typed(const GroupNormArgs& a) {
  if (a.channels_last) return group_norm_channels_last_typed<kType, kSilu>(a);
  using S = Storage<kType>;
  using T = typename S::type;
  const auto* x = static_cast<const T*>(a.x);
  auto* y = static_cast<T*>(a.y);
  const int64_t C = a.channels, G = a.groups, F = a.frames, HW = a.spatial, per_group = C / G;
  std::vector<float> mean(a.batch * G), rstd(a.batch * G);

  if (!a.permute_output) {
    // With a.stream_output each channel's run goes to y with streaming stores, skipping the read-for-ownership of
    // y's lines: straight from registers for float32 runs on a vector boundary, else normalised into a per-thread
    // staging row (in L1/L2) and copied out. The staged copy cost 8-13 % against plain stores on an AMD EPYC Zen 4
    // at [16, 320, 32, 32]; the direct stores gained 2-3 % there (4-5 % for the staged ones on Sapphire Rapids).
#pragma omp parallel
    {
      std::vector<T> staged(a.stream_output ? HW : 0);
#pragma omp for schedule(static)
      for (int64_t index = 0; index < a.batch * G; ++index) {
        const int64_t b = index / G, g = index % G;
        const T* base = x + ((b * F) * C + g * per_group) * HW;
        group_stats<S>(base, F, per_group * HW, C * HW, a.eps, &mean[index], &rstd[index]);
        for (int64_t f = 0; f < F; ++f) {
          for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) {
            const float w = a.weight ? static_cast<const float*>(a.weight)[c] : 1.0f;
            const float bias = a.bias ? static_cast<const float*>(a.bias)[c] : 0.0f;
            const float scale = rstd[index] * w, shift = bias - mean[index] * scale;
            const int64_t offset = ((b * F + f) * C + c) * HW;
            if (!a.stream_output) {
              normalize_run<S, kSilu>(x + offset, y + offset, HW, scale, shift, per_group * HW);
              continue;
            }
            if constexpr (kType == kFloat32) {
              if (reinterpret_cast<std::uintptr_t>(y + offset) % sizeof(VecF) == 0) {
                normalize_run<S, kSilu, true>(x + offset, y + offset, HW, scale, shift, per_group * HW);
                continue;
              }
            }
            normalize_run<S, kSilu>(x + offset, staged.data(), HW, scale, shift, per_group * HW);
            stream_copy(y + offset, staged.data(), HW * static_cast<int64_t>(sizeof(T)));
          }
        }
      }
      // This thread's streaming stores reach memory before the region's closing barrier lets anyone read them.
      if (a.stream_output) store_fence();
    }
    return;
  }

#pragma omp parallel for schedule(static)
  for (int64_t index = 0; index < a.batch * G; ++index) {
    const int64_t b = index / G, g = index % G;
    group_stats<S>(x + ((b * F) * C + g * per_group) * HW, F, per_group * HW, C * HW, a.eps, &mean[index], &rstd[index]);
  }
  // Tiles of kLanes channels x kLanes positions of one frame: normalised as rows of positions, transposed in
  // registers, stored as rows of channels.
  const int64_t tiles = (HW + kLanes - 1) / kLanes;
#pragma omp parallel
  {
    std::vector<float> scale(C), shift(C);
    int64_t current_batch = -1;
#pragma omp for schedule(static)
    for (int64_t index = 0; index < a.batch * tiles * F; ++index) {
      const int64_t b = index / (tiles * F), t = (index / F) % tiles, f = index % F;
      if (b != current_batch) {
        channel_affine(a, mean.data(), rstd.data(), b, scale.data(), shift.data());
        current_batch = b;
      }
      const int64_t s0 = t * kLanes, count = std::min<int64_t>(kLanes, HW - s0);
      for (int64_t c0 = 0; c0 < C; c0 += kLanes) {
        VecF tile[kLanes];
        for (int r = 0; r < kLanes; ++r) {
          const int64_t c = c0 + r;
          tile[r] = VecF{};
          if (c < C) {
            tile[r] = load_chunk<S>(x + ((b * F + f) * C + c) * HW, s0, HW) * scale[c] + shift[c];
            if constexpr (kSilu) tile[r] = silu(tile[r]);
          }
        }
        transpose_tile(tile);
        for (int64_t s = 0; s < count; ++s) store_chunk<S>(y + ((b * HW + s0 + s) * F + f) * C, c0, C, tile[s]);
      }
    }
  }
}

template <int kType>
void unpermute_residual_typed(const UnpermuteResidualArgs& a) {
  using S = Storage<kType>;
  using T = typename S::type;
  const auto* y = static_cast<const T*>(a.y);
  const auto* residual = static_cast<const T*>(a.residual);
  auto* out = static_cast<T*>(a.out);
  const int64_t C = a.channels, F = a.frames, HW = a.spatial, tiles = (HW + kLanes - 1) / kLanes;
  // Work units of one frame and kBlockChannels channels: their output and residual rows are one contiguous block
  // that the unit walks through in kLanes-position steps (a few dozen sequential streams the hardware prefetcher
  // follows), while y is read kBlockChannels channels per position. Each step transposes kLanes positions x kLanes
  // channels in registers and adds them to the residual rows.
  constexpr int64_t kBlockChannels = 64;
  const int64_t channel_blocks = (C + kBlockChannels - 1) / kBlockChannels;
#pragma omp parallel for schedule(static)
  for (int64_t index = 0; index < a.batch * F * channel_blocks; ++index) {
    const int64_t b = index / (F * channel_blocks), f = (index / channel_blocks) % F;
    const int64_t first = (index % channel_blocks) * kBlockChannels, last = std::min(C, first + kBlockChannels);
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t s0 = t * kLanes, count = std::min<int64_t>(kLanes, HW - s0);
      for (int64_t c0 = first; c0 < last; c0 += kLanes) {
        VecF tile[kLanes];
        for (int r = 0; r < kLanes; ++r)
          tile[r] = r < count ? load_chunk<S>(y + ((b * HW + s0 + r) * F + f) * C, c0, last) : VecF{};
        transpose_tile(tile);
        const int64_t channels = std::min<int64_t>(kLanes, last - c0);
        for (int64_t c = 0; c < channels; ++c) {
          const int64_t offset = ((b * F + f) * C + c0 + c) * HW;
          store_chunk<S>(out + offset, s0, HW, tile[c] + load_chunk<S>(residual + offset, s0, HW));
        }
      }
    }
  }
}

}  // namespace

void group_norm_cpu(const GroupNormArgs& args) {
  if (args.groups <= 0 || args.channels % args.groups) throw std::invalid_argument("group_norm: bad group count");
  if (args.affine_scalar_type != kFloat32) throw std::invalid_argument("group_norm: the CPU kernel reads fp32 weight/bias");
  const bool s = args.silu;
  switch (args.scalar_type) {
    case kFloat32: return s ? group_norm_typed<kFloat32, true>(args) : group_norm_typed<kFloat32, false>(args);
    case kFloat16: return s ? group_norm_typed<kFloat16, true>(args) : group_norm_typed<kFloat16, false>(args);
    case kBFloat16: return s ? group_norm_typed<kBFloat16, true>(args) : group_norm_typed<kBFloat16, false>(args);
    default: throw std::invalid_argument("group_norm: unsupported scalar type code");
  }
}

void unpermute_residual_cpu(const UnpermuteResidualArgs& args) {
  switch (args.scalar_type) {
    case kFloat32: return unpermute_residual_typed<kFloat32>(args);
    case kFloat16: return unpermute_residual_typed<kFloat16>(args);
    case kBFloat16: return unpermute_residual_typed<kBFloat16>(args);
    default: throw std::invalid_argument("unpermute_residual: unsupported scalar type code");
  }
}

}  // namespace ALCM_CPU_ISA
}  // namespace animatelcm
