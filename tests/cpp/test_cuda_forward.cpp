// The GPU forward through the C++ API on device buffers, against the fp64 CPU reference. Skips itself
// (with the reason) where no sm_90 GPU is present; the full GPU suite is tests/python/test_cuda_forward.py.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

#include "problem_builder.hpp"

namespace flash_kda::tests {
namespace {

std::string why_no_sm90() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) return "no CUDA device";
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess) return "cannot query CUDA device 0";
  if (prop.major != 9 || prop.minor != 0)
    return "CUDA device 0 is sm_" + std::to_string(prop.major) + std::to_string(prop.minor) + ", not sm_90";
  if (std::strstr(compiled_cuda_architectures(), "90a") == nullptr) return "this build has no sm_90a code";
  return "";
}

// Device copies of a problem's tensors, same strides; freed on destruction.
class DeviceCopy {
 public:
  ~DeviceCopy() {
    for (void* p : buffers_) cudaFree(p);
  }
  TensorView upload(HostTensor& t) {
    TensorView view = t.view();
    if (!t.present()) return view;
    const size_t bytes = static_cast<size_t>(t.storage_elements()) * dtype_size(t.dtype());
    void* device = nullptr;
    EXPECT_EQ(cudaMalloc(&device, bytes), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(device, t.data(), bytes, cudaMemcpyHostToDevice), cudaSuccess);
    buffers_.push_back(device);
    view.data = device;
    return view;
  }
  static void download(const TensorView& device, HostTensor& t) {
    const size_t bytes = static_cast<size_t>(t.storage_elements()) * dtype_size(t.dtype());
    EXPECT_EQ(cudaMemcpy(t.data(), device.data, bytes, cudaMemcpyDeviceToHost), cudaSuccess);
  }

 private:
  static size_t dtype_size(DType d) {
    return d == DType::kFloat32 || d == DType::kInt32 ? 4 : d == DType::kInt64 || d == DType::kFloat64 ? 8 : 2;
  }
  std::vector<void*> buffers_;
};

ProblemConfig cuda_config() {
  ProblemConfig c;
  c.K = c.V = 128;
  c.data_dtype = c.out_dtype = DType::kBFloat16;
  return c;
}

void expect_gpu_matches_reference(ProblemConfig config, uint32_t seed) {
  OwnedProblem gold = make_problem(config, seed);
  OwnedProblem gpu = make_problem(config, seed);  // same inputs
  gold.out = HostTensor(DType::kFloat64, gold.out.sizes());
  gold.final_state = HostTensor(DType::kFloat64, gold.final_state.sizes());
  reference_forward_recurrent(gold.problem());

  DeviceCopy device;
  ForwardProblem p = gpu.problem();
  p.device = DeviceType::kCUDA;
  for (auto [view, host] : {std::pair{&p.q, &gpu.q},
                            {&p.k, &gpu.k},
                            {&p.v, &gpu.v},
                            {&p.g, &gpu.g},
                            {&p.beta, &gpu.beta},
                            {&p.out, &gpu.out},
                            {&p.A_log, &gpu.A_log},
                            {&p.dt_bias, &gpu.dt_bias},
                            {&p.initial_state, &gpu.initial_state},
                            {&p.final_state, &gpu.final_state},
                            {&p.cu_seqlens, &gpu.cu_seqlens}})
    *view = device.upload(*host);
  cuda_forward(p, nullptr, nullptr, 0);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  DeviceCopy::download(p.out, gpu.out);
  DeviceCopy::download(p.final_state, gpu.final_state);

  ASSERT_TRUE(all_finite(gpu.out)) << "an output element was not written (NaN poison survived)";
  EXPECT_LE(relative_l2(gpu.out, gold.out), 5e-3);
  EXPECT_LE(relative_l2(gpu.final_state, gold.final_state), 5e-3);
}

class CudaForward : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string reason = why_no_sm90();
    if (!reason.empty()) GTEST_SKIP() << "needs an sm_90 GPU: " << reason;
  }
};

TEST_F(CudaForward, FixedLengthMatchesReference) {
  ProblemConfig c = cuda_config();
  c.B = 2;
  c.T = 77;
  expect_gpu_matches_reference(c, 1);
}

TEST_F(CudaForward, VarlenWithZeroLengthMatchesReference) {
  ProblemConfig c = cuda_config();
  c.T = 130;
  c.cu_seqlens = {0, 0, 17, 17, 130};
  expect_gpu_matches_reference(c, 2);
}

TEST_F(CudaForward, RejectsUnsupportedHeadDim) {
  ProblemConfig c = cuda_config();
  c.K = 64;
  OwnedProblem host = make_problem(c, 3);
  ForwardProblem p = host.problem();
  p.device = DeviceType::kCUDA;
  try {
    cuda_forward(p, nullptr, nullptr, 0);
    FAIL() << "K = 64 was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("K"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace flash_kda::tests
