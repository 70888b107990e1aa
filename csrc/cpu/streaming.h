// Streaming (non-temporal) stores for the CPU kernels: an output that will not stay in cache for its consumer is
// written without the read-for-ownership of every line. Included inside each per-ISA build (ALCM_CPU_ISA).
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace animatelcm {
namespace ALCM_CPU_ISA {
namespace {

// dst[0, bytes) <- src[0, bytes): aligned streaming stores of the widest native vectors for the whole lines, plain
// copies for the unaligned head and the tail. The caller issues the store fence before the data is read elsewhere.
inline void stream_copy(void* dst, const void* src, int64_t bytes) {
#if defined(__AVX512F__)
  constexpr int64_t kWidth = 64;
#elif defined(__AVX2__)
  constexpr int64_t kWidth = 32;
#elif defined(__SSE2__)
  constexpr int64_t kWidth = 16;
#else
  constexpr int64_t kWidth = 0;
#endif
  auto* d = static_cast<char*>(dst);
  const auto* s = static_cast<const char*>(src);
  if constexpr (kWidth > 0) {
    int64_t head = static_cast<int64_t>((kWidth - reinterpret_cast<std::uintptr_t>(d) % kWidth) % kWidth);
    head = head < bytes ? head : bytes;
    std::memcpy(d, s, head);
    d += head, s += head, bytes -= head;
    for (; bytes >= kWidth; d += kWidth, s += kWidth, bytes -= kWidth) {
#if defined(__AVX512F__)
      _mm512_stream_si512(reinterpret_cast<__m512i*>(d), _mm512_loadu_si512(s));
#elif defined(__AVX2__)
      _mm256_stream_si256(reinterpret_cast<__m256i*>(d), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)));
#elif defined(__SSE2__)
      _mm_stream_si128(reinterpret_cast<__m128i*>(d), _mm_loadu_si128(reinterpret_cast<const __m128i*>(s)));
#endif
    }
  }
  std::memcpy(d, s, bytes);
}

// One float vector to an aligned address with a streaming store.
inline void stream_vector(float* dst, VecF v) {
#if defined(__AVX512F__)
  _mm512_stream_ps(dst, reinterpret_cast<__m512>(v));
#elif defined(__AVX__)
  _mm256_stream_ps(dst, reinterpret_cast<__m256>(v));
#elif defined(__SSE2__)
  _mm_stream_ps(dst, reinterpret_cast<__m128>(v));
#else
  std::memcpy(dst, &v, sizeof v);
#endif
}

inline void store_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

}  // namespace
}  // namespace ALCM_CPU_ISA
}  // namespace animatelcm
