// Shared plumbing of the two CPU references: which tokens form each sequence, and reading/writing the
// state and the output of one (sequence, value head) in the problem's own layouts and dtypes.
// Internally a state is a K×V row-major array S[key][value], whatever options.state_layout says.
#pragma once

#include <cstdint>
#include <vector>

#include "flash_kda/flash_kda.hpp"
#include "reference/tensor_access.hpp"

namespace flash_kda::reference {

// One independent sequence: tokens [begin, begin + length) of batch row `batch_row`; `index` is its
// position n in the state tensors.
struct Sequence {
  int64_t index;
  int64_t batch_row;
  int64_t begin;
  int64_t length;
};

// Fixed length: sequence n is batch row n. Varlen: row 0 split by cu_seqlens (host memory, validated).
inline std::vector<Sequence> split_sequences(const ForwardProblem& p, const ProblemShape& s) {
  std::vector<Sequence> sequences;
  sequences.reserve(static_cast<size_t>(s.num_sequences));
  for (int64_t n = 0; n < s.num_sequences; ++n) {
    if (p.cu_seqlens.present()) {
      const int64_t begin = load_index(p.cu_seqlens, n * p.cu_seqlens.strides[0]);
      const int64_t end = load_index(p.cu_seqlens, (n + 1) * p.cu_seqlens.strides[0]);
      sequences.push_back({n, 0, begin, end - begin});
    } else {
      sequences.push_back({n, n, 0, s.tokens});
    }
  }
  return sequences;
}

inline int64_t state_offset(const ForwardProblem& p, const TensorView& state, int64_t n, int64_t hv, int64_t key,
                            int64_t value) {
  return p.options.state_layout == StateLayout::kKeyFirst ? element_offset(state, n, hv, key, value)
                                                          : element_offset(state, n, hv, value, key);
}

// S_0 of sequence n, value head hv: the initial state, or zeros when none is given.
template <typename Real>
void load_state(const ForwardProblem& p, const ProblemShape& s, int64_t n, int64_t hv, Real* state) {
  for (int64_t key = 0; key < s.head_dim_k; ++key) {
    for (int64_t value = 0; value < s.head_dim_v; ++value) {
      state[key * s.head_dim_v + value] =
          p.initial_state.present()
              ? static_cast<Real>(load_element(p.initial_state, state_offset(p, p.initial_state, n, hv, key, value)))
              : Real(0);
    }
  }
}

template <typename Real>
void store_state(const ForwardProblem& p, const ProblemShape& s, int64_t n, int64_t hv, const Real* state) {
  if (!p.final_state.present()) return;
  for (int64_t key = 0; key < s.head_dim_k; ++key) {
    for (int64_t value = 0; value < s.head_dim_v; ++value) {
      store_element(p.final_state, state_offset(p, p.final_state, n, hv, key, value),
                    static_cast<double>(state[key * s.head_dim_v + value]));
    }
  }
}

// o_t of token t of batch row `batch_row`, value head hv.
template <typename Real>
void store_output(const ForwardProblem& p, const ProblemShape& s, int64_t batch_row, int64_t t, int64_t hv,
                  const Real* o) {
  for (int64_t value = 0; value < s.head_dim_v; ++value) {
    store_element(p.out, element_offset(p.out, batch_row, t, hv, value), static_cast<double>(o[value]));
  }
}

}  // namespace flash_kda::reference
