// Entry points of the CUDA kernels (compiled only when the build found a CUDA toolkit); `stream` is the
// cudaStream_t handle from torch.cuda.current_stream().cuda_stream.
#pragma once
#include <cstdint>

#include "../cpu/cpu_kernels.h"

namespace animatelcm {

void consistency_step_cuda(const ConsistencyStepArgs& args, std::uintptr_t stream);

}  // namespace animatelcm
