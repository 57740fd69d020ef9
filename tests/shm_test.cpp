// The shared-memory transport: ranks as real processes, results identical to the oracle (and so to
// the in-process runtime), lost peers reported by name and phase, nothing left in /dev/shm.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>

#include <chrono>
#include <cstdio>
#include <random>
#include <thread>

#include "process/rank_processes.h"
#include "test_support.h"
#include "transport/shm/shm_transport.h"

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

// A waiter that sleeps (no spin) is woken by the publisher's FUTEX_WAKE, which a publisher makes only
// while a peer says it sleeps: a wake-up lost to that bookkeeping would end each wait only at the
// waiter's next 20 ms look at its peer (about 600 ms for these 60 steps, whose waits then end in pairs),
// instead of about the peer's 1 ms delays (60 ms). The bound, 400 ms, is a liveness check with a wide
// margin, not a speed target.
TEST(Shm, ASleepingWaiterIsWokenWhenItsPeerPublishes) {
  const std::string job = "shm-wake-" + std::to_string(::getpid());
  constexpr int kSteps = 60;
  process::RankProcesses ranks;
  for (int r = 0; r < 2; ++r) {
    ranks.start([&job, r] {
      try {
        ShmOptions options = test_shm_options();
        options.spin = std::chrono::microseconds(0);  // sleep on the futex at once
        shm::ShmTransport t(job, r, 2, options);
        char in = static_cast<char>(r), out[2] = {};
        t.allgather(&in, 1, out, "wake.start");
        const auto start = std::chrono::steady_clock::now();
        for (int step = 0; step < kSteps; ++step) {
          if (r == 1) std::this_thread::sleep_for(std::chrono::milliseconds(1));  // rank 0 is asleep by then
          t.allgather(&in, 1, out, "wake.step");
          if (out[0] != 0 || out[1] != 1) return 3;
        }
        const auto ms =
            std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - start).count();
        if (r == 0 && ms >= 400) {
          std::fprintf(stderr, "rank 0: %d waits took %lld ms\n", kSteps, static_cast<long long>(ms));
          return 2;
        }
        return 0;
      } catch (const std::exception& e) {
        std::fprintf(stderr, "rank %d: %s\n", r, e.what());
        return 4;
      }
    });
  }
  for (const RankExit& e : ranks.wait()) EXPECT_TRUE(e.ok()) << e.describe();
}

}  // namespace
}  // namespace moedist::testing
