// SPEC §1's chunked formulation in fp32 on the CPU: the math the GPU kernels use, pinned down on the host
// and compared against the fp64 recurrence in the tests. Per (sequence, value head), chunks of C tokens
// (the last one may be shorter), with Γ the inclusive cumulative sum of the log decays a inside the chunk:
//     A_kk[i,j] = b_i Σ_d k̂_id e^{Γ_id − Γ_jd} k̂_jd   (j < i)     T = (I + A_kk)^{-1}
//     W = T (b ⊙ e^Γ ⊙ k̂)      U = T (b ⊙ v)      v' = U − W S
//     o = scale (q̂ ⊙ e^Γ) S + A_qk v',   A_qk[i,j] = scale Σ_d q̂_id e^{Γ_id − Γ_jd} k̂_jd   (j ≤ i)
//     S ← Diag(e^{Γ_C}) S + (e^{Γ_C − Γ} ⊙ k̂)ᵀ v'
// Every decay between two tokens is formed as e^{Γ_i − Γ_j} with j ≤ i, an exponent ≤ 0 for decaying gates:
// with the unbounded softplus gate e^{Γ_i} underflows to 0 and e^{−Γ_j} overflows to inf, so the product
// e^{Γ_i} · e^{−Γ_j} would be 0 · inf = NaN where the pairwise form is just a small number.
#include <algorithm>
#include <cmath>
#include <vector>

#include "common/check.hpp"
#include "reference/preprocess.hpp"
#include "reference/problem_io.hpp"

namespace flash_kda {
namespace {

// Working arrays of one chunk, row-major; sized once for the largest chunk.
struct ChunkBuffers {
  ChunkBuffers(int64_t C, int64_t K, int64_t V)
      : q(size(C * K)),
        k(size(C * K)),
        gamma(size(C * K)),
        scaled_k(size(C * K)),
        w(size(C * K)),
        v(size(C * V)),
        u(size(C * V)),
        v_new(size(C * V)),
        beta(size(C)),
        a_kk(size(C * C)),
        a_qk(size(C * C)),
        t(size(C * C)) {}
  static size_t size(int64_t n) { return static_cast<size_t>(n); }

  std::vector<float> q, k, gamma, scaled_k, w;  // [C, K]; gamma holds a, then its cumulative sum Γ
  std::vector<float> v, u, v_new;               // [C, V]
  std::vector<float> beta;                      // [C]
  std::vector<float> a_kk, a_qk, t;             // [C, C]
};

// Advances `state` (K×V) over one chunk of L tokens whose inputs are already in `c`; writes o rows to `o`.
void run_chunk(ChunkBuffers& c, int64_t L, int64_t K, int64_t V, float scale, std::vector<float>& state,
               std::vector<float>& o) {
  // Γ: inclusive cumulative sum over the chunk, per key channel.
  for (int64_t i = 1; i < L; ++i) {
    for (int64_t d = 0; d < K; ++d) c.gamma[i * K + d] += c.gamma[(i - 1) * K + d];
  }
  // A_kk (strictly lower) and A_qk (lower with diagonal), decays pairwise.
  for (int64_t i = 0; i < L; ++i) {
    for (int64_t j = 0; j <= i; ++j) {
      float kk = 0.f, qk = 0.f;
      for (int64_t d = 0; d < K; ++d) {
        const float decayed_k = std::exp(c.gamma[i * K + d] - c.gamma[j * K + d]) * c.k[j * K + d];
        kk += c.k[i * K + d] * decayed_k;
        qk += c.q[i * K + d] * decayed_k;
      }
      c.a_kk[i * L + j] = j < i ? c.beta[i] * kk : 0.f;
      c.a_qk[i * L + j] = scale * qk;
    }
  }
  // T = (I + A_kk)^{-1}, unit lower-triangular, by forward substitution: row i of (I + A_kk) T = I gives
  // T[i,:] = e_i − Σ_{j<i} A_kk[i,j] T[j,:].
  for (int64_t i = 0; i < L; ++i) {
    for (int64_t col = 0; col < L; ++col) c.t[i * L + col] = i == col ? 1.f : 0.f;
    for (int64_t j = 0; j < i; ++j) {
      const float a = c.a_kk[i * L + j];
      for (int64_t col = 0; col <= j; ++col) c.t[i * L + col] -= a * c.t[j * L + col];
    }
  }
  // W = T (b ⊙ e^Γ ⊙ k̂), U = T (b ⊙ v). e^Γ alone (exponent ≤ 0 for decaying gates) may underflow to 0,
  // which is the right limit: the chunk's start state has then decayed away.
  for (int64_t j = 0; j < L; ++j) {
    for (int64_t d = 0; d < K; ++d) c.scaled_k[j * K + d] = c.beta[j] * std::exp(c.gamma[j * K + d]) * c.k[j * K + d];
  }
  for (int64_t i = 0; i < L; ++i) {
    for (int64_t d = 0; d < K; ++d) c.w[i * K + d] = 0.f;
    for (int64_t e = 0; e < V; ++e) c.u[i * V + e] = 0.f;
    for (int64_t j = 0; j <= i; ++j) {
      const float tij = c.t[i * L + j];
      for (int64_t d = 0; d < K; ++d) c.w[i * K + d] += tij * c.scaled_k[j * K + d];
      for (int64_t e = 0; e < V; ++e) c.u[i * V + e] += tij * c.beta[j] * c.v[j * V + e];
    }
  }
  // v' = U − W S
  for (int64_t i = 0; i < L; ++i) {
    for (int64_t e = 0; e < V; ++e) c.v_new[i * V + e] = c.u[i * V + e];
    for (int64_t d = 0; d < K; ++d) {
      const float wid = c.w[i * K + d];
      for (int64_t e = 0; e < V; ++e) c.v_new[i * V + e] -= wid * state[d * V + e];
    }
  }
  // o_i = scale (q̂_i ⊙ e^{Γ_i})ᵀ S + Σ_{j≤i} A_qk[i,j] v'_j   (S is still the chunk's start state)
  for (int64_t i = 0; i < L; ++i) {
    float* o_i = &o[i * V];
    for (int64_t e = 0; e < V; ++e) o_i[e] = 0.f;
    for (int64_t d = 0; d < K; ++d) {
      const float qd = scale * c.q[i * K + d] * std::exp(c.gamma[i * K + d]);
      for (int64_t e = 0; e < V; ++e) o_i[e] += qd * state[d * V + e];
    }
    for (int64_t j = 0; j <= i; ++j) {
      const float aij = c.a_qk[i * L + j];
      for (int64_t e = 0; e < V; ++e) o_i[e] += aij * c.v_new[j * V + e];
    }
  }
  // S ← Diag(e^{Γ_L}) S + Σ_j (e^{Γ_L − Γ_j} ⊙ k̂_j) v'_jᵀ
  const float* gamma_last = &c.gamma[(L - 1) * K];
  for (int64_t d = 0; d < K; ++d) {
    float* row = &state[d * V];
    const float decay = std::exp(gamma_last[d]);
    for (int64_t e = 0; e < V; ++e) row[e] *= decay;
    for (int64_t j = 0; j < L; ++j) {
      const float kd = std::exp(gamma_last[d] - c.gamma[j * K + d]) * c.k[j * K + d];
      for (int64_t e = 0; e < V; ++e) row[e] += kd * c.v_new[j * V + e];
    }
  }
}

}  // namespace

void reference_forward_chunked(const ForwardProblem& problem, int chunk_size) {
  FLASH_KDA_CHECK(chunk_size >= 1, "chunk_size: expected a value >= 1, got ", chunk_size);
  const ProblemShape shape = validate_forward(problem, Target::kReference);
  const int64_t K = shape.head_dim_k, V = shape.head_dim_v;
  const float scale = static_cast<float>(problem.options.scale);
  const std::vector<reference::Sequence> sequences = reference::split_sequences(problem, shape);

  // No chunk is longer than the longest sequence, so a huge chunk_size costs no memory.
  int64_t longest = 1;
  for (const reference::Sequence& seq : sequences) longest = std::max(longest, seq.length);
  const int64_t C = std::min<int64_t>(chunk_size, longest);

  reference::TokenPreprocessor<float> tokens(problem, shape);
  ChunkBuffers chunk(C, K, V);
  std::vector<float> state(static_cast<size_t>(K * V)), o(static_cast<size_t>(C * V));

  for (const reference::Sequence& seq : sequences) {
    for (int64_t hv = 0; hv < shape.value_heads; ++hv) {
      tokens.select_value_head(hv);
      reference::load_state(problem, shape, seq.index, hv, state.data());
      for (int64_t start = 0; start < seq.length; start += C) {
        const int64_t L = std::min(C, seq.length - start);
        for (int64_t i = 0; i < L; ++i) {
          chunk.beta[i] = tokens.load(seq.batch_row, seq.begin + start + i, &chunk.q[i * K], &chunk.k[i * K],
                                      &chunk.v[i * V], &chunk.gamma[i * K]);
        }
        run_chunk(chunk, L, K, V, scale, state, o);
        for (int64_t i = 0; i < L; ++i) {
          reference::store_output(problem, shape, seq.batch_row, seq.begin + start + i, hv, &o[i * V]);
        }
      }
      // A zero-length sequence runs no chunk: its final state is its initial state (or zeros).
      reference::store_state(problem, shape, seq.index, hv, state.data());
    }
  }
}

}  // namespace flash_kda
