// The exact gold: SPEC §1's token-by-token recurrence in fp64 on the CPU, with every option.
// Per (sequence, value head), with S the K×V state (S[key][value]):
//     S ← Diag(exp(a_t)) S
//     S ← S + b_t k̂_t (v_t − Sᵀ k̂_t)ᵀ
//     o_t = scale · Sᵀ q̂_t
// Inputs of any float dtype are read exactly (every bf16/fp16/fp32 value is a double); out and final_state
// are rounded once, to nearest even, into their own dtypes.
#include <cmath>
#include <vector>

#include "common/check.hpp"
#include "reference/preprocess.hpp"
#include "reference/problem_io.hpp"

namespace flash_kda {

void reference_forward_recurrent(const ForwardProblem& problem) {
  const ProblemShape shape = validate_forward(problem, Target::kReference);
  const int64_t K = shape.head_dim_k, V = shape.head_dim_v;
  const double scale = problem.options.scale;

  reference::TokenPreprocessor<double> tokens(problem, shape);
  std::vector<double> state(static_cast<size_t>(K * V));
  std::vector<double> q(static_cast<size_t>(K)), k(static_cast<size_t>(K)), a(static_cast<size_t>(K));
  std::vector<double> v(static_cast<size_t>(V)), residual(static_cast<size_t>(V)), o(static_cast<size_t>(V));

  for (const reference::Sequence& seq : reference::split_sequences(problem, shape)) {
    for (int64_t hv = 0; hv < shape.value_heads; ++hv) {
      tokens.select_value_head(hv);
      reference::load_state(problem, shape, seq.index, hv, state.data());
      for (int64_t t = seq.begin; t < seq.begin + seq.length; ++t) {
        const double b = tokens.load(seq.batch_row, t, q.data(), k.data(), v.data(), a.data());
        // Decay each key row, then the delta rule: residual = v − Sᵀ k̂ (against the decayed state).
        for (int64_t key = 0; key < K; ++key) {
          const double decay = std::exp(a[key]);
          for (int64_t value = 0; value < V; ++value) state[key * V + value] *= decay;
        }
        for (int64_t value = 0; value < V; ++value) residual[value] = v[value];
        for (int64_t key = 0; key < K; ++key) {
          for (int64_t value = 0; value < V; ++value) residual[value] -= state[key * V + value] * k[key];
        }
        for (int64_t key = 0; key < K; ++key) {
          const double bk = b * k[key];
          for (int64_t value = 0; value < V; ++value) state[key * V + value] += bk * residual[value];
        }
        for (int64_t value = 0; value < V; ++value) o[value] = 0.0;
        for (int64_t key = 0; key < K; ++key) {
          for (int64_t value = 0; value < V; ++value) o[value] += state[key * V + value] * q[key];
        }
        for (int64_t value = 0; value < V; ++value) o[value] *= scale;
        reference::store_output(problem, shape, seq.batch_row, t, hv, o.data());
      }
      // A zero-length sequence leaves S_0 untouched: its final state is its initial state (or zeros).
      reference::store_state(problem, shape, seq.index, hv, state.data());
    }
  }
}

}  // namespace flash_kda
