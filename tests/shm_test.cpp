// The shared-memory transport: ranks as real processes, results identical to the oracle (and so to
// the in-process runtime), lost peers reported by name and phase, nothing left in /dev/shm.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>

#include <random>

#include "test_support.h"

namespace moedist::testing {
namespace {

ShmOptions test_shm_options() {
  ShmOptions o;
  o.wait.timeout = std::chrono::milliseconds(20000);  // generous: up to 32 processes share 2 cores here
  return o;
}

std::string first_error(const ProcessRun& run) {
  for (std::size_t g = 0; g < run.errors.size(); ++g) {
    if (!run.errors[g].empty()) return "rank " + std::to_string(g) + ": " + run.errors[g];
  }
  return "";
}

class ShmRandomConfigs : public ::testing::TestWithParam<int> {};

TEST_P(ShmRandomConfigs, ProcessesMatchTheOracleBitExactly) {
  for (int i = 0; i < 10; ++i) {
    const auto seed = static_cast<std::uint64_t>(GetParam() * 100 + i + 7000);
    std::mt19937_64 rng(seed);
    CaseLimits lim;
    lim.token_masks = true;
    lim.v2 = 0.5;
    const casefile::Case c = random_case(rng, lim);
    RunOptions opt;
    opt.strided_inputs = (seed % 3) == 1;
    opt.caller_outputs = (seed % 2) == 1;
    opt.outputs_in_window = (seed % 3) == 2;
    const ProcessRun run = run_processes(c, opt, test_shm_options());
    ASSERT_EQ(first_error(run), "") << "seed " << seed << ": " << describe(c);
    EXPECT_EQ(oracle_diff(c, run.outputs), "") << "seed " << seed << ": " << describe(c);
  }
}

INSTANTIATE_TEST_SUITE_P(Shards, ShmRandomConfigs, ::testing::Range(0, 6));

TEST(Shm, NothingIsCreatedInDevShm) {
  const auto before = moedist_shm_entries();
  std::mt19937_64 rng(99);
  const casefile::Case c = random_case(rng);
  const ProcessRun run = run_processes(c, RunOptions{}, test_shm_options());
  EXPECT_EQ(first_error(run), "");
  EXPECT_EQ(moedist_shm_entries(), before);
}

}  // namespace
}  // namespace moedist::testing
