// Ranks with several worker threads (GroupOptions::worker_threads): the pool itself (chunks, inline
// runs, exceptions, many calls, destruction while idle), the option's validation, and the operators'
// outputs against the oracles, bit for bit, for 1, 2, 3 and 8 threads per rank (and ranks that differ),
// V1 and V2, on one host, on virtual hosts, and over the shared-memory transport.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <mutex>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "common/worker_pool.h"
#include "moedist/error.h"
#include "moedist/inproc.h"
#include "moedist/shm.h"
#include "test_support.h"

namespace moedist::testing {
namespace {

// --- The pool ---

TEST(WorkerPool, OneThreadRunsInlineOnTheCaller) {
  WorkerPool pool(1);
  EXPECT_EQ(pool.size(), 1);
  int calls = 0;
  pool.parallel_for(3, 1000, 1, [&](std::int64_t b, std::int64_t e, int thread) {
    ++calls;
    EXPECT_EQ(b, 3);
    EXPECT_EQ(e, 1000);
    EXPECT_EQ(thread, 0);
  });
  EXPECT_EQ(calls, 1);
  pool.parallel_for(5, 5, 1, [&](std::int64_t, std::int64_t, int) { ++calls; });  // empty: not called
  EXPECT_EQ(calls, 1);
}

TEST(WorkerPool, ChunksCoverTheRangeOnceEachOnDistinctThreads) {
  for (const int threads : {2, 3, 8}) {
    WorkerPool pool(threads);
    for (const std::int64_t n : {0, 1, 2, 3, 7, 8, 9, 100, 1001}) {
      for (const std::int64_t min_chunk : {1, 2, 50}) {
        std::vector<std::atomic<int>> hits(static_cast<std::size_t>(n));
        std::mutex m;
        std::set<int> used;
        std::set<std::thread::id> ids;
        pool.parallel_for(10, 10 + n, min_chunk, [&](std::int64_t b, std::int64_t e, int thread) {
          for (std::int64_t i = b; i < e; ++i) hits[static_cast<std::size_t>(i - 10)].fetch_add(1);
          const std::lock_guard<std::mutex> lock(m);
          EXPECT_TRUE(used.insert(thread).second) << "thread " << thread << " got two chunks";
          ids.insert(std::this_thread::get_id());
          EXPECT_GE(e - b, std::min(n, min_chunk));
        });
        for (std::int64_t i = 0; i < n; ++i) EXPECT_EQ(hits[static_cast<std::size_t>(i)].load(), 1) << i;
        EXPECT_LE(static_cast<int>(used.size()), threads);
        EXPECT_EQ(used.size(), ids.size());
        if (n >= threads * min_chunk) {
          EXPECT_EQ(static_cast<int>(used.size()), threads) << n << " items, min_chunk " << min_chunk;
        }
        if (n > 0 && n < 2 * min_chunk) {
          EXPECT_EQ(used, std::set<int>{0}) << "a range below two chunks stays on the caller";
        }
      }
    }
  }
}

TEST(WorkerPool, ManyCallsInARow) {
  WorkerPool pool(4);
  std::vector<std::int64_t> data(256);
  for (int call = 0; call < 20000; ++call) {
    pool.parallel_for(0, static_cast<std::int64_t>(data.size()), 1 + call % 70,
                      [&](std::int64_t b, std::int64_t e, int) {
                        for (std::int64_t i = b; i < e; ++i) data[static_cast<std::size_t>(i)] += i;
                      });
  }
  for (std::size_t i = 0; i < data.size(); ++i) EXPECT_EQ(data[i], static_cast<std::int64_t>(i) * 20000);
}

TEST(WorkerPool, CallsAfterTheWorkersParked) {
  WorkerPool pool(3);
  for (int round = 0; round < 5; ++round) {
    std::this_thread::sleep_for(std::chrono::milliseconds(3));  // longer than the spin: the workers sleep
    std::atomic<int> sum{0};
    pool.parallel_for(0, 30, 1, [&](std::int64_t b, std::int64_t e, int) {
      for (std::int64_t i = b; i < e; ++i) sum.fetch_add(static_cast<int>(i));
    });
    EXPECT_EQ(sum.load(), 435);
  }
}

TEST(WorkerPool, AnExceptionReachesTheCallerAfterEveryChunkStopped) {
  WorkerPool pool(4);
  for (const int thrower : {0, 1, 3}) {
    std::atomic<int> finished{0};
    try {
      pool.parallel_for(0, 4, 1, [&](std::int64_t, std::int64_t, int thread) {
        if (thread == thrower) throw std::runtime_error("chunk " + std::to_string(thread));
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
        finished.fetch_add(1);
      });
      ADD_FAILURE() << "no exception";
    } catch (const std::runtime_error& e) {
      EXPECT_EQ(std::string(e.what()), "chunk " + std::to_string(thrower));
      EXPECT_EQ(finished.load(), 3) << "the other chunks finished before the exception was raised";
    }
  }
  // Every chunk throws: exactly one exception arrives, and the pool stays usable.
  EXPECT_THROW(
      pool.parallel_for(0, 4, 1, [](std::int64_t, std::int64_t, int t) { throw std::logic_error(std::to_string(t)); }),
      std::logic_error);
  std::atomic<int> n{0};
  pool.parallel_for(0, 4, 1, [&](std::int64_t b, std::int64_t e, int) { n.fetch_add(static_cast<int>(e - b)); });
  EXPECT_EQ(n.load(), 4);
}

TEST(WorkerPool, DestroyedWhileIdleOrRightAfterCreation) {
  for (int i = 0; i < 50; ++i) WorkerPool pool(1 + i % 8);  // never used
  for (int i = 0; i < 5; ++i) {
    WorkerPool pool(4);
    pool.parallel_for(0, 8, 1, [](std::int64_t, std::int64_t, int) {});
    std::this_thread::sleep_for(std::chrono::milliseconds(i));  // spinning, or parked
  }
}

// --- The option ---

void expect_refused(const std::function<void()>& f, const std::string& value) {
  try {
    f();
    ADD_FAILURE() << "worker_threads = " << value << " was accepted";
  } catch (const ValidationError& e) {
    const std::string what = e.what();
    EXPECT_EQ(e.code(), ErrorCode::invalid_argument);
    EXPECT_NE(what.find("GroupOptions::worker_threads"), std::string::npos) << what;
    EXPECT_NE(what.find(value), std::string::npos) << what;
    EXPECT_NE(what.find("[1, 256]"), std::string::npos) << what;
  }
}

TEST(WorkerThreadsOption, OutOfRangeIsRefusedWithTheRule) {
  GroupConfig config;
  config.ep_world_size = 1;
  config.moe_expert_num = 1;
  for (const int bad : {0, -3, 257}) {
    GroupOptions options;
    options.worker_threads = bad;
    expect_refused([&] { validate_group_options(options); }, std::to_string(bad));
    InProcessWorld world(1);
    expect_refused([&] { world.join(config, options); }, std::to_string(bad));
    ShmOptions shm;
    shm.group = options;
    expect_refused([&] { join_shm(config, "moedist-worker-threads-refused", shm); }, std::to_string(bad));
  }
  GroupOptions negative_chunk;
  negative_chunk.min_chunk_bytes = -1;
  EXPECT_THROW(validate_group_options(negative_chunk), ValidationError);
  GroupOptions most;
  most.worker_threads = GroupOptions::kMaxWorkerThreads;
  EXPECT_NO_THROW(validate_group_options(most));
}

TEST(WorkerThreadsOption, TheGroupKeepsItsOptions) {
  GroupConfig config;
  config.ep_world_size = 1;
  config.moe_expert_num = 2;
  InProcessWorld world(1);
  GroupOptions options;
  options.worker_threads = 3;
  const std::unique_ptr<Group> group = world.join(config, options);
  EXPECT_EQ(group->options().worker_threads, 3);
}

// --- Bit-identical outputs ---

GroupOptions threads(int n) {
  GroupOptions o;
  o.worker_threads = n;
  o.min_chunk_bytes = 1;  // split every loop, however small the case
  return o;
}

CaseLimits limits(double v2) {
  CaseLimits lim;
  lim.token_masks = true;
  lim.v2 = v2;
  lim.max_bs = 20;
  lim.max_ep_world_size = 8;
  return lim;
}

// One random case at each thread count (and with threads differing by rank), on one host or on
// virtual hosts; every run must equal the oracle bit for bit.
void check_case(std::uint64_t seed, double v2, bool virtual_hosts) {
  std::mt19937_64 rng(seed);
  const casefile::Case c = random_case(rng, limits(v2));
  RunOptions opt;
  opt.strided_inputs = seed % 3 == 1;
  opt.caller_outputs = seed % 2 == 1;
  opt.outputs_in_window = seed % 3 == 2;
  if (virtual_hosts) {
    const int world = c.ep_world_size * std::max(c.tp_world_size, 1);
    const int step = c.tp_world_size == 2 ? 2 : 1;
    opt.ranks_per_host = step * (1 + static_cast<int>(rng() % static_cast<std::uint64_t>(world / step)));
  }
  const Expected want = expected_outputs(c);
  const auto check = [&](const std::string& label) {
    const std::vector<casefile::RankOutputs> got = run_runtime(c, opt);
    for (int g = 0; g < static_cast<int>(got.size()); ++g) {
      const std::string diff = compare_rank(c, g, got[static_cast<std::size_t>(g)], want);
      EXPECT_EQ(diff, "") << "seed " << seed << ", " << label << ": " << describe(c)
                          << " ranks_per_host=" << opt.ranks_per_host;
      if (!diff.empty()) return;
    }
  };
  for (const int n : {1, 2, 3, 8}) {
    opt.group_options = [n](int) { return threads(n); };
    check(std::to_string(n) + " threads per rank");
  }
  opt.group_options = [](int g) { return threads(1 + g % 3); };
  check("1 + g % 3 threads on rank g");
}

TEST(WorkerThreadsOracle, V1OnOneHost) {
  for (std::uint64_t seed = 0; seed < 30; ++seed) check_case(7100 + seed, 0.0, false);
}

TEST(WorkerThreadsOracle, V2OnOneHost) {
  for (std::uint64_t seed = 0; seed < 30; ++seed) check_case(7200 + seed, 1.0, false);
}

TEST(WorkerThreadsOracle, V1AndV2OnVirtualHosts) {
  for (std::uint64_t seed = 0; seed < 30; ++seed) check_case(7300 + seed, 0.5, true);
}

// The cases above must reach what the threads split: quant 0 and 2, comm quant 0 and 2, TP, shared
// experts, virtual hosts with more than one host.
TEST(WorkerThreadsOracle, CasesCoverTheSplitLoops) {
  std::set<std::string> seen;
  for (const std::uint64_t base : {7100, 7200, 7300}) {
    for (std::uint64_t seed = 0; seed < 30; ++seed) {
      std::mt19937_64 rng(base + seed);
      const casefile::Case c = random_case(rng, limits(base == 7100 ? 0.0 : base == 7200 ? 1.0 : 0.5));
      seen.insert("quant " + std::to_string(c.quant_mode));
      seen.insert("comm quant " + std::to_string(c.comm_quant_mode));
      seen.insert("op " + std::to_string(c.op));
      if (c.tp_world_size == 2) seen.insert("TP");
      if (c.shared_expert_rank_num > 0) seen.insert("shared expert ranks");
    }
  }
  for (const char* kind :
       {"quant 0", "quant 2", "comm quant 0", "comm quant 2", "op 1", "op 2", "TP", "shared expert ranks"})
    EXPECT_TRUE(seen.count(kind) == 1) << kind;
}

// Processes over shared memory, each rank with its own number of threads.
TEST(WorkerThreadsOracle, SharedMemoryProcesses) {
  for (std::uint64_t seed = 0; seed < 4; ++seed) {
    std::mt19937_64 rng(7400 + seed);
    const casefile::Case c = random_case(rng, limits(seed % 2 == 0 ? 0.0 : 1.0));
    ShmOptions shm;
    shm.wait.timeout = std::chrono::milliseconds(60000);
    const ProcessRun run =
        run_processes(c, RunOptions{}, shm, [](int g, ShmOptions& o) { o.group = threads(2 + g % 2); });
    for (std::size_t g = 0; g < run.errors.size(); ++g) ASSERT_EQ(run.errors[g], "") << "rank " << g;
    EXPECT_EQ(oracle_diff(c, run.outputs), "") << "seed " << 7400 + seed << ": " << describe(c);
  }
}

}  // namespace
}  // namespace moedist::testing
