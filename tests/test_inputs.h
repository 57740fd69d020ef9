// What the error and rule tests build their inputs from (validation_test, the v2_*_test programs): a
// case of a configuration's geometry, random 16-bit and fp32 values, and bool masks; and the exact
// 16-bit encoders the oracle tests write their hand-computed values with.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "casefile/case_file.h"
#include "moedist/config.h"
#include "moedist/tensor.h"
#include "test_support.h"

namespace moedist::testing {

// A case of the configuration's geometry (EP and TP domains, experts, shared experts, global_bs), with
// no ranks yet.
inline casefile::Case case_of(const GroupConfig& config) {
  casefile::Case c;
  c.ep_world_size = config.ep_world_size;
  c.tp_world_size = config.tp_world_size;
  c.moe_expert_num = config.moe_expert_num;
  c.shared_expert_rank_num = config.shared_expert_rank_num;
  c.shared_expert_num = config.shared_expert_num;
  c.global_bs = config.global_bs;
  return c;
}

// (rows, cols) bf16 / fp16 values drawn from N(0, spread).
inline Tensor half_tensor(std::mt19937_64& rng, DType dtype, std::int64_t rows, std::int64_t cols,
                          float spread = 1.0f) {
  Tensor t(dtype, rows, cols);
  std::normal_distribution<float> normal(0.0f, spread);
  for (std::int64_t i = 0; i < t.numel(); ++i) t.data<std::uint16_t>()[i] = to_half_bits(dtype, normal(rng));
  return t;
}

// (rows, cols) fp32 values drawn from U(lo, hi).
inline Tensor fp32_tensor(std::mt19937_64& rng, std::int64_t rows, std::int64_t cols, float lo, float hi) {
  Tensor t(DType::fp32, rows, cols);
  std::uniform_real_distribution<float> u(lo, hi);
  for (std::int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = u(rng);
  return t;
}

// A bool tensor holding `values`: (rows,) when cols is 0, else (rows, cols).
inline Tensor bool_tensor(std::int64_t rows, std::int64_t cols, const std::vector<std::uint8_t>& values) {
  Tensor t = cols == 0 ? Tensor(DType::boolean, rows) : Tensor(DType::boolean, rows, cols);
  std::copy(values.begin(), values.end(), t.data<std::uint8_t>());
  return t;
}

// The exact encoders are written independently of numeric/convert.h, so that hand-computed expectations
// do not lean on the conversions under test. bf16 bits of a value that bf16 represents exactly (the test
// fails otherwise).
inline std::uint16_t exact_bf16(float value) {
  const auto bits = std::bit_cast<std::uint32_t>(value);
  EXPECT_EQ(bits & 0xffffu, 0u) << value << " is not exactly representable in bf16";
  return static_cast<std::uint16_t>(bits >> 16);
}

// fp16 bits of a normal (or zero) value that fp16 represents exactly (the test fails otherwise).
inline std::uint16_t exact_fp16(double value) {
  if (value == 0.0) return std::signbit(value) ? 0x8000 : 0x0000;
  const std::uint16_t sign = value < 0 ? 0x8000 : 0x0000;
  const double magnitude = std::fabs(value);
  int exponent = -14;
  while (exponent < 15 && std::ldexp(1.0, exponent + 1) <= magnitude) ++exponent;
  const double mantissa = (magnitude / std::ldexp(1.0, exponent) - 1.0) * 1024.0;
  EXPECT_TRUE(mantissa >= 0.0 && mantissa < 1024.0 && mantissa == std::floor(mantissa))
      << value << " is not an exactly representable normal fp16";
  return static_cast<std::uint16_t>(sign | ((exponent + 15) << 10) | static_cast<int>(mantissa));
}

inline std::vector<std::uint16_t> exact_bf16_row(const std::vector<float>& values) {
  std::vector<std::uint16_t> bits;
  for (const float v : values) bits.push_back(exact_bf16(v));
  return bits;
}

inline std::vector<std::uint16_t> exact_fp16_row(const std::vector<double>& values) {
  std::vector<std::uint16_t> bits;
  for (const double v : values) bits.push_back(exact_fp16(v));
  return bits;
}

}  // namespace moedist::testing
