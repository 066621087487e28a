// The hand-written bf16/fp16 conversions of the CPU references (src/reference/tensor_access.hpp), checked
// against bit patterns worked out from the IEEE-754 formats, and exhaustively for round trips.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "reference/tensor_access.hpp"

namespace {

using flash_kda::reference::bfloat16_bits_to_double;
using flash_kda::reference::double_to_bfloat16_bits;
using flash_kda::reference::double_to_float16_bits;
using flash_kda::reference::float16_bits_to_double;

TEST(TensorAccess, BFloat16RoundsToNearestEven) {
  EXPECT_EQ(double_to_bfloat16_bits(1.0), 0x3F80);
  EXPECT_EQ(double_to_bfloat16_bits(-2.0), 0xC000);
  EXPECT_EQ(double_to_bfloat16_bits(0.0), 0x0000);
  EXPECT_EQ(double_to_bfloat16_bits(-0.0), 0x8000);
  // 1 + 2^-8 lies halfway between 1 (mantissa 0, even) and 1 + 2^-7 (mantissa 1): goes to even.
  EXPECT_EQ(double_to_bfloat16_bits(1.0 + std::ldexp(1.0, -8)), 0x3F80);
  // 1 + 3·2^-8 lies halfway between mantissa 1 and mantissa 2 (even): goes up.
  EXPECT_EQ(double_to_bfloat16_bits(1.0 + 3 * std::ldexp(1.0, -8)), 0x3F82);
  // Just above the tie rounds up. Via float this would be double-rounded to the tie and then down.
  EXPECT_EQ(double_to_bfloat16_bits(1.0 + std::ldexp(1.0, -8) + std::ldexp(1.0, -40)), 0x3F81);
  EXPECT_EQ(double_to_bfloat16_bits(-1.0 - std::ldexp(1.0, -8) - std::ldexp(1.0, -40)), 0xBF81);
  // Mantissa all ones rounding up carries into the exponent: 2 − 2^-9 → 2.
  EXPECT_EQ(double_to_bfloat16_bits(2.0 - std::ldexp(1.0, -9)), 0x4000);
  // Largest finite (2 − 2^-7)·2^127 and overflow past the halfway point to 2^128.
  EXPECT_EQ(double_to_bfloat16_bits(std::ldexp(2.0 - std::ldexp(1.0, -7), 127)), 0x7F7F);
  EXPECT_EQ(double_to_bfloat16_bits(std::ldexp(2.0 - std::ldexp(1.0, -8), 127)), 0x7F80);
  EXPECT_EQ(double_to_bfloat16_bits(1e300), 0x7F80);
  EXPECT_EQ(double_to_bfloat16_bits(-std::numeric_limits<double>::infinity()), 0xFF80);
  // Subnormals: 2^-133 is the smallest; 2^-134 is a tie with 0 (even); 1.5·2^-134 rounds up.
  EXPECT_EQ(double_to_bfloat16_bits(std::ldexp(1.0, -133)), 0x0001);
  EXPECT_EQ(double_to_bfloat16_bits(std::ldexp(1.0, -134)), 0x0000);
  EXPECT_EQ(double_to_bfloat16_bits(std::ldexp(1.5, -134)), 0x0001);
  EXPECT_EQ(double_to_bfloat16_bits(std::ldexp(1.0, -126)), 0x0080);  // smallest normal
  EXPECT_EQ(double_to_bfloat16_bits(1e-300), 0x0000);
  const uint16_t nan = double_to_bfloat16_bits(std::numeric_limits<double>::quiet_NaN());
  EXPECT_EQ(nan & 0x7F80, 0x7F80);
  EXPECT_NE(nan & 0x007F, 0);
}

TEST(TensorAccess, Float16RoundsToNearestEven) {
  EXPECT_EQ(double_to_float16_bits(1.0), 0x3C00);
  EXPECT_EQ(double_to_float16_bits(-2.5), 0xC100);
  EXPECT_EQ(double_to_float16_bits(1.0 / 3.0), 0x3555);
  EXPECT_EQ(double_to_float16_bits(65504.0), 0x7BFF);  // largest finite
  EXPECT_EQ(double_to_float16_bits(65519.99), 0x7BFF);
  EXPECT_EQ(double_to_float16_bits(65520.0), 0x7C00);                     // halfway to 2^16: ties to even = overflow
  EXPECT_EQ(double_to_float16_bits(std::ldexp(1.0, -14)), 0x0400);        // smallest normal
  EXPECT_EQ(double_to_float16_bits(std::ldexp(1.0, -24)), 0x0001);        // smallest subnormal
  EXPECT_EQ(double_to_float16_bits(std::ldexp(1.0, -25)), 0x0000);        // tie with 0
  EXPECT_EQ(double_to_float16_bits(std::ldexp(3.0, -25)), 0x0002);        // tie between 1 and 2 subnormal units
  EXPECT_EQ(double_to_float16_bits(1.0 + std::ldexp(1.0, -11)), 0x3C00);  // tie, to even
  EXPECT_EQ(double_to_float16_bits(1.0 + 3 * std::ldexp(1.0, -11)), 0x3C02);  // tie, to even
}

TEST(TensorAccess, DecodesKnownPatterns) {
  EXPECT_EQ(bfloat16_bits_to_double(0x3F80), 1.0);
  EXPECT_EQ(bfloat16_bits_to_double(0xC049), -3.140625);
  EXPECT_EQ(bfloat16_bits_to_double(0x0001), std::ldexp(1.0, -133));
  EXPECT_EQ(float16_bits_to_double(0x3C00), 1.0);
  EXPECT_EQ(float16_bits_to_double(0x7BFF), 65504.0);
  EXPECT_EQ(float16_bits_to_double(0x0001), std::ldexp(1.0, -24));
  EXPECT_EQ(float16_bits_to_double(0x8000), 0.0);
  EXPECT_TRUE(std::signbit(float16_bits_to_double(0x8000)));
  EXPECT_TRUE(std::isinf(float16_bits_to_double(0xFC00)));
  EXPECT_TRUE(std::isnan(float16_bits_to_double(0x7E00)));
  EXPECT_TRUE(std::isnan(bfloat16_bits_to_double(0x7FC0)));
}

// Every non-NaN pattern decodes to a value that encodes back to the same pattern.
TEST(TensorAccess, EveryPatternRoundTrips) {
  for (uint32_t bits = 0; bits <= 0xFFFF; ++bits) {
    const auto b = static_cast<uint16_t>(bits);
    const double as_bf16 = bfloat16_bits_to_double(b);
    if (!std::isnan(as_bf16)) {
      ASSERT_EQ(double_to_bfloat16_bits(as_bf16), b) << std::hex << bits;
    }
    const double as_fp16 = float16_bits_to_double(b);
    if (!std::isnan(as_fp16)) {
      ASSERT_EQ(double_to_float16_bits(as_fp16), b) << std::hex << bits;
    }
  }
}

// bf16 is the top half of float32: decoding must agree with that reading of the bits.
TEST(TensorAccess, BFloat16MatchesFloatTopHalf) {
  for (uint32_t bits = 0; bits <= 0xFFFF; ++bits) {
    const uint32_t as_float_bits = bits << 16;
    float f;
    std::memcpy(&f, &as_float_bits, 4);
    const double decoded = bfloat16_bits_to_double(static_cast<uint16_t>(bits));
    if (std::isnan(f)) {
      ASSERT_TRUE(std::isnan(decoded));
    } else {
      ASSERT_EQ(decoded, static_cast<double>(f)) << std::hex << bits;
    }
  }
}

}  // namespace
