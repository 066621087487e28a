// The pre-processing of SPEC §1, shared by both CPU references (instantiated in double for the fp64
// recurrence and in float for the chunked fp32 version): L2 normalisation of q and k, the gate in its three
// forms, and beta. One place, so that the two references can only differ in how they run the recurrence.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "flash_kda/flash_kda.hpp"
#include "reference/tensor_access.hpp"

namespace flash_kda::reference {

// Both forms are finite for every finite x (no exp of a large positive argument).
template <typename Real>
Real sigmoid(Real x) {
  if (x >= Real(0)) return Real(1) / (Real(1) + std::exp(-x));
  const Real e = std::exp(x);
  return e / (Real(1) + e);
}

// softplus(x) = log(1 + e^x) = max(x, 0) + log1p(e^−|x|): no overflow for large x, no loss for small.
template <typename Real>
Real softplus(Real x) {
  return std::max(x, Real(0)) + std::log1p(std::exp(-std::fabs(x)));
}

// x ← x / sqrt(‖x‖² + 1e-6)   (SPEC §1; the epsilon keeps an all-zero row finite)
template <typename Real>
void l2_normalize(Real* x, int64_t n) {
  Real sum_of_squares = 0;
  for (int64_t i = 0; i < n; ++i) sum_of_squares += x[i] * x[i];
  const Real norm = std::sqrt(sum_of_squares + Real(1e-6));
  for (int64_t i = 0; i < n; ++i) x[i] /= norm;
}

// Natural-log decay a from the raw gate g (one key channel). exp_a_log is exp(A_log), 1 when A_log is absent;
// dt_bias is 0 when absent.
template <typename Real>
Real log_decay(GateMode gate, Real g, Real dt_bias, Real exp_a_log, Real lower_bound) {
  switch (gate) {
    case GateMode::kNone:
      return g;
    case GateMode::kLowerBound:
      return lower_bound * sigmoid(exp_a_log * (g + dt_bias));
    case GateMode::kSoftplus:
      return -exp_a_log * softplus(g + dt_bias);
  }
  return g;  // unreachable: validate_forward rejects other values
}

template <typename Real>
Real beta_value(BetaMode mode, Real beta) {
  switch (mode) {
    case BetaMode::kNone:
      return beta;
    case BetaMode::kSigmoid:
      return sigmoid(beta);
    case BetaMode::kTwoSigmoid:
      return Real(2) * sigmoid(beta);
  }
  return beta;  // unreachable: validate_forward rejects other values
}

// Loads one token of one value head in working precision with all pre-processing applied.
// GVA: value head hv reads q/k head hv / G (G = HV / H); g, beta, A_log and dt_bias are per value head.
template <typename Real>
class TokenPreprocessor {
 public:
  TokenPreprocessor(const ForwardProblem& p, const ProblemShape& s)
      : p_(p), s_(s), group_(s.value_heads / s.heads), dt_bias_(static_cast<size_t>(s.head_dim_k), Real(0)) {}

  // Selects the value head and loads its per-head gate parameters.
  void select_value_head(int64_t hv) {
    value_head_ = hv;
    qk_head_ = hv / group_;
    exp_a_log_ = p_.A_log.present() ? static_cast<Real>(std::exp(load_element(p_.A_log, element_offset(p_.A_log, hv))))
                                    : Real(1);
    for (int64_t d = 0; d < s_.head_dim_k; ++d) {
      if (!p_.dt_bias.present()) break;
      // [HV, K] or the flattened [HV * K]
      const int64_t offset =
          p_.dt_bias.rank == 2 ? element_offset(p_.dt_bias, hv, d) : element_offset(p_.dt_bias, hv * s_.head_dim_k + d);
      dt_bias_[static_cast<size_t>(d)] = static_cast<Real>(load_element(p_.dt_bias, offset));
    }
  }

  // Fills q̂, k̂ (K each), v (V) and the log decay a (K) of token t in batch row `row`; returns b_t.
  Real load(int64_t row, int64_t t, Real* q, Real* k, Real* v, Real* a) const {
    const ForwardOptions& o = p_.options;
    const Real lower_bound = static_cast<Real>(o.lower_bound);
    for (int64_t d = 0; d < s_.head_dim_k; ++d) {
      q[d] = static_cast<Real>(load_element(p_.q, element_offset(p_.q, row, t, qk_head_, d)));
      k[d] = static_cast<Real>(load_element(p_.k, element_offset(p_.k, row, t, qk_head_, d)));
      const Real g = static_cast<Real>(load_element(p_.g, element_offset(p_.g, row, t, value_head_, d)));
      a[d] = log_decay(o.gate, g, dt_bias_[static_cast<size_t>(d)], exp_a_log_, lower_bound);
    }
    if (o.l2norm_qk != 0) {
      l2_normalize(q, s_.head_dim_k);
      l2_normalize(k, s_.head_dim_k);
    }
    for (int64_t d = 0; d < s_.head_dim_v; ++d) {
      v[d] = static_cast<Real>(load_element(p_.v, element_offset(p_.v, row, t, value_head_, d)));
    }
    const Real beta = static_cast<Real>(load_element(p_.beta, element_offset(p_.beta, row, t, value_head_)));
    return beta_value(o.beta, beta);
  }

 private:
  const ForwardProblem& p_;
  const ProblemShape s_;
  const int64_t group_;
  int64_t value_head_ = 0;
  int64_t qk_head_ = 0;
  Real exp_a_log_ = 1;
  std::vector<Real> dt_bias_;
};

}  // namespace flash_kda::reference
