// flash_kda C++ example: one KDA forward on device buffers through the public API, checked against the
// library's fp64 CPU reference. Without a usable GPU it says so and runs only the CPU reference.
//
//   flash_kda_example            (exit code 0 = ran and matched, 1 = mismatch or error)
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "flash_kda/flash_kda.hpp"

namespace {

constexpr int64_t kBatch = 1, kTokens = 300, kHeads = 2, kDim = 128;

// bf16 <-> float on the host (round to nearest even), so the example needs no CUDA headers for them.
uint16_t to_bf16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}
float from_bf16(uint16_t x) {
  uint32_t bits = uint32_t{x} << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

flash_kda::TensorView view(void* data, flash_kda::DType dtype, std::vector<int64_t> sizes) {
  flash_kda::TensorView t;
  t.data = data;
  t.dtype = dtype;
  t.rank = static_cast<int32_t>(sizes.size());
  int64_t stride = 1;
  for (int i = t.rank - 1; i >= 0; --i) {
    t.sizes[i] = sizes[i];
    t.strides[i] = stride;
    stride *= sizes[i];
  }
  return t;
}

bool check(cudaError_t status, const char* what) {
  if (status == cudaSuccess) return true;
  std::fprintf(stderr, "%s failed: %s\n", what, cudaGetErrorString(status));
  return false;
}

}  // namespace

int main() {
  using flash_kda::DType;
  const int64_t tokens = kBatch * kTokens * kHeads;
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.f, 1.f);
  auto random_bf16 = [&](int64_t n, float sigma) {
    std::vector<uint16_t> x(n);
    for (auto& e : x) e = to_bf16(sigma * normal(rng));
    return x;
  };
  std::vector<uint16_t> q = random_bf16(tokens * kDim, 1.f), k = random_bf16(tokens * kDim, 1.f),
                        v = random_bf16(tokens * kDim, 1.f), g = random_bf16(tokens * kDim, 1.f),
                        beta = random_bf16(tokens, 1.f);
  std::vector<float> A_log(kHeads), dt_bias(kHeads * kDim);
  for (auto& e : A_log) e = 0.1f * normal(rng);
  for (auto& e : dt_bias) e = 0.1f * normal(rng);

  // The problem on host buffers; the GPU run swaps in device pointers.
  std::vector<uint16_t> out_ref(tokens * kDim);
  std::vector<float> state_ref(kBatch * kHeads * kDim * kDim);
  flash_kda::ForwardProblem p;
  p.q = view(q.data(), DType::kBFloat16, {kBatch, kTokens, kHeads, kDim});
  p.k = view(k.data(), DType::kBFloat16, {kBatch, kTokens, kHeads, kDim});
  p.v = view(v.data(), DType::kBFloat16, {kBatch, kTokens, kHeads, kDim});
  p.g = view(g.data(), DType::kBFloat16, {kBatch, kTokens, kHeads, kDim});
  p.beta = view(beta.data(), DType::kBFloat16, {kBatch, kTokens, kHeads});
  p.out = view(out_ref.data(), DType::kBFloat16, {kBatch, kTokens, kHeads, kDim});
  p.A_log = view(A_log.data(), DType::kFloat32, {kHeads});
  p.dt_bias = view(dt_bias.data(), DType::kFloat32, {kHeads, kDim});
  p.final_state = view(state_ref.data(), DType::kFloat32, {kBatch, kHeads, kDim, kDim});
  p.options.scale = 1.0 / std::sqrt(double(kDim));

  try {
    flash_kda::reference_forward_recurrent(p);
  } catch (const flash_kda::Error& e) {
    std::fprintf(stderr, "reference failed: %s\n", e.what());
    return 1;
  }
  std::printf("flash_kda %s: CPU reference done (compiled CUDA architectures: '%s')\n", flash_kda::version(),
              flash_kda::compiled_cuda_architectures());

  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no CUDA device: ran the CPU reference only\n");
    return 0;
  }

  // ---- the same problem on the GPU ----
  std::vector<void*> buffers;
  auto to_device = [&](flash_kda::TensorView& t, const void* host, size_t bytes) {
    void* d = nullptr;
    if (!check(cudaMalloc(&d, bytes), "cudaMalloc")) return false;
    buffers.push_back(d);
    if (host != nullptr && !check(cudaMemcpy(d, host, bytes, cudaMemcpyHostToDevice), "cudaMemcpy")) return false;
    t.data = d;
    return true;
  };
  const size_t data_bytes = tokens * kDim * sizeof(uint16_t);
  bool ok = to_device(p.q, q.data(), data_bytes) && to_device(p.k, k.data(), data_bytes) &&
            to_device(p.v, v.data(), data_bytes) && to_device(p.g, g.data(), data_bytes) &&
            to_device(p.beta, beta.data(), tokens * sizeof(uint16_t)) && to_device(p.out, nullptr, data_bytes) &&
            to_device(p.A_log, A_log.data(), A_log.size() * sizeof(float)) &&
            to_device(p.dt_bias, dt_bias.data(), dt_bias.size() * sizeof(float)) &&
            to_device(p.final_state, nullptr, state_ref.size() * sizeof(float));
  p.device = flash_kda::DeviceType::kCUDA;
  p.device_index = 0;
  std::vector<uint16_t> out_gpu(out_ref.size());
  std::vector<float> state_gpu(state_ref.size());
  if (ok) {
    try {
      flash_kda::cuda_forward(p, /*stream=*/nullptr, /*workspace=*/nullptr, 0);
      ok = check(cudaMemcpy(out_gpu.data(), p.out.data, data_bytes, cudaMemcpyDeviceToHost), "cudaMemcpy out") &&
           check(cudaMemcpy(state_gpu.data(), p.final_state.data, state_gpu.size() * sizeof(float),
                            cudaMemcpyDeviceToHost),
                 "cudaMemcpy state");
    } catch (const flash_kda::Error& e) {
      std::printf("GPU forward unavailable here: %s\n", e.what());
      for (void* d : buffers) cudaFree(d);
      return 0;
    }
  }
  for (void* d : buffers) cudaFree(d);
  if (!ok) return 1;

  auto relative_error = [](auto get_x, auto get_ref, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; ++i) {
      const double d = get_x(i) - get_ref(i);
      num += d * d;
      den += get_ref(i) * get_ref(i);
    }
    return std::sqrt(num / den);
  };
  const double out_err = relative_error([&](size_t i) { return from_bf16(out_gpu[i]); },
                                        [&](size_t i) { return from_bf16(out_ref[i]); }, out_gpu.size());
  const double state_err =
      relative_error([&](size_t i) { return state_gpu[i]; }, [&](size_t i) { return state_ref[i]; }, state_gpu.size());
  const bool pass = out_err < 1e-2 && state_err < 1e-2;
  std::printf("GPU vs CPU reference: out rel. error %.2e, final state rel. error %.2e: %s\n", out_err, state_err,
              pass ? "PASS" : "FAIL");
  return pass ? 0 : 1;
}
