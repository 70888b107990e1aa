// pybind11 module animatelcm._C: raw pointers, sizes and type codes in; no torch headers, so the extension builds
// with pybind11 + CMake alone and one wheel serves every torch release. Python (animatelcm/ops/native.py)
// validates shapes, dtypes, devices and contiguity before calling in.
#include <pybind11/pybind11.h>

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

py::dict build_info() {
  py::dict info;
  info["version"] = ANIMATELCM_VERSION;
  info["compiler"] = ANIMATELCM_COMPILER;
  info["openmp"] = static_cast<bool>(ANIMATELCM_WITH_OPENMP);
  info["cuda"] = static_cast<bool>(ANIMATELCM_WITH_CUDA);
  info["cuda_version"] = ANIMATELCM_CUDA_VERSION;
  info["cuda_archs"] = ANIMATELCM_CUDA_ARCHS;
  info["step_coefficients"] = kNumStepCoefficients;
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "animatelcm native kernels (C++ CPU and, when built with CUDA, CUDA)";
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
#if ANIMATELCM_WITH_CUDA
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
#endif
}
