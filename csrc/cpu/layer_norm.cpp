// CPU LayerNorm over the rows of x [rows, cols] (contiguous), with the residual add before it and an addend after
// it: sum = x + residual (rounded to the storage type, as PyTorch's add writes it), out = layer_norm(sum) * weight +
// bias (+ addend[row % addend_rows], added to the normed row rounded to the storage type, as PyTorch's op sequence
// does). One row at a time per thread: its fp32 values in a buffer that stays in L1 for the statistics (mean, then
// the centred variance) and the output, so memory is read once and written once.
#include <cmath>
#include <stdexcept>
#include <vector>

#include "../fast_math.h"
#include "../scalar_types.h"
#include "cpu_kernels.h"

namespace animatelcm {
namespace ALCM_CPU_ISA {
namespace {

template <int kType>
void layer_norm_typed(const LayerNormArgs& a) {
  using S = Storage<kType>;
  using T = typename S::type;
  const auto* x = static_cast<const T*>(a.x);
  const auto* residual = static_cast<const T*>(a.residual);
  auto* sum = static_cast<T*>(a.sum);
  auto* out = static_cast<T*>(a.out);
  const auto* addend = static_cast<const T*>(a.addend);
  const int64_t cols = a.cols;
  const int64_t vector_end = cols - cols % kLanes;
#pragma omp parallel if (a.rows * cols > (1 << 15))
  {
    std::vector<float> buffer(cols);
    float* v = buffer.data();
#pragma omp for schedule(static)
    for (int64_t r = 0; r < a.rows; ++r) {
      const int64_t offset = r * cols;
      VecF totals = splat(0.0f);
      float tail_total = 0.0f;
      for (int64_t i = 0; i < cols; i += kLanes) {
        VecF values = load_chunk<S>(x + offset, i, cols);
        if (residual != nullptr) {
          values += load_chunk<S>(residual + offset, i, cols);
          store_chunk<S>(sum + offset, i, cols, values);
          values = load_chunk<S>(sum + offset, i, cols);  // rounded to the storage type
        }
        if (i < vector_end) {
          __builtin_memcpy(v + i, &values, sizeof values);
          totals += values;
        } else {
          for (int64_t l = 0; i + l < cols; ++l) {
            v[i + l] = values[l];
            tail_total += values[l];
          }
        }
      }
      const float mean = (horizontal_sum(totals) + tail_total) / static_cast<float>(cols);
      VecF squares = splat(0.0f);
      int64_t i = 0;
      for (; i < vector_end; i += kLanes) {
        VecF centred;
        __builtin_memcpy(&centred, v + i, sizeof centred);
        centred -= mean;
        squares += centred * centred;
      }
      float square_total = horizontal_sum(squares);
      for (; i < cols; ++i) square_total += (v[i] - mean) * (v[i] - mean);
      const float rstd = 1.0f / std::sqrt(square_total / static_cast<float>(cols) + a.eps);
      for (i = 0; i < cols; ++i) {
        float y = (v[i] - mean) * rstd;
        if (a.weight != nullptr) y *= a.weight[i];
        if (a.bias != nullptr) y += a.bias[i];
        v[i] = y;
      }
      for (i = 0; i < cols; i += kLanes) {
        VecF values = load_chunk<Storage<kFloat32>>(v, i, cols);
        if (addend != nullptr) {
          store_chunk<S>(out + offset, i, cols, values);
          values = load_chunk<S>(out + offset, i, cols) + load_chunk<S>(addend + (r % a.addend_rows) * cols, i, cols);
        }
        store_chunk<S>(out + offset, i, cols, values);
      }
    }
  }
}

}  // namespace

void layer_norm_cpu(const LayerNormArgs& args) {
  switch (args.scalar_type) {
    case kFloat32: return layer_norm_typed<kFloat32>(args);
    case kFloat16: return layer_norm_typed<kFloat16>(args);
    case kBFloat16: return layer_norm_typed<kBFloat16>(args);
    default: throw std::invalid_argument("layer_norm: unsupported scalar type code");
  }
}

}  // namespace ALCM_CPU_ISA
}  // namespace animatelcm
