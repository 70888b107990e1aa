// CPU consistency step: one pass over memory, OpenMP across chunks, fp32 math for every storage type.
#include "cpu_kernels.h"

#include <stdexcept>

#include "../consistency_step.h"
#include "../scalar_types.h"

namespace animatelcm {
namespace ALCM_CPU_ISA {
namespace {

template <int kType>
void consistency_step_typed(const ConsistencyStepArgs& a) {
  using S = Storage<kType>;
  using T = typename S::type;
  const auto* model_output = static_cast<const T*>(a.model_output);
  const auto* sample = static_cast<const T*>(a.sample);
  const auto* noise = static_cast<const T*>(a.noise);
  auto* prev = static_cast<T*>(a.prev_sample);
  auto* denoised = static_cast<T*>(a.denoised);
  const auto& c = *static_cast<const StepCoefficients*>(a.coefficients);
  const bool has_noise = noise != nullptr;
#pragma omp parallel for schedule(static) if (a.numel > (1 << 16))
  for (int64_t i = 0; i < a.numel; ++i) {
    float p, d;
    consistency_update(S::load(model_output, i), S::load(sample, i), has_noise ? S::load(noise, i) : 0.f, has_noise,
                       c, a.prediction_type, a.clip, a.clip_range, &p, &d);
    S::store(prev, i, p);
    S::store(denoised, i, d);
  }
}

}  // namespace

void consistency_step_cpu(const ConsistencyStepArgs& args) {
  switch (args.scalar_type) {
    case kFloat32: return consistency_step_typed<kFloat32>(args);
    case kFloat16: return consistency_step_typed<kFloat16>(args);
    case kBFloat16: return consistency_step_typed<kBFloat16>(args);
    default: throw std::invalid_argument("consistency_step: unsupported scalar type code");
  }
}

}  // namespace ALCM_CPU_ISA
}  // namespace animatelcm
