// CPU GEGLU: out[m, i] = h * gelu(g), h = x[m, i] (+ bias[i]), g = x[m, inner + i] (+ bias[inner + i]) for
// x [rows, 2 * inner] (contiguous), one pass over memory
// (diffusers materialises gelu(gate) and then the product), whole vectors then a scalar tail per row.
#include <stdexcept>

#include "../fast_math.h"
#include "../scalar_types.h"
#include "cpu_kernels.h"

namespace animatelcm {
namespace ALCM_CPU_ISA {
namespace {

template <int kType>
void geglu_typed(const GegluArgs& a) {
  using S = Storage<kType>;
  using T = typename S::type;
  const auto* x = static_cast<const T*>(a.x);
  auto* out = static_cast<T*>(a.out);
  const float* bias = a.bias;
  const int64_t inner = a.inner;
#pragma omp parallel for schedule(static) if (a.rows * inner > (1 << 15))
  for (int64_t m = 0; m < a.rows; ++m) {
    const T* row = x + m * 2 * inner;
    T* o = out + m * inner;
    int64_t i = 0;
    for (; i + kLanes <= inner; i += kLanes) {
      VecF hidden = load_vector<S>(row + i), gate = load_vector<S>(row + inner + i);
      if (bias != nullptr) {
        hidden += load_vector<Storage<kFloat32>>(bias + i);
        gate += load_vector<Storage<kFloat32>>(bias + inner + i);
      }
      store_vector<S>(o + i, hidden * gelu(gate));
    }
    for (; i < inner; ++i) {
      const float hidden = S::load(row, i) + (bias != nullptr ? bias[i] : 0.0f);
      const float gate = S::load(row, inner + i) + (bias != nullptr ? bias[inner + i] : 0.0f);
      S::store(o, i, hidden * gelu(gate));
    }
  }
}

}  // namespace

void geglu_cpu(const GegluArgs& args) {
  switch (args.scalar_type) {
    case kFloat32: return geglu_typed<kFloat32>(args);
    case kFloat16: return geglu_typed<kFloat16>(args);
    case kBFloat16: return geglu_typed<kBFloat16>(args);
    default: throw std::invalid_argument("geglu: unsupported scalar type code");
  }
}

}  // namespace ALCM_CPU_ISA
}  // namespace animatelcm
