// The transport conformance suite: what every Transport guarantees (src/transport/transport.h),
// checked the same way over every transport. It is the checklist of "Adding a transport"
// (docs/architecture.md): a new transport gets a TransportKind here and must pass every test.
//
// In-process transports run their ranks as threads of this process, the shared-memory transport as
// forked processes. The MPI transport runs under mpirun (tests/CMakeLists.txt): then every process is
// one rank, and only the MPI instantiations run.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sched.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <iterator>
#include <memory>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "moedist/error.h"
#include "moedist/shm.h"
#include "process/rank_processes.h"
#include "transport/inproc/inproc_transport.h"
#include "transport/shm/shm_transport.h"
#include "transport/transport.h"
#ifdef MOEDIST_HAVE_MPI
#include <mpi.h>

#include "moedist/mpi.h"
#include "transport/mpi/mpi_transport.h"
#endif

namespace moedist {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

enum class TransportKind { inproc, inproc_hosts, shm, mpi };

std::string kind_name(TransportKind kind) {
  switch (kind) {
    case TransportKind::inproc:
      return "InProcess";
    case TransportKind::inproc_hosts:
      return "InProcessVirtualHosts";
    case TransportKind::shm:
      return "SharedMemory";
    case TransportKind::mpi:
      return "Mpi";
  }
  return "unknown";
}

// Set by main(): this process is one rank of an mpirun job.
bool g_under_mpi = false;

// The transports this process runs: under mpirun the MPI transport only, else all the others.
std::vector<TransportKind> transports_here(bool processes_only) {
  if (g_under_mpi) return {TransportKind::mpi};
  if (processes_only) return {TransportKind::shm};
  return {TransportKind::inproc, TransportKind::inproc_hosts, TransportKind::shm};
}

// A rank's check failed: the message says which rank saw what.
struct CheckFailure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

template <typename... Parts>
[[noreturn]] void fail_check(const Transport& t, const Parts&... parts) {
  std::string message = "rank " + std::to_string(t.rank()) + ": ";
  ((message += parts), ...);
  throw CheckFailure(message);
}

using RankBody = std::function<void(Transport&)>;

// Runs `body` on every rank of a world of `size` ranks over `kind`, each with its own transport whose
// waits end after `timeout`. Returns what each rank reported ("" when its checks passed); under MPI
// only this process's rank is run and reported.
std::vector<std::string> run_world(TransportKind kind, int size, milliseconds timeout, const RankBody& body) {
  auto guarded = [&](const std::function<std::unique_ptr<Transport>()>& make) -> std::string {
    try {
      std::unique_ptr<Transport> t = make();
      body(*t);
      return "";
    } catch (const std::exception& e) {
      return e.what();
    }
  };
  std::vector<std::string> failures(static_cast<std::size_t>(size));
  if (kind == TransportKind::inproc || kind == TransportKind::inproc_hosts) {
    auto hub = std::make_shared<inproc::InProcHub>(size, timeout, std::chrono::microseconds(-1),
                                                   kind == TransportKind::inproc_hosts ? 2 : 0);
    std::vector<std::thread> threads;
    for (int r = 0; r < size; ++r) {
      threads.emplace_back([&, r] {
        failures[static_cast<std::size_t>(r)] = guarded([&] {
          hub->claim(r);
          return std::make_unique<inproc::InProcTransport>(hub, r);
        });
      });
    }
    for (std::thread& th : threads) th.join();
    return failures;
  }
  if (kind == TransportKind::shm) {
    static int jobs = 0;
    const std::string job = "conformance-" + std::to_string(::getpid()) + "-" + std::to_string(++jobs);
    process::TempDir dir("moedist-conformance");
    process::RankProcesses ranks;
    for (int r = 0; r < size; ++r) {
      ranks.start([&, r] {
        ShmOptions options;
        options.wait.timeout = timeout;
        const std::string failure = guarded([&] { return std::make_unique<shm::ShmTransport>(job, r, size, options); });
        std::ofstream(process::rank_file(dir.path(), r, ".failure")) << failure;
        return 0;
      });
    }
    const std::vector<RankExit> exits = ranks.wait();
    for (int r = 0; r < size; ++r) {
      std::ifstream in(process::rank_file(dir.path(), r, ".failure"));
      std::string& text = failures[static_cast<std::size_t>(r)];
      text.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
      // A rank that a test makes die on purpose exits with 0 and reports nothing.
      if (!exits[static_cast<std::size_t>(r)].ok()) text += " (" + exits[static_cast<std::size_t>(r)].describe() + ")";
    }
    return failures;
  }
#ifdef MOEDIST_HAVE_MPI
  int rank = 0, world = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  if (world != size)
    return {"this test needs " + std::to_string(size) + " MPI ranks, mpirun started " + std::to_string(world)};
  MpiOptions options;
  options.wait.timeout = timeout;
  options.ranks_per_node = 2;  // two ranks per virtual host: messages between hosts go through MPI
  return {guarded([&] { return std::make_unique<mpi::MpiTransport>(MPI_COMM_WORLD, rank, options); })};
#else
  return {"this build has no MPI transport"};
#endif
}

class Conformance : public ::testing::TestWithParam<TransportKind> {
 public:
  // Ranks of the world: 4, on two hosts where the transport has hosts (virtual hosts of 2 ranks).
  static constexpr int kRanks = 4;
  void expect_all_passed(const std::vector<std::string>& failures) {
    for (std::size_t r = 0; r < failures.size(); ++r) EXPECT_EQ(failures[r], "") << "rank " << r;
  }
};

std::uint8_t pattern(int rank, int round, std::size_t i) {
  return static_cast<std::uint8_t>((i * 131u) ^ (static_cast<unsigned>(rank) * 29u) ^
                                   (static_cast<unsigned>(round) * 7u));
}

TEST_P(Conformance, AllgatherDeliversEveryRanksRecordInRankOrder) {
  expect_all_passed(run_world(GetParam(), kRanks, milliseconds(20000), [](Transport& t) {
    int round = 0;
    for (std::size_t bytes : {std::size_t{1}, std::size_t{24}, std::size_t{1000}, std::size_t{8}}) {
      std::vector<std::uint8_t> in(bytes), out(bytes * static_cast<std::size_t>(t.size()), 0xEE);
      for (std::size_t i = 0; i < bytes; ++i) in[i] = pattern(t.rank(), round, i);
      t.allgather(in.data(), bytes, out.data(), "conformance.allgather");
      for (int r = 0; r < t.size(); ++r) {
        for (std::size_t i = 0; i < bytes; ++i) {
          if (out[static_cast<std::size_t>(r) * bytes + i] != pattern(r, round, i)) {
            fail_check(t, "allgather of ", std::to_string(bytes), " bytes: byte ", std::to_string(i), " of rank ",
                       std::to_string(r), "'s record is wrong");
          }
        }
      }
      ++round;
    }
  }));
}

// Fills this rank's window with its pattern for `round`, then (after a barrier) checks every window
// this rank can address, and the size of every other one.
void check_windows(Transport& t, int round, const std::function<std::size_t(int)>& requested) {
  std::byte* own = t.window(t.rank());
  if (own == nullptr) fail_check(t, "its own window is null");
  for (std::size_t i = 0; i < requested(t.rank()); ++i) own[i] = std::byte{pattern(t.rank(), round, i)};
  char token = 0;
  std::vector<char> tokens(static_cast<std::size_t>(t.size()));
  t.allgather(&token, 1, tokens.data(), "conformance.barrier");
  for (int p = 0; p < t.size(); ++p) {
    if (t.window_size(p) < requested(p)) {
      fail_check(t, "window_size(", std::to_string(p), ") = ", std::to_string(t.window_size(p)), " < the ",
                 std::to_string(requested(p)), " bytes rank ", std::to_string(p), " asked for");
    }
    const std::byte* w = t.window(p);
    const bool same_host = t.host_of(p) == t.host_of(t.rank());
    if (same_host != (w != nullptr)) {
      fail_check(t, "window(", std::to_string(p), ") is ", w ? "addressable" : "null", " though rank ",
                 std::to_string(p), same_host ? " shares its host" : " is on another host");
    }
    if (w == nullptr) continue;
    for (std::size_t i = 0; i < requested(p); ++i) {
      if (w[i] != std::byte{pattern(p, round, i)}) {
        fail_check(t, "round ", std::to_string(round), ": byte ", std::to_string(i), " of rank ", std::to_string(p),
                   "'s window is not what it wrote");
      }
    }
  }
}

TEST_P(Conformance, ResizeKeepsThePreviousWindowReadableUntilTheNextResize) {
  expect_all_passed(run_world(GetParam(), kRanks, milliseconds(20000), [](Transport& t) {
    auto small = [](int r) { return std::size_t{4096} + 512u * static_cast<std::size_t>(r); };
    auto large = [](int r) { return std::size_t{3} << 20 | 4096u * static_cast<std::size_t>(r); };
    t.resize_window(small(t.rank()), "conformance.resize");
    check_windows(t, 1, small);
    const std::byte* previous = t.window(t.rank());
    t.resize_window(large(t.rank()), "conformance.resize");
    // The previous window is still this rank's to read (callers pass views into it back).
    for (std::size_t i = 0; i < small(t.rank()); ++i) {
      if (previous[i] != std::byte{pattern(t.rank(), 1, i)}) {
        fail_check(t, "byte ", std::to_string(i), " of its previous window changed when the window grew");
      }
    }
    check_windows(t, 2, large);
    // Growing is not the only resize: a smaller request keeps a window at least that large.
    t.resize_window(small(t.rank()), "conformance.resize");
    check_windows(t, 3, small);
  }));
}

TEST_P(Conformance, ExchangeDeliversMessagesWhoseSizesOnlyTheSenderKnows) {
  expect_all_passed(run_world(GetParam(), kRanks, milliseconds(20000), [](Transport& t) {
    std::vector<int> remote;
    for (int p = 0; p < t.size(); ++p) {
      if (t.host_of(p) != t.host_of(t.rank())) remote.push_back(p);
    }
    if (t.host_count() == 1) {
      if (!remote.empty()) fail_check(t, "host_count() is 1 but host_of() puts ranks on several hosts");
      t.exchange({}, {}, {}, "conformance.exchange");  // nothing to send: a no-op on one host
      return;
    }
    // Sizes differ per pair and round, zero included: the receiver learns each on arrival.
    auto size_of = [](int from, int to, int round) -> std::size_t {
      return round == 0 && from < to ? 0
                                     : static_cast<std::size_t>((from * 7919 + to * 104729 + round * 1299709) % 70000);
    };
    for (int round = 0; round < 3; ++round) {
      std::vector<std::vector<std::byte>> payloads;
      std::vector<Transport::Outgoing> out;
      for (int q : remote) {
        std::vector<std::byte> m(size_of(t.rank(), q, round));
        for (std::size_t i = 0; i < m.size(); ++i) m[i] = std::byte{pattern(t.rank() * 16 + q, round, i)};
        payloads.push_back(std::move(m));
      }
      for (std::size_t i = 0; i < remote.size(); ++i)
        out.push_back({remote[i], payloads[i].data(), payloads[i].size()});
      std::vector<std::vector<std::byte>> in(remote.size(), std::vector<std::byte>(5, std::byte{0x55}));
      t.exchange(out, remote, in, "conformance.exchange");
      for (std::size_t i = 0; i < remote.size(); ++i) {
        const int q = remote[i];
        if (in[i].size() != size_of(q, t.rank(), round)) {
          fail_check(t, "round ", std::to_string(round), ": the message of rank ", std::to_string(q), " has ",
                     std::to_string(in[i].size()), " bytes, not ", std::to_string(size_of(q, t.rank(), round)));
        }
        for (std::size_t j = 0; j < in[i].size(); ++j) {
          if (in[i][j] != std::byte{pattern(q * 16 + t.rank(), round, j)}) {
            fail_check(t, "round ", std::to_string(round), ": byte ", std::to_string(j), " of rank ", std::to_string(q),
                       "'s message is wrong");
          }
        }
      }
    }
  }));
}

// The rank that does not come: the last one, on a host of its own ranks' where there are hosts.
constexpr int kAbsent = 3;

// The absent rank either idles (outside an operator call) or says it is busy (inside one), which makes
// its peers spin or yield for it rather than sleep (Transport::set_busy): either way they give up at
// the timeout, naming it.
void expect_timeout_names_the_missing_peer(TransportKind kind, bool absent_busy) {
  const milliseconds timeout(600);
  const auto failures = run_world(kind, Conformance::kRanks, timeout, [&](Transport& t) {
    char token = 1;
    std::vector<char> tokens(static_cast<std::size_t>(t.size()));
    t.allgather(&token, 1, tokens.data(), "conformance.start");
    if (t.rank() == kAbsent) {
      t.set_busy(absent_busy);
      // Stay alive (a closed connection would be a lost peer, not a late one) until the others gave up.
      std::this_thread::sleep_for(timeout * 4);
      return;
    }
    const auto started = Clock::now();
    try {
      t.allgather(&token, 1, tokens.data(), "conformance.late");
      fail_check(t, "an allgather without rank ", std::to_string(kAbsent), " returned");
    } catch (const PeerError& e) {
      const auto waited = std::chrono::duration_cast<milliseconds>(Clock::now() - started);
      if (e.code() != ErrorCode::timeout)
        fail_check(t, "raised ", error_code_name(e.code()), ", not timeout: ", e.what());
      if (e.peer() != kAbsent)
        fail_check(t, "named rank ", std::to_string(e.peer()), ", not the absent rank: ", e.what());
      if (e.phase() != "conformance.late") fail_check(t, "named phase '", e.phase(), "', not conformance.late");
      if (waited < timeout * 9 / 10 || waited > timeout * 5) {
        fail_check(t, "gave up after ", std::to_string(waited.count()), " ms with a timeout of ",
                   std::to_string(timeout.count()), " ms");
      }
    }
    // A failed transport stays failed: the next call raises at once, naming the same peer.
    const auto again = Clock::now();
    try {
      t.allgather(&token, 1, tokens.data(), "conformance.after");
      fail_check(t, "a failed transport completed another allgather");
    } catch (const PeerError& e) {
      if (e.peer() != kAbsent)
        fail_check(t, "after the failure, named rank ", std::to_string(e.peer()), ": ", e.what());
      if (Clock::now() - again > timeout / 2) fail_check(t, "after the failure, waited again before raising");
    }
  });
  for (std::size_t r = 0; r < failures.size(); ++r) EXPECT_EQ(failures[r], "") << "rank " << r;
}

TEST_P(Conformance, ATimeoutNamesTheMissingPeerAndTheTransportStaysFailed) {
  expect_timeout_names_the_missing_peer(GetParam(), false);
}

TEST_P(Conformance, ATimeoutNamesAMissingPeerThatSaysItIsBusy) {
  expect_timeout_names_the_missing_peer(GetParam(), true);
}

INSTANTIATE_TEST_SUITE_P(Transports, Conformance, ::testing::ValuesIn(transports_here(false)),
                         [](const ::testing::TestParamInfo<TransportKind>& param) { return kind_name(param.param); });

// Two ranks on one CPU: a waiter gives the CPU up (sleeps) for the rank it awaits when that rank last ran
// on the same CPU, even while that rank says it is busy, for the scheduler does not move either of two
// spinning ranks to an idle CPU, and each would hold the CPU for a whole slice while the other waits
// (current_cpu). Seen as the waiter's voluntary context switches, which spinning and yielding never make.
// Only the transports that take the busy hint (MPI ignores it, and MPI_Allgather polls).
class WaitsOnOneCpu : public ::testing::TestWithParam<TransportKind> {};

void pin_to_one_cpu(const Transport& t) {
  cpu_set_t allowed;
  CPU_ZERO(&allowed);
  if (::sched_getaffinity(0, sizeof allowed, &allowed) != 0) fail_check(t, "sched_getaffinity: ", std::strerror(errno));
  int first = 0;
  while (first < CPU_SETSIZE && !CPU_ISSET(first, &allowed)) ++first;
  cpu_set_t one;
  CPU_ZERO(&one);
  CPU_SET(first, &one);
  if (::sched_setaffinity(0, sizeof one, &one) != 0) fail_check(t, "sched_setaffinity: ", std::strerror(errno));
}

TEST_P(WaitsOnOneCpu, AWaiterSleepsWhenTheRankItAwaitsLastRanOnItsCpu) {
  const auto failures = run_world(GetParam(), 2, milliseconds(20000), [&](Transport& t) {
    pin_to_one_cpu(t);
    char token = 1;
    std::vector<char> tokens(2);
    t.allgather(&token, 1, tokens.data(), "one_cpu.start");  // both have run on the one CPU since
    if (t.rank() == 1) {
      t.set_busy(true);  // busy, but not running for a while: rank 0 must not spin for it
      std::this_thread::sleep_for(milliseconds(50));
      t.allgather(&token, 1, tokens.data(), "one_cpu.late");
      t.set_busy(false);
      return;
    }
    rusage before{}, after{};
    ::getrusage(RUSAGE_THREAD, &before);
    t.allgather(&token, 1, tokens.data(), "one_cpu.late");
    ::getrusage(RUSAGE_THREAD, &after);
    if (after.ru_nvcsw == before.ru_nvcsw)
      fail_check(t, "waited 50 ms for a busy rank on its own CPU without sleeping once (",
                 std::to_string(after.ru_nivcsw - before.ru_nivcsw), " involuntary context switches)");
  });
  for (std::size_t r = 0; r < failures.size(); ++r) EXPECT_EQ(failures[r], "") << "rank " << r;
}

cpu_set_t affinity_of_this_thread() {
  cpu_set_t set;
  CPU_ZERO(&set);
  EXPECT_EQ(::sched_getaffinity(0, sizeof set, &set), 0) << std::strerror(errno);
  return set;
}

// move_off_cpu alone: it moves the thread to a CPU that is neither its own nor taken, restores the
// affinity, claims the shared interval, and otherwise leaves the thread where it is.
TEST(MoveOffCpu, MovesToAFreeAllowedCpuAndRestoresTheAffinity) {
  std::thread([] {  // a thread of its own: its affinity changes
    const cpu_set_t allowed = affinity_of_this_thread();
    std::vector<int> cpus;
    for (int c = 0; c < CPU_SETSIZE; ++c) {
      if (CPU_ISSET(c, &allowed)) cpus.push_back(c);
    }
    ASSERT_FALSE(cpus.empty());
    cpu_set_t first;
    CPU_ZERO(&first);
    CPU_SET(cpus[0], &first);
    ASSERT_EQ(::sched_setaffinity(0, sizeof first, &first), 0);
    ASSERT_EQ(current_cpu(), cpus[0]);
    std::atomic<std::int64_t> next_move_ns{0};
    EXPECT_FALSE(move_off_cpu(cpus[0], {}, next_move_ns)) << "a thread pinned to one CPU moved";
    EXPECT_TRUE(move_due(next_move_ns)) << "a refusal claimed the interval";
    // Free again, still on cpus[0] (the kernel moves a thread only when its CPU leaves the mask, or when
    // it balances, rarely at this very moment: then pin and free it again).
    for (int attempt = 0; attempt < 5; ++attempt) {
      ASSERT_EQ(::sched_setaffinity(0, sizeof first, &first), 0);
      ASSERT_EQ(::sched_setaffinity(0, sizeof allowed, &allowed), 0);
      if (current_cpu() == cpus[0]) break;
    }
    ASSERT_EQ(current_cpu(), cpus[0]);
    const std::vector<int> others(cpus.begin() + 1, cpus.end());
    EXPECT_FALSE(move_off_cpu(cpus[0], others, next_move_ns)) << "moved onto a taken CPU";
    EXPECT_EQ(current_cpu(), cpus[0]);
    EXPECT_TRUE(move_due(next_move_ns));
    if (cpus.size() == 1) return;  // a single usable CPU: nowhere to go, as checked above
    const std::vector<int> taken(cpus.begin() + 1, cpus.end() - 1);  // leaves the last CPU free
    const auto steady_ns = [] {
      return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
    };
    const std::int64_t before = steady_ns();
    EXPECT_TRUE(move_off_cpu(cpus[0], taken, next_move_ns));
    const std::int64_t after_move = steady_ns();
    EXPECT_EQ(current_cpu(), cpus.back());
    const cpu_set_t after = affinity_of_this_thread();
    EXPECT_TRUE(CPU_EQUAL(&allowed, &after)) << "the affinity was not restored";
    // The move claimed the shared interval from its own time on.
    EXPECT_GE(next_move_ns.load(), before + kMoveIntervalNs);
    EXPECT_LE(next_move_ns.load(), after_move + kMoveIntervalNs);
    // Within a claimed interval no thread that shares it moves (a deadline far off, so that no timing
    // of this machine matters).
    next_move_ns.store(steady_ns() + 3'600'000'000'000);
    EXPECT_FALSE(move_due(next_move_ns));
    EXPECT_FALSE(move_off_cpu(cpus.back(), {}, next_move_ns)) << "moved within a claimed interval";
    EXPECT_EQ(current_cpu(), cpus.back());
  })
      .join();
}

// The overload that reads the other threads' CPUs from a table: the caller's own entry does not count
// as taken, every other does.
TEST(MoveOffCpu, ReadsTakenCpusFromATableLeavingOutItsOwnEntry) {
  std::thread([] {
    const cpu_set_t allowed = affinity_of_this_thread();
    std::vector<int> cpus;
    for (int c = 0; c < CPU_SETSIZE; ++c) {
      if (CPU_ISSET(c, &allowed)) cpus.push_back(c);
    }
    cpu_set_t first;
    CPU_ZERO(&first);
    CPU_SET(cpus[0], &first);
    for (int attempt = 0; attempt < 5; ++attempt) {
      ASSERT_EQ(::sched_setaffinity(0, sizeof first, &first), 0);
      ASSERT_EQ(::sched_setaffinity(0, sizeof allowed, &allowed), 0);
      if (current_cpu() == cpus[0]) break;
    }
    ASSERT_EQ(current_cpu(), cpus[0]);
    std::atomic<std::int64_t> next_move_ns{0};
    // n + 1 entries: [0] names the last CPU, [1, n - 1) the CPUs between, [n - 1] nothing known, [n] the
    // first CPU (where the thread is).
    const std::size_t n = cpus.size();
    std::vector<std::atomic<int>> table(n + 1);
    table[0].store(cpus.back());
    for (std::size_t i = 1; i + 1 < n; ++i) table[i].store(cpus[i]);
    table[n - 1].store(-1);
    table[n].store(cpus[0]);
    if (n == 1) {
      EXPECT_FALSE(move_off_cpu(cpus[0], table, 0, next_move_ns));
      return;
    }
    // As thread 0, its own entry (the last CPU) does not count: the last CPU is free.
    EXPECT_TRUE(move_off_cpu(cpus[0], table, 0, next_move_ns));
    EXPECT_EQ(current_cpu(), cpus.back());
    // As thread n - 1, entries 0 and n count: every CPU is taken, and it stays.
    next_move_ns.store(0);
    EXPECT_FALSE(move_off_cpu(cpus.back(), table, static_cast<int>(n - 1), next_move_ns));
    EXPECT_EQ(current_cpu(), cpus.back());
  }).join();
}

// Two ranks that start on one CPU while another is allowed and free: the waiter moves itself off the
// shared CPU (move_off_cpu), for a wake-up does not always place it on the idle one and the two would take
// turns on one CPU for the rest of the run. With a single usable CPU they stay there, and still finish.
TEST_P(WaitsOnOneCpu, RanksThatStartOnOneCpuMoveApartWhenAnotherIsFree) {
  const auto failures = run_world(GetParam(), 2, milliseconds(20000), [&](Transport& t) {
    cpu_set_t allowed;
    CPU_ZERO(&allowed);
    if (::sched_getaffinity(0, sizeof allowed, &allowed) != 0)
      fail_check(t, "sched_getaffinity: ", std::strerror(errno));
    pin_to_one_cpu(t);
    int cpu = current_cpu();
    std::vector<int> cpus(2);
    t.allgather(&cpu, sizeof cpu, cpus.data(), "one_cpu.start");  // both have run on the one CPU since
    // Free to move again; the kernel leaves a thread where it is when its CPU stays allowed.
    if (::sched_setaffinity(0, sizeof allowed, &allowed) != 0)
      fail_check(t, "sched_setaffinity: ", std::strerror(errno));
    t.set_busy(true);
    constexpr int kSteps = 2000;
    int apart = 0;  // steps of the second half where the ranks ran on different CPUs
    for (int step = 0; step < kSteps; ++step) {
      cpu = current_cpu();
      t.allgather(&cpu, sizeof cpu, cpus.data(), "one_cpu.step");
      if (step >= kSteps / 2 && cpus[0] != cpus[1]) ++apart;
    }
    t.set_busy(false);
    if (std::getenv("MOEDIST_TEST_PRINT_APART"))
      std::printf("rank %d: apart in %d of %d steps\n", t.rank(), apart, kSteps / 2);
    // Apart for a good part of the second half: a wake-up may put them together now and then, and other
    // work on the machine (tests run in parallel) may draw the kernel to keep them on one CPU for a while,
    // but without the move they stay together for the whole run (0 apart).
    if (CPU_COUNT(&allowed) >= 2 && apart < kSteps / 20) {
      fail_check(t, "two ranks that started on one CPU, with ", std::to_string(CPU_COUNT(&allowed)),
                 " CPUs allowed, ran apart in only ", std::to_string(apart), " of the last ",
                 std::to_string(kSteps / 2), " steps");
    }
    if (CPU_COUNT(&allowed) == 1 && apart > 0) fail_check(t, "ranks pinned to one CPU ran apart");
  });
  for (std::size_t r = 0; r < failures.size(); ++r) EXPECT_EQ(failures[r], "") << "rank " << r;
}

INSTANTIATE_TEST_SUITE_P(Transports, WaitsOnOneCpu, ::testing::Values(TransportKind::inproc, TransportKind::shm),
                         [](const ::testing::TestParamInfo<TransportKind>& param) { return kind_name(param.param); });

// A rank that dies: only where ranks are processes (a thread cannot die alone; its process would).

// The dead rank died inside an operator call (busy, Transport::set_busy) or outside one.
class ConformanceOfProcesses : public ::testing::TestWithParam<std::tuple<TransportKind, bool>> {};

TEST_P(ConformanceOfProcesses, ADeadPeerIsReportedAsLostBeforeTheTimeout) {
  const milliseconds timeout(20000);
  const bool dies_busy = std::get<1>(GetParam());
  const auto failures = run_world(std::get<0>(GetParam()), Conformance::kRanks, timeout, [&](Transport& t) {
    char token = 1;
    std::vector<char> tokens(static_cast<std::size_t>(t.size()));
    t.allgather(&token, 1, tokens.data(), "conformance.start");
    if (t.rank() == kAbsent) {
      t.set_busy(dies_busy);
      std::fflush(nullptr);
      ::_exit(0);  // dies without a word; the others must notice its process is gone
    }
    const auto started = Clock::now();
    try {
      t.allgather(&token, 1, tokens.data(), "conformance.after_death");
      fail_check(t, "an allgather without the dead rank returned");
    } catch (const PeerError& e) {
      if (e.code() != ErrorCode::peer_lost)
        fail_check(t, "raised ", error_code_name(e.code()), ", not peer_lost: ", e.what());
      if (e.peer() != kAbsent)
        fail_check(t, "named rank ", std::to_string(e.peer()), ", not the dead rank: ", e.what());
      if (Clock::now() - started > timeout / 4)
        fail_check(t, "noticed the dead rank only after a quarter of the timeout");
    }
    if (g_under_mpi) std::printf("conformance: rank %d named the lost rank %d\n", t.rank(), kAbsent);
  });
  if (g_under_mpi) {
    // Open MPI would wait in MPI_Finalize for the dead rank: a survivor leaves here with its verdict.
    const bool passed = failures.size() == 1 && failures[0].empty();
    if (!passed) std::printf("conformance: FAILED: %s\n", failures.empty() ? "" : failures[0].c_str());
    std::fflush(nullptr);
    ::_exit(passed ? 0 : 1);
  }
  for (std::size_t r = 0; r < failures.size(); ++r) EXPECT_EQ(failures[r], "") << "rank " << r;
}

INSTANTIATE_TEST_SUITE_P(Transports, ConformanceOfProcesses,
                         ::testing::Combine(::testing::ValuesIn(transports_here(true)), ::testing::Bool()),
                         [](const ::testing::TestParamInfo<std::tuple<TransportKind, bool>>& param) {
                           return kind_name(std::get<0>(param.param)) + (std::get<1>(param.param) ? "Busy" : "Idle");
                         });

}  // namespace
}  // namespace moedist

int main(int argc, char** argv) {
#ifdef MOEDIST_HAVE_MPI
  // Before InitGoogleTest, which instantiates the parameterized tests for the transports of this process.
  moedist::g_under_mpi = std::getenv("OMPI_COMM_WORLD_SIZE") != nullptr || std::getenv("PMIX_RANK") != nullptr;
#endif
  ::testing::InitGoogleTest(&argc, argv);
#ifdef MOEDIST_HAVE_MPI
  if (moedist::g_under_mpi) {
    int provided = 0;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
  }
#endif
  const int result = RUN_ALL_TESTS();
#ifdef MOEDIST_HAVE_MPI
  if (moedist::g_under_mpi) MPI_Finalize();
#endif
  return result;
}
