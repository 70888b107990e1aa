// Host-side 16-bit float conversions (no torch headers): round-to-nearest-even, NaN/inf preserved.
#pragma once
#include <cstdint>
#include <cstring>

namespace animatelcm {
// Internal linkage: every per-ISA build of the CPU kernels keeps its own copy (no cross-ISA ODR merging).
namespace {

// Scalar type codes passed from Python (animatelcm/ops/native.py keeps the same table).
enum ScalarType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
}

inline float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

inline uint16_t float_to_bf16(float f) {
  const uint32_t bits = float_to_bits(f);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);  // quiet NaN
  const uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

inline float fp16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1fu) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));
  if (exponent == 0) {
    if (mantissa == 0) return bits_to_float(sign);
    // subnormal: normalise
    exponent = 1;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --exponent;
    }
    mantissa &= 0x3ffu;
  }
  return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

inline uint16_t float_to_fp16(float f) {
  const uint32_t bits = float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t abs_bits = bits & 0x7fffffffu;
  if (abs_bits > 0x7f800000u) return sign | 0x7e00u;       // NaN
  if (abs_bits >= 0x477ff000u) return sign | 0x7c00u;      // overflow (incl. inf) after rounding
  if (abs_bits < 0x38800000u) {                            // result is subnormal or zero
    if (abs_bits < 0x33000000u) return sign;               // below half the smallest subnormal
    const uint32_t exponent = abs_bits >> 23;
    const uint32_t mantissa = (abs_bits & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - exponent;                // 14..24
    uint32_t half_mantissa = mantissa >> shift;
    const uint32_t remainder = mantissa & ((1u << shift) - 1u);
    const uint32_t halfway = 1u << (shift - 1u);
    if (remainder > halfway || (remainder == halfway && (half_mantissa & 1u))) ++half_mantissa;
    return sign | static_cast<uint16_t>(half_mantissa);
  }
  uint32_t rounded = abs_bits + 0xfffu + ((abs_bits >> 13) & 1u);
  return sign | static_cast<uint16_t>(((rounded - 0x38000000u) >> 13) & 0x7fffu);
}

// Typed load/store over raw storage, so one kernel template serves fp32/fp16/bf16.
template <int kType> struct Storage;
template <> struct Storage<kFloat32> {
  using type = float;
  static float load(const type* p, int64_t i) { return p[i]; }
  static void store(type* p, int64_t i, float v) { p[i] = v; }
};
template <> struct Storage<kFloat16> {
  using type = uint16_t;
#if defined(__FLT16_MAX__) && (defined(__GNUC__) || defined(__clang__))
  // The compiler's binary16 type: hardware conversions (vectorisable) where the target has them.
  static float load(const type* p, int64_t i) { return static_cast<float>(__builtin_bit_cast(_Float16, p[i])); }
  static void store(type* p, int64_t i, float v) { p[i] = __builtin_bit_cast(uint16_t, static_cast<_Float16>(v)); }
#else
  static float load(const type* p, int64_t i) { return fp16_to_float(p[i]); }
  static void store(type* p, int64_t i, float v) { p[i] = float_to_fp16(v); }
#endif
};
template <> struct Storage<kBFloat16> {
  using type = uint16_t;
  static float load(const type* p, int64_t i) { return bf16_to_float(p[i]); }
  static void store(type* p, int64_t i, float v) { p[i] = float_to_bf16(v); }
};

}  // namespace
}  // namespace animatelcm
