// Branch-free math shared by the CPU loops (vectorised by the compiler) and the CUDA kernels.
#pragma once
#include <cstdint>
#include <cstring>

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

// exp(x) = 2^n * e^r with n = round(x / ln 2), |r| <= ln2 / 2 (Cephes polynomial). T is float or a float vector;
// returns e^r and sets n (as T). Shared by the scalar and vector fast_exp so both do the same arithmetic.
template <typename T>
ALCM_HD_MATH T exp_reduced(T x, T* n) {
  const float kRound = 12582912.0f;  // 1.5 * 2^23: adding and subtracting rounds to the nearest integer
  *n = (x * 1.44269504088896341f + kRound) - kRound;
  const T r = (x - *n * 0.693359375f) - *n * -2.12194440e-4f;
  T p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * r * r + r + 1.0f;
}

// exp(x) to ~2 ulp over the float range. Arguments are clamped to [-87, 88] so 2^n stays a normal float; NaN
// propagates (comparisons with NaN are false, so it is not clamped).
ALCM_HD_MATH float fast_exp(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  float n;
  const float p = exp_reduced(x, &n);
  return p * bit_cast_float((static_cast<int32_t>(n) + 127) << 23);
}

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

// fast_exp on a vector: the same clamps and exp_reduced arithmetic (NaN lanes stay NaN).
__attribute__((always_inline)) inline VecF fast_exp(VecF x) {
  x = x < -87.0f ? splat(-87.0f) : x;
  x = x > 88.0f ? splat(88.0f) : x;
  VecF n;
  const VecF p = exp_reduced(x, &n);
  const VecI bits = (__builtin_convertvector(n, VecI) + 127) << 23;
  VecF scale;
  __builtin_memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}
#endif

// The functions below are templates over float and (on the CPU) VecF: one definition serves the scalar loops, the
// CUDA kernels and the explicitly vectorised CPU loops, so they all do the same arithmetic.

// erf(x) to 1.5e-7 absolute (Abramowitz & Stegun 7.1.26), branch-free.
template <typename T>
ALCM_HD_MATH T erf_approx(T x) {
  const T magnitude = x < 0.0f ? -x : x;
  const T t = 1.0f / (1.0f + 0.3275911f * magnitude);
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
  const T magnitude = x < 0.0f ? -x : x;
  const T e = fast_exp(-magnitude);
  return (x < 0.0f ? x * e : x) / (1.0f + e);
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
#endif

}  // namespace
}  // namespace animatelcm
