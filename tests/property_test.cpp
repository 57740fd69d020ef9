// Randomized property tests: the in-process runtime against the reference oracle, bit for bit, over
// hundreds of random configurations (W 1-16, shared-expert ranks, TP, both quant modes, both dtypes,
// uneven BS and BS 0, K up to 16, comm_quant_mode 2, strided inputs, caller or group-owned outputs).
#include <gtest/gtest.h>

#include <random>

#include "test_support.h"

namespace moedist::testing {
namespace {

void run_and_compare(std::uint64_t seed, const CaseLimits& limits) {
  std::mt19937_64 rng(seed);
  const casefile::Case c = random_case(rng, limits);
  RunOptions opt;
  opt.strided_inputs = (seed % 3) == 1;
  opt.caller_outputs = (seed % 2) == 1;
  const auto want = oracle::run(to_oracle_case(c));
  const auto got = run_runtime(c, opt);
  const std::string diff = compare_with_oracle(c, got, want);
  EXPECT_EQ(diff, "") << "seed " << seed << ": " << describe(c) << " strided=" << opt.strided_inputs
                      << " caller_outputs=" << opt.caller_outputs;
}

class RandomConfigs : public ::testing::TestWithParam<int> {};

// 8 shards x 30 seeds = 240 configurations.
TEST_P(RandomConfigs, RuntimeMatchesOracleBitExactly) {
  for (int i = 0; i < 30; ++i) run_and_compare(static_cast<std::uint64_t>(GetParam()) * 1000 + static_cast<std::uint64_t>(i), CaseLimits{});
}

INSTANTIATE_TEST_SUITE_P(Shards, RandomConfigs, ::testing::Range(0, 8));

TEST(RandomConfigs, LargerHiddenSizes) {
  CaseLimits lim;
  lim.max_ep_world_size = 8;
  lim.max_h = 1100;
  lim.max_bs = 12;
  for (std::uint64_t seed = 90000; seed < 90012; ++seed) run_and_compare(seed, lim);
}

TEST(RandomConfigs, SameCaseTwiceOnOneRunnerIsDeterministic) {
  std::mt19937_64 rng(4242);
  const casefile::Case c = random_case(rng);
  const auto a = run_runtime(c, RunOptions{});
  const auto b = run_runtime(c, RunOptions{true, true});
  const auto want = oracle::run(to_oracle_case(c));
  EXPECT_EQ(compare_with_oracle(c, a, want), "") << describe(c);
  EXPECT_EQ(compare_with_oracle(c, b, want), "") << describe(c);
}

}  // namespace
}  // namespace moedist::testing
