// Branch-free math shared by the CPU loops (vectorised by the compiler) and the CUDA kernels.
#pragma once
#include <cstdint>
#include <cstring>

#if (defined(__AVX512F__) || defined(__AVX__) || defined(__SSE2__)) && !defined(__CUDACC__)
#include <immintrin.h>
#endif

#if defined(__CUDACC__)
#define ALCM_HD_MATH __host__ __device__ __forceinline__
#else
#define ALCM_HD_MATH inline
#endif

namespace animatelcm {
// Internal linkage: every per-ISA build of the CPU kernels keeps its own copy (no cross-ISA ODR merging).
namespace {

ALCM_HD_MATH float bit_cast_float(int32_t bits) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(bits);
#elif defined(__GNUC__) || defined(__clang__)
  return __builtin_bit_cast(float, bits);  // unlike memcpy, keeps loops vectorisable
#else
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
#endif
}

// e^r for |r| <= ln2 / 2 (Cephes polynomial). T is float or a float vector: shared by the scalar and vector
// fast_exp so both do the same arithmetic.
template <typename T>
ALCM_HD_MATH T exp_polynomial(T r) {
  T p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * r * r + r + 1.0f;
}

constexpr float kLog2E = 1.44269504088896341f;
constexpr float kLn2High = 0.693359375f, kLn2Low = -2.12194440e-4f;  // ln 2 in two parts (Cody-Waite)

// exp(x) to ~2 ulp over the float range. Arguments are clamped to [-87, 88] so 2^n stays a normal float; NaN
// propagates (comparisons with NaN are false, so it is not clamped).
// exp(x) = 2^n * e^r with n = round(x / ln 2), |r| <= ln2 / 2.
ALCM_HD_MATH float fast_exp(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float kRound = 12582912.0f;  // 1.5 * 2^23: adding and subtracting rounds to the nearest integer
  const float n = (x * kLog2E + kRound) - kRound;
  const float r = (x - n * kLn2High) - n * kLn2Low;
  return exp_polynomial(r) * bit_cast_float((static_cast<int32_t>(n) + 127) << 23);
}

// |x| (written so that the CUDA kernels compile it as before; the CPU vector overload clears the sign bit).
ALCM_HD_MATH float abs_value(float x) { return x < 0.0f ? -x : x; }

#if !defined(__CUDACC__) && (defined(__GNUC__) || defined(__clang__))
// One native vector of floats (GCC/Clang vector extensions), as wide as the ISA this file is compiled for:
// 16 lanes with AVX-512, 8 with AVX2, 4 otherwise. One source serves every per-ISA build of the CPU kernels.
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX2__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
typedef float VecF __attribute__((vector_size(kLanes * 4)));
typedef int32_t VecI __attribute__((vector_size(kLanes * 4)));

__attribute__((always_inline)) inline VecF splat(float x) { return VecF{} + x; }

// x clamped to [low, high] with a NaN lane left NaN: x86's min/max return their second operand when either is NaN.
__attribute__((always_inline)) inline VecF clamp_keep_nan(VecF x, float low, float high) {
#if defined(__AVX512F__)
  const __m512 lower = _mm512_max_ps(_mm512_set1_ps(low), reinterpret_cast<__m512>(x));
  return reinterpret_cast<VecF>(_mm512_min_ps(_mm512_set1_ps(high), lower));
#elif defined(__AVX__)
  const __m256 lower = _mm256_max_ps(_mm256_set1_ps(low), reinterpret_cast<__m256>(x));
  return reinterpret_cast<VecF>(_mm256_min_ps(_mm256_set1_ps(high), lower));
#elif defined(__SSE2__)
  const __m128 lower = _mm_max_ps(_mm_set1_ps(low), reinterpret_cast<__m128>(x));
  return reinterpret_cast<VecF>(_mm_min_ps(_mm_set1_ps(high), lower));
#else
  x = x < low ? splat(low) : x;
  return x > high ? splat(high) : x;
#endif
}

// fast_exp on a vector: the scalar one's clamps, reduction and polynomial, with two shortcuts that cut SiLU's
// time by a quarter on an AMD EPYC (Zen 4, AVX-512; 0.46 -> 0.37 ns an element in L1, one thread): the clamps are
// one max and one min, and 2^n comes from the bits of the rounding sum itself (for n in [-126, 127] its low nine
// mantissa bits hold n + 127) instead of a float-to-int conversion.
__attribute__((always_inline)) inline VecF fast_exp(VecF x) {
  x = clamp_keep_nan(x, -87.0f, 88.0f);
  const float kRoundBiased = 12582912.0f + 127.0f;  // rounds x / ln 2 to the nearest integer n, plus the bias
  const VecF sum = x * kLog2E + kRoundBiased;
  const VecF n = sum - kRoundBiased;
  const VecF r = (x - n * kLn2High) - n * kLn2Low;
  VecI bits;
  __builtin_memcpy(&bits, &sum, sizeof bits);
  bits <<= 23;
  VecF scale;
  __builtin_memcpy(&scale, &bits, sizeof scale);
  return exp_polynomial(r) * scale;
}

// The sum of a vector's lanes.
__attribute__((always_inline)) inline float horizontal_sum(VecF v) {
  float total = 0.0f;
  for (int lane = 0; lane < kLanes; ++lane) total += v[lane];
  return total;
}

// |x|: the sign bit cleared.
__attribute__((always_inline)) inline VecF abs_value(VecF x) {
  VecI bits;
  __builtin_memcpy(&bits, &x, sizeof bits);
  bits &= 0x7fffffff;
  __builtin_memcpy(&x, &bits, sizeof x);
  return x;
}

// 1 / d for finite, positive, normal d: the ISA's reciprocal estimate (14 bits with AVX-512, 12 below) refined by
// one Newton step to within about 2 ulp of the division it replaces. A vector division costs 5-16 cycles a vector,
// which made SiLU and GELU compute-bound on the CPU.
__attribute__((always_inline)) inline VecF reciprocal(VecF d) {
#if defined(__AVX512F__)
  const VecF r = reinterpret_cast<VecF>(_mm512_rcp14_ps(reinterpret_cast<__m512>(d)));
#elif defined(__AVX__)
  const VecF r = reinterpret_cast<VecF>(_mm256_rcp_ps(reinterpret_cast<__m256>(d)));
#elif defined(__SSE2__)
  const VecF r = reinterpret_cast<VecF>(_mm_rcp_ps(reinterpret_cast<__m128>(d)));
#else
  return 1.0f / d;
#endif
  return r * (2.0f - d * r);
}
#endif

// The scalar (and CUDA) reciprocal: a division.
ALCM_HD_MATH float reciprocal(float d) { return 1.0f / d; }

// The functions below are templates over float and (on the CPU) VecF: one definition serves the scalar loops, the
// CUDA kernels and the explicitly vectorised CPU loops, so they all do the same arithmetic.

// erf(x) to 1.5e-7 absolute (Abramowitz & Stegun 7.1.26), branch-free. |x| is capped at 10 (erf is 1 in float
// from 3.9 on) so the reciprocal's argument stays finite; NaN is not capped (the comparison is false).
template <typename T>
ALCM_HD_MATH T erf_approx(T x) {
  T magnitude = abs_value(x);
  magnitude = magnitude > 10.0f ? T{} + 10.0f : magnitude;
  const T t = reciprocal(1.0f + 0.3275911f * magnitude);
  const T poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
  const T y = 1.0f - poly * fast_exp(-magnitude * magnitude);
  return x < 0.0f ? -y : y;
}

// Exact (erf) GELU, as F.gelu(x) with approximate="none".
template <typename T>
ALCM_HD_MATH T gelu(T x) {
  return 0.5f * x * (1.0f + erf_approx(x * 0.70710678118654752f));
}

// x * sigmoid(x), through e = exp(-|x|) in (0, 1]: no overflow, and no denormal intermediate (a denormal in a
// vectorised division costs a microcode assist per vector; x / (1 + exp(-x)) produced them on the clamped path).
template <typename T>
ALCM_HD_MATH T silu(T x) {
  const T magnitude = abs_value(x);
  const T e = fast_exp(-magnitude);
  return (x < 0.0f ? x * e : x) * reciprocal(1.0f + e);
}

#if !defined(__CUDACC__) && (defined(__GNUC__) || defined(__clang__))

// kLanes consecutive elements of a typed row (S: a Storage<> of scalar_types.h) as one float vector, and back.
template <typename S>
__attribute__((always_inline)) inline VecF load_vector(const typename S::type* p) {
  VecF v;
  if constexpr (sizeof(typename S::type) == sizeof(float)) {
    __builtin_memcpy(&v, p, sizeof v);
  } else {
    for (int l = 0; l < kLanes; ++l) v[l] = S::load(p, l);
  }
  return v;
}

template <typename S>
__attribute__((always_inline)) inline void store_vector(typename S::type* p, VecF v) {
  if constexpr (sizeof(typename S::type) == sizeof(float)) {
    __builtin_memcpy(p, &v, sizeof v);
  } else {
    for (int l = 0; l < kLanes; ++l) S::store(p, l, v[l]);
  }
}

// The first `count` (0 <= count <= kLanes) elements of a typed row as a float vector, the other lanes zero (nothing
// past them is read), and back (nothing past them is written): the tails of rows that are not whole vectors.
template <typename S>
__attribute__((always_inline)) inline VecF load_partial(const typename S::type* p, int64_t count) {
#if defined(__AVX512F__)
  if constexpr (sizeof(typename S::type) == sizeof(float))
    return reinterpret_cast<VecF>(_mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << count) - 1u), p));
#endif
  VecF v = {};
  for (int64_t l = 0; l < count; ++l) v[l] = S::load(p, l);
  return v;
}

template <typename S>
__attribute__((always_inline)) inline void store_partial(typename S::type* p, int64_t count, VecF v) {
#if defined(__AVX512F__)
  if constexpr (sizeof(typename S::type) == sizeof(float)) {
    _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << count) - 1u), reinterpret_cast<__m512>(v));
    return;
  }
#endif
  for (int64_t l = 0; l < count; ++l) S::store(p, l, v[l]);
}

// Elements [first, min(first + kLanes, dim)) of a typed row as a vector (lanes past dim zero, nothing past dim read),
// and back (nothing past dim written).
template <typename S>
__attribute__((always_inline)) inline VecF load_chunk(const typename S::type* row, int64_t first, int64_t dim) {
  return dim - first >= kLanes ? load_vector<S>(row + first) : load_partial<S>(row + first, dim - first);
}

template <typename S>
__attribute__((always_inline)) inline void store_chunk(typename S::type* row, int64_t first, int64_t dim, VecF values) {
  if (dim - first >= kLanes) {
    store_vector<S>(row + first, values);
  } else {
    store_partial<S>(row + first, dim - first, values);
  }
}

// Lanes [0, kLanes / 2) of a and b interleaved (a0 b0 a1 b1 ...), and lanes [kLanes / 2, kLanes) likewise.
#if defined(__clang__) || __GNUC__ >= 12
#define ALCM_SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define ALCM_SHUFFLE(a, b, ...) __builtin_shuffle(a, b, VecI{__VA_ARGS__})
#endif
__attribute__((always_inline)) inline VecF interleave_low(VecF a, VecF b) {
#if defined(__AVX512F__)
  return ALCM_SHUFFLE(a, b, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
#elif defined(__AVX2__)
  return ALCM_SHUFFLE(a, b, 0, 8, 1, 9, 2, 10, 3, 11);
#else
  return ALCM_SHUFFLE(a, b, 0, 4, 1, 5);
#endif
}
__attribute__((always_inline)) inline VecF interleave_high(VecF a, VecF b) {
#if defined(__AVX512F__)
  return ALCM_SHUFFLE(a, b, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
#elif defined(__AVX2__)
  return ALCM_SHUFFLE(a, b, 4, 12, 5, 13, 6, 14, 7, 15);
#else
  return ALCM_SHUFFLE(a, b, 2, 6, 3, 7);
#endif
}
#undef ALCM_SHUFFLE

// In-register transpose of a kLanes x kLanes tile (tile[r][c] -> tile[c][r]): log2(kLanes) rounds, each
// interleaving row i with row i + kLanes / 2 (kLanes two-source shuffles per round).
__attribute__((always_inline)) inline void transpose_tile(VecF (&tile)[kLanes]) {
  for (int round = 1; round < kLanes; round *= 2) {
    VecF next[kLanes];
    for (int i = 0; i < kLanes / 2; ++i) {
      next[2 * i] = interleave_low(tile[i], tile[i + kLanes / 2]);
      next[2 * i + 1] = interleave_high(tile[i], tile[i + kLanes / 2]);
    }
    for (int i = 0; i < kLanes; ++i) tile[i] = next[i];
  }
}
#endif

}  // namespace
}  // namespace animatelcm
