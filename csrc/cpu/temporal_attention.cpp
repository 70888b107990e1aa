// CPU temporal attention: softmax(q k^T * scale) v over short sequences (frames), one (batch0, batch1) sequence per
// OpenMP iteration, written with native-width vectors (VecF, fast_math.h) so each per-ISA build gets full-width code.
//
// Per sequence the scores are computed transposed, S^T [keys][queries]: Q^T is staged as [head_dim][query blocks]
// vectors (queries zero-padded to 16/32/64), transposed in registers a kLanes x kLanes tile at a time, and each key
// row's elements are broadcast against it, kKeys keys at a time so every staged Q^T vector feeds kKeys independent
// FMA chains (enough of them to hide the FMA latency). With the queries across the lanes the softmax over keys is
// element-wise between vectors (max, exp, sum: no horizontal shuffles, no masking: only real keys are visited;
// padded query lanes compute zeros that are never stored). The output rows then accumulate sum_j P[i, j] V[j] in
// registers, kRows query rows per pass, V staged as [frames][head_dim chunks] vectors. The softmax scale multiplies
// the scores, not q. While one sequence computes, the next one's rows are prefetched a pass at a time.
#include <cstring>
#include <stdexcept>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "../fast_math.h"
#include "../scalar_types.h"
#include "cpu_kernels.h"
#include "streaming.h"

namespace animatelcm {
namespace ALCM_CPU_ISA {
namespace {

constexpr int kMaxFrames = 64;
// Score accumulators per pass over head_dim: enough independent FMA chains to cover the FMA latency on two ports,
// and no more than the register file holds next to the staged Q^T vectors (32 registers with AVX-512, 16 below).
constexpr int kScoreAccumulators = kLanes == 16 ? 16 : 8;
constexpr int kRows = 4;        // query rows per pass in the output
constexpr int kChunkBlock = 3;  // output vectors per row accumulated together (kRows x kChunkBlock registers)

VecF* align_to_vector(std::vector<float>& buffer) {
  auto address = reinterpret_cast<std::uintptr_t>(buffer.data());
  address = (address + sizeof(VecF) - 1) / sizeof(VecF) * sizeof(VecF);
  return reinterpret_cast<VecF*>(address);
}

// With a.stream_output (set by the caller when q, k, v and out together exceed the last-level cache) and contiguous
// rows, each sequence's output is computed into a per-thread staging buffer and written with streaming stores: they
// skip the read-for-ownership of every output line, a fifth of the traffic. Measured on 2 Sapphire Rapids cores at
// [1024, 8, 16, 40] fp32 with cold inputs: 14 % less time; with an output that stays in cache for its consumer they
// cost up to 23 %, hence the cache test.
// Prefetch `rows` rows of `row_elements` elements, `row_stride` apart. Each pass over query rows prefetches the same
// rows of the next sequence's q, k and v, so they come in from memory while this one computes, a few lines at a
// time (all at once, the prefetches queued behind the line-fill buffers and stalled instead).
template <typename T>
inline void prefetch_rows(const T* base, int64_t rows, int64_t row_stride, int64_t row_elements) {
  constexpr int64_t kLine = 64 / sizeof(T);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t e = 0; e < row_elements; e += kLine) __builtin_prefetch(base + r * row_stride + e);
}

// Output chunks [c0, c0 + kCount) of kRows query rows: sum_j P[j][r] * V[j] (`probabilities` points at the pass's
// first query in key row 0; key rows are `probability_stride` apart), accumulated in registers. Rows whose `outs`
// entry is null (past the last query) are computed but not stored.
template <typename S, int kCount>
inline void output_block(const VecF* value, int64_t chunks, int64_t c0, int64_t frames, int64_t dim,
                         const float* probabilities, int64_t probability_stride, typename S::type* const* outs) {
  VecF acc[kRows][kCount] = {};
  for (int64_t j = 0; j < frames; ++j) {
    const VecF* vrow = value + j * chunks + c0;
    const float* pj = probabilities + j * probability_stride;
    for (int r = 0; r < kRows; ++r)
      for (int u = 0; u < kCount; ++u) acc[r][u] += pj[r] * vrow[u];
  }
  for (int r = 0; r < kRows; ++r)
    if (outs[r] != nullptr)
      for (int u = 0; u < kCount; ++u) store_chunk<S>(outs[r], (c0 + u) * kLanes, dim, acc[r][u]);
}

template <int kType, int kPaddedFrames>
void attention_padded(const AttentionArgs& a) {
  using S = Storage<kType>;
  using T = typename S::type;
  constexpr int kBlocks = kPaddedFrames / kLanes;
  constexpr int kKeys = kScoreAccumulators / kBlocks > 0 ? kScoreAccumulators / kBlocks : 1;  // key rows per pass
  const int64_t frames = a.frames, dim = a.head_dim, total = a.batch0 * a.batch1;
  const int64_t chunks = (dim + kLanes - 1) / kLanes;
  const auto* q = static_cast<const T*>(a.q);
  const auto* k = static_cast<const T*>(a.k);
  const auto* v = static_cast<const T*>(a.v);
  auto* out = static_cast<T*>(a.out);
  const bool stream_output = a.stream_output && a.out_stride[2] == dim;
#pragma omp parallel
  {
    std::vector<float> query_t_storage((dim * kBlocks + 1) * kLanes);
    std::vector<float> value_storage((frames * chunks + 1) * kLanes), key_storage(kType == kFloat32 ? 0 : frames * dim);
    std::vector<float> scores_storage((kPaddedFrames * kBlocks + 1) * kLanes);
    VecF* query_t = align_to_vector(query_t_storage);
    VecF* value = align_to_vector(value_storage);
    VecF* scores = align_to_vector(scores_storage);  // S^T, then P^T: [key][query blocks]
    std::vector<T> staged_output(stream_output ? frames * dim : 0);  // [frames][dim], streamed to the output
    const int64_t out_row_stride = stream_output ? dim : a.out_stride[2];
#pragma omp for schedule(static) nowait
    for (int64_t index = 0; index < total; ++index) {
      const int64_t b0 = index / a.batch1, b1 = index % a.batch1;
      const T* qb = q + b0 * a.q_stride[0] + b1 * a.q_stride[1];
      const T* kb = k + b0 * a.k_stride[0] + b1 * a.k_stride[1];
      const T* vb = v + b0 * a.v_stride[0] + b1 * a.v_stride[1];
      T* ob = out + b0 * a.out_stride[0] + b1 * a.out_stride[1];
      T* out_rows = stream_output ? staged_output.data() : ob;
      // The next sequence (or this one again at the end: a harmless prefetch of cached lines).
      const int64_t next = index + 1 < total ? index + 1 : index;
      const int64_t n0 = next / a.batch1, n1 = next % a.batch1;
      const T* q_next = q + n0 * a.q_stride[0] + n1 * a.q_stride[1];
      const T* k_next = k + n0 * a.k_stride[0] + n1 * a.k_stride[1];
      const T* v_next = v + n0 * a.v_stride[0] + n1 * a.v_stride[1];

      // Q^T, a kLanes x kLanes tile (queries x head_dim chunk) at a time, transposed in registers.
      for (int b = 0; b < kBlocks; ++b) {
        for (int64_t c = 0; c < chunks; ++c) {
          VecF tile[kLanes];
          for (int r = 0; r < kLanes; ++r) {
            const int64_t i = b * kLanes + r;
            tile[r] = i < frames ? load_chunk<S>(qb + i * a.q_stride[2], c * kLanes, dim) : VecF{};
          }
          transpose_tile(tile);
          const int64_t columns = dim - c * kLanes < kLanes ? dim - c * kLanes : kLanes;
          for (int64_t d = 0; d < columns; ++d) query_t[(c * kLanes + d) * kBlocks + b] = tile[d];
        }
      }
      const float* keys[kMaxFrames];
      for (int64_t j = 0; j < frames; ++j) {
        const T* kj = kb + j * a.k_stride[2];
        if constexpr (kType == kFloat32) {
          keys[j] = kj;
        } else {
          float* staged = key_storage.data() + j * dim;
          for (int64_t d = 0; d < dim; ++d) staged[d] = S::load(kj, d);
          keys[j] = staged;
        }
      }
      for (int64_t j = 0; j < frames; ++j)
        for (int64_t c = 0; c < chunks; ++c) value[j * chunks + c] = load_chunk<S>(vb + j * a.v_stride[2], c * kLanes, dim);

      // S^T, kKeys key rows at a time (a partial last pass repeats its last key and stores it once).
      for (int64_t j0 = 0; j0 < frames; j0 += kKeys) {
        const int64_t pass_keys = frames - j0 < kKeys ? frames - j0 : kKeys;
        const float* key_rows[kKeys];
        for (int r = 0; r < kKeys; ++r) key_rows[r] = keys[j0 + (r < pass_keys ? r : pass_keys - 1)];
        VecF acc[kKeys][kBlocks] = {};
        for (int64_t d = 0; d < dim; ++d) {
          const VecF* qt = query_t + d * kBlocks;
          for (int r = 0; r < kKeys; ++r) {
            const float kd = key_rows[r][d];
            for (int b = 0; b < kBlocks; ++b) acc[r][b] += kd * qt[b];
          }
        }
        for (int r = 0; r < pass_keys; ++r)
          for (int b = 0; b < kBlocks; ++b) scores[(j0 + r) * kBlocks + b] = acc[r][b] * a.scale;
      }
      // Softmax over keys, every query lane at once.
      for (int b = 0; b < kBlocks; ++b) {
        VecF row_max = scores[b];
        for (int64_t j = 1; j < frames; ++j) {
          const VecF s = scores[j * kBlocks + b];
          row_max = s > row_max ? s : row_max;
        }
        VecF sum = {};
        for (int64_t j = 0; j < frames; ++j) {
          const VecF e = fast_exp(scores[j * kBlocks + b] - row_max);
          scores[j * kBlocks + b] = e;
          sum += e;
        }
        const VecF inverse = 1.0f / sum;
        for (int64_t j = 0; j < frames; ++j) scores[j * kBlocks + b] *= inverse;
      }

      const float* probabilities = reinterpret_cast<const float*>(scores);
      for (int64_t i = 0; i < frames; i += kRows) {
        const int64_t pass_rows = frames - i < kRows ? frames - i : kRows;
        prefetch_rows(q_next + i * a.q_stride[2], pass_rows, a.q_stride[2], dim);
        prefetch_rows(k_next + i * a.k_stride[2], pass_rows, a.k_stride[2], dim);
        prefetch_rows(v_next + i * a.v_stride[2], pass_rows, a.v_stride[2], dim);
        T* outs[kRows];
        for (int r = 0; r < kRows; ++r) outs[r] = r < pass_rows ? out_rows + (i + r) * out_row_stride : nullptr;
        int64_t c0 = 0;
        for (; c0 + kChunkBlock <= chunks; c0 += kChunkBlock)
          output_block<S, kChunkBlock>(value, chunks, c0, frames, dim, probabilities + i, kPaddedFrames, outs);
        switch (chunks - c0) {
          case 2: output_block<S, 2>(value, chunks, c0, frames, dim, probabilities + i, kPaddedFrames, outs); break;
          case 1: output_block<S, 1>(value, chunks, c0, frames, dim, probabilities + i, kPaddedFrames, outs); break;
          default: break;
        }
      }
      if (stream_output) stream_copy(ob, out_rows, frames * dim * static_cast<int64_t>(sizeof(T)));
    }
    // This thread's streaming stores reach memory before the region's closing barrier lets anyone read them.
    if (stream_output) store_fence();
  }
}

// Sequences longer than kMaxFrames (spatial self-attention: H*W tokens) take a streaming-softmax path. One OpenMP
// iteration per (sequence, block of kLongQueries queries). Q^T of the block, times the scale, is staged as above
// (queries across the lanes); the keys are visited kLongKeys at a time: S^T of the block as above, then per query
// lane a running max and sum (element-wise between vectors), P^T = exp(S^T - max), and the output rows, kept in a
// float buffer [query][head_dim chunks], are rescaled by exp(old max - new max) and accumulate sum_j P[j][r] V[j].
// V (and K when not float32) are staged once per sequence per thread: the iterations of a thread are consecutive
// query blocks of the same sequences (static schedule). On 2 AMD EPYC Zen 4 cores at [16, 2, 1024, 40] float32 the
// time splits about 15 : 6 : 15 between the scores, the softmax and the output (the scores' FMAs at ~78 % of what
// the output's reach; 128-key blocks and scaling q instead of the scores measured no different).
constexpr int kLongBlocks = 4;                       // query vectors per iteration
constexpr int kLongQueries = kLongBlocks * kLanes;   // 64 queries with AVX-512, 32 with AVX2
constexpr int kLongKeys = 64;                        // keys per score block
constexpr int kLongRows = kLanes == 16 ? 8 : 4;      // query rows per output pass (x kChunkBlock accumulators)

// Output chunks [c0, c0 + kCount) of kLongRows query rows of the streaming path: acc = acc * correction[r] +
// sum_j P[j][r] V[j] over `keys` keys, in place in `accumulators` ([query][chunks] vectors).
template <int kCount>
inline void long_output_block(const VecF* value, int64_t chunks, int64_t c0, int64_t keys, const float* probabilities,
                              const float* correction, VecF* accumulators) {
  VecF acc[kLongRows][kCount];
  for (int r = 0; r < kLongRows; ++r)
    for (int u = 0; u < kCount; ++u) acc[r][u] = accumulators[r * chunks + c0 + u] * correction[r];
  for (int64_t j = 0; j < keys; ++j) {
    const VecF* vrow = value + j * chunks + c0;
    const float* pj = probabilities + j * kLongQueries;
    for (int r = 0; r < kLongRows; ++r)
      for (int u = 0; u < kCount; ++u) acc[r][u] += pj[r] * vrow[u];
  }
  for (int r = 0; r < kLongRows; ++r)
    for (int u = 0; u < kCount; ++u) accumulators[r * chunks + c0 + u] = acc[r][u];
}

template <int kType>
void attention_long(const AttentionArgs& a) {
  using S = Storage<kType>;
  using T = typename S::type;
  constexpr int kBlocks = kLongBlocks;
  constexpr int kKeys = kScoreAccumulators / kBlocks > 0 ? kScoreAccumulators / kBlocks : 1;
  const int64_t frames = a.frames, dim = a.head_dim, sequences = a.batch0 * a.batch1;
  const int64_t chunks = (dim + kLanes - 1) / kLanes;
  const int64_t query_blocks = (frames + kLongQueries - 1) / kLongQueries;
  const auto* q = static_cast<const T*>(a.q);
  const auto* k = static_cast<const T*>(a.k);
  const auto* v = static_cast<const T*>(a.v);
  auto* out = static_cast<T*>(a.out);
#pragma omp parallel
  {
    std::vector<float> query_t_storage((dim * kBlocks + 1) * kLanes);
    std::vector<float> value_storage((frames * chunks + 1) * kLanes), key_storage(kType == kFloat32 ? 0 : frames * dim);
    std::vector<float> scores_storage((kLongKeys * kBlocks + 1) * kLanes);
    std::vector<float> output_storage((kLongQueries * chunks + 1) * kLanes);
    VecF* query_t = align_to_vector(query_t_storage);
    VecF* value = align_to_vector(value_storage);
    VecF* scores = align_to_vector(scores_storage);  // S^T, then P^T: [key][query blocks]
    VecF* accumulators = align_to_vector(output_storage);
    alignas(64) float correction[kLongQueries];
    int64_t staged = -1;
#pragma omp for schedule(static)
    for (int64_t task = 0; task < sequences * query_blocks; ++task) {
      const int64_t index = task / query_blocks, q0 = task % query_blocks * kLongQueries;
      const int64_t queries = frames - q0 < kLongQueries ? frames - q0 : kLongQueries;
      const int64_t b0 = index / a.batch1, b1 = index % a.batch1;
      const T* qb = q + b0 * a.q_stride[0] + b1 * a.q_stride[1] + q0 * a.q_stride[2];
      const T* kb = k + b0 * a.k_stride[0] + b1 * a.k_stride[1];
      const T* vb = v + b0 * a.v_stride[0] + b1 * a.v_stride[1];
      T* ob = out + b0 * a.out_stride[0] + b1 * a.out_stride[1] + q0 * a.out_stride[2];
      if (index != staged) {
        for (int64_t j = 0; j < frames; ++j)
          for (int64_t c = 0; c < chunks; ++c)
            value[j * chunks + c] = load_chunk<S>(vb + j * a.v_stride[2], c * kLanes, dim);
        if constexpr (kType != kFloat32)
          for (int64_t j = 0; j < frames; ++j)
            for (int64_t d = 0; d < dim; ++d) key_storage[j * dim + d] = S::load(kb + j * a.k_stride[2], d);
        staged = index;
      }
      for (int b = 0; b < kBlocks; ++b) {
        for (int64_t c = 0; c < chunks; ++c) {
          VecF tile[kLanes];
          for (int r = 0; r < kLanes; ++r) {
            const int64_t i = b * kLanes + r;
            tile[r] = i < queries ? load_chunk<S>(qb + i * a.q_stride[2], c * kLanes, dim) : VecF{};
          }
          transpose_tile(tile);
          const int64_t columns = dim - c * kLanes < kLanes ? dim - c * kLanes : kLanes;
          for (int64_t d = 0; d < columns; ++d) query_t[(c * kLanes + d) * kBlocks + b] = tile[d] * a.scale;  // scaled q
        }
      }
      VecF running_max[kBlocks], running_sum[kBlocks];
      for (int b = 0; b < kBlocks; ++b) {
        running_max[b] = splat(-__builtin_inff());
        running_sum[b] = VecF{};
      }
      for (int64_t i = 0; i < kLongQueries * chunks; ++i) accumulators[i] = VecF{};

      for (int64_t j_block = 0; j_block < frames; j_block += kLongKeys) {
        const int64_t block_keys = frames - j_block < kLongKeys ? frames - j_block : kLongKeys;
        // S^T of this key block, kKeys key rows at a time (a partial last pass repeats its last key, stored once).
        for (int64_t j0 = 0; j0 < block_keys; j0 += kKeys) {
          const int64_t pass_keys = block_keys - j0 < kKeys ? block_keys - j0 : kKeys;
          const float* key_rows[kKeys];
          for (int r = 0; r < kKeys; ++r) {
            const int64_t j = j_block + j0 + (r < pass_keys ? r : pass_keys - 1);
            if constexpr (kType == kFloat32) {
              key_rows[r] = kb + j * a.k_stride[2];
            } else {
              key_rows[r] = key_storage.data() + j * dim;
            }
          }
          VecF acc[kKeys][kBlocks] = {};
          for (int64_t d = 0; d < dim; ++d) {
            const VecF* qt = query_t + d * kBlocks;
            for (int r = 0; r < kKeys; ++r) {
              const float kd = key_rows[r][d];
              for (int b = 0; b < kBlocks; ++b) acc[r][b] += kd * qt[b];
            }
          }
          for (int r = 0; r < pass_keys; ++r)
            for (int b = 0; b < kBlocks; ++b) scores[(j0 + r) * kBlocks + b] = acc[r][b];
        }
        // Streaming softmax, every query lane at once.
        for (int b = 0; b < kBlocks; ++b) {
          VecF block_max = running_max[b];
          for (int64_t j = 0; j < block_keys; ++j) {
            const VecF s = scores[j * kBlocks + b];
            block_max = s > block_max ? s : block_max;
          }
          const VecF rescale = fast_exp(running_max[b] - block_max);
          running_max[b] = block_max;
          VecF sum = running_sum[b] * rescale;
          for (int64_t j = 0; j < block_keys; ++j) {
            const VecF e = fast_exp(scores[j * kBlocks + b] - block_max);
            scores[j * kBlocks + b] = e;
            sum += e;
          }
          running_sum[b] = sum;
          __builtin_memcpy(correction + b * kLanes, &rescale, sizeof rescale);
        }
        const float* probabilities = reinterpret_cast<const float*>(scores);
        const VecF* value_block = value + j_block * chunks;
        for (int64_t i = 0; i < queries; i += kLongRows) {
          VecF* rows = accumulators + i * chunks;
          int64_t c0 = 0;
          for (; c0 + kChunkBlock <= chunks; c0 += kChunkBlock)
            long_output_block<kChunkBlock>(value_block, chunks, c0, block_keys, probabilities + i, correction + i, rows);
          switch (chunks - c0) {
            case 2: long_output_block<2>(value_block, chunks, c0, block_keys, probabilities + i, correction + i, rows); break;
            case 1: long_output_block<1>(value_block, chunks, c0, block_keys, probabilities + i, correction + i, rows); break;
            default: break;
          }
        }
      }
      for (int b = 0; b < kBlocks; ++b) {
        const VecF inverse = 1.0f / running_sum[b];
        __builtin_memcpy(correction + b * kLanes, &inverse, sizeof inverse);
      }
      for (int64_t i = 0; i < queries; ++i)
        for (int64_t c = 0; c < chunks; ++c)
          store_chunk<S>(ob + i * a.out_stride[2], c * kLanes, dim, accumulators[i * chunks + c] * correction[i]);
    }
  }
}

template <int kType>
void attention_typed(const AttentionArgs& a) {
  static_assert(kMaxFrames % 16 == 0 && 16 % kLanes == 0, "frame paddings must be whole vectors");
  static_assert(kLongQueries % kLongRows == 0, "output passes must tile the query block");
  if (a.frames <= 16) return attention_padded<kType, 16>(a);
  if (a.frames <= 32) return attention_padded<kType, 32>(a);
  if (a.frames <= kMaxFrames) return attention_padded<kType, kMaxFrames>(a);
  return attention_long<kType>(a);
}

}  // namespace

void temporal_attention_cpu(const AttentionArgs& args) {
  switch (args.scalar_type) {
    case kFloat32: return attention_typed<kFloat32>(args);
    case kFloat16: return attention_typed<kFloat16>(args);
    case kBFloat16: return attention_typed<kBFloat16>(args);
    default: throw std::invalid_argument("temporal_attention: unsupported scalar type code");
  }
}

}  // namespace ALCM_CPU_ISA
}  // namespace animatelcm
