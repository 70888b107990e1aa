// Entry points of the CPU kernels, called by the pybind11 module with raw pointers validated in Python.
#pragma once
#include <cstdint>

namespace animatelcm {

// Pointers to contiguous storage of `numel` elements of `scalar_type` (see scalar_types.h); `noise` may be null
// (final step); `coefficients` points to one StepCoefficients row (fp32) on the tensors' device.
struct ConsistencyStepArgs {
  void* prev_sample;
  void* denoised;
  const void* model_output;
  const void* sample;
  const void* noise;
  const void* coefficients;
  int64_t numel;
  int scalar_type;
  int prediction_type;
  bool clip;
  float clip_range;
};

}  // namespace animatelcm

namespace animatelcm {

// softmax(q k^T * scale) v for batch0 x batch1 sequences of `frames` rows of `head_dim` (stride 1) elements;
// strides (in elements) of (batch0, batch1, frame) for each tensor. stream_output: write the output with streaming
// (non-temporal) stores where its rows are contiguous; the caller sets it when the output would not stay in cache.
struct AttentionArgs {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  int64_t batch0, batch1, frames, head_dim;
  int64_t q_stride[3], k_stride[3], v_stride[3], out_stride[3];
  float scale;
  int scalar_type;
  bool stream_output;
};

// GroupNorm over x [batch*frames, channels, spatial] (contiguous); statistics per (batch, group) span the frames.
// weight/bias: [channels] or null, of scalar type affine_scalar_type (the CPU kernels take fp32 only; the CUDA ones
// also fp16/bf16). permute_output writes y as [batch, spatial, frames, channels].
// channels_last: x and y are [batch, spatial, channels] in memory instead (frames 1, no permute_output): a
// channels-last [N, C, H, W] tensor. stream_output (set by the caller when x and y together exceed the last-level
// cache; [N, C, S] layout without permute_output only): write y with streaming stores.
struct GroupNormArgs {
  const void* x;
  void* y;
  const void* weight;
  const void* bias;
  int64_t batch, frames, channels, spatial, groups;
  float eps;
  bool silu;
  bool permute_output;
  int scalar_type;
  int affine_scalar_type = 0;  // float32 (scalar_types.h's codes)
  bool channels_last = false;
  bool stream_output = false;
  bool resident_groups = true;  // CUDA: a group that fits in shared memory is read once (group_norm.cu)
  int cluster_packs = 0;  // CUDA, sm_90: 16-byte packs a thread of a block cluster holding the group (0: no cluster)
};

// out [batch*frames, channels, spatial] = permute(y [batch*spatial, frames, channels]) + residual (same as out).
struct UnpermuteResidualArgs {
  const void* y;
  const void* residual;
  void* out;
  int64_t batch, frames, channels, spatial;
  int scalar_type;
};

// out [rows, inner] = h * gelu(g) with [h, g] = x[:, :inner], x[:, inner:] (+ bias [2 * inner] fp32 when given) for
// x [rows, 2 * inner], both contiguous. The bias lets a projection run as a plain matrix product (no bias copy).
struct GegluArgs {
  const void* x;
  const float* bias;
  void* out;
  int64_t rows, inner;
  int scalar_type;
};

// LayerNorm over the rows of x [rows, cols] (contiguous): sum = x + residual when residual is given (then written to
// sum; both null otherwise), out = layer_norm(sum or x) * weight + bias (fp32 [cols] or null) + addend[row %
// addend_rows] (rows of cols elements of scalar_type, or null).
struct LayerNormArgs {
  const void* x;
  const void* residual;
  void* sum;
  void* out;
  const float* weight;
  const float* bias;
  const void* addend;
  int64_t rows, cols, addend_rows;
  float eps;
  int scalar_type;
};

// Each CPU kernel source is compiled once per instruction set (CMakeLists.txt) into its own namespace; the
// functions directly in `animatelcm` dispatch to the best one this CPU supports (csrc/cpu/dispatch.cpp).
#define ALCM_CPU_KERNEL_DECLARATIONS                          \
  void consistency_step_cpu(const ConsistencyStepArgs& args); \
  void temporal_attention_cpu(const AttentionArgs& args);     \
  void group_norm_cpu(const GroupNormArgs& args);             \
  void unpermute_residual_cpu(const UnpermuteResidualArgs& args); \
  void geglu_cpu(const GegluArgs& args);                      \
  void layer_norm_cpu(const LayerNormArgs& args);

ALCM_CPU_KERNEL_DECLARATIONS
namespace baseline { ALCM_CPU_KERNEL_DECLARATIONS }
namespace avx2 { ALCM_CPU_KERNEL_DECLARATIONS }
namespace avx512 { ALCM_CPU_KERNEL_DECLARATIONS }

// Instruction set the dispatching entry points use now: "avx512", "avx2" or "baseline" (the best compiled in and
// supported by this CPU, lowered by ANIMATELCM_CPU_ISA when set), and the list compiled in.
const char* cpu_isa();
const char* compiled_cpu_isas();

}  // namespace animatelcm
