// pybind11 module animatelcm._C: raw pointers, sizes and type codes in; no torch headers, so the extension builds
// with pybind11 + CMake alone and one wheel serves every torch release. Python (animatelcm/ops/native.py)
// validates shapes, dtypes, devices and contiguity before calling in.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>

#include "consistency_step.h"
#include "cpu/cpu_kernels.h"
#if ANIMATELCM_WITH_CUDA
#include "cuda/cuda_kernels.h"
#endif

namespace py = pybind11;
using namespace animatelcm;

namespace {

ConsistencyStepArgs make_step_args(std::uintptr_t prev, std::uintptr_t denoised, std::uintptr_t model_output,
                                   std::uintptr_t sample, std::uintptr_t noise, std::uintptr_t coefficients,
                                   int64_t numel, int scalar_type, int prediction_type, bool clip, float clip_range) {
  return ConsistencyStepArgs{reinterpret_cast<void*>(prev),         reinterpret_cast<void*>(denoised),
                             reinterpret_cast<const void*>(model_output), reinterpret_cast<const void*>(sample),
                             reinterpret_cast<const void*>(noise),   reinterpret_cast<const void*>(coefficients),
                             numel, scalar_type, prediction_type, clip, clip_range};
}

using Strides = std::array<int64_t, 3>;

AttentionArgs make_attention_args(std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t out,
                                  int64_t batch0, int64_t batch1, int64_t frames, int64_t head_dim,
                                  const Strides& q_stride, const Strides& k_stride, const Strides& v_stride,
                                  const Strides& out_stride, float scale, int scalar_type, bool stream_output) {
  AttentionArgs a{reinterpret_cast<const void*>(q), reinterpret_cast<const void*>(k), reinterpret_cast<const void*>(v),
                  reinterpret_cast<void*>(out), batch0, batch1, frames, head_dim, {}, {}, {}, {}, scale, scalar_type,
                  stream_output};
  for (int i = 0; i < 3; ++i) {
    a.q_stride[i] = q_stride[i];
    a.k_stride[i] = k_stride[i];
    a.v_stride[i] = v_stride[i];
    a.out_stride[i] = out_stride[i];
  }
  return a;
}

GroupNormArgs make_group_norm_args(std::uintptr_t x, std::uintptr_t y, std::uintptr_t weight, std::uintptr_t bias,
                                   int64_t batch, int64_t frames, int64_t channels, int64_t spatial, int64_t groups,
                                   float eps, bool silu, bool permute_output, int scalar_type) {
  return GroupNormArgs{reinterpret_cast<const void*>(x), reinterpret_cast<void*>(y),
                       reinterpret_cast<const void*>(weight), reinterpret_cast<const void*>(bias),
                       batch, frames, channels, spatial, groups, eps, silu, permute_output, scalar_type};
}

// As make_group_norm_args, for the CPU kernel: plus stream_output.
GroupNormArgs make_cpu_group_norm_args(std::uintptr_t x, std::uintptr_t y, std::uintptr_t weight, std::uintptr_t bias,
                                       int64_t batch, int64_t frames, int64_t channels, int64_t spatial, int64_t groups,
                                       float eps, bool silu, bool permute_output, int scalar_type, bool stream_output) {
  GroupNormArgs args = make_group_norm_args(x, y, weight, bias, batch, frames, channels, spatial, groups, eps, silu,
                                            permute_output, scalar_type);
  args.stream_output = stream_output;
  return args;
}

// As make_group_norm_args for a channels-last x, y [batch, spatial, channels] (frames 1, no permuted output).
GroupNormArgs make_channels_last_group_norm_args(std::uintptr_t x, std::uintptr_t y, std::uintptr_t weight,
                                                 std::uintptr_t bias, int64_t batch, int64_t channels, int64_t spatial,
                                                 int64_t groups, float eps, bool silu, int scalar_type) {
  GroupNormArgs args = make_group_norm_args(x, y, weight, bias, batch, 1, channels, spatial, groups, eps, silu, false,
                                            scalar_type);
  args.channels_last = true;
  return args;
}

UnpermuteResidualArgs make_unpermute_args(std::uintptr_t y, std::uintptr_t residual, std::uintptr_t out,
                                          int64_t batch, int64_t frames, int64_t channels, int64_t spatial,
                                          int scalar_type) {
  return UnpermuteResidualArgs{reinterpret_cast<const void*>(y), reinterpret_cast<const void*>(residual),
                               reinterpret_cast<void*>(out), batch, frames, channels, spatial, scalar_type};
}

GegluArgs make_geglu_args(std::uintptr_t x, std::uintptr_t bias, std::uintptr_t out, int64_t rows, int64_t inner,
                          int scalar_type) {
  return GegluArgs{reinterpret_cast<const void*>(x), reinterpret_cast<const float*>(bias), reinterpret_cast<void*>(out),
                   rows, inner, scalar_type};
}

LayerNormArgs make_layer_norm_args(std::uintptr_t x, std::uintptr_t residual, std::uintptr_t sum, std::uintptr_t out,
                                   std::uintptr_t weight, std::uintptr_t bias, std::uintptr_t addend, int64_t rows,
                                   int64_t cols, int64_t addend_rows, float eps, int scalar_type) {
  return LayerNormArgs{reinterpret_cast<const void*>(x), reinterpret_cast<const void*>(residual),
                       reinterpret_cast<void*>(sum), reinterpret_cast<void*>(out),
                       reinterpret_cast<const float*>(weight), reinterpret_cast<const float*>(bias),
                       reinterpret_cast<const void*>(addend), rows, cols, addend_rows, eps, scalar_type};
}

// Binds `kernel(make_args(args...))` with the GIL released while it runs.
template <typename Args, typename... Params>
auto released(void (*kernel)(const Args&), Args (*make)(Params...)) {
  return [kernel, make](Params... params) {
    const Args args = make(params...);
    py::gil_scoped_release release;
    kernel(args);
  };
}

py::dict build_info() {
  py::dict info;
  info["version"] = ANIMATELCM_VERSION;
  info["compiler"] = ANIMATELCM_COMPILER;
  info["openmp"] = static_cast<bool>(ANIMATELCM_WITH_OPENMP);
  info["cuda"] = static_cast<bool>(ANIMATELCM_WITH_CUDA);
  info["cuda_version"] = ANIMATELCM_CUDA_VERSION;
  info["cuda_archs"] = ANIMATELCM_CUDA_ARCHS;
  info["step_coefficients"] = kNumStepCoefficients;
  info["cpu_isas"] = compiled_cpu_isas();
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "animatelcm native kernels (C++ CPU and, when built with CUDA, CUDA)";
  m.def("cpu_isa", &cpu_isa, "Instruction set the CPU kernels use now (ANIMATELCM_CPU_ISA can lower it).");
  m.def("build_info", &build_info, "How this module was built: version, compiler, OpenMP, CUDA version and archs.");
  m.def(
      "consistency_step_cpu",
      [](std::uintptr_t prev, std::uintptr_t denoised, std::uintptr_t model_output, std::uintptr_t sample,
         std::uintptr_t noise, std::uintptr_t coefficients, int64_t numel, int scalar_type, int prediction_type,
         bool clip, float clip_range) {
        const auto args = make_step_args(prev, denoised, model_output, sample, noise, coefficients, numel,
                                         scalar_type, prediction_type, clip, clip_range);
        py::gil_scoped_release release;
        consistency_step_cpu(args);
      },
      "Consistency step over contiguous host buffers (pointers as ints; noise 0 for the final step).");
  m.def("temporal_attention_cpu", released(&temporal_attention_cpu, &make_attention_args),
        "softmax(q k^T scale) v over host buffers: pointers, batch0, batch1, frames, head_dim, four (b0, b1, frame) "
        "stride triples, scale, scalar type, stream_output (streaming stores for a contiguous output).");
  m.def("group_norm_cpu", released(&group_norm_cpu, &make_cpu_group_norm_args),
        "GroupNorm(+SiLU) over host x [batch*frames, C, S]; statistics span frames; optional [B, S, F, C] output; "
        "stream_output (streaming stores for the [N, C, S] output).");
  m.def("group_norm_channels_last_cpu", released(&group_norm_cpu, &make_channels_last_group_norm_args),
        "GroupNorm(+SiLU) over host x [batch, spatial, C] (a channels-last [N, C, H, W]); y in the same layout.");
  m.def("unpermute_residual_cpu", released(&unpermute_residual_cpu, &make_unpermute_args),
        "out [B*F, C, S] = permute(y [B*S, F, C]) + residual over host buffers.");
  m.def("geglu_cpu", released(&geglu_cpu, &make_geglu_args),
        "out [rows, inner] = h * gelu(g), [h, g] = x (+ fp32 bias [2*inner] or 0) over contiguous host buffers.");
  m.def("layer_norm_cpu", released(&layer_norm_cpu, &make_layer_norm_args),
        "LayerNorm over host rows x [rows, cols] (+ residual, the sum written; fp32 weight, bias; + addend rows "
        "r % addend_rows): pointers (0 for none), rows, cols, addend_rows, eps, scalar type.");
#if ANIMATELCM_WITH_CUDA
  m.def(
      "geglu_cuda",
      [](std::uintptr_t x, std::uintptr_t bias, std::uintptr_t out, int64_t rows, int64_t inner, int scalar_type,
         std::uintptr_t stream) {
        geglu_cuda(make_geglu_args(x, bias, out, rows, inner, scalar_type), stream);
      },
      "GEGLU over contiguous device buffers on the given stream.");
  m.def(
      "consistency_step_cuda",
      [](std::uintptr_t prev, std::uintptr_t denoised, std::uintptr_t model_output, std::uintptr_t sample,
         std::uintptr_t noise, std::uintptr_t coefficients, int64_t numel, int scalar_type, int prediction_type,
         bool clip, float clip_range, std::uintptr_t stream) {
        consistency_step_cuda(make_step_args(prev, denoised, model_output, sample, noise, coefficients, numel,
                                             scalar_type, prediction_type, clip, clip_range),
                              stream);
      },
      "Consistency step over contiguous device buffers, launched on the given cudaStream_t handle.");
  m.def(
      "group_norm_cuda",
      [](std::uintptr_t x, std::uintptr_t y, std::uintptr_t weight, std::uintptr_t bias, int64_t batch, int64_t frames,
         int64_t channels, int64_t spatial, int64_t groups, float eps, bool silu, bool permute_output, int scalar_type,
         std::uintptr_t workspace, std::uintptr_t stream, int affine_scalar_type, bool resident_groups,
         int cluster_packs) {
        GroupNormArgs args = make_group_norm_args(x, y, weight, bias, batch, frames, channels, spatial, groups, eps,
                                                  silu, permute_output, scalar_type);
        args.affine_scalar_type = affine_scalar_type;
        args.resident_groups = resident_groups;
        args.cluster_packs = cluster_packs;
        group_norm_cuda(args, reinterpret_cast<double*>(workspace), stream);
      },
      "GroupNorm(+SiLU) over device buffers (as group_norm_cpu) plus a float64 workspace of "
      "group_norm_cuda_workspace_doubles(batch, frames, channels, spatial, groups) elements and a stream; weight "
      "and bias of scalar type affine_scalar_type (both the same: float32, float16 or bfloat16); "
      "cluster_packs: on sm_90, a group held by a thread block cluster whose threads keep about that many 16-byte "
      "packs each (0, the default: never; slower than shared memory on 13 of 18 SD1.5 shapes on an H100); resident_groups: a group that fits in shared memory kept there (False with "
      "cluster_packs=0 always takes the three launches, for timing them).",
      py::arg("x"), py::arg("y"), py::arg("weight"), py::arg("bias"), py::arg("batch"), py::arg("frames"),
      py::arg("channels"), py::arg("spatial"), py::arg("groups"), py::arg("eps"), py::arg("silu"),
      py::arg("permute_output"), py::arg("scalar_type"), py::arg("workspace"), py::arg("stream"),
      py::arg("affine_scalar_type") = 0, py::arg("resident_groups") = true, py::arg("cluster_packs") = 0);
  m.def("group_norm_cuda_workspace_doubles", &group_norm_cuda_workspace_doubles,
        "Size, in float64 elements, of the workspace group_norm_cuda needs for these sizes.");
  m.def(
      "unpermute_residual_cuda",
      [](std::uintptr_t y, std::uintptr_t residual, std::uintptr_t out, int64_t batch, int64_t frames,
         int64_t channels, int64_t spatial, int scalar_type, std::uintptr_t stream) {
        unpermute_residual_cuda(make_unpermute_args(y, residual, out, batch, frames, channels, spatial, scalar_type),
                                stream);
      },
      "out [B*F, C, S] = permute(y [B*S, F, C]) + residual over device buffers, on the given stream.");
#endif
}
