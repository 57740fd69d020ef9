// Randomized property tests: the in-process runtime against the reference oracle, bit for bit, over
// hundreds of random configurations (W 1-16, shared-expert ranks, TP, both quant modes, both dtypes,
// uneven BS and BS 0, K up to 16, comm_quant_mode 2, strided inputs, caller or group-owned outputs),
// on one host and on virtual hosts.
#include <gtest/gtest.h>

#include <algorithm>
#include <random>

#include "moedist/inproc.h"
#include "test_support.h"

namespace moedist::testing {
namespace {

// A ranks_per_host for a case: any size from 1 to the world, even with TP (pairs share a host).
int random_ranks_per_host(std::mt19937_64& rng, const casefile::Case& c) {
  const int world = c.ep_world_size * std::max(c.tp_world_size, 1);
  const int step = c.tp_world_size == 2 ? 2 : 1;
  return step * (1 + static_cast<int>(rng() % static_cast<std::uint64_t>(world / step)));
}

// With virtual_hosts, the ranks are split into hosts of a random size: rows between hosts then go
// through proxies (docs/architecture.md), and the results must be the same bits.
void run_and_compare(std::uint64_t seed, const CaseLimits& limits, bool virtual_hosts = false) {
  std::mt19937_64 rng(seed);
  const casefile::Case c = random_case(rng, limits);
  RunOptions opt;
  opt.strided_inputs = (seed % 3) == 1;
  opt.caller_outputs = (seed % 2) == 1;
  opt.outputs_in_window = (seed % 3) == 2;
  if (virtual_hosts) opt.ranks_per_host = random_ranks_per_host(rng, c);
  const auto want = oracle::run(to_oracle_case(c));
  const auto got = run_runtime(c, opt);
  const std::string diff = compare_with_oracle(c, got, want);
  EXPECT_EQ(diff, "") << "seed " << seed << ": " << describe(c) << " strided=" << opt.strided_inputs
                      << " caller_outputs=" << opt.caller_outputs << " outputs_in_window=" << opt.outputs_in_window
                      << " ranks_per_host=" << opt.ranks_per_host;
}

// The CPU transports' cases: every kind of input, x_active_mask included.
CaseLimits cpu_limits() {
  CaseLimits lim;
  lim.token_masks = true;
  return lim;
}

class RandomConfigs : public ::testing::TestWithParam<int> {};

// 8 shards x 30 seeds = 240 configurations.
TEST_P(RandomConfigs, RuntimeMatchesOracleBitExactly) {
  for (int i = 0; i < 30; ++i)
    run_and_compare(static_cast<std::uint64_t>(GetParam()) * 1000 + static_cast<std::uint64_t>(i), cpu_limits());
}

INSTANTIATE_TEST_SUITE_P(Shards, RandomConfigs, ::testing::Range(0, 8));

// The shards above must include masked cases of every kind that matters: some rank with inactive
// tokens, with shared experts, and with uneven BS (global_bs != 0).
TEST(RandomConfigs, ShardsIncludeTokenMasks) {
  int masked = 0, masked_shared = 0, masked_uneven = 0;
  for (std::uint64_t shard = 0; shard < 8; ++shard) {
    for (std::uint64_t i = 0; i < 30; ++i) {
      std::mt19937_64 rng(shard * 1000 + i);
      const casefile::Case c = random_case(rng, cpu_limits());
      bool cut = false;
      for (const casefile::RankInputs& in : c.ranks) {
        if (!in.x_active_mask.present()) continue;
        const auto* m = in.x_active_mask.data<std::uint8_t>();
        cut = cut || std::count(m, m + in.x_active_mask.numel(), std::uint8_t{1}) < in.x.rows();
      }
      masked += cut ? 1 : 0;
      masked_shared += cut && c.shared_expert_rank_num > 0 ? 1 : 0;
      masked_uneven += cut && c.global_bs != 0 ? 1 : 0;
    }
  }
  EXPECT_GE(masked, 30);
  EXPECT_GE(masked_shared, 5);
  EXPECT_GE(masked_uneven, 5);
}

CaseLimits larger_hidden_sizes() {
  CaseLimits lim = cpu_limits();
  lim.max_ep_world_size = 8;
  lim.max_h = 1100;
  lim.max_bs = 12;
  return lim;
}

TEST(RandomConfigs, LargerHiddenSizes) {
  for (std::uint64_t seed = 90000; seed < 90012; ++seed) run_and_compare(seed, larger_hidden_sizes());
}

// The same on virtual hosts: 4 shards x 30 seeds, and larger H.
class VirtualHosts : public ::testing::TestWithParam<int> {};
TEST_P(VirtualHosts, MatchOracleBitExactly) {
  for (int i = 0; i < 30; ++i)
    run_and_compare(700000 + static_cast<std::uint64_t>(GetParam()) * 1000 + static_cast<std::uint64_t>(i),
                    cpu_limits(), true);
}
INSTANTIATE_TEST_SUITE_P(Shards, VirtualHosts, ::testing::Range(0, 4));

TEST(VirtualHosts, LargerHiddenSizes) {
  for (std::uint64_t seed = 790000; seed < 790010; ++seed) run_and_compare(seed, larger_hidden_sizes(), true);
}

// One group per rank serves a sequence of calls whose H, K, BS, dtype and modes change: windows grow,
// state carries over, and every call still matches the oracle.
TEST(RandomConfigs, OneGroupServesChangingShapes) {
  for (std::uint64_t seed = 500; seed < 510; ++seed) {
    std::mt19937_64 rng(seed);
    casefile::Case c = random_case(rng);
    const int world = c.ep_world_size * std::max(c.tp_world_size, 1);
    const std::int64_t bs_zero_gbs = c.ranks.front().x.rows();
    std::vector<casefile::Case> calls;
    for (int call = 0; call < 6; ++call) {
      CaseLimits lim;
      lim.max_h = 40 + 60 * call;  // growing hidden sizes force the windows to grow
      random_inputs(c, rng, lim, bs_zero_gbs + call % 3);
      calls.push_back(std::move(c));
      c = casefile::Case{};
      c.ep_world_size = calls.back().ep_world_size;
      c.tp_world_size = calls.back().tp_world_size;
      c.moe_expert_num = calls.back().moe_expert_num;
      c.shared_expert_rank_num = calls.back().shared_expert_rank_num;
      c.global_bs = calls.back().global_bs;
    }
    std::vector<std::vector<casefile::RankOutputs>> got(calls.size());
    for (auto& per_rank : got) per_rank.resize(static_cast<std::size_t>(world));
    InProcessWorld runtime(world);
    run_ranks(world, [&](int g) {
      std::unique_ptr<Group> group = runtime.join(rank_config(calls.front(), g));
      for (std::size_t i = 0; i < calls.size(); ++i) {
        RunOptions opt;
        opt.strided_inputs = i % 2 == 1;
        opt.caller_outputs = i % 3 == 2;
        got[i][static_cast<std::size_t>(g)] = run_rank(*group, calls[i], g, opt);
      }
    });
    for (std::size_t i = 0; i < calls.size(); ++i) {
      EXPECT_EQ(compare_with_oracle(calls[i], got[i], oracle::run(to_oracle_case(calls[i]))), "")
          << "seed " << seed << " call " << i << ": " << describe(calls[i]);
    }
  }
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
