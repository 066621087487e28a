// Typed element access for the CPU references: read any supported dtype through strides as double, write
// a double back in the tensor's own dtype (round-to-nearest-even). bfloat16 and float16 are converted by
// hand so that the reference needs no CUDA (or compiler-specific half-precision) headers.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "common/check.hpp"
#include "flash_kda/flash_kda.hpp"

namespace flash_kda::reference {

// An IEEE-754 style binary format of 16 bits: 1 sign bit, exponent_bits, mantissa_bits (stored bits,
// without the implicit leading one). bfloat16 is float32 with a 7-bit mantissa; float16 is binary16.
struct NarrowFormat {
  int exponent_bits;
  int mantissa_bits;
};
inline constexpr NarrowFormat kBFloat16Format{8, 7};
inline constexpr NarrowFormat kFloat16Format{5, 10};

inline double narrow_bits_to_double(uint16_t bits, NarrowFormat format) {
  const int bias = (1 << (format.exponent_bits - 1)) - 1;
  const uint32_t exponent_all_ones = (1u << format.exponent_bits) - 1;
  const uint32_t exponent = (bits >> format.mantissa_bits) & exponent_all_ones;
  const uint32_t mantissa = bits & ((1u << format.mantissa_bits) - 1);
  double magnitude;
  if (exponent == exponent_all_ones) {
    magnitude = mantissa != 0 ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  } else if (exponent == 0) {  // zero or subnormal: no implicit one, exponent of the smallest normal
    magnitude = std::ldexp(static_cast<double>(mantissa), 1 - bias - format.mantissa_bits);
  } else {
    magnitude = std::ldexp(static_cast<double>(mantissa | (1u << format.mantissa_bits)),
                           static_cast<int>(exponent) - bias - format.mantissa_bits);
  }
  return (bits & 0x8000u) != 0 ? -magnitude : magnitude;
}

// Rounds directly from double (no intermediate float, so there is no double rounding), to nearest with
// ties to even; overflow gives infinity, underflow gives subnormals and then signed zero.
inline uint16_t double_to_narrow_bits(double value, NarrowFormat format) {
  const int bias = (1 << (format.exponent_bits - 1)) - 1;
  const int mantissa_bits = format.mantissa_bits;
  const uint32_t exponent_all_ones = (1u << format.exponent_bits) - 1;
  const uint32_t sign = std::signbit(value) ? 0x8000u : 0u;
  if (std::isnan(value))
    return static_cast<uint16_t>(sign | (exponent_all_ones << mantissa_bits) | (1u << (mantissa_bits - 1)));
  if (std::isinf(value)) return static_cast<uint16_t>(sign | (exponent_all_ones << mantissa_bits));
  const double magnitude = std::fabs(value);
  if (magnitude == 0.0) return static_cast<uint16_t>(sign);

  const int min_normal_exponent = 1 - bias;
  int frexp_exponent = 0;
  std::frexp(magnitude, &frexp_exponent);  // magnitude = f · 2^e, f in [0.5, 1): leading bit weighs 2^(e−1)
  // Weight of the last mantissa bit kept; below the normal range it stays at the subnormal quantum.
  const int quantum_exponent = std::max(frexp_exponent - 1, min_normal_exponent) - mantissa_bits;
  // Scaling by a power of two is exact; nearbyint rounds ties to even in the default rounding mode,
  // which the library never changes.
  uint32_t units = static_cast<uint32_t>(std::nearbyint(std::ldexp(magnitude, -quantum_exponent)));
  const uint32_t implicit_one = 1u << mantissa_bits;
  if (units < implicit_one) return static_cast<uint16_t>(sign | units);  // subnormal (or rounded to zero)
  int exponent_field = quantum_exponent + mantissa_bits + bias;
  if (units == (implicit_one << 1)) {  // rounding carried into the next binade
    units >>= 1;
    exponent_field += 1;
  }
  if (exponent_field >= static_cast<int>(exponent_all_ones)) {
    return static_cast<uint16_t>(sign | (exponent_all_ones << mantissa_bits));  // overflow: infinity
  }
  return static_cast<uint16_t>(sign | (static_cast<uint32_t>(exponent_field) << mantissa_bits) |
                               (units - implicit_one));
}

inline double bfloat16_bits_to_double(uint16_t bits) { return narrow_bits_to_double(bits, kBFloat16Format); }
inline double float16_bits_to_double(uint16_t bits) { return narrow_bits_to_double(bits, kFloat16Format); }
inline uint16_t double_to_bfloat16_bits(double value) { return double_to_narrow_bits(value, kBFloat16Format); }
inline uint16_t double_to_float16_bits(double value) { return double_to_narrow_bits(value, kFloat16Format); }

// Element offset of a multi-index (one index per dimension, outermost first), in elements.
template <typename... Index>
int64_t element_offset(const TensorView& t, Index... index) {
  const int64_t indices[] = {static_cast<int64_t>(index)...};
  int64_t offset = 0;
  for (size_t d = 0; d < sizeof...(Index); ++d) offset += indices[d] * t.strides[d];
  return offset;
}

// memcpy rather than a typed dereference: the buffers come from other code (torch, tests) and we must not
// rely on their dynamic type.
template <typename Stored>
Stored load_raw(const TensorView& t, int64_t offset) {
  Stored x;
  std::memcpy(&x, static_cast<const unsigned char*>(t.data) + offset * static_cast<int64_t>(sizeof(Stored)),
              sizeof(Stored));
  return x;
}

template <typename Stored>
void store_raw(const TensorView& t, int64_t offset, Stored x) {
  std::memcpy(static_cast<unsigned char*>(t.data) + offset * static_cast<int64_t>(sizeof(Stored)), &x, sizeof(Stored));
}

// Reads one floating-point element (any of the four float dtypes) as double; exact for all of them.
inline double load_element(const TensorView& t, int64_t offset) {
  switch (t.dtype) {
    case DType::kBFloat16:
      return bfloat16_bits_to_double(load_raw<uint16_t>(t, offset));
    case DType::kFloat16:
      return float16_bits_to_double(load_raw<uint16_t>(t, offset));
    case DType::kFloat32:
      return load_raw<float>(t, offset);
    case DType::kFloat64:
      return load_raw<double>(t, offset);
    default:
      break;
  }
  detail::fail_internal(__FILE__, __LINE__,
                        detail::concat("load_element on a tensor of non-float dtype ", static_cast<int32_t>(t.dtype)));
}

// Writes one element in the tensor's dtype, rounding to nearest even.
inline void store_element(const TensorView& t, int64_t offset, double value) {
  switch (t.dtype) {
    case DType::kBFloat16:
      store_raw<uint16_t>(t, offset, double_to_bfloat16_bits(value));
      return;
    case DType::kFloat16:
      store_raw<uint16_t>(t, offset, double_to_float16_bits(value));
      return;
    case DType::kFloat32:
      store_raw<float>(t, offset, static_cast<float>(value));
      return;
    case DType::kFloat64:
      store_raw<double>(t, offset, value);
      return;
    default:
      break;
  }
  detail::fail_internal(__FILE__, __LINE__,
                        detail::concat("store_element on a tensor of non-float dtype ", static_cast<int32_t>(t.dtype)));
}

// Reads one element of an integer tensor (int32 or int64), e.g. cu_seqlens.
inline int64_t load_index(const TensorView& t, int64_t offset) {
  switch (t.dtype) {
    case DType::kInt32:
      return load_raw<int32_t>(t, offset);
    case DType::kInt64:
      return load_raw<int64_t>(t, offset);
    default:
      break;
  }
  detail::fail_internal(__FILE__, __LINE__,
                        detail::concat("load_index on a tensor of non-integer dtype ", static_cast<int32_t>(t.dtype)));
}

}  // namespace flash_kda::reference
