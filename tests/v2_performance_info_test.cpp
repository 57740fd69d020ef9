// performance_info (V2 §5.1): an optional (W,) int64 buffer of dispatch_v2 and combine_v2 whose entry r
// becomes max(entry, the microseconds this rank waited for EP rank r in the call), never zeroed, never
// written by a call that fails (v2_validation_test's sentinels) or that does not get it, nor by the V1
// operators, which have none. A rank that enters a call 200 ms after the others shows up at its EP rank
// on every other rank with at least 100 ms, while its own entries for the punctual ranks stay below
// 100 ms; over threads (the in-process transport) and over processes (the shared-memory transport).
// Only these wide bounds are asserted of the times themselves: on a loaded machine (a sanitizer build
// beside other tests) a punctual rank may need tens of milliseconds to get from its arrival to its wait.
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <latch>
#include <memory>
#include <new>
#include <string>
#include <thread>
#include <vector>

#include "moedist/moedist.h"
#include "moedist/shm.h"
#include "outcome.h"
#include "test_support.h"
#include "v2_world.h"

namespace moedist::testing::v2 {
namespace {

using std::chrono::milliseconds;

constexpr milliseconds kLate{200};
constexpr std::int64_t kSeenLate = 100000;  // µs: what a 200 ms wait must show at least
constexpr std::int64_t kPunctual = 100000;  // µs: what a wait for a punctual rank stays below

// W = 4, E = 4, BS = 3, K = 2 (no shared experts).
World four_ranks() { return world(4, 4); }

using Perf = std::vector<std::int64_t>;

// Before a call: the punctual ranks count themselves in; the late one waits for all of them, then kLate.
void arrive(std::latch& reached, bool late) {
  if (!late) {
    reached.count_down();
    return;
  }
  reached.wait();
  std::this_thread::sleep_for(kLate);
}

Perf values(const Tensor& t) { return Perf(t.data<std::int64_t>(), t.data<std::int64_t>() + t.numel()); }

Tensor perf_tensor(int W, std::int64_t fill) {
  Tensor t(DType::int64, W);
  std::fill_n(t.data<std::int64_t>(), W, fill);
  return t;
}

// Where a rank is late: entering dispatch_v2, or combine_v2.
enum class Late : std::uint8_t { dispatch, combine };

// Every rank runs a V2 round with its own performance_info for dispatch and one for combine (each filled
// with `fill`; absent in combine with `combine_perf` false). Global rank `late` enters the call `when`
// says kLate after every other rank has reached it.
struct Round {
  std::vector<Perf> dispatch, combine;
};

Round late_round(const World& w, int late, Late when, std::int64_t fill = 0, bool combine_perf = true) {
  const casefile::Case c = make_case(w, 31);
  InProcessWorld runtime(w.size(), RuntimeOptions{{milliseconds(20000)}});
  Round round{std::vector<Perf>(static_cast<std::size_t>(w.size())),
              std::vector<Perf>(static_cast<std::size_t>(w.size()))};
  std::latch dispatch_reached(w.size() - 1), combine_reached(w.size() - 1);
  run_ranks(w.size(), [&](int g) {
    const casefile::RankInputs& in = c.ranks[static_cast<std::size_t>(g)];
    const std::unique_ptr<Group> group = runtime.join(w.rank_config(g));
    Tensor dispatch_perf = perf_tensor(w.config.ep_world_size, fill),
           combine_perf_t = perf_tensor(w.config.ep_world_size, fill);
    DispatchCall dispatch(w, g, in);
    dispatch.options.performance_info = dispatch_perf.mutable_view();
    if (g != late || when == Late::dispatch) arrive(dispatch_reached, g == late);
    const DispatchResult d = group->dispatch_v2(dispatch.x, dispatch.expert_ids, dispatch.options);
    CombineCall combine(w, dispatch.config, d, in);
    combine.options.performance_info = combine_perf ? combine_perf_t.mutable_view() : MutableTensorView{};
    if (g != late || when == Late::combine) arrive(combine_reached, g == late);
    combine.run(*group);
    round.dispatch[static_cast<std::size_t>(g)] = values(dispatch_perf);
    round.combine[static_cast<std::size_t>(g)] = values(combine_perf_t);
  });
  return round;
}

// Every other rank waited kLate for EP rank late_ep; the late rank waited for none of the punctual ones.
void expect_late_rank_seen(const World& w, const std::vector<Perf>& perf, int late) {
  const int T = tp_domain_size(w.config);
  const int late_ep = late / T;
  for (int g = 0; g < w.size(); ++g) {
    const Perf& p = perf[static_cast<std::size_t>(g)];
    ASSERT_EQ(p.size(), static_cast<std::size_t>(w.config.ep_world_size));
    if (g / T != late_ep) {
      EXPECT_GE(p[static_cast<std::size_t>(late_ep)], kSeenLate)
          << "rank " << g << " did not see EP rank " << late_ep << " late";
    }
    for (int r = 0; r < w.config.ep_world_size; ++r) {
      EXPECT_GE(p[static_cast<std::size_t>(r)], 0) << "rank " << g << ", entry " << r;
      if (g == late && r != late_ep) {
        EXPECT_LT(p[static_cast<std::size_t>(r)], kPunctual) << "the late rank, entry " << r;
      }
    }
  }
}

TEST(PerformanceInfo, ARankLateForDispatchShowsOnEveryOtherRank) {
  const World w = four_ranks();
  const Round round = late_round(w, 2, Late::dispatch);
  expect_late_rank_seen(w, round.dispatch, 2);
}

TEST(PerformanceInfo, ARankLateForCombineShowsOnEveryOtherRank) {
  const World w = four_ranks();
  const Round round = late_round(w, 1, Late::combine);
  expect_late_rank_seen(w, round.combine, 1);
}

// With a TP domain the entries are per EP rank: global rank 3 late shows at entry 1, also on its TP peer.
TEST(PerformanceInfo, EntriesArePerEpRankWithTp) {
  const World w = tp_pairs();
  const Round round = late_round(w, 3, Late::dispatch);
  expect_late_rank_seen(w, round.dispatch, 3);
  EXPECT_GE(round.dispatch[2][1], kSeenLate) << "the late rank's TP peer";
}

// Entries are a maximum, not a sum: larger values stay as they are, smaller ones rise to the wait.
TEST(PerformanceInfo, EntriesOnlyGrow) {
  const World w = four_ranks();
  constexpr std::int64_t kLarge = 1000000000000;
  for (const Perf& p : late_round(w, 0, Late::dispatch, kLarge).dispatch) EXPECT_EQ(p, Perf(4, kLarge));
  const Round from_negative = late_round(w, 0, Late::dispatch, -5);
  for (const Perf& p : from_negative.dispatch) {
    for (const std::int64_t v : p) EXPECT_GE(v, 0);
  }
  expect_late_rank_seen(w, from_negative.dispatch, 0);
}

// One buffer over several calls keeps the largest wait of each rank (the kernels' atomic maximum).
TEST(PerformanceInfo, OneBufferOverSeveralCallsKeepsTheMaximum) {
  const World w = four_ranks();
  const casefile::Case c = make_case(w, 32);
  InProcessWorld runtime(w.size(), RuntimeOptions{{milliseconds(20000)}});
  std::vector<Perf> after_late(4), after_punctual(4);
  std::latch reached(3);
  run_ranks(w.size(), [&](int g) {
    const std::unique_ptr<Group> group = runtime.join(w.rank_config(g));
    Tensor perf = perf_tensor(4, 0);
    for (int call = 0; call < 2; ++call) {
      DispatchCall dispatch(w, g, c.ranks[static_cast<std::size_t>(g)]);
      dispatch.options.performance_info = perf.mutable_view();
      if (call == 0) arrive(reached, g == 3);
      group->dispatch_v2(dispatch.x, dispatch.expert_ids, dispatch.options);
      (call == 0 ? after_late : after_punctual)[static_cast<std::size_t>(g)] = values(perf);
    }
  });
  expect_late_rank_seen(w, after_late, 3);
  for (int g = 0; g < 4; ++g) {
    for (int r = 0; r < 4; ++r) {
      EXPECT_GE(after_punctual[static_cast<std::size_t>(g)][static_cast<std::size_t>(r)],
                after_late[static_cast<std::size_t>(g)][static_cast<std::size_t>(r)]);
    }
  }
}

// A buffer given to dispatch only is not combine's: a late rank in combine leaves it as dispatch left it.
TEST(PerformanceInfo, UntouchedByACallThatDoesNotGetIt) {
  const World w = four_ranks();
  const Round round = late_round(w, 2, Late::combine, 7, /*combine_perf=*/false);
  for (const Perf& p : round.combine) EXPECT_EQ(p, Perf(4, 7));
}

// The V1 operators have no performance_info: V1 calls with a late rank after a V2 call leave the V2
// call's buffer as it was.
TEST(PerformanceInfo, V1CallsLeaveItAlone) {
  const World w = four_ranks();  // no shared experts: the V1 operators take it too
  const casefile::Case v2 = make_case(w, 33);
  casefile::Case v1 = make_case(w, 34);
  v1.op = 1;
  InProcessWorld runtime(w.size(), RuntimeOptions{{milliseconds(20000)}});
  std::vector<Perf> before(4), after_v1(4);
  std::latch reached(3);
  run_ranks(w.size(), [&](int g) {
    const std::unique_ptr<Group> group = runtime.join(w.rank_config(g));
    Tensor perf = perf_tensor(4, 0);
    DispatchCall dispatch(w, g, v2.ranks[static_cast<std::size_t>(g)]);
    dispatch.options.performance_info = perf.mutable_view();
    group->dispatch_v2(dispatch.x, dispatch.expert_ids, dispatch.options);
    before[static_cast<std::size_t>(g)] = values(perf);
    arrive(reached, g == 0);
    run_rank(*group, v1, g, RunOptions{});
    after_v1[static_cast<std::size_t>(g)] = values(perf);
  });
  EXPECT_EQ(after_v1, before);
}

// ---- over processes (the shared-memory transport) ---------------------------------------------------

// Shared with the children: how many punctual ranks reached dispatch, and every rank's entries.
struct Shared {
  std::atomic<int> reached{0};
  std::int64_t perf[4][4];
};

TEST(PerformanceInfo, ARankLateForDispatchOverProcesses) {
  const World w = four_ranks();
  const casefile::Case c = make_case(w, 35);
  const int late = 3;
  void* area = ::mmap(nullptr, sizeof(Shared), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(area, MAP_FAILED);
  auto* shared = new (area) Shared{};
  const std::string job = "v2perf-" + std::to_string(::getpid()) + "-" +
                          std::to_string(std::chrono::steady_clock::now().time_since_epoch().count() % 1000000007);
  std::vector<pid_t> pids;
  for (int g = 0; g < 4; ++g) {
    const pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      int code = 1;
      try {
        ShmOptions options;
        options.wait.timeout = milliseconds(10000);
        const std::unique_ptr<Group> group = join_shm(w.rank_config(g), job, options);
        DispatchCall dispatch(w, g, c.ranks[static_cast<std::size_t>(g)]);
        Tensor perf = perf_tensor(4, 0);
        dispatch.options.performance_info = perf.mutable_view();
        if (g != late) {
          shared->reached.fetch_add(1);
        } else {
          while (shared->reached.load() < 3) std::this_thread::sleep_for(std::chrono::microseconds(100));
          std::this_thread::sleep_for(kLate);
        }
        group->dispatch_v2(dispatch.x, dispatch.expert_ids, dispatch.options);
        std::copy_n(perf.data<std::int64_t>(), 4, shared->perf[g]);
        code = 0;
      } catch (...) {
        code = 2;
      }
      ::_exit(code);
    }
    pids.push_back(pid);
  }
  for (int g = 0; g < 4; ++g) {
    int status = 0;
    ::waitpid(pids[static_cast<std::size_t>(g)], &status, 0);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "rank " << g << " status " << status;
  }
  std::vector<Perf> perf;
  for (const auto& row : shared->perf) perf.emplace_back(row, row + 4);
  expect_late_rank_seen(w, perf, late);
  shared->~Shared();
  ::munmap(area, sizeof(Shared));
}

}  // namespace
}  // namespace moedist::testing::v2
