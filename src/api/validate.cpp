// validate_forward: every argument of a ForwardProblem checked against every other, on the host, once.
//
// Each kind of check is one small helper below (check_rank, check_shape, check_dtype, ...); the body of
// validate_forward only says which helper applies to which argument. Messages name the argument (with the
// names of the Python API), the expected and the actual value: "k: expected shape [2, 64, 4, 128] (same as
// q), got [2, 64, 4, 64]".
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <string>
#include <vector>

#include "common/check.hpp"
#include "reference/tensor_access.hpp"

namespace flash_kda {
namespace {

using detail::concat;
using Shape = std::vector<int64_t>;

// The CUDA kernel's fixed head dimensions and its copy granularity.
constexpr int64_t kCudaHeadDim = 128;
constexpr int64_t kCudaCopyBytes = 16;
constexpr int64_t kCudaCopyElements = kCudaCopyBytes / 2;  // bf16 elements per 16-byte copy

// ---- names ----------------------------------------------------------------------------------------

std::string dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kBFloat16:
      return "bfloat16";
    case DType::kFloat16:
      return "float16";
    case DType::kFloat32:
      return "float32";
    case DType::kFloat64:
      return "float64";
    case DType::kInt32:
      return "int32";
    case DType::kInt64:
      return "int64";
  }
  return concat("DType(", static_cast<int32_t>(dtype), ")");  // garbage from a binding
}

// "bfloat16", "float32 or float64", "bfloat16, float16, float32 or float64".
std::string dtype_list(std::initializer_list<DType> dtypes) {
  std::string out;
  size_t i = 0;
  for (DType d : dtypes) {
    if (i > 0) out += (i + 1 == dtypes.size()) ? " or " : ", ";
    out += dtype_name(d);
    ++i;
  }
  return out;
}

std::string shape_string(const Shape& shape) {
  std::string out = "[";
  for (size_t d = 0; d < shape.size(); ++d) out += concat(d ? ", " : "", shape[d]);
  return out + "]";
}

Shape shape_of(const TensorView& t) { return Shape(t.sizes, t.sizes + t.rank); }

int64_t numel(const TensorView& t) {
  int64_t n = 1;
  for (int d = 0; d < t.rank; ++d) n *= t.sizes[d];
  return n;
}

std::string gate_name(GateMode gate) {
  switch (gate) {
    case GateMode::kNone:
      return "kNone";
    case GateMode::kLowerBound:
      return "kLowerBound";
    case GateMode::kSoftplus:
      return "kSoftplus";
  }
  return concat("GateMode(", static_cast<int32_t>(gate), ")");
}

std::string beta_name(BetaMode beta) {
  switch (beta) {
    case BetaMode::kNone:
      return "kNone";
    case BetaMode::kSigmoid:
      return "kSigmoid";
    case BetaMode::kTwoSigmoid:
      return "kTwoSigmoid";
  }
  return concat("BetaMode(", static_cast<int32_t>(beta), ")");
}

std::string layout_name(StateLayout layout) {
  switch (layout) {
    case StateLayout::kKeyFirst:
      return "kKeyFirst";
    case StateLayout::kValueFirst:
      return "kValueFirst";
  }
  return concat("StateLayout(", static_cast<int32_t>(layout), ")");
}

std::string device_name(DeviceType device) {
  switch (device) {
    case DeviceType::kCPU:
      return "kCPU";
    case DeviceType::kCUDA:
      return "kCUDA";
  }
  return concat("DeviceType(", static_cast<int32_t>(device), ")");
}

// ---- one helper per kind of check ------------------------------------------------------------------

// An enum field read from a binding may hold any int32; `names` lists the valid values 0, 1, ... in order.
void check_enum(int32_t value, const char* name, std::initializer_list<const char*> names) {
  if (value >= 0 && value < static_cast<int32_t>(names.size())) return;
  std::string expected;
  int32_t i = 0;
  for (const char* n : names) expected += concat(i ? ", " : "", n, " (", i, ")"), ++i;
  detail::fail(concat(name, ": expected one of ", expected, ", got ", value));
}

// A required tensor must be given. A view with a null data pointer but zero elements (T = 0 or B = 0 from
// an allocator that hands out null for empty buffers) is accepted: nothing is ever read or written there.
void check_required(const TensorView& t, const char* name) {
  FLASH_KDA_CHECK(t.present() || t.rank > 0, name, ": expected a tensor, got none (null data pointer)");
}

// Checked before anything that reads sizes or strides: with a wrong rank they mean other dimensions.
void check_rank(const TensorView& t, const char* name, std::initializer_list<int32_t> allowed) {
  std::string expected;
  size_t i = 0;
  for (int32_t r : allowed) {
    if (t.rank == r) return;
    expected += concat(i == 0 ? "" : (i + 1 == allowed.size() ? " or " : ", "), r);
    ++i;
  }
  detail::fail(concat(name, ": expected rank ", expected, ", got ", t.rank));
}

// Structure every tensor must have whatever its role: sizes ≥ 0, strides ≥ 0, innermost stride 1 (a size-1
// innermost dimension is never stepped over, so its stride does not matter), a span that fits int64 byte
// offsets, and a non-null pointer if it has elements.
void check_structure(const TensorView& t, const char* name) {
  FLASH_KDA_CHECK(t.rank >= 1 && t.rank <= kMaxRank, name, ": expected rank 1 to ", kMaxRank, ", got ", t.rank);
  for (int d = 0; d < t.rank; ++d) {
    FLASH_KDA_CHECK(t.sizes[d] >= 0, name, ": expected sizes >= 0, got ", shape_string(shape_of(t)));
    FLASH_KDA_CHECK(t.strides[d] >= 0, name, ": expected strides >= 0, got stride ", t.strides[d], " for dim ", d);
  }
  const int inner = t.rank - 1;
  FLASH_KDA_CHECK(t.strides[inner] == 1 || t.sizes[inner] <= 1, name,
                  ": expected innermost stride 1 (contiguous last dimension), got ", t.strides[inner]);
  // Largest element offset, kept below 2^63 / 8 so that byte offsets of 8-byte elements cannot overflow.
  constexpr int64_t kLimit = std::numeric_limits<int64_t>::max() / 8;
  int64_t span = 0;
  for (int d = 0; d < t.rank; ++d) {
    if (t.sizes[d] == 0) return;  // no elements: nothing is addressed
    const int64_t steps = t.sizes[d] - 1;
    FLASH_KDA_CHECK(t.strides[d] == 0 || steps <= (kLimit - span) / t.strides[d], name, ": sizes ",
                    shape_string(shape_of(t)), " with strides ", shape_string(Shape(t.strides, t.strides + t.rank)),
                    " address more than 2^60 elements");
    span += steps * t.strides[d];
  }
  FLASH_KDA_CHECK(t.present() || numel(t) == 0, name, ": expected a data pointer, got null for a tensor of ", numel(t),
                  " elements");
}

void check_shape(const TensorView& t, const char* name, const Shape& expected, const std::string& why) {
  FLASH_KDA_CHECK(shape_of(t) == expected, name, ": expected shape ", shape_string(expected), " ", why, ", got ",
                  shape_string(shape_of(t)));
}

void check_dtype(const TensorView& t, const char* name, std::initializer_list<DType> allowed, const char* why = "") {
  for (DType d : allowed) {
    if (t.dtype == d) return;
  }
  detail::fail(concat(name, ": expected dtype ", dtype_list(allowed), ", got ", dtype_name(t.dtype), why));
}

// Outputs must not write one element from two indices; a zero stride over a dimension of size > 1
// (a broadcast/expanded view) would.
void check_no_broadcast(const TensorView& t, const char* name) {
  if (numel(t) == 0) return;  // nothing is written
  for (int d = 0; d < t.rank; ++d) {
    FLASH_KDA_CHECK(t.strides[d] != 0 || t.sizes[d] <= 1, name,
                    ": expected an output without broadcast dimensions, got stride 0 for dim ", d, " of size ",
                    t.sizes[d]);
  }
}

void check_contiguous(const TensorView& t, const char* name) {
  if (numel(t) == 0) return;  // nothing is addressed; strides of empty tensors vary between frameworks
  int64_t expected = 1;
  for (int d = t.rank - 1; d >= 0; --d) {
    FLASH_KDA_CHECK(t.strides[d] == expected || t.sizes[d] <= 1, name, ": expected a contiguous tensor (strides ",
                    shape_string(Shape(t.strides, t.strides + t.rank)), " for shape ", shape_string(shape_of(t)),
                    "), got stride ", t.strides[d], " for dim ", d, " where ", expected, " is needed");
    expected *= t.sizes[d];
  }
}

void check_aligned(const TensorView& t, const char* name, int64_t bytes, const char* why) {
  const auto address = reinterpret_cast<uintptr_t>(t.data);
  FLASH_KDA_CHECK(address % static_cast<uintptr_t>(bytes) == 0, name, ": expected a ", bytes,
                  "-byte aligned data pointer", why, ", got an address ", address % static_cast<uintptr_t>(bytes),
                  " bytes past a multiple of ", bytes);
}

// Strides of the outer dimensions [0, rank − 1) must be multiples of `multiple` elements (dimensions of
// size 1 are never stepped over and are exempt).
void check_outer_strides_multiple(const TensorView& t, const char* name, int64_t multiple, const char* why) {
  if (numel(t) == 0) return;  // nothing is addressed
  for (int d = 0; d + 1 < t.rank; ++d) {
    FLASH_KDA_CHECK(t.strides[d] % multiple == 0 || t.sizes[d] <= 1, name, ": expected the stride of dim ", d,
                    " to be a multiple of ", multiple, " elements", why, ", got ", t.strides[d]);
  }
}

// ---- the checks that relate several arguments ------------------------------------------------------

void check_options(const ForwardOptions& o) {
  check_enum(static_cast<int32_t>(o.gate), "options.gate", {"kNone", "kLowerBound", "kSoftplus"});
  check_enum(static_cast<int32_t>(o.beta), "options.beta", {"kNone", "kSigmoid", "kTwoSigmoid"});
  check_enum(static_cast<int32_t>(o.state_layout), "options.state_layout", {"kKeyFirst", "kValueFirst"});
  FLASH_KDA_CHECK(o.l2norm_qk == 0 || o.l2norm_qk == 1, "options.l2norm_qk: expected 0 or 1, got ", o.l2norm_qk);
  FLASH_KDA_CHECK(std::isfinite(o.scale), "scale: expected a finite value, got ", o.scale);
  if (o.gate == GateMode::kLowerBound) {
    // Written so that NaN fails too.
    FLASH_KDA_CHECK(o.lower_bound >= -5.0f && o.lower_bound < 0.0f, "lower_bound: expected a value in [-5, 0), got ",
                    o.lower_bound);
  }
}

// Reads cu_seqlens (host memory) and checks the offsets partition [0, T).
void check_cu_seqlens_values(const TensorView& cu, int64_t tokens) {
  const int64_t count = cu.sizes[0];
  int64_t previous = reference::load_index(cu, 0);
  FLASH_KDA_CHECK(previous == 0, "cu_seqlens: expected cu_seqlens[0] == 0, got ", previous);
  for (int64_t i = 1; i < count; ++i) {
    const int64_t current = reference::load_index(cu, i * cu.strides[0]);
    FLASH_KDA_CHECK(current >= previous, "cu_seqlens: expected non-decreasing offsets, got cu_seqlens[", i,
                    "] = ", current, " < cu_seqlens[", i - 1, "] = ", previous);
    previous = current;
  }
  FLASH_KDA_CHECK(previous == tokens, "cu_seqlens: expected the last offset cu_seqlens[", count - 1,
                  "] == T = ", tokens, " (q's token count), got ", previous);
}

void check_state(const TensorView& t, const char* name, const ProblemShape& s, StateLayout layout, Target target) {
  if (!t.present()) return;
  check_rank(t, name, {4});
  check_structure(t, name);
  const bool key_first = layout == StateLayout::kKeyFirst;
  const Shape expected = key_first ? Shape{s.num_sequences, s.value_heads, s.head_dim_k, s.head_dim_v}
                                   : Shape{s.num_sequences, s.value_heads, s.head_dim_v, s.head_dim_k};
  check_shape(t, name, expected,
              concat(key_first ? "([N, HV, K, V]" : "([N, HV, V, K]",
                     " for options.state_layout = ", layout_name(layout), ")"));
  if (target == Target::kReference) {
    check_dtype(t, name, {DType::kBFloat16, DType::kFloat16, DType::kFloat32, DType::kFloat64});
  } else {
    check_dtype(t, name, {DType::kBFloat16, DType::kFloat32}, " (the CUDA kernel's state dtypes)");
    check_contiguous(t, name);
    // The kernel moves state tiles with 16-byte copies.
    check_aligned(t, name, kCudaCopyBytes, " (the CUDA kernel uses 16-byte copies)");
  }
}

}  // namespace

ProblemShape validate_forward(const ForwardProblem& p, Target target) {
  FLASH_KDA_CHECK(p.abi_version == kAbiVersion, "abi_version: expected ", kAbiVersion, " (this library), got ",
                  p.abi_version);
  check_enum(static_cast<int32_t>(target), "target", {"kReference", "kCuda"});
  check_enum(static_cast<int32_t>(p.device), "device", {"kCPU", "kCUDA"});
  const bool cuda = target == Target::kCuda;
  const DeviceType wanted_device = cuda ? DeviceType::kCUDA : DeviceType::kCPU;
  FLASH_KDA_CHECK(p.device == wanted_device, "device: expected ", device_name(wanted_device), " for ",
                  cuda ? "Target::kCuda" : "Target::kReference (CPU)", ", got ", device_name(p.device));
  if (cuda) FLASH_KDA_CHECK(p.device_index >= 0, "device_index: expected a value >= 0, got ", p.device_index);
  check_options(p.options);

  // ---- rank and structure of each tensor on its own ----
  struct Argument {
    const TensorView& view;
    const char* name;
    int32_t rank;
  };
  const Argument required[] = {{p.q, "q", 4}, {p.k, "k", 4},       {p.v, "v", 4},
                               {p.g, "g", 4}, {p.beta, "beta", 3}, {p.out, "out", 4}};
  for (const Argument& a : required) {
    check_required(a.view, a.name);
    check_rank(a.view, a.name, {a.rank});
    check_structure(a.view, a.name);
  }
  const Argument optional[] = {{p.A_log, "A_log", 1}, {p.cu_seqlens, "cu_seqlens", 1}};
  for (const Argument& a : optional) {
    if (!a.view.present()) continue;
    check_rank(a.view, a.name, {a.rank});
    check_structure(a.view, a.name);
  }
  if (p.dt_bias.present()) {
    check_rank(p.dt_bias, "dt_bias", {2, 1});  // [HV, K] or flattened [HV * K]
    check_structure(p.dt_bias, "dt_bias");
  }

  // ---- sizes: B, T, H, K from q; HV, V from v; everything else must agree ----
  ProblemShape s;
  s.batch = p.q.sizes[0];
  s.tokens = p.q.sizes[1];
  s.heads = p.q.sizes[2];
  s.head_dim_k = p.q.sizes[3];
  FLASH_KDA_CHECK(s.heads >= 1, "q: expected at least 1 head (dim 2), got shape ", shape_string(shape_of(p.q)));
  FLASH_KDA_CHECK(s.head_dim_k >= 1, "q: expected a head dim K >= 1 (dim 3), got shape ", shape_string(shape_of(p.q)));
  check_shape(p.k, "k", shape_of(p.q), "(same as q)");
  FLASH_KDA_CHECK(p.v.sizes[0] == s.batch && p.v.sizes[1] == s.tokens, "v: expected shape [", s.batch, ", ", s.tokens,
                  ", HV, V] (B and T as q), got ", shape_string(shape_of(p.v)));
  s.value_heads = p.v.sizes[2];
  s.head_dim_v = p.v.sizes[3];
  FLASH_KDA_CHECK(s.value_heads >= 1 && s.value_heads % s.heads == 0,
                  "v: expected a number of value heads HV (dim 2) that is a positive multiple of H = ", s.heads,
                  " (q's heads), got HV = ", s.value_heads);
  FLASH_KDA_CHECK(s.head_dim_v >= 1, "v: expected a head dim V >= 1 (dim 3), got shape ", shape_string(shape_of(p.v)));
  check_shape(p.g, "g", {s.batch, s.tokens, s.value_heads, s.head_dim_k}, "([B, T, HV, K] from q and v)");
  check_shape(p.beta, "beta", {s.batch, s.tokens, s.value_heads}, "([B, T, HV] from q and v)");
  check_shape(p.out, "out", shape_of(p.v), "(same as v)");
  check_no_broadcast(p.out, "out");

  // A_log and dt_bias parameterise the gate; with GateMode::kNone they would be silently ignored, which is
  // almost certainly a caller's mistake.
  const bool gate_in_kernel = p.options.gate != GateMode::kNone;
  if (p.A_log.present()) {
    FLASH_KDA_CHECK(gate_in_kernel,
                    "A_log: expected none with options.gate = kNone (g already holds the decay), got a tensor");
    check_shape(p.A_log, "A_log", {s.value_heads}, "([HV])");
  }
  if (p.dt_bias.present()) {
    FLASH_KDA_CHECK(gate_in_kernel,
                    "dt_bias: expected none with options.gate = kNone (g already holds the decay), got a tensor");
    const Shape as_matrix{s.value_heads, s.head_dim_k}, flat{s.value_heads * s.head_dim_k};
    FLASH_KDA_CHECK(shape_of(p.dt_bias) == as_matrix || shape_of(p.dt_bias) == flat, "dt_bias: expected shape ",
                    shape_string(as_matrix), " or ", shape_string(flat), " ([HV, K] or [HV * K]), got ",
                    shape_string(shape_of(p.dt_bias)));
  }

  // ---- batching: fixed length (N = B) or varlen (B = 1, N = cu_seqlens.numel() − 1) ----
  if (p.cu_seqlens.present()) {
    check_dtype(p.cu_seqlens, "cu_seqlens", {DType::kInt64, DType::kInt32});
    FLASH_KDA_CHECK(p.cu_seqlens.sizes[0] >= 1, "cu_seqlens: expected at least 1 element (N + 1 offsets), got 0");
    FLASH_KDA_CHECK(s.batch == 1, "q: expected batch size B = 1 when cu_seqlens is given (varlen), got ", s.batch);
    s.num_sequences = p.cu_seqlens.sizes[0] - 1;
    // check_structure already made it contiguous (rank 1, stride 1).
    if (!cuda) {
      check_cu_seqlens_values(p.cu_seqlens, s.tokens);
    }
    // On the CUDA target cu_seqlens lives in GPU memory and is deliberately not read here: reading it would
    // synchronise the stream. The Python layer checks the values where it may synchronise, and the kernel
    // clamps every offset into [0, T] so that bad values can never make it read or write out of bounds.
  } else {
    s.num_sequences = s.batch;
  }

  check_state(p.initial_state, "initial_state", s, p.options.state_layout, target);
  check_state(p.final_state, "final_state", s, p.options.state_layout, target);
  if (p.final_state.present()) check_no_broadcast(p.final_state, "final_state");
  // SPEC §4: when both states are given they share a dtype. The one exception is an fp64 final state on
  // the reference target, which is how the gold records the state at full precision.
  if (p.initial_state.present() && p.final_state.present() && p.final_state.dtype != p.initial_state.dtype &&
      !(target == Target::kReference && p.final_state.dtype == DType::kFloat64)) {
    detail::fail(concat("final_state: expected dtype ", dtype_name(p.initial_state.dtype),
                        " (the same as initial_state), got ", dtype_name(p.final_state.dtype)));
  }

  // ---- what each target supports ----
  if (!cuda) {
    for (const Argument& a : required) {
      check_dtype(a.view, a.name, {DType::kBFloat16, DType::kFloat16, DType::kFloat32, DType::kFloat64});
    }
    if (p.A_log.present()) check_dtype(p.A_log, "A_log", {DType::kFloat32, DType::kFloat64});
    if (p.dt_bias.present()) check_dtype(p.dt_bias, "dt_bias", {DType::kFloat32, DType::kFloat64});
    return s;
  }

  for (const Argument& a : required)
    check_dtype(a.view, a.name, {DType::kBFloat16}, " (the CUDA kernel reads bf16 only)");
  if (p.A_log.present()) check_dtype(p.A_log, "A_log", {DType::kFloat32}, " (the CUDA kernel)");
  if (p.dt_bias.present()) check_dtype(p.dt_bias, "dt_bias", {DType::kFloat32}, " (the CUDA kernel)");
  FLASH_KDA_CHECK(s.head_dim_k == kCudaHeadDim, "K: the CUDA kernel supports K = ", kCudaHeadDim, " only, got ",
                  s.head_dim_k);
  FLASH_KDA_CHECK(s.head_dim_v == kCudaHeadDim, "V: the CUDA kernel supports V = ", kCudaHeadDim, " only, got ",
                  s.head_dim_v);
  FLASH_KDA_CHECK(s.value_heads == s.heads, "v: the CUDA kernel needs HV == H (no GVA), got HV = ", s.value_heads,
                  " with H = ", s.heads);
  // One thread block per (sequence, head), indexed by blockIdx.x (at most 2^31 − 1).
  FLASH_KDA_CHECK(s.num_sequences * s.heads <= std::numeric_limits<int32_t>::max(),
                  "N·H: the CUDA kernel launches one block per (sequence, head), at most 2147483647, got N = ",
                  s.num_sequences, ", H = ", s.heads);
  FLASH_KDA_CHECK(p.options.gate == GateMode::kLowerBound,
                  "options.gate: the CUDA kernel supports kLowerBound only, got ", gate_name(p.options.gate));
  FLASH_KDA_CHECK(p.options.beta == BetaMode::kSigmoid || p.options.beta == BetaMode::kTwoSigmoid,
                  "options.beta: the CUDA kernel supports kSigmoid or kTwoSigmoid, got ", beta_name(p.options.beta));
  // q, k, v, g, out rows are moved with 16-byte copies: every row must start on a 16-byte boundary.
  // beta is read element by element: any strides (innermost 1, checked above).
  for (const Argument& a : required) {
    if (&a.view == &p.beta) continue;
    check_aligned(a.view, a.name, kCudaCopyBytes, " (the CUDA kernel uses 16-byte copies)");
    check_outer_strides_multiple(a.view, a.name, kCudaCopyElements, " (the CUDA kernel uses 16-byte copies)");
  }
  return s;
}

}  // namespace flash_kda
