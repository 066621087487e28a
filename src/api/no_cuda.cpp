// Stand-ins for the GPU entry points in a build without CUDA (FLASH_KDA_ENABLE_CUDA=OFF): they validate,
// then say clearly that this build has no GPU code.
#include "common/check.hpp"

namespace flash_kda {

const char* compiled_cuda_architectures() { return ""; }

size_t cuda_forward_workspace_bytes(const ForwardProblem& problem) {
  validate_forward(problem, Target::kCuda);
  return 0;
}

void cuda_forward(const ForwardProblem& problem, void*, void*, size_t) {
  validate_forward(problem, Target::kCuda);
  detail::fail("flash_kda was built without CUDA (FLASH_KDA_ENABLE_CUDA=OFF): no GPU kernel is available");
}

}  // namespace flash_kda
