// Host dispatch of the GPU forward: validate, pick the device, check that this GPU and this build can
// run the kernel, translate the ForwardProblem into kernel parameters, launch on the caller's stream.
#include <cuda_runtime.h>

#include <cstring>
#include <mutex>
#include <unordered_map>

#include "common/check.hpp"
#include "cuda/cuda_check.hpp"
#include "cuda/forward_params.hpp"
#include "cuda/sm90/kda_forward_sm90.hpp"

namespace flash_kda {
namespace {

// Makes `device` current for the scope of a call and restores the caller's device afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    cuda::check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) cuda::check_cuda(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() {
    int current = previous_;
    if (cudaGetDevice(&current) == cudaSuccess && current != previous_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

bool compiled_for_sm90a() { return std::strstr(FLASH_KDA_CUDA_ARCHS_STRING, "90a") != nullptr; }

struct DeviceFacts {
  int major = 0, minor = 0;
  int multiprocessors = 0;
  bool prepared = false;  // the sm_90 kernels' attributes are set and `launch` is measured
  cuda::sm90::DeviceLaunchFacts launch;
};

// One cache of per-device facts for the process: the forward consults it on every call.
std::mutex device_facts_mutex;
std::unordered_map<int, DeviceFacts> known_device_facts;

// Compute capability and SM count of `device`, queried once per device and process.
DeviceFacts device_facts(int device) {
  std::lock_guard<std::mutex> lock(device_facts_mutex);
  if (auto it = known_device_facts.find(device); it != known_device_facts.end()) return it->second;
  int count = 0;
  cuda::check_cuda(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
  FLASH_KDA_CHECK(device >= 0 && device < count, "device: expected a CUDA device index in [0, ", count, "), got ",
                  device);
  DeviceFacts facts;
  cuda::check_cuda(cudaDeviceGetAttribute(&facts.major, cudaDevAttrComputeCapabilityMajor, device),
                   "cudaDeviceGetAttribute(major)");
  cuda::check_cuda(cudaDeviceGetAttribute(&facts.minor, cudaDevAttrComputeCapabilityMinor, device),
                   "cudaDeviceGetAttribute(minor)");
  cuda::check_cuda(cudaDeviceGetAttribute(&facts.multiprocessors, cudaDevAttrMultiProcessorCount, device),
                   "cudaDeviceGetAttribute(multiProcessorCount)");
  return known_device_facts[device] = facts;
}

// Checks that `device` (the current device) can run the sm_90a kernels and returns what their launch
// needs; the kernels are prepared on the first call for each device.
cuda::sm90::DeviceLaunchFacts supported_device_launch_facts(int device) {
  const DeviceFacts facts = device_facts(device);
  FLASH_KDA_CHECK(facts.major == 9 && facts.minor == 0,
                  "flash_kda: the CUDA kernel needs a Hopper GPU (sm_90: H100, H200); cuda:", device, " is sm_",
                  facts.major, facts.minor);
  FLASH_KDA_CHECK(compiled_for_sm90a(), "flash_kda: this build contains no sm_90a code (compiled architectures: '",
                  FLASH_KDA_CUDA_ARCHS_STRING, "'); rebuild with FLASH_KDA_CUDA_ARCHS=90a");
  if (facts.prepared) return facts.launch;
  std::lock_guard<std::mutex> lock(device_facts_mutex);
  DeviceFacts& entry = known_device_facts[device];
  if (!entry.prepared) {
    entry.launch = cuda::sm90::prepare_device(entry.multiprocessors);
    entry.prepared = true;
  }
  return entry.launch;
}

cuda::TokenTensor token_tensor(const TensorView& t) {
  return {t.data, t.strides[0], t.strides[1], t.rank >= 3 ? t.strides[2] : 0};
}

cuda::StateDType state_dtype(const TensorView& t) {
  if (!t.present()) return cuda::StateDType::kNone;
  return t.dtype == DType::kFloat32 ? cuda::StateDType::kFloat32 : cuda::StateDType::kBFloat16;
}

cuda::ForwardParams make_params(const ForwardProblem& p, const ProblemShape& shape) {
  cuda::ForwardParams params;
  params.q = token_tensor(p.q);
  params.k = token_tensor(p.k);
  params.v = token_tensor(p.v);
  params.g = token_tensor(p.g);
  params.beta = token_tensor(p.beta);
  params.out = token_tensor(p.out);
  params.A_log = static_cast<const float*>(p.A_log.data);
  params.dt_bias = static_cast<const float*>(p.dt_bias.data);
  params.dt_bias_head_stride = p.dt_bias.rank == 2 ? p.dt_bias.strides[0] : shape.head_dim_k;
  params.initial_state = p.initial_state.data;
  params.final_state = p.final_state.data;
  params.initial_state_dtype = state_dtype(p.initial_state);
  params.final_state_dtype = state_dtype(p.final_state);
  params.state_value_first = p.options.state_layout == StateLayout::kValueFirst ? 1 : 0;
  params.cu_seqlens = p.cu_seqlens.data;
  params.cu_seqlens_is_int64 = p.cu_seqlens.dtype == DType::kInt64 ? 1 : 0;
  params.num_sequences = shape.num_sequences;
  params.tokens = shape.tokens;
  params.heads = static_cast<int32_t>(shape.heads);
  params.scale = static_cast<float>(p.options.scale);
  params.lower_bound = p.options.lower_bound;
  params.l2norm_qk = p.options.l2norm_qk;
  params.beta_times_two = p.options.beta == BetaMode::kTwoSigmoid ? 1 : 0;
  return params;
}

}  // namespace

const char* compiled_cuda_architectures() { return FLASH_KDA_CUDA_ARCHS_STRING; }

size_t cuda_forward_workspace_bytes(const ForwardProblem& problem) {
  const ProblemShape shape = validate_forward(problem, Target::kCuda);
  DeviceGuard guard(problem.device_index);
  const cuda::sm90::DeviceLaunchFacts facts = supported_device_launch_facts(problem.device_index);
  return cuda::sm90::forward_workspace_bytes(make_params(problem, shape), facts);  // 0 for most launches
}

void cuda_forward(const ForwardProblem& problem, void* stream, void* workspace, size_t workspace_bytes) {
  const ProblemShape shape = validate_forward(problem, Target::kCuda);
  DeviceGuard guard(problem.device_index);
  const cuda::sm90::DeviceLaunchFacts facts = supported_device_launch_facts(problem.device_index);
  cuda::sm90::launch_forward(make_params(problem, shape), workspace, workspace_bytes, static_cast<cudaStream_t>(stream),
                             facts);
}

}  // namespace flash_kda
