// validate_forward: one test per error class, for both targets where the rule applies. Each rejection must
// name the argument and show the actual value; acceptance tests pin what each target supports.
#include <gtest/gtest.h>

#include <cmath>
#include <initializer_list>
#include <limits>
#include <sstream>
#include <string>

#include "problem_builder.hpp"

namespace {

using namespace flash_kda;
using flash_kda::tests::HostTensor;
using flash_kda::tests::OwnedProblem;
using flash_kda::tests::ProblemConfig;

// Passes if validation throws flash_kda::Error whose message contains every one of `parts`.
::testing::AssertionResult rejected(const ForwardProblem& p, Target target, std::initializer_list<std::string> parts) {
  try {
    validate_forward(p, target);
  } catch (const Error& e) {
    const std::string message = e.what();
    for (const std::string& part : parts) {
      if (message.find(part) == std::string::npos) {
        return ::testing::AssertionFailure() << "message \"" << message << "\" lacks \"" << part << "\"";
      }
    }
    return ::testing::AssertionSuccess() << message;
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << "threw a non-flash_kda exception: " << e.what();
  }
  return ::testing::AssertionFailure() << "was accepted";
}

::testing::AssertionResult accepted(const ForwardProblem& p, Target target) {
  try {
    validate_forward(p, target);
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << "rejected: " << e.what();
  }
  return ::testing::AssertionSuccess();
}

// Small CPU problem with deliberately different sizes everywhere: B=2, T=8, H=2, HV=4, K=16, V=8.
ProblemConfig reference_config() {
  ProblemConfig c;
  c.B = 2, c.T = 8, c.H = 2, c.HV = 4, c.K = 16, c.V = 8;
  return c;
}

// What the CUDA kernel supports: bf16 data, K = V = 128, HV = H, fp32 state, V-first layout.
ProblemConfig cuda_config() {
  ProblemConfig c;
  c.B = 2, c.T = 8, c.H = 2, c.HV = 2, c.K = 128, c.V = 128;
  c.data_dtype = c.out_dtype = DType::kBFloat16;
  c.device = DeviceType::kCUDA;
  return c;
}

const char* target_name(Target t) { return t == Target::kReference ? "Reference" : "Cuda"; }

class ValidateBothTargets : public ::testing::TestWithParam<Target> {
 protected:
  Target target() const { return GetParam(); }
  bool cuda() const { return GetParam() == Target::kCuda; }
  ProblemConfig config() const { return cuda() ? cuda_config() : reference_config(); }
  OwnedProblem build(const ProblemConfig& c) const { return tests::make_problem(c, 1234); }
  OwnedProblem build() const { return build(config()); }
};

INSTANTIATE_TEST_SUITE_P(Targets, ValidateBothTargets, ::testing::Values(Target::kReference, Target::kCuda),
                         [](const ::testing::TestParamInfo<Target>& param_info) {
                           return target_name(param_info.param);
                         });

TEST_P(ValidateBothTargets, AcceptsValidProblemAndReportsItsShape) {
  OwnedProblem o = build();
  const ProblemShape s = validate_forward(o.problem(), target());
  const ProblemConfig& c = o.config;
  EXPECT_EQ(s.batch, c.B);
  EXPECT_EQ(s.tokens, c.T);
  EXPECT_EQ(s.num_sequences, c.B);
  EXPECT_EQ(s.heads, c.H);
  EXPECT_EQ(s.value_heads, c.HV);
  EXPECT_EQ(s.head_dim_k, c.K);
  EXPECT_EQ(s.head_dim_v, c.V);
}

TEST_P(ValidateBothTargets, RejectsStatesOfDifferentDtypes) {
  ProblemConfig c = config();
  c.initial_state_dtype = DType::kBFloat16;
  c.final_state_dtype = DType::kFloat32;
  EXPECT_TRUE(rejected(build(c).problem(), target(), {"final_state", "bfloat16", "float32", "initial_state"}));
}

TEST(ValidateReference, AcceptsAnFp64FinalStateForTheGold) {
  ProblemConfig c = reference_config();
  c.initial_state_dtype = DType::kBFloat16;
  c.final_state_dtype = DType::kFloat64;
  EXPECT_TRUE(accepted(tests::make_problem(c, 5).problem(), Target::kReference));
}

TEST_P(ValidateBothTargets, AcceptsEveryOptionalTensorAbsentAndVariants) {
  ProblemConfig c = config();
  c.with_A_log = c.with_dt_bias = c.with_initial_state = c.with_final_state = false;
  EXPECT_TRUE(accepted(build(c).problem(), target()));
  c = config();
  c.dt_bias_flat = true;
  EXPECT_TRUE(accepted(build(c).problem(), target()));
  c = config();
  c.options.state_layout = StateLayout::kKeyFirst;
  c.initial_state_dtype = c.final_state_dtype = DType::kBFloat16;
  EXPECT_TRUE(accepted(build(c).problem(), target()));
  c.with_final_state = false;  // a bf16 initial state alone
  EXPECT_TRUE(accepted(build(c).problem(), target()));
  c = config();
  c.options.beta = BetaMode::kTwoSigmoid;
  c.options.l2norm_qk = 0;
  EXPECT_TRUE(accepted(build(c).problem(), target()));
  c = config();
  c.B = 1, c.T = 9, c.cu_seqlens = {0, 4, 4, 9};
  c.cu_seqlens_dtype = DType::kInt32;
  OwnedProblem varlen = build(c);
  EXPECT_TRUE(accepted(varlen.problem(), target()));
  EXPECT_EQ(validate_forward(varlen.problem(), target()).num_sequences, 3);
  c.T = 0, c.cu_seqlens = {0};  // no tokens, no sequences
  EXPECT_TRUE(accepted(build(c).problem(), target()));
}

TEST_P(ValidateBothTargets, RejectsAbiVersion) {
  OwnedProblem o = build();
  ForwardProblem p = o.problem();
  p.abi_version = kAbiVersion + 41;
  EXPECT_TRUE(rejected(p, target(), {"abi_version", std::to_string(kAbiVersion + 41)}));
}

TEST_P(ValidateBothTargets, RejectsWrongDevice) {
  OwnedProblem o = build();
  ForwardProblem p = o.problem();
  p.device = cuda() ? DeviceType::kCPU : DeviceType::kCUDA;
  EXPECT_TRUE(rejected(p, target(), {"device", cuda() ? "kCPU" : "kCUDA"}));
}

TEST_P(ValidateBothTargets, RejectsGarbageEnumValues) {
  OwnedProblem o = build();
  ForwardProblem p = o.problem();
  p.options.gate = static_cast<GateMode>(7);
  EXPECT_TRUE(rejected(p, target(), {"options.gate", "7"}));
  p = o.problem();
  p.options.beta = static_cast<BetaMode>(-1);
  EXPECT_TRUE(rejected(p, target(), {"options.beta", "-1"}));
  p = o.problem();
  p.options.state_layout = static_cast<StateLayout>(5);
  EXPECT_TRUE(rejected(p, target(), {"options.state_layout", "5"}));
  p = o.problem();
  p.device = static_cast<DeviceType>(3);
  EXPECT_TRUE(rejected(p, target(), {"device", "3"}));
  p = o.problem();
  p.q.dtype = static_cast<DType>(42);
  EXPECT_TRUE(rejected(p, target(), {"q", "DType(42)"}));
  p = o.problem();
  p.options.l2norm_qk = 2;
  EXPECT_TRUE(rejected(p, target(), {"options.l2norm_qk", "2"}));
  EXPECT_TRUE(rejected(o.problem(), static_cast<Target>(9), {"target", "9"}));
}

TEST_P(ValidateBothTargets, RejectsMissingRequiredTensor) {
  OwnedProblem o = build();
  ForwardProblem p = o.problem();
  p.beta = TensorView{};
  EXPECT_TRUE(rejected(p, target(), {"beta", "none"}));
  p = o.problem();
  p.v.data = nullptr;  // shape says it has elements
  EXPECT_TRUE(rejected(p, target(), {"v", "null"}));
}

TEST_P(ValidateBothTargets, RejectsWrongDtype) {
  OwnedProblem o = build();
  ForwardProblem p = o.problem();
  p.q.dtype = cuda() ? DType::kFloat32 : DType::kInt32;
  EXPECT_TRUE(rejected(p, target(), {"q: expected dtype", cuda() ? "float32" : "int32"}));
  p = o.problem();
  p.out.dtype = cuda() ? DType::kFloat16 : DType::kInt64;
  EXPECT_TRUE(rejected(p, target(), {"out", cuda() ? "float16" : "int64"}));
  p = o.problem();
  p.A_log.dtype = cuda() ? DType::kFloat64 : DType::kBFloat16;
  EXPECT_TRUE(rejected(p, target(), {"A_log", cuda() ? "float64" : "bfloat16"}));
  p = o.problem();
  p.dt_bias.dtype = DType::kFloat16;
  EXPECT_TRUE(rejected(p, target(), {"dt_bias", "float16"}));
  p = o.problem();
  p.beta.dtype = DType::kInt32;
  EXPECT_TRUE(rejected(p, target(), {"beta", "int32"}));
}

TEST_P(ValidateBothTargets, RejectsWrongRank) {
  OwnedProblem o = build();
  ForwardProblem p = o.problem();
  p.q.rank = 3;
  EXPECT_TRUE(rejected(p, target(), {"q", "rank", "3"}));
  p = o.problem();
  p.beta.rank = 4;
  p.beta.sizes[3] = 1;
  EXPECT_TRUE(rejected(p, target(), {"beta", "rank", "4"}));
  p = o.problem();
  p.A_log.rank = 2;
  p.A_log.sizes[1] = 1;
  EXPECT_TRUE(rejected(p, target(), {"A_log", "rank", "2"}));
  p = o.problem();
  p.g.rank = 9;  // garbage
  EXPECT_TRUE(rejected(p, target(), {"g", "rank", "9"}));
  p = o.problem();
  p.dt_bias.rank = 3;
  p.dt_bias.sizes[2] = 1;
  EXPECT_TRUE(rejected(p, target(), {"dt_bias", "rank 2 or 1", "got 3"}));
  p = o.problem();
  p.initial_state.rank = 3;
  EXPECT_TRUE(rejected(p, target(), {"initial_state", "rank", "got 3"}));
}

TEST_P(ValidateBothTargets, RejectsShapeMismatch) {
  OwnedProblem o = build();
  const ProblemConfig& c = o.config;
  ForwardProblem p = o.problem();
  p.k.sizes[3] = c.K / 2;
  EXPECT_TRUE(
      rejected(p, target(), {"k: expected shape", "(same as q)", "[2, 8, 2, " + std::to_string(c.K / 2) + "]"}));
  p = o.problem();
  p.v.sizes[1] = c.T - 1;
  EXPECT_TRUE(rejected(p, target(), {"v", "[2, 7, "}));
  p = o.problem();
  p.g.sizes[3] = c.K + 1;
  EXPECT_TRUE(rejected(p, target(), {"g", std::to_string(c.K + 1) + "]"}));
  p = o.problem();
  p.beta.sizes[2] = c.HV + 2;
  EXPECT_TRUE(rejected(p, target(), {"beta", "[2, 8, " + std::to_string(c.HV + 2) + "]"}));
  p = o.problem();
  p.out.sizes[3] = c.V + 1;
  EXPECT_TRUE(rejected(p, target(), {"out", "(same as v)", std::to_string(c.V + 1) + "]"}));
  p = o.problem();
  p.A_log.sizes[0] = c.HV + 3;
  EXPECT_TRUE(rejected(p, target(), {"A_log", "[" + std::to_string(c.HV + 3) + "]"}));
  p = o.problem();
  p.dt_bias.sizes[1] = c.K - 1;
  EXPECT_TRUE(rejected(p, target(), {"dt_bias", std::to_string(c.K - 1) + "]"}));
}

TEST_P(ValidateBothTargets, RejectsNegativeSizes) {
  OwnedProblem o = build();
  ForwardProblem p = o.problem();
  p.q.sizes[1] = -1;
  EXPECT_TRUE(rejected(p, target(), {"q", "-1"}));
}

TEST_P(ValidateBothTargets, RejectsValueHeadsThatAreNotAMultipleOfH) {
  OwnedProblem o = build();
  ForwardProblem p = o.problem();
  for (TensorView* t : {&p.v, &p.g, &p.beta, &p.out}) t->sizes[2] = 3;  // H = 2
  EXPECT_TRUE(rejected(p, target(), {"v", "HV = 3"}));
  p = o.problem();
  p.g.sizes[2] = 2 * o.config.HV;  // v and g disagree on HV
  EXPECT_TRUE(rejected(p, target(), {"g", "[2, 8, " + std::to_string(2 * o.config.HV) + ", "}));
}

TEST_P(ValidateBothTargets, RejectsBadCuSeqlensDtypeRankAndBatch) {
  ProblemConfig c = config();
  c.B = 1, c.T = 9, c.cu_seqlens = {0, 4, 9};
  OwnedProblem o = build(c);
  ForwardProblem p = o.problem();
  p.cu_seqlens.dtype = DType::kFloat32;
  EXPECT_TRUE(rejected(p, target(), {"cu_seqlens", "float32"}));
  p = o.problem();
  p.cu_seqlens.rank = 2;
  p.cu_seqlens.sizes[0] = 1, p.cu_seqlens.sizes[1] = 3, p.cu_seqlens.strides[0] = 3, p.cu_seqlens.strides[1] = 1;
  EXPECT_TRUE(rejected(p, target(), {"cu_seqlens", "rank", "2"}));
  p = o.problem();
  p.cu_seqlens.sizes[0] = 0;
  EXPECT_TRUE(rejected(p, target(), {"cu_seqlens", "got 0"}));
  // B = 2 with cu_seqlens.
  ProblemConfig fixed = config();
  OwnedProblem batch2 = build(fixed);
  p = batch2.problem();
  p.cu_seqlens = o.cu_seqlens.view();
  EXPECT_TRUE(rejected(p, target(), {"cu_seqlens", "got 2"}));
}

TEST_P(ValidateBothTargets, RejectsStateShapeAndDtypeMismatch) {
  OwnedProblem o = build();
  ForwardProblem p = o.problem();
  p.initial_state.sizes[0] = o.config.B + 1;  // N wrong
  EXPECT_TRUE(rejected(p, target(), {"initial_state", "[3, "}));
  p = o.problem();
  p.final_state.sizes[1] = o.config.HV + 1;
  EXPECT_TRUE(rejected(p, target(), {"final_state", "[2, " + std::to_string(o.config.HV + 1) + ", "}));
  p = o.problem();
  p.initial_state.dtype = cuda() ? DType::kFloat16 : DType::kInt32;
  EXPECT_TRUE(rejected(p, target(), {"initial_state", cuda() ? "float16" : "int32"}));
  p = o.problem();
  p.final_state.dtype = DType::kInt64;
  EXPECT_TRUE(rejected(p, target(), {"final_state", "int64"}));
  // Varlen: N comes from cu_seqlens, not from B.
  ProblemConfig c = config();
  c.B = 1, c.T = 9, c.cu_seqlens = {0, 4, 9};
  OwnedProblem varlen = build(c);
  p = varlen.problem();
  p.initial_state = o.initial_state.view();  // N = 2 matches; then make it 1
  p.initial_state.sizes[0] = 1;
  EXPECT_TRUE(rejected(p, target(), {"initial_state", "[1, "}));
}

TEST_P(ValidateBothTargets, RejectsStateInTheOtherLayout) {
  ProblemConfig c = config();
  c.K = cuda() ? 128 : 16;
  c.V = cuda() ? 64 : 8;  // K ≠ V so that [K, V] and [V, K] differ
  c.options.state_layout = StateLayout::kKeyFirst;
  OwnedProblem key_first = build(c);
  c.options.state_layout = StateLayout::kValueFirst;
  OwnedProblem value_first = build(c);
  ForwardProblem p = value_first.problem();
  p.final_state = key_first.final_state.view();
  const std::string got = "[2, " + std::to_string(c.HV) + ", " + std::to_string(c.K) + ", " + std::to_string(c.V) + "]";
  EXPECT_TRUE(rejected(p, target(), {"final_state", "kValueFirst", got}));
}

TEST_P(ValidateBothTargets, RejectsLowerBoundOutsideRange) {
  OwnedProblem o = build();
  for (float bad : {0.5f, 0.0f, -5.5f, -100.0f}) {
    ForwardProblem p = o.problem();
    p.options.lower_bound = bad;
    std::ostringstream value;
    value << bad;
    EXPECT_TRUE(rejected(p, target(), {"lower_bound", "[-5, 0)", "got " + value.str()}));
  }
  ForwardProblem p = o.problem();
  p.options.lower_bound = std::numeric_limits<float>::quiet_NaN();
  EXPECT_TRUE(rejected(p, target(), {"lower_bound", "nan"}));
  p.options.lower_bound = -5.0f;  // the closed end
  EXPECT_TRUE(accepted(p, target()));
}

TEST_P(ValidateBothTargets, RejectsNonFiniteScale) {
  OwnedProblem o = build();
  ForwardProblem p = o.problem();
  p.options.scale = std::numeric_limits<double>::infinity();
  EXPECT_TRUE(rejected(p, target(), {"scale", "inf"}));
  p.options.scale = std::numeric_limits<double>::quiet_NaN();
  EXPECT_TRUE(rejected(p, target(), {"scale", "nan"}));
}

TEST_P(ValidateBothTargets, RejectsNonUnitInnermostStride) {
  OwnedProblem o = build();
  ForwardProblem p = o.problem();
  p.q.strides[3] = 2;
  EXPECT_TRUE(rejected(p, target(), {"q", "innermost stride", "got 2"}));
  p = o.problem();
  p.beta.strides[2] = 3;
  EXPECT_TRUE(rejected(p, target(), {"beta", "innermost stride", "got 3"}));
  p = o.problem();
  p.final_state.strides[3] = 4;
  EXPECT_TRUE(rejected(p, target(), {"final_state", "innermost stride", "got 4"}));
  p = o.problem();
  p.dt_bias.strides[1] = 5;
  EXPECT_TRUE(rejected(p, target(), {"dt_bias", "innermost stride", "got 5"}));
  p = o.problem();
  p.q.strides[1] = -8;
  EXPECT_TRUE(rejected(p, target(), {"q", "stride", "-8"}));
}

TEST_P(ValidateBothTargets, RejectsBroadcastOutput) {
  OwnedProblem o = build();
  ForwardProblem p = o.problem();
  p.out.strides[1] = 0;
  EXPECT_TRUE(rejected(p, target(), {"out", "stride 0", "dim 1"}));
}

TEST_P(ValidateBothTargets, RejectsGateParametersWithoutGateInKernel) {
  // kNone is not a CUDA gate at all; on the reference it means A_log/dt_bias would be silently ignored.
  OwnedProblem o = build();
  ForwardProblem p = o.problem();
  p.options.gate = GateMode::kNone;
  p.dt_bias = TensorView{};
  if (cuda()) p.A_log = TensorView{};
  EXPECT_TRUE(rejected(p, target(), {cuda() ? "options.gate" : "A_log", "kNone"}));
}

// ---- reference-only rules -----------------------------------------------------------------------------

TEST(ValidateReference, AcceptsEveryFloatDtypeGvaAndOddSizes) {
  ProblemConfig c = reference_config();
  c.H = 3, c.HV = 9, c.K = 5, c.V = 7, c.T = 3;
  c.data_dtype = DType::kFloat16;
  c.out_dtype = DType::kBFloat16;
  c.param_dtype = DType::kFloat64;
  c.initial_state_dtype = DType::kFloat16;
  c.final_state_dtype = DType::kFloat64;
  c.pad = 3;  // non-contiguous inputs are fine on the CPU
  c.options.gate = GateMode::kSoftplus;
  c.options.beta = BetaMode::kNone;
  c.options.lower_bound = 3.0f;  // ignored for kSoftplus
  OwnedProblem o = tests::make_problem(c, 7);
  ForwardProblem p = o.problem();
  p.k.dtype = DType::kFloat64;  // k's buffer holds different bytes now, but validation does not read them
  EXPECT_TRUE(accepted(p, Target::kReference));
  c.T = 0;
  c.B = 0;
  EXPECT_TRUE(accepted(tests::make_problem(c, 7).problem(), Target::kReference));
}

TEST(ValidateReference, RejectsCuSeqlensNotStartingAtZero) {
  ProblemConfig c = reference_config();
  c.B = 1, c.T = 9, c.cu_seqlens = {3, 5, 9};
  EXPECT_TRUE(
      rejected(tests::make_problem(c, 1).problem(), Target::kReference, {"cu_seqlens", "cu_seqlens[0] == 0", "got 3"}));
}

TEST(ValidateReference, RejectsDecreasingCuSeqlens) {
  ProblemConfig c = reference_config();
  c.B = 1, c.T = 9, c.cu_seqlens = {0, 6, 2, 9};
  c.cu_seqlens_dtype = DType::kInt32;
  EXPECT_TRUE(
      rejected(tests::make_problem(c, 1).problem(), Target::kReference, {"cu_seqlens", "non-decreasing", "= 2"}));
}

TEST(ValidateReference, RejectsCuSeqlensNotEndingAtT) {
  ProblemConfig c = reference_config();
  c.B = 1, c.T = 9, c.cu_seqlens = {0, 4, 7};
  EXPECT_TRUE(rejected(tests::make_problem(c, 1).problem(), Target::kReference, {"cu_seqlens", "T = 9", "got 7"}));
  c.cu_seqlens = {0, 4, 12};
  EXPECT_TRUE(rejected(tests::make_problem(c, 1).problem(), Target::kReference, {"cu_seqlens", "got 12"}));
}

TEST(ValidateReference, AcceptsStridedStatesAndInputs) {
  ProblemConfig c = reference_config();
  c.pad = 2;
  OwnedProblem o = tests::make_problem(c, 3);
  ForwardProblem p = o.problem();
  // A state view that skips every other head: not contiguous, fine on the CPU.
  HostTensor wide(DType::kFloat32, {2, 2 * c.HV, c.V, c.K});
  p.initial_state = wide.view();
  p.initial_state.sizes[1] = c.HV;
  p.initial_state.strides[1] *= 2;
  EXPECT_TRUE(accepted(p, Target::kReference));
}

// ---- CUDA-only rules ----------------------------------------------------------------------------------

TEST(ValidateCuda, RejectsUnsupportedHeadDims) {
  ProblemConfig c = cuda_config();
  c.K = 64;
  EXPECT_TRUE(rejected(tests::make_problem(c, 1).problem(), Target::kCuda,
                       {"K: the CUDA kernel supports K = 128 only, got 64"}));
  c = cuda_config();
  c.V = 256;
  EXPECT_TRUE(rejected(tests::make_problem(c, 1).problem(), Target::kCuda, {"V: ", "V = 128", "got 256"}));
}

TEST(ValidateCuda, RejectsGva) {
  ProblemConfig c = cuda_config();
  c.HV = 4;  // a valid GVA problem for the reference
  OwnedProblem o = tests::make_problem(c, 1);
  EXPECT_TRUE(accepted(
      [&] {
        ForwardProblem p = o.problem();
        p.device = DeviceType::kCPU;
        return p;
      }(),
      Target::kReference));
  EXPECT_TRUE(rejected(o.problem(), Target::kCuda, {"v", "HV = 4", "H = 2"}));
}

TEST(ValidateCuda, RejectsUnsupportedGateAndBetaModes) {
  ProblemConfig c = cuda_config();
  c.options.gate = GateMode::kSoftplus;
  EXPECT_TRUE(rejected(tests::make_problem(c, 1).problem(), Target::kCuda, {"options.gate", "kSoftplus"}));
  c = cuda_config();
  c.options.beta = BetaMode::kNone;
  EXPECT_TRUE(rejected(tests::make_problem(c, 1).problem(), Target::kCuda, {"options.beta", "kNone"}));
}

TEST(ValidateCuda, RejectsMisalignedDataPointer) {
  OwnedProblem o = tests::make_problem(cuda_config(), 1);
  ForwardProblem p = o.problem();
  p.k.data = static_cast<unsigned char*>(p.k.data) + 2;  // one bf16 element in
  EXPECT_TRUE(rejected(p, Target::kCuda, {"k", "16-byte aligned", "got an address 2 bytes"}));
  p = o.problem();
  p.final_state.data = static_cast<unsigned char*>(p.final_state.data) + 4;
  EXPECT_TRUE(rejected(p, Target::kCuda, {"final_state", "16-byte aligned", "4 bytes"}));
}

TEST(ValidateCuda, RejectsStridesThatBreak16ByteRows) {
  ProblemConfig c = cuda_config();
  c.pad = 1;  // every outer stride is now an odd number of elements
  OwnedProblem o = tests::make_problem(c, 1);
  ForwardProblem p = o.problem();
  EXPECT_TRUE(rejected(p, Target::kCuda, {"q", "multiple of 8", "got " + std::to_string(o.q.strides()[0])}));
  // Padding by 8 elements keeps 16-byte rows: accepted, and beta may have any outer strides.
  c.pad = 8;
  OwnedProblem padded = tests::make_problem(c, 1);
  p = padded.problem();
  p.beta = o.beta.view();  // pad 1
  EXPECT_TRUE(accepted(p, Target::kCuda));
}

TEST(ValidateCuda, RejectsNonContiguousState) {
  ProblemConfig c = cuda_config();
  OwnedProblem o = tests::make_problem(c, 1);
  HostTensor wide(DType::kFloat32, {2, 2 * c.HV, c.V, c.K});
  ForwardProblem p = o.problem();
  p.initial_state = wide.view();
  p.initial_state.sizes[1] = c.HV;
  p.initial_state.strides[1] *= 2;
  EXPECT_TRUE(
      rejected(p, Target::kCuda, {"initial_state", "contiguous", "got stride " + std::to_string(2 * c.V * c.K)}));
}

TEST(ValidateCuda, DoesNotReadCuSeqlensValues) {
  // The offsets live on the GPU; the kernel clamps them. Bad values therefore pass host validation.
  ProblemConfig c = cuda_config();
  c.B = 1, c.T = 9, c.cu_seqlens = {5, 2, 40};
  EXPECT_TRUE(accepted(tests::make_problem(c, 1).problem(), Target::kCuda));
}

TEST(ValidateCuda, RejectsMoreBlocksThanTheGridHolds) {
  OwnedProblem o = tests::make_problem(cuda_config(), 1);
  ForwardProblem p = o.problem();
  // Sizes only (nothing is read): B = 2^30 rows of 0 tokens, 2 heads → 2^31 (sequence, head) pairs.
  for (TensorView* t : {&p.q, &p.k, &p.v, &p.g, &p.beta, &p.out}) t->sizes[0] = int64_t{1} << 30, t->sizes[1] = 0;
  p.initial_state = p.final_state = TensorView{};
  EXPECT_TRUE(rejected(p, Target::kCuda, {"N·H", "N = 1073741824", "H = 2"}));
}

TEST(ValidateCuda, RejectsNegativeDeviceIndex) {
  OwnedProblem o = tests::make_problem(cuda_config(), 1);
  ForwardProblem p = o.problem();
  p.device_index = -1;
  EXPECT_TRUE(rejected(p, Target::kCuda, {"device_index", "-1"}));
}

}  // namespace
