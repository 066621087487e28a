// Test helpers shared by the C++ suites: owning host tensors of any dtype (optionally with padded, i.e.
// non-contiguous, outer strides) and a builder that fills a ForwardProblem with fresh random inputs.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <utility>
#include <vector>

#include "flash_kda/flash_kda.hpp"
#include "reference/tensor_access.hpp"  // bf16/fp16 conversions (tested on their own in test_tensor_access)

namespace flash_kda::tests {

using Index = std::vector<int64_t>;

inline int64_t dtype_bytes(DType dtype) {
  switch (dtype) {
    case DType::kBFloat16:
    case DType::kFloat16:
      return 2;
    case DType::kFloat32:
    case DType::kInt32:
      return 4;
    case DType::kFloat64:
    case DType::kInt64:
      return 8;
  }
  return 8;
}

// Calls fn(index) for every multi-index of `sizes`, last dimension fastest.
inline void for_each_index(const Index& sizes, const std::function<void(const Index&)>& fn) {
  for (int64_t s : sizes) {
    if (s == 0) return;
  }
  Index index(sizes.size(), 0);
  while (true) {
    fn(index);
    int d = static_cast<int>(sizes.size()) - 1;
    while (d >= 0 && ++index[static_cast<size_t>(d)] == sizes[static_cast<size_t>(d)])
      index[static_cast<size_t>(d--)] = 0;
    if (d < 0) return;
  }
}

// An owning host tensor. Storage is 64-byte aligned; `pad` extra elements are added to the stride of every
// outer dimension so that the tensor is not contiguous (pad = 0 gives a contiguous row-major tensor).
class HostTensor {
 public:
  HostTensor() = default;
  HostTensor(DType dtype, Index sizes, int64_t pad = 0) : dtype_(dtype), sizes_(std::move(sizes)), present_(true) {
    // stride[last] = 1, stride[d] = (sizes[d+1] + pad) * stride[d+1]
    const size_t rank = sizes_.size();
    strides_.assign(rank, 1);
    if (rank > 0)
      for (size_t d = rank - 1; d-- > 0;) strides_[d] = (sizes_[d + 1] + pad) * strides_[d + 1];
    const int64_t elements = rank > 0 ? (sizes_[0] + pad) * strides_[0] : 1;
    storage_.assign(static_cast<size_t>(elements * dtype_bytes(dtype_) + 64), 0);
  }

  bool present() const { return present_; }
  DType dtype() const { return dtype_; }
  const Index& sizes() const { return sizes_; }
  const Index& strides() const { return strides_; }
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t s : sizes_) n *= s;
    return n;
  }

  // 64-byte aligned start of the elements (recomputed, so copies of a HostTensor stay valid).
  unsigned char* data() {
    if (!present_) return nullptr;
    auto address = reinterpret_cast<uintptr_t>(storage_.data());
    return storage_.data() + ((64 - address % 64) % 64);
  }
  const unsigned char* data() const { return const_cast<HostTensor*>(this)->data(); }

  TensorView view() {
    TensorView t;
    if (!present_) return t;
    t.data = data();
    t.dtype = dtype_;
    t.rank = static_cast<int32_t>(sizes_.size());
    for (size_t d = 0; d < sizes_.size(); ++d) {
      t.sizes[d] = sizes_[d];
      t.strides[d] = strides_[d];
    }
    return t;
  }

  int64_t offset(const Index& index) const {
    int64_t o = 0;
    for (size_t d = 0; d < index.size(); ++d) o += index[d] * strides_[d];
    return o;
  }

  double get(const Index& index) const {
    TensorView t = const_cast<HostTensor*>(this)->view();
    if (dtype_ == DType::kInt32 || dtype_ == DType::kInt64)
      return static_cast<double>(reference::load_index(t, offset(index)));
    return reference::load_element(t, offset(index));
  }

  void set(const Index& index, double value) {
    TensorView t = view();
    if (dtype_ == DType::kInt32) {
      const auto x = static_cast<int32_t>(value);
      std::memcpy(data() + offset(index) * 4, &x, 4);
    } else if (dtype_ == DType::kInt64) {
      const auto x = static_cast<int64_t>(value);
      std::memcpy(data() + offset(index) * 8, &x, 8);
    } else {
      reference::store_element(t, offset(index), value);
    }
  }

  void fill(const std::function<double(const Index&)>& fn) {
    for_each_index(sizes_, [&](const Index& i) { set(i, fn(i)); });
  }

  // All elements in index order (not storage order), as double.
  std::vector<double> values() const {
    std::vector<double> out;
    out.reserve(static_cast<size_t>(numel()));
    for_each_index(sizes_, [&](const Index& i) { out.push_back(get(i)); });
    return out;
  }

  // Raw access to every element of the storage, padding included (to check that padding is never written).
  int64_t storage_elements() const {
    return present_ ? static_cast<int64_t>(storage_.size() - 64) / dtype_bytes(dtype_) : 0;
  }
  void fill_storage(double value) {
    for (int64_t i = 0; i < storage_elements(); ++i) reference::store_element(view(), i, value);
  }
  double get_raw(int64_t storage_offset) const {
    return reference::load_element(const_cast<HostTensor*>(this)->view(), storage_offset);
  }

 private:
  DType dtype_ = DType::kFloat32;
  Index sizes_;
  Index strides_;
  bool present_ = false;
  std::vector<unsigned char> storage_;
};

// Copies every element of `from` into `to` (same sizes; dtypes and strides may differ).
inline void copy_values(const HostTensor& from, HostTensor& to) {
  to.fill([&](const Index& i) { return from.get(i); });
}

// What to build. Defaults: a small fixed-length fp32 problem with every option of the CUDA path on.
struct ProblemConfig {
  int64_t B = 1, T = 16, H = 2, HV = 2, K = 32, V = 32;
  std::vector<int64_t> cu_seqlens;  // empty: fixed length; else varlen offsets (B must be 1)
  DType cu_seqlens_dtype = DType::kInt64;
  DType data_dtype = DType::kFloat32;  // q, k, v, g, beta
  DType out_dtype = DType::kFloat32;
  DType param_dtype = DType::kFloat32;  // A_log, dt_bias
  DType initial_state_dtype = DType::kFloat32;
  DType final_state_dtype = DType::kFloat32;
  bool with_A_log = true;
  bool with_dt_bias = true;
  bool dt_bias_flat = false;  // [HV * K] instead of [HV, K]
  bool with_initial_state = true;
  bool with_final_state = true;
  int64_t pad = 0;        // non-contiguous q, k, v, g, beta, out when > 0
  double gate_std = 1.0;  // standard deviation of the raw gate g (8 for "extreme" gates)
  DeviceType device = DeviceType::kCPU;
  ForwardOptions options = [] {
    ForwardOptions o;
    o.scale = 0.0;  // 0: use K^-0.5
    return o;
  }();
};

struct OwnedProblem {
  ProblemConfig config;
  HostTensor q, k, v, g, beta, out, A_log, dt_bias, initial_state, final_state, cu_seqlens;

  int64_t num_sequences() const {
    return config.cu_seqlens.empty() ? config.B : static_cast<int64_t>(config.cu_seqlens.size()) - 1;
  }
  Index state_sizes() const {
    const bool key_first = config.options.state_layout == StateLayout::kKeyFirst;
    return {num_sequences(), config.HV, key_first ? config.K : config.V, key_first ? config.V : config.K};
  }

  ForwardProblem problem() {
    ForwardProblem p;
    p.device = config.device;
    p.q = q.view();
    p.k = k.view();
    p.v = v.view();
    p.g = g.view();
    p.beta = beta.view();
    p.out = out.view();
    p.A_log = A_log.view();
    p.dt_bias = dt_bias.view();
    p.initial_state = initial_state.view();
    p.final_state = final_state.view();
    p.cu_seqlens = cu_seqlens.view();
    p.options = config.options;
    return p;
  }

  // Output buffers back to NaN, so that an element that is not written shows up.
  void poison_outputs() {
    const double nan = std::numeric_limits<double>::quiet_NaN();
    out.fill([&](const Index&) { return nan; });
    if (final_state.present()) final_state.fill([&](const Index&) { return nan; });
  }
};

// Copies the inputs (q, k, v, g, beta, A_log, dt_bias, initial_state) of `from` into `to` wherever both
// have the tensor with the same sizes, so that two problems differing only in dtypes/strides/options share
// their values.
inline void copy_inputs(const OwnedProblem& from, OwnedProblem& to) {
  const std::pair<const HostTensor*, HostTensor*> pairs[] = {{&from.q, &to.q},
                                                             {&from.k, &to.k},
                                                             {&from.v, &to.v},
                                                             {&from.g, &to.g},
                                                             {&from.beta, &to.beta},
                                                             {&from.A_log, &to.A_log},
                                                             {&from.dt_bias, &to.dt_bias},
                                                             {&from.initial_state, &to.initial_state}};
  for (const auto& [src, dst] : pairs) {
    if (src->present() && dst->present() && src->sizes() == dst->sizes()) copy_values(*src, *dst);
  }
}

// Allocates and fills a problem with random inputs from `seed`: q, k, v ~ N(0, 1); g ~ N(0, gate_std) (for
// GateMode::kNone, a log decay −|N(0, gate_std)| · 0.1); beta logits ~ N(0, 1) (for BetaMode::kNone, b in
// (0, 1)); A_log, dt_bias ~ N(0, 0.5); initial state ~ N(0, 0.5). Outputs are filled with NaN.
inline OwnedProblem make_problem(ProblemConfig c, uint32_t seed) {
  if (c.options.scale == 0.0) c.options.scale = 1.0 / std::sqrt(static_cast<double>(c.K));
  if (c.options.gate == GateMode::kNone) c.with_A_log = c.with_dt_bias = false;
  const int64_t B = c.B, T = c.T, H = c.H, HV = c.HV, K = c.K, V = c.V;
  OwnedProblem p;
  p.config = c;
  p.q = HostTensor(c.data_dtype, {B, T, H, K}, c.pad);
  p.k = HostTensor(c.data_dtype, {B, T, H, K}, c.pad);
  p.v = HostTensor(c.data_dtype, {B, T, HV, V}, c.pad);
  p.g = HostTensor(c.data_dtype, {B, T, HV, K}, c.pad);
  p.beta = HostTensor(c.data_dtype, {B, T, HV}, c.pad);
  p.out = HostTensor(c.out_dtype, {B, T, HV, V}, c.pad);
  if (c.with_A_log) p.A_log = HostTensor(c.param_dtype, {HV});
  if (c.with_dt_bias)
    p.dt_bias = c.dt_bias_flat ? HostTensor(c.param_dtype, {HV * K}) : HostTensor(c.param_dtype, {HV, K});
  if (c.with_initial_state) p.initial_state = HostTensor(c.initial_state_dtype, p.state_sizes());
  if (c.with_final_state) p.final_state = HostTensor(c.final_state_dtype, p.state_sizes());
  if (!c.cu_seqlens.empty()) {
    p.cu_seqlens = HostTensor(c.cu_seqlens_dtype, {static_cast<int64_t>(c.cu_seqlens.size())});
    p.cu_seqlens.fill([&](const Index& i) { return static_cast<double>(c.cu_seqlens[static_cast<size_t>(i[0])]); });
  }

  std::mt19937 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::uniform_real_distribution<double> unit(0.05, 0.95);
  auto gaussian = [&](double std) { return [&, std](const Index&) { return std * normal(rng); }; };
  p.q.fill(gaussian(1.0));
  p.k.fill(gaussian(1.0));
  p.v.fill(gaussian(1.0));
  if (c.options.gate == GateMode::kNone) {
    p.g.fill([&](const Index&) { return -0.1 * std::fabs(c.gate_std * normal(rng)); });
  } else {
    p.g.fill(gaussian(c.gate_std));
  }
  if (c.options.beta == BetaMode::kNone) {
    p.beta.fill([&](const Index&) { return unit(rng); });
  } else {
    p.beta.fill(gaussian(1.0));
  }
  if (p.A_log.present()) p.A_log.fill(gaussian(0.5));
  if (p.dt_bias.present()) p.dt_bias.fill(gaussian(0.5));
  if (p.initial_state.present()) p.initial_state.fill(gaussian(0.5));
  p.poison_outputs();
  return p;
}

// ‖x − gold‖ / ‖gold‖ over all elements (index order).
inline double relative_l2(const HostTensor& x, const HostTensor& gold) {
  const std::vector<double> a = x.values(), b = gold.values();
  double diff = 0.0, norm = 0.0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    diff += (a[i] - b[i]) * (a[i] - b[i]);
    norm += b[i] * b[i];
  }
  if (a.size() != b.size()) return std::numeric_limits<double>::infinity();
  return std::sqrt(diff) / std::sqrt(norm);
}

inline double max_abs_diff(const std::vector<double>& a, const std::vector<double>& b) {
  if (a.size() != b.size()) return std::numeric_limits<double>::infinity();
  double m = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = std::fabs(a[i] - b[i]);
    if (std::isnan(d)) return std::numeric_limits<double>::infinity();  // NaN: "infinitely different"
    m = std::max(m, d);
  }
  return m;
}

inline bool all_finite(const HostTensor& t) {
  for (double x : t.values()) {
    if (!std::isfinite(x)) return false;
  }
  return true;
}

}  // namespace flash_kda::tests
