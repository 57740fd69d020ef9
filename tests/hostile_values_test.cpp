// The bad-input battery's values part: NaN, ±Inf, huge, subnormal and signed-zero values in x, in the
// smooth scales and in the router weights, and all-zero rows, on one host and on virtual hosts. Each
// has a defined result (docs/contract.md, "NaN and infinities"; docs/reliability.md lists them all),
// which the oracle computes: the runtime must match it bit for bit, and a NaN it stores is canonical.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>

#include "moedist/inproc.h"
#include "test_support.h"

namespace moedist::testing {
namespace {

float hostile(std::mt19937_64& rng) {
  switch (rng() % 8) {
    case 0: return std::numeric_limits<float>::quiet_NaN();
    case 1: return std::numeric_limits<float>::infinity();
    case 2: return -std::numeric_limits<float>::infinity();
    case 3: return 65504.0f * 4;  // past fp16's range: inf in fp16, finite in bf16
    case 4: return 1e-40f;        // subnormal in fp32, zero in both 16-bit types
    case 5: return -0.0f;
    case 6: return 3.0e38f;
    default: return -1e-5f;
  }
}

// Replaces about one value in `every` of each tensor with a hostile one.
void poison(casefile::Case& c, std::mt19937_64& rng, int every) {
  for (casefile::RankInputs& in : c.ranks) {
    for (std::int64_t i = 0; i < in.x.numel(); ++i) {
      if (rng() % static_cast<std::uint64_t>(every) == 0) in.x.data<std::uint16_t>()[i] = to_half_bits(c.dtype, hostile(rng));
    }
    if (in.x.rows() > 0 && rng() % 2 == 0) {  // an all-zero row (of either sign)
      const std::int64_t row = static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(in.x.rows()));
      std::fill_n(in.x.data<std::uint16_t>() + row * in.x.cols(), in.x.cols(), to_half_bits(c.dtype, rng() % 2 ? 0.0f : -0.0f));
    }
    for (Tensor* t : {&in.scales, &in.expert_scales}) {
      for (std::int64_t i = 0; i < t->numel(); ++i) {
        if (rng() % static_cast<std::uint64_t>(every) == 0) t->data<float>()[i] = hostile(rng);
      }
    }
    for (std::int64_t i = 0; i < in.combine_x.numel(); ++i) {
      if (rng() % static_cast<std::uint64_t>(every) == 0) in.combine_x.data<std::uint16_t>()[i] = to_half_bits(c.dtype, hostile(rng));
    }
  }
}

// Every 16-bit NaN a result holds is the canonical one.
void expect_canonical_nans(const Tensor& t, DType dtype, const std::string& what) {
  if (!t.present() || (t.dtype() != DType::bf16 && t.dtype() != DType::fp16)) return;
  const std::uint16_t canonical = dtype == DType::bf16 ? 0x7fc0 : 0x7e00;
  const std::uint16_t exponent = dtype == DType::bf16 ? 0x7f80 : 0x7c00;
  const std::uint16_t mantissa = dtype == DType::bf16 ? 0x007f : 0x03ff;
  for (std::int64_t i = 0; i < t.numel(); ++i) {
    const std::uint16_t v = t.data<std::uint16_t>()[i];
    if ((v & exponent) == exponent && (v & mantissa) != 0) {
      ASSERT_EQ(v, canonical) << what << "[" << i << "]";
    }
  }
}

void run_poisoned(std::uint64_t seed, int every, bool virtual_hosts) {
  std::mt19937_64 rng(seed);
  CaseLimits lim;
  lim.max_ep_world_size = 8;
  casefile::Case c = random_case(rng, lim);
  poison(c, rng, every);
  RunOptions opt;
  opt.strided_inputs = seed % 2 == 1;
  if (virtual_hosts) opt.ranks_per_host = c.tp_world_size == 2 ? 2 : 1 + static_cast<int>(seed % 3);
  const auto want = oracle::run(to_oracle_case(c));
  const auto got = run_runtime(c, opt);
  ASSERT_EQ(compare_with_oracle(c, got, want), "") << "seed " << seed << ": " << describe(c);
  for (std::size_t g = 0; g < got.size(); ++g) {
    expect_canonical_nans(got[g].combine_out, c.dtype, "rank " + std::to_string(g) + " combine_out");
    if (c.quant_mode == 0) expect_canonical_nans(got[g].expand_x, c.dtype, "rank " + std::to_string(g) + " expand_x");
  }
}

TEST(HostileValues, NanInfHugeSubnormalAndZeroRowsMatchTheOracle) {
  for (std::uint64_t seed = 0; seed < 60; ++seed) run_poisoned(880000 + seed, 7, false);
}

TEST(HostileValues, MostlyHostileValuesMatchTheOracle) {
  for (std::uint64_t seed = 0; seed < 30; ++seed) run_poisoned(881000 + seed, 2, false);
}

TEST(HostileValues, OnVirtualHostsToo) {
  for (std::uint64_t seed = 0; seed < 30; ++seed) run_poisoned(882000 + seed, 5, true);
}

// The documented results, spelled out on one row: quant_mode 2 of [NaN, +inf, -inf, 1, 0, ...] and a
// combine whose only term is NaN.
TEST(HostileValues, QuantizationOfNanAndInfinitiesIsDefined) {
  casefile::Case c;
  c.ep_world_size = 1;
  c.moe_expert_num = 1;
  c.quant_mode = 2;
  c.dtype = DType::bf16;
  casefile::RankInputs in;
  in.x = Tensor(DType::bf16, 1, 8);
  const float values[8] = {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                           -std::numeric_limits<float>::infinity(), 1.0f, 0.0f, -2.0f, 0.5f, 3.0f};
  for (int i = 0; i < 8; ++i) in.x.data<std::uint16_t>()[i] = to_half_bits(DType::bf16, values[i]);
  in.expert_ids = int32_tensor(1, 1, {0});
  c.ranks.push_back(std::move(in));
  const auto got = run_runtime(c, RunOptions{});
  ASSERT_EQ(compare_with_oracle(c, got, oracle::run(to_oracle_case(c))), "");
  // amax = inf: ds = 127 / inf = 0, so every finite value becomes 0 * v = 0; inf * 0 and NaN are NaN,
  // which converts to 0; the stored scale is 1 / 0 = inf.
  const auto* q = got[0].expand_x.data<std::int8_t>();
  for (int i = 0; i < 8; ++i) EXPECT_EQ(q[i], 0) << "element " << i;
  EXPECT_TRUE(std::isinf(got[0].dynamic_scales.data<float>()[0]));
}

}  // namespace
}  // namespace moedist::testing
