// Device-side description of one forward launch: what the host launcher (launch_forward.cu) fills from a
// validated ForwardProblem and what the kernels read. Plain data, passed by value as a __grid_constant__.
#pragma once

#include <cstdint>

namespace flash_kda::cuda {

// A [B, T, H, D] (or [B, T, H]) tensor: innermost stride 1, the other strides in elements.
struct TokenTensor {
  const void* data = nullptr;
  int64_t batch_stride = 0;
  int64_t token_stride = 0;
  int64_t head_stride = 0;
};

enum class StateDType : int32_t { kNone = 0, kBFloat16 = 1, kFloat32 = 2 };

struct ForwardParams {
  TokenTensor q, k, v, g, beta;
  TokenTensor out;  // written; `data` is cast to non-const by the kernel

  const float* A_log = nullptr;    // [H] or null (then exp(A_log) = 1)
  const float* dt_bias = nullptr;  // [H, K] or null (then 0)
  int64_t dt_bias_head_stride = 0;

  const void* initial_state = nullptr;  // contiguous [N, H, V, K] or [N, H, K, V]
  void* final_state = nullptr;
  StateDType initial_state_dtype = StateDType::kNone;
  StateDType final_state_dtype = StateDType::kNone;
  int32_t state_value_first = 1;  // 1: [.., V, K] (FlashKDA layout), 0: [.., K, V]

  const void* cu_seqlens = nullptr;  // [N + 1] or null for fixed-length batches
  int32_t cu_seqlens_is_int64 = 1;

  int64_t num_sequences = 0;  // N
  int64_t tokens = 0;         // T: tokens per batch row (all tokens when varlen)
  int32_t heads = 0;          // H

  float scale = 0.f;
  float lower_bound = -5.f;
  int32_t l2norm_qk = 1;
  int32_t beta_times_two = 0;  // 1: b = 2·sigmoid(beta) (allow_neg_eigval)
};

}  // namespace flash_kda::cuda
