// Entry points of the CUDA kernels (compiled only when the build found a CUDA toolkit); `stream` is the
// cudaStream_t handle from torch.cuda.current_stream().cuda_stream.
#pragma once
#include <cstdint>

#include "../cpu/cpu_kernels.h"

namespace animatelcm {

void consistency_step_cuda(const ConsistencyStepArgs& args, std::uintptr_t stream);
// `workspace` is a device buffer of group_norm_cuda_workspace_doubles(...) doubles (per-chunk partial sums, then
// mean and rstd per group) the launches fill; it must stay alive until they are enqueued.
int64_t group_norm_cuda_workspace_doubles(int64_t batch, int64_t frames, int64_t channels, int64_t spatial,
                                          int64_t groups);
void group_norm_cuda(const GroupNormArgs& args, double* workspace, std::uintptr_t stream);
void unpermute_residual_cuda(const UnpermuteResidualArgs& args, std::uintptr_t stream);
void geglu_cuda(const GegluArgs& args, std::uintptr_t stream);

}  // namespace animatelcm
