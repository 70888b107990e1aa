// Entry points of the CUDA kernels (compiled only when the build found a CUDA toolkit); `stream` is the
// cudaStream_t handle from torch.cuda.current_stream().cuda_stream.
#pragma once
#include <cstdint>

#include "../cpu/cpu_kernels.h"

namespace animatelcm {

void consistency_step_cuda(const ConsistencyStepArgs& args, std::uintptr_t stream);
// `stats` is a device buffer of 2 * batch * groups floats (mean, rstd per group) the kernel fills.
void group_norm_cuda(const GroupNormArgs& args, float* stats, std::uintptr_t stream);
void unpermute_residual_cuda(const UnpermuteResidualArgs& args, std::uintptr_t stream);
void geglu_cuda(const GegluArgs& args, std::uintptr_t stream);

}  // namespace animatelcm
