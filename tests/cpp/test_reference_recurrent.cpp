// The fp64 token-by-token recurrence (reference_forward_recurrent): against computations written out by
// hand for K = V = 2, and against itself under transformations that must not change the result (batching,
// layouts, GVA, pre-processing done by the caller instead of inside, dtypes, strides).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <set>
#include <string>

#include "problem_builder.hpp"

namespace {

using namespace flash_kda;
using flash_kda::tests::copy_inputs;
using flash_kda::tests::copy_values;
using flash_kda::tests::for_each_index;
using flash_kda::tests::HostTensor;
using flash_kda::tests::Index;
using flash_kda::tests::make_problem;
using flash_kda::tests::max_abs_diff;
using flash_kda::tests::OwnedProblem;
using flash_kda::tests::ProblemConfig;

void run(OwnedProblem& o) { reference_forward_recurrent(o.problem()); }

double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// Every tensor in float64 (the sizes and options of `c` kept).
ProblemConfig with_fp64_tensors(ProblemConfig c) {
  c.data_dtype = c.out_dtype = c.param_dtype = DType::kFloat64;
  c.initial_state_dtype = c.final_state_dtype = DType::kFloat64;
  return c;
}

ProblemConfig fp64_config() { return with_fp64_tensors(ProblemConfig{}); }

void expect_close(double actual, double expected, const std::string& what) {
  EXPECT_NEAR(actual, expected, 1e-12 * std::max(1.0, std::fabs(expected))) << what;
}

// ---- hand computations: K = V = 2, three tokens, every formula written out with scalars -----------------

TEST(ReferenceRecurrent, MatchesHandComputationLowerBoundGateSigmoidBeta) {
  ProblemConfig c = fp64_config();
  c.T = 3, c.H = c.HV = 1, c.K = c.V = 2;
  c.options.scale = 0.7;
  c.options.gate = GateMode::kLowerBound;
  c.options.lower_bound = -3.5f;
  c.options.beta = BetaMode::kSigmoid;
  c.options.l2norm_qk = 1;
  c.options.state_layout = StateLayout::kKeyFirst;
  OwnedProblem o = make_problem(c, 11);
  run(o);

  // S[key][value]; key-first layout stores it as [n, h, key, value].
  double s00 = o.initial_state.get({0, 0, 0, 0}), s01 = o.initial_state.get({0, 0, 0, 1});
  double s10 = o.initial_state.get({0, 0, 1, 0}), s11 = o.initial_state.get({0, 0, 1, 1});
  const double exp_a_log = std::exp(o.A_log.get({0}));
  const double dt0 = o.dt_bias.get({0, 0}), dt1 = o.dt_bias.get({0, 1});
  for (int64_t t = 0; t < 3; ++t) {
    double q0 = o.q.get({0, t, 0, 0}), q1 = o.q.get({0, t, 0, 1});
    double k0 = o.k.get({0, t, 0, 0}), k1 = o.k.get({0, t, 0, 1});
    const double v0 = o.v.get({0, t, 0, 0}), v1 = o.v.get({0, t, 0, 1});
    const double qn = std::sqrt(q0 * q0 + q1 * q1 + 1e-6), kn = std::sqrt(k0 * k0 + k1 * k1 + 1e-6);
    q0 /= qn, q1 /= qn, k0 /= kn, k1 /= kn;
    const double a0 = -3.5 / (1.0 + std::exp(-exp_a_log * (o.g.get({0, t, 0, 0}) + dt0)));
    const double a1 = -3.5 / (1.0 + std::exp(-exp_a_log * (o.g.get({0, t, 0, 1}) + dt1)));
    const double b = 1.0 / (1.0 + std::exp(-o.beta.get({0, t, 0})));
    s00 *= std::exp(a0), s01 *= std::exp(a0);
    s10 *= std::exp(a1), s11 *= std::exp(a1);
    const double r0 = v0 - (s00 * k0 + s10 * k1), r1 = v1 - (s01 * k0 + s11 * k1);
    s00 += b * k0 * r0, s01 += b * k0 * r1;
    s10 += b * k1 * r0, s11 += b * k1 * r1;
    expect_close(o.out.get({0, t, 0, 0}), 0.7 * (s00 * q0 + s10 * q1), "o[" + std::to_string(t) + "][0]");
    expect_close(o.out.get({0, t, 0, 1}), 0.7 * (s01 * q0 + s11 * q1), "o[" + std::to_string(t) + "][1]");
  }
  expect_close(o.final_state.get({0, 0, 0, 0}), s00, "S[0][0]");
  expect_close(o.final_state.get({0, 0, 0, 1}), s01, "S[0][1]");
  expect_close(o.final_state.get({0, 0, 1, 0}), s10, "S[1][0]");
  expect_close(o.final_state.get({0, 0, 1, 1}), s11, "S[1][1]");
}

TEST(ReferenceRecurrent, MatchesHandComputationSoftplusGateTwoSigmoidValueFirst) {
  ProblemConfig c = fp64_config();
  c.T = 3, c.H = c.HV = 1, c.K = c.V = 2;
  c.options.scale = -1.3;
  c.options.gate = GateMode::kSoftplus;
  c.with_A_log = false;  // exp(A_log) = 1
  c.options.beta = BetaMode::kTwoSigmoid;
  c.options.l2norm_qk = 0;
  c.options.state_layout = StateLayout::kValueFirst;
  OwnedProblem o = make_problem(c, 12);
  run(o);

  // Value-first layout stores S[key][value] at [n, h, value, key].
  double s00 = o.initial_state.get({0, 0, 0, 0}), s01 = o.initial_state.get({0, 0, 1, 0});
  double s10 = o.initial_state.get({0, 0, 0, 1}), s11 = o.initial_state.get({0, 0, 1, 1});
  const double dt0 = o.dt_bias.get({0, 0}), dt1 = o.dt_bias.get({0, 1});
  for (int64_t t = 0; t < 3; ++t) {
    const double q0 = o.q.get({0, t, 0, 0}), q1 = o.q.get({0, t, 0, 1});
    const double k0 = o.k.get({0, t, 0, 0}), k1 = o.k.get({0, t, 0, 1});
    const double v0 = o.v.get({0, t, 0, 0}), v1 = o.v.get({0, t, 0, 1});
    const double a0 = -std::log(1.0 + std::exp(o.g.get({0, t, 0, 0}) + dt0));
    const double a1 = -std::log(1.0 + std::exp(o.g.get({0, t, 0, 1}) + dt1));
    const double b = 2.0 / (1.0 + std::exp(-o.beta.get({0, t, 0})));
    s00 *= std::exp(a0), s01 *= std::exp(a0);
    s10 *= std::exp(a1), s11 *= std::exp(a1);
    const double r0 = v0 - (s00 * k0 + s10 * k1), r1 = v1 - (s01 * k0 + s11 * k1);
    s00 += b * k0 * r0, s01 += b * k0 * r1;
    s10 += b * k1 * r0, s11 += b * k1 * r1;
    expect_close(o.out.get({0, t, 0, 0}), -1.3 * (s00 * q0 + s10 * q1), "o[" + std::to_string(t) + "][0]");
    expect_close(o.out.get({0, t, 0, 1}), -1.3 * (s01 * q0 + s11 * q1), "o[" + std::to_string(t) + "][1]");
  }
  expect_close(o.final_state.get({0, 0, 0, 0}), s00, "S[0][0]");
  expect_close(o.final_state.get({0, 0, 1, 0}), s01, "S[0][1]");
  expect_close(o.final_state.get({0, 0, 0, 1}), s10, "S[1][0]");
  expect_close(o.final_state.get({0, 0, 1, 1}), s11, "S[1][1]");
}

// ---- batching ------------------------------------------------------------------------------------------

// Sequence `n` of `full` (tokens [begin, begin + length) of batch row `row`) as a problem of its own.
OwnedProblem single_sequence(const OwnedProblem& full, int64_t n, int64_t row, int64_t begin, int64_t length) {
  ProblemConfig c = full.config;
  c.B = 1, c.T = length, c.cu_seqlens.clear();
  OwnedProblem one = make_problem(c, 99);
  auto token = [&](const Index& i) {
    Index j = i;
    j[0] = row, j[1] += begin;
    return j;
  };
  for (const auto& pair :
       {std::make_pair(&full.q, &one.q), std::make_pair(&full.k, &one.k), std::make_pair(&full.v, &one.v),
        std::make_pair(&full.g, &one.g), std::make_pair(&full.beta, &one.beta)}) {
    const HostTensor* src = pair.first;
    pair.second->fill([&](const Index& i) { return src->get(token(i)); });
  }
  copy_values(full.A_log, one.A_log);
  copy_values(full.dt_bias, one.dt_bias);
  one.initial_state.fill([&](const Index& i) { return full.initial_state.get({n, i[1], i[2], i[3]}); });
  return one;
}

void expect_matches_sequence(OwnedProblem& one, const OwnedProblem& full, int64_t n, int64_t row, int64_t begin) {
  run(one);  // its out and final_state start as NaN: anything left unwritten fails below
  for_each_index(one.out.sizes(), [&](const Index& i) {
    ASSERT_EQ(one.out.get(i), full.out.get({row, begin + i[1], i[2], i[3]})) << "sequence " << n << " token " << i[1];
  });
  for_each_index(one.final_state.sizes(), [&](const Index& i) {
    ASSERT_EQ(one.final_state.get(i), full.final_state.get({n, i[1], i[2], i[3]})) << "sequence " << n;
  });
}

TEST(ReferenceRecurrent, VarlenBatchEqualsSequencesRunOneByOne) {
  ProblemConfig c;
  c.T = 20, c.H = 2, c.HV = 4, c.K = 8, c.V = 6;
  c.cu_seqlens = {0, 5, 5, 12, 20};
  c.out_dtype = c.final_state_dtype = DType::kFloat64;
  OwnedProblem full = make_problem(c, 21);
  run(full);
  for (int64_t n = 0; n + 1 < static_cast<int64_t>(c.cu_seqlens.size()); ++n) {
    const int64_t begin = c.cu_seqlens[static_cast<size_t>(n)], end = c.cu_seqlens[static_cast<size_t>(n) + 1];
    OwnedProblem one = single_sequence(full, n, 0, begin, end - begin);
    expect_matches_sequence(one, full, n, 0, begin);
  }
}

TEST(ReferenceRecurrent, FixedLengthBatchEqualsRowsRunOneByOne) {
  ProblemConfig c;
  c.B = 3, c.T = 11, c.H = 1, c.HV = 2, c.K = 6, c.V = 5;
  c.out_dtype = c.final_state_dtype = DType::kFloat64;
  OwnedProblem full = make_problem(c, 22);
  run(full);
  for (int64_t n = 0; n < c.B; ++n) {
    OwnedProblem one = single_sequence(full, n, n, 0, c.T);
    expect_matches_sequence(one, full, n, n, 0);
  }
}

TEST(ReferenceRecurrent, ZeroLengthSequencesKeepInitialStateAndWriteNoOutput) {
  ProblemConfig c;
  c.T = 10, c.H = 2, c.HV = 2, c.K = 4, c.V = 3;
  c.cu_seqlens = {0, 0, 7, 7, 7, 10};
  c.pad = 2;  // out has padding that must never be written
  OwnedProblem o = make_problem(c, 23);
  o.out.fill_storage(std::nan(""));
  run(o);
  std::set<int64_t> written;
  for_each_index(o.out.sizes(), [&](const Index& i) { written.insert(o.out.offset(i)); });
  for (int64_t raw = 0; raw < o.out.storage_elements(); ++raw) {
    if (written.count(raw)) {
      ASSERT_TRUE(std::isfinite(o.out.get_raw(raw))) << "output element at storage offset " << raw << " not written";
    } else {
      ASSERT_TRUE(std::isnan(o.out.get_raw(raw))) << "padding at storage offset " << raw << " was written";
    }
  }
  for (int64_t n : {0, 2, 3}) {
    for_each_index({c.HV, c.V, c.K}, [&](const Index& i) {
      ASSERT_EQ(o.final_state.get({n, i[0], i[1], i[2]}), o.initial_state.get({n, i[0], i[1], i[2]}))
          << "sequence " << n;
    });
  }
  for (int64_t n : {1, 4}) {  // the others did move
    EXPECT_NE(o.final_state.get({n, 0, 0, 0}), o.initial_state.get({n, 0, 0, 0}));
  }
}

TEST(ReferenceRecurrent, NoTokensReturnsInitialStateOrZeros) {
  ProblemConfig c;
  c.B = 2, c.T = 0, c.K = 4, c.V = 4;
  OwnedProblem o = make_problem(c, 24);
  run(o);
  EXPECT_EQ(max_abs_diff(o.final_state.values(), o.initial_state.values()), 0.0);
  c.with_initial_state = false;
  OwnedProblem zeros = make_problem(c, 24);
  run(zeros);
  for (double x : zeros.final_state.values()) ASSERT_EQ(x, 0.0);
}

TEST(ReferenceRecurrent, NoInitialStateEqualsZeroInitialState) {
  ProblemConfig c;
  c.B = 2, c.T = 9, c.K = 5, c.V = 4;
  c.with_initial_state = false;
  OwnedProblem absent = make_problem(c, 25);
  c.with_initial_state = true;
  OwnedProblem zero = make_problem(c, 25);
  copy_inputs(absent, zero);
  zero.initial_state.fill([](const Index&) { return 0.0; });
  run(absent);
  run(zero);
  EXPECT_EQ(max_abs_diff(absent.out.values(), zero.out.values()), 0.0);
  EXPECT_EQ(max_abs_diff(absent.final_state.values(), zero.final_state.values()), 0.0);
}

TEST(ReferenceRecurrent, Int32CuSeqlensEqualsInt64) {
  ProblemConfig c;
  c.T = 12, c.K = 4, c.V = 4, c.cu_seqlens = {0, 3, 12};
  OwnedProblem wide = make_problem(c, 26);
  c.cu_seqlens_dtype = DType::kInt32;
  OwnedProblem narrow = make_problem(c, 26);
  copy_inputs(wide, narrow);
  run(wide);
  run(narrow);
  EXPECT_EQ(max_abs_diff(wide.out.values(), narrow.out.values()), 0.0);
  EXPECT_EQ(max_abs_diff(wide.final_state.values(), narrow.final_state.values()), 0.0);
}

// ---- layouts, GVA --------------------------------------------------------------------------------------

TEST(ReferenceRecurrent, StateLayoutsGiveTransposedStates) {
  ProblemConfig c;
  c.B = 2, c.T = 7, c.H = 2, c.HV = 2, c.K = 8, c.V = 6;  // K ≠ V: a mixed-up index cannot go unnoticed
  c.options.state_layout = StateLayout::kKeyFirst;
  OwnedProblem key_first = make_problem(c, 31);
  c.options.state_layout = StateLayout::kValueFirst;
  OwnedProblem value_first = make_problem(c, 32);
  copy_inputs(key_first, value_first);  // all but the states, whose sizes differ
  value_first.initial_state.fill([&](const Index& i) { return key_first.initial_state.get({i[0], i[1], i[3], i[2]}); });
  run(key_first);
  run(value_first);
  EXPECT_EQ(max_abs_diff(key_first.out.values(), value_first.out.values()), 0.0);
  for_each_index(value_first.final_state.sizes(), [&](const Index& i) {
    ASSERT_EQ(value_first.final_state.get(i), key_first.final_state.get({i[0], i[1], i[3], i[2]}));
  });
}

TEST(ReferenceRecurrent, GvaEqualsQKRepeatedPerValueHead) {
  ProblemConfig c;
  c.B = 2, c.T = 9, c.H = 2, c.HV = 6, c.K = 5, c.V = 4;  // G = 3
  OwnedProblem gva = make_problem(c, 33);
  c.H = 6;
  OwnedProblem repeated = make_problem(c, 34);
  copy_inputs(gva, repeated);  // v, g, beta, A_log, dt_bias, initial_state (same shapes)
  repeated.q.fill([&](const Index& i) { return gva.q.get({i[0], i[1], i[2] / 3, i[3]}); });
  repeated.k.fill([&](const Index& i) { return gva.k.get({i[0], i[1], i[2] / 3, i[3]}); });
  run(gva);
  run(repeated);
  EXPECT_EQ(max_abs_diff(gva.out.values(), repeated.out.values()), 0.0);
  EXPECT_EQ(max_abs_diff(gva.final_state.values(), repeated.final_state.values()), 0.0);
}

// ---- pre-processing inside == done by the caller -------------------------------------------------------

// Runs `inside` and `outside` (same inputs after the caller's pre-processing) and compares in fp64.
void expect_same_results(OwnedProblem& inside, OwnedProblem& outside) {
  run(inside);
  run(outside);
  // Not bit-exact: e.g. sigmoid may be evaluated in another (equivalent) form.
  EXPECT_LE(tests::relative_l2(outside.out, inside.out), 1e-12);
  EXPECT_LE(tests::relative_l2(outside.final_state, inside.final_state), 1e-12);
}

TEST(ReferenceRecurrent, TwoSigmoidBetaEqualsPrecomputedBeta) {
  ProblemConfig c = fp64_config();
  c.B = 2, c.T = 12, c.K = 6, c.V = 5;
  c.options.beta = BetaMode::kTwoSigmoid;
  OwnedProblem inside = make_problem(c, 41);
  c.options.beta = BetaMode::kNone;
  OwnedProblem outside = make_problem(c, 42);
  copy_inputs(inside, outside);
  outside.beta.fill([&](const Index& i) { return 2.0 * sigmoid(inside.beta.get(i)); });
  expect_same_results(inside, outside);
}

TEST(ReferenceRecurrent, SigmoidBetaEqualsPrecomputedBeta) {
  ProblemConfig c = fp64_config();
  c.B = 1, c.T = 12, c.K = 6, c.V = 5;
  OwnedProblem inside = make_problem(c, 43);
  c.options.beta = BetaMode::kNone;
  OwnedProblem outside = make_problem(c, 44);
  copy_inputs(inside, outside);
  outside.beta.fill([&](const Index& i) { return sigmoid(inside.beta.get(i)); });
  expect_same_results(inside, outside);
}

TEST(ReferenceRecurrent, L2NormOffEqualsOnWithPreNormalisedQK) {
  ProblemConfig c = fp64_config();
  c.B = 2, c.T = 10, c.H = 2, c.HV = 4, c.K = 7, c.V = 3;
  OwnedProblem inside = make_problem(c, 45);
  c.options.l2norm_qk = 0;
  OwnedProblem outside = make_problem(c, 46);
  copy_inputs(inside, outside);
  for (auto [src, dst] : {std::make_pair(&inside.q, &outside.q), std::make_pair(&inside.k, &outside.k)}) {
    dst->fill([&, src = src](const Index& i) {
      double norm2 = 0.0;
      for (int64_t d = 0; d < c.K; ++d) norm2 += std::pow(src->get({i[0], i[1], i[2], d}), 2);
      return src->get(i) / std::sqrt(norm2 + 1e-6);
    });
  }
  expect_same_results(inside, outside);
}

struct GateCase {
  GateMode gate;
  bool with_A_log;
  int dt_bias;  // 0: absent, 1: [HV, K], 2: flattened [HV * K]
};

class ReferenceRecurrentGate : public ::testing::TestWithParam<GateCase> {};

TEST_P(ReferenceRecurrentGate, EqualsNoGateWithPrecomputedDecay) {
  const GateCase g = GetParam();
  ProblemConfig c = fp64_config();
  c.B = 2, c.T = 10, c.H = 1, c.HV = 2, c.K = 6, c.V = 4;
  c.options.gate = g.gate;
  c.options.lower_bound = -2.25f;
  c.with_A_log = g.with_A_log;
  c.with_dt_bias = g.dt_bias != 0;
  c.dt_bias_flat = g.dt_bias == 2;
  OwnedProblem inside = make_problem(c, 51);
  c.options.gate = GateMode::kNone;
  OwnedProblem outside = make_problem(c, 52);
  copy_inputs(inside, outside);
  outside.g.fill([&](const Index& i) {
    const double exp_a_log = g.with_A_log ? std::exp(inside.A_log.get({i[2]})) : 1.0;
    double dt = 0.0;
    if (g.dt_bias == 1) dt = inside.dt_bias.get({i[2], i[3]});
    if (g.dt_bias == 2) dt = inside.dt_bias.get({i[2] * c.K + i[3]});
    const double x = inside.g.get(i) + dt;
    return g.gate == GateMode::kLowerBound ? -2.25 * sigmoid(exp_a_log * x) : -exp_a_log * std::log1p(std::exp(x));
  });
  expect_same_results(inside, outside);
}

INSTANTIATE_TEST_SUITE_P(
    Forms, ReferenceRecurrentGate,
    ::testing::Values(GateCase{GateMode::kLowerBound, true, 1}, GateCase{GateMode::kLowerBound, false, 1},
                      GateCase{GateMode::kLowerBound, true, 0}, GateCase{GateMode::kLowerBound, false, 2},
                      GateCase{GateMode::kSoftplus, true, 1}, GateCase{GateMode::kSoftplus, false, 1},
                      GateCase{GateMode::kSoftplus, true, 0}, GateCase{GateMode::kSoftplus, false, 0},
                      GateCase{GateMode::kSoftplus, true, 2}),
    [](const ::testing::TestParamInfo<GateCase>& param_info) {
      const GateCase& g = param_info.param;
      return std::string(g.gate == GateMode::kLowerBound ? "LowerBound" : "Softplus") +
             (g.with_A_log ? "WithALog" : "NoALog") +
             (g.dt_bias == 0   ? "NoDtBias"
              : g.dt_bias == 1 ? "DtBias"
                               : "FlatDtBias");
    });

// ---- dtypes and strides --------------------------------------------------------------------------------

// Round to nearest even float → bf16 with the usual bit trick (independent of the library's converter).
uint16_t bf16_bits_from_float(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

TEST(ReferenceRecurrent, OutputsAreRoundedOnceIntoTheirDtypes) {
  ProblemConfig c = fp64_config();
  c.B = 2, c.T = 9, c.K = 8, c.V = 8;
  c.with_initial_state = false;  // a narrow final state needs a matching initial state; leave both out
  OwnedProblem gold = make_problem(c, 61);
  c.out_dtype = DType::kBFloat16;
  c.final_state_dtype = DType::kFloat16;
  OwnedProblem narrow = make_problem(c, 62);
  copy_inputs(gold, narrow);
  run(gold);
  run(narrow);
  for_each_index(gold.out.sizes(), [&](const Index& i) {
    uint16_t stored;
    std::memcpy(&stored, narrow.out.data() + narrow.out.offset(i) * 2, 2);
    ASSERT_EQ(stored, bf16_bits_from_float(static_cast<float>(gold.out.get(i))));
  });
  for_each_index(gold.final_state.sizes(), [&](const Index& i) {
    uint16_t stored;
    std::memcpy(&stored, narrow.final_state.data() + narrow.final_state.offset(i) * 2, 2);
    ASSERT_EQ(stored, reference::double_to_float16_bits(gold.final_state.get(i)));
  });
}

TEST(ReferenceRecurrent, InputsOfAnyDtypeAreReadExactly) {
  ProblemConfig c = fp64_config();
  c.B = 1, c.T = 13, c.H = 2, c.HV = 2, c.K = 8, c.V = 4;
  c.data_dtype = DType::kBFloat16;
  c.param_dtype = DType::kFloat32;
  c.initial_state_dtype = DType::kFloat16;
  OwnedProblem narrow = make_problem(c, 63);
  OwnedProblem wide = make_problem(with_fp64_tensors(c), 64);
  copy_inputs(narrow, wide);  // exact: every bf16/fp16/fp32 value is a double
  run(narrow);
  run(wide);
  EXPECT_EQ(max_abs_diff(narrow.out.values(), wide.out.values()), 0.0);
  EXPECT_EQ(max_abs_diff(narrow.final_state.values(), wide.final_state.values()), 0.0);
}

TEST(ReferenceRecurrent, StridedInputsEqualContiguousInputs) {
  ProblemConfig c;
  c.B = 2, c.T = 8, c.H = 2, c.HV = 4, c.K = 6, c.V = 5;
  OwnedProblem contiguous = make_problem(c, 65);
  c.pad = 3;
  OwnedProblem strided = make_problem(c, 66);
  copy_inputs(contiguous, strided);
  run(contiguous);
  run(strided);
  EXPECT_EQ(max_abs_diff(contiguous.out.values(), strided.out.values()), 0.0);
  EXPECT_EQ(max_abs_diff(contiguous.final_state.values(), strided.final_state.values()), 0.0);
}

TEST(ReferenceRecurrent, RejectsInvalidProblems) {
  ProblemConfig c;
  OwnedProblem o = make_problem(c, 67);
  ForwardProblem p = o.problem();
  p.device = DeviceType::kCUDA;
  EXPECT_THROW(reference_forward_recurrent(p), Error);
}

}  // namespace
