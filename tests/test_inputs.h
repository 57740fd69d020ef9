// What the error and rule tests build their inputs from (validation_test, the v2_*_test programs): a
// case of a configuration's geometry, random 16-bit and fp32 values, and bool masks.
#pragma once

#include <algorithm>
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

}  // namespace moedist::testing
