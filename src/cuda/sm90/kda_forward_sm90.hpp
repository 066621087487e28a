// Host entry of the sm_90a forward kernel (kda_forward_sm90.cu).
#pragma once

#include <cuda_runtime.h>

#include "cuda/forward_params.hpp"

namespace flash_kda::cuda::sm90 {

// Enqueues the forward on `stream` (current device must be the tensors' device). Never synchronises.
// `multiprocessors`: the device's SM count, which picks the work split (blocks per (sequence, head)).
void launch_forward(const ForwardParams& params, cudaStream_t stream, int multiprocessors);

}  // namespace flash_kda::cuda::sm90
