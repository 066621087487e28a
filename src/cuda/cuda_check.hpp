// CUDA-call checks of the one error family (common/check.hpp): the message names the call and the error.
#pragma once

#include <cuda_runtime.h>

#include "common/check.hpp"

namespace flash_kda::cuda {

inline void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    detail::fail(detail::concat("flash_kda: ", what, " failed: ", cudaGetErrorName(status), " (",
                                cudaGetErrorString(status), ")"));
}

}  // namespace flash_kda::cuda
