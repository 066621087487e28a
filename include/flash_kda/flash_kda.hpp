// flash_kda — Kimi Delta Attention (KDA) forward: public C++ API.
//
// One plain description of a problem (ForwardProblem: strided tensor views, options) and a few entry
// points. Everything is validated on the host, once, by validate_forward(); every entry point calls it.
// The math is ../docs/kda_math.md (SPEC §1): per head, with S the K×V state,
//     S ← Diag(exp(a_t)) S;  S ← S + b_t k̂_t (v_t − Sᵀ k̂_t)ᵀ;  o_t = scale · Sᵀ q̂_t.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

#if defined(_WIN32)
#define FLASH_KDA_API __declspec(dllexport)
#else
#define FLASH_KDA_API __attribute__((visibility("default")))
#endif

namespace flash_kda {

// ---------------------------------------------------------------------------------------------------
// Errors: every failed check throws flash_kda::Error with a message that names the argument, the
// expected and the actual value (and, for internal failures, file:line).
// ---------------------------------------------------------------------------------------------------
class FLASH_KDA_API Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// ---------------------------------------------------------------------------------------------------
// Tensor views. Sizes and strides are in elements. A view with data == nullptr is "absent".
// The layout of this struct is mirrored by the Python binding (python/flash_kda/_native.py);
// bump kAbiVersion whenever it or ForwardProblem changes.
// ---------------------------------------------------------------------------------------------------
inline constexpr int32_t kAbiVersion = 1;
inline constexpr int32_t kMaxRank = 4;

enum class DType : int32_t { kBFloat16 = 0, kFloat16 = 1, kFloat32 = 2, kFloat64 = 3, kInt32 = 4, kInt64 = 5 };
enum class DeviceType : int32_t { kCPU = 0, kCUDA = 1 };

struct TensorView {
  void* data = nullptr;
  DType dtype = DType::kBFloat16;
  int32_t rank = 0;
  int64_t sizes[kMaxRank] = {0, 0, 0, 0};
  int64_t strides[kMaxRank] = {0, 0, 0, 0};

  bool present() const { return data != nullptr; }
};

// ---------------------------------------------------------------------------------------------------
// Options (SPEC §1). Each pre-processing step is either done inside the operator or already done by
// the caller ("kNone" / l2norm_qk == 0).
// ---------------------------------------------------------------------------------------------------
enum class GateMode : int32_t {
  kNone = 0,        // g already holds the natural-log decay a_t
  kLowerBound = 1,  // a = lower_bound · sigmoid(exp(A_log) · (g + dt_bias)); A_log optional
  kSoftplus = 2,    // a = −exp(A_log) · softplus(g + dt_bias); A_log optional (absent = 1)
};
enum class BetaMode : int32_t {
  kNone = 0,        // beta already holds b_t
  kSigmoid = 1,     // b = sigmoid(beta)
  kTwoSigmoid = 2,  // b = 2 · sigmoid(beta)   (FLA allow_neg_eigval)
};
enum class StateLayout : int32_t {
  kKeyFirst = 0,    // [N, HV, K, V]  (FLA default)
  kValueFirst = 1,  // [N, HV, V, K]  (FlashKDA, FLA state_v_first=True)
};

struct ForwardOptions {
  double scale = 0.0;     // multiplies o; callers pass K^-0.5 for the usual default
  int32_t l2norm_qk = 1;  // 1: normalise q and k inside
  GateMode gate = GateMode::kLowerBound;
  float lower_bound = -5.0f;  // only for GateMode::kLowerBound; must lie in [-5, 0)
  BetaMode beta = BetaMode::kSigmoid;
  StateLayout state_layout = StateLayout::kValueFirst;
};

// ---------------------------------------------------------------------------------------------------
// The problem. Shapes (B batch rows, T tokens per row, H q/k heads, HV = G·H value heads, K, V):
//   q, k        [B, T, H, K]          v, out  [B, T, HV, V]
//   g           [B, T, HV, K]         beta    [B, T, HV]
//   A_log       [HV]      (optional)  dt_bias [HV, K] (optional)
//   initial_state, final_state [N, HV, K, V] or [N, HV, V, K] (optional, see StateLayout)
//   cu_seqlens  [N + 1] int64/int32 (optional; requires B == 1; N = B otherwise)
// The innermost dimension of every tensor must be contiguous (stride 1). All tensors live on
// `device` (cu_seqlens may also be on the CPU for the CPU entry points).
// ---------------------------------------------------------------------------------------------------
struct ForwardProblem {
  int32_t abi_version = kAbiVersion;
  DeviceType device = DeviceType::kCPU;
  int32_t device_index = 0;
  TensorView q, k, v, g, beta, out;
  TensorView A_log, dt_bias;
  TensorView initial_state, final_state;
  TensorView cu_seqlens;
  ForwardOptions options;
};

// Derived sizes of a validated problem.
struct ProblemShape {
  int64_t batch = 0;          // B
  int64_t tokens = 0;         // T (per batch row)
  int64_t num_sequences = 0;  // N
  int64_t heads = 0;          // H
  int64_t value_heads = 0;    // HV
  int64_t head_dim_k = 0;     // K
  int64_t head_dim_v = 0;     // V
};

// Which implementation a problem is validated for; each supports a different subset.
enum class Target : int32_t {
  kReference = 0,  // CPU, everything SPEC §1–3 describes (any float dtype, GVA, every option)
  kCuda = 1,       // GPU kernel: see docs/kernel_sm90.md for the supported subset
};

// Checks every argument against every other; throws Error naming the first problem found.
// For kReference it also reads and checks cu_seqlens' values (they must be on the CPU).
FLASH_KDA_API ProblemShape validate_forward(const ForwardProblem& problem, Target target);

// ---------------------------------------------------------------------------------------------------
// Entry points.
// ---------------------------------------------------------------------------------------------------

// Exact gold: the token-by-token recurrence of SPEC §1 in fp64 on the CPU (inputs of any float dtype;
// out and final_state are written in their own dtypes).
FLASH_KDA_API void reference_forward_recurrent(const ForwardProblem& problem);

// The chunked formulation of SPEC §1 in fp32 on the CPU (chunk_size ≥ 1). Exists to pin down the
// chunked math the GPU kernels use; compared against the recurrence in the tests.
FLASH_KDA_API void reference_forward_chunked(const ForwardProblem& problem, int chunk_size);

// Bytes of scratch device memory cuda_forward needs for this problem on its device. `grid` keeps its L2 ring there
// (about 0.5 MB per (sequence, head) pair); it is chosen for few long sequences (from 1024 tokens per sequence;
// longer ones take it at more pairs: see the README's status) on devices with cooperative launch, or forced by
// FLASH_KDA_SM90_SCHEDULE=grid. Where its CTAs outnumber the SMs, `whole` (or a forced `split`) asks for 128 bytes
// (a ticket counter for its persistent CTAs). Otherwise 0.
// Validates like cuda_forward and asks the device (a supported GPU must be present).
FLASH_KDA_API size_t cuda_forward_workspace_bytes(const ForwardProblem& problem);

// The GPU forward, enqueued on `stream` (a cudaStream_t; nullptr = legacy default stream) on the
// tensors' device. Never synchronises and never allocates: scratch memory comes from `workspace`
// (at least cuda_forward_workspace_bytes bytes, 128-byte aligned, may be null when that is 0; the launch zeroes
// what it needs there itself, and two launches that may run at once must not share one). Given less
// where the automatic choice is `grid`, it runs a schedule without scratch instead: as accurate, slower, and
// not the same bits (`grid` rounds differently from the 16-token schedules). Given less where `whole` would run
// persistent CTAs, it launches one CTA per pair: the same bits, slower.
FLASH_KDA_API void cuda_forward(const ForwardProblem& problem, void* stream, void* workspace, size_t workspace_bytes);

// Build facts: the CUDA architectures compiled into this library (e.g. "90a"), "" when none.
FLASH_KDA_API const char* compiled_cuda_architectures();
FLASH_KDA_API const char* version();

}  // namespace flash_kda
