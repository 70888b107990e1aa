// Runtime choice among the per-ISA builds of the CPU kernels (PyTorch's CPU_CAPABILITY idea): the best one the
// CPU supports, optionally lowered with ANIMATELCM_CPU_ISA=baseline|avx2|avx512 (for tests and comparisons).
#include <cstdlib>
#include <cstring>

#include "cpu_kernels.h"

namespace animatelcm {
namespace {

enum Isa { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };
const char* const kIsaNames[] = {"baseline", "avx2", "avx512"};

Isa best_supported() {
#if ALCM_HAVE_X86_ISAS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma"))
    return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
#endif
  return kBaseline;
}

Isa current() {
  static const Isa best = best_supported();
  const char* requested = std::getenv("ANIMATELCM_CPU_ISA");
  if (requested == nullptr || *requested == '\0') return best;
  for (int isa = kBaseline; isa <= kAvx512; ++isa)
    if (std::strcmp(requested, kIsaNames[isa]) == 0) return isa < best ? static_cast<Isa>(isa) : best;
  return best;
}

}  // namespace

const char* cpu_isa() { return kIsaNames[current()]; }

const char* compiled_cpu_isas() {
#if ALCM_HAVE_X86_ISAS
  return "baseline,avx2,avx512";
#else
  return "baseline";
#endif
}

#if ALCM_HAVE_X86_ISAS
#define ALCM_DISPATCH(function, Args)             \
  void function(const Args& args) {               \
    switch (current()) {                          \
      case kAvx512: return avx512::function(args); \
      case kAvx2: return avx2::function(args);     \
      default: return baseline::function(args);    \
    }                                             \
  }
#else
#define ALCM_DISPATCH(function, Args) \
  void function(const Args& args) { baseline::function(args); }
#endif

ALCM_DISPATCH(consistency_step_cpu, ConsistencyStepArgs)
ALCM_DISPATCH(temporal_attention_cpu, AttentionArgs)
ALCM_DISPATCH(group_norm_cpu, GroupNormArgs)
ALCM_DISPATCH(unpermute_residual_cpu, UnpermuteResidualArgs)
ALCM_DISPATCH(geglu_cpu, GegluArgs)
ALCM_DISPATCH(layer_norm_cpu, LayerNormArgs)

}  // namespace animatelcm
