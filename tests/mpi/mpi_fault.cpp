// Fault injection over MPI (run by tests/mpi/fault_injection.sh under `mpirun --enable-recovery`, which
// keeps the job alive when a rank dies): rounds of a group over the ranks still alive, on one host or two
// virtual hosts, in which a random rank SIGKILLs itself at a random occurrence of a random phase of
// dispatch or combine. Every survivor must raise a PeerError naming that rank within the timeout; then
// the survivors make a communicator of their own (MPI_Comm_create_group, collective over them only) and
// the next round's group on it. After the last round the survivors check a group against the oracle.
// Each survivor prints one line per round; rank 0 of the survivors prints the summary:
//   mpi faults: N kills, every survivor named the victim (...); the survivors' last group matched the oracle
#include <mpi.h>
#include <signal.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "moedist/error.h"
#include "moedist/mpi.h"
#include "test_support.h"

using namespace moedist;
using Clock = std::chrono::steady_clock;

namespace {

// The phases every call goes through (a window grows only when a shape needs it, so the window phases
// are left to the shared-memory fault tests, which force them).
std::vector<std::string> phases_of(int hosts, int t) {
  std::vector<std::string> p = {"join", "dispatch.counts", "dispatch.data", "combine.counts", "combine.data"};
  if (hosts > 1) p.insert(p.end(), {"dispatch.hosts", "combine.requests", "combine.hosts"});
  if (t == 2) p.insert(p.end(), {"dispatch.tp", "combine.tp"});
  return p;
}

// One round's group configuration over n ranks.
casefile::Case round_case(int n, std::mt19937_64& rng) {
  casefile::Case c;
  const bool tp = n % 2 == 0 && rng() % 3 == 0;
  c.tp_world_size = tp ? 2 : 0;
  c.ep_world_size = tp ? n / 2 : n;
  c.shared_expert_rank_num = !tp && n >= 4 && rng() % 2 == 0 ? 1 : 0;
  c.moe_expert_num = (c.ep_world_size - c.shared_expert_rank_num) * (tp ? 1 : 2);
  testing::CaseLimits lim;
  lim.max_h = 48;
  lim.max_k = 2;
  testing::random_inputs(c, rng, lim, 3);
  return c;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int world = 0, me = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  MPI_Comm_rank(MPI_COMM_WORLD, &me);
  CLI::App app("fault injection over MPI");
  std::uint64_t seed = 1;
  int timeout_ms = 3000, min_alive = 4;
  app.add_option("--seed", seed);
  app.add_option("--timeout-ms", timeout_ms);
  app.add_option("--min-alive", min_alive, "stop killing when fewer ranks are alive");
  CLI11_PARSE(app, argc, argv);

  // Descriptors and threads before the first group (MPI's own are open by now), compared at the end.
  const int fds_before = testing::proc_entries("/proc/self/fd"), threads_before = testing::proc_entries("/proc/self/task");
  std::vector<int> alive(static_cast<std::size_t>(world));
  for (int r = 0; r < world; ++r) alive[static_cast<std::size_t>(r)] = r;
  std::mt19937_64 rng(seed);  // the same draws on every rank
  int kills = 0, problems = 0;
  double worst_ms = 0;
  MPI_Group world_group;
  MPI_Comm_group(MPI_COMM_WORLD, &world_group);
  const auto comm_of = [&](int round) {
    MPI_Group g;
    MPI_Group_incl(world_group, static_cast<int>(alive.size()), alive.data(), &g);
    MPI_Comm comm = MPI_COMM_NULL;
    MPI_Comm_create_group(MPI_COMM_WORLD, g, round, &comm);
    MPI_Group_free(&g);
    return comm;
  };
  for (int round = 0; static_cast<int>(alive.size()) >= min_alive; ++round) {
    const int n = static_cast<int>(alive.size());
    const int g = static_cast<int>(std::find(alive.begin(), alive.end(), me) - alive.begin());
    const casefile::Case c = round_case(n, rng);
    const int t = std::max(c.tp_world_size, 1);
    const bool two_hosts = rng() % 2 == 0;
    MpiOptions o;
    o.wait.timeout = std::chrono::milliseconds(timeout_ms);
    o.ranks_per_node = two_hosts ? ((n + 1) / 2 + t - 1) / t * t : n;  // two hosts of about n / 2 ranks (even with TP)
    const int hosts = (n + o.ranks_per_node - 1) / o.ranks_per_node;
    const std::vector<std::string> phases = phases_of(hosts, c.tp_world_size);
    const std::string& phase = phases[rng() % phases.size()];
    const int victim = static_cast<int>(rng() % static_cast<std::uint64_t>(n));
    const bool once = phase == "join";
    const int occurrence = once ? 1 : 1 + static_cast<int>(rng() % 3);
    int seen = 0;
    o.on_phase = [&](std::string_view p) {
      if (g == victim && p == phase && ++seen == occurrence) ::raise(SIGKILL);
    };
    MPI_Comm comm = comm_of(round);
    const Clock::time_point start = Clock::now();
    Clock::time_point last = start;
    std::string line;
    try {
      auto group = join_mpi(comm, testing::rank_config(c, g), o);
      // The victim dies in one of the first 3 calls; the calls after it need every rank, so every
      // survivor fails by then at the latest.
      for (int call = 0; call < 6; ++call) {
        last = Clock::now();
        testing::run_rank(*group, c, g, testing::RunOptions{});
      }
      line = "no error although rank " + std::to_string(victim) + " was to be killed at '" + phase + "'";
      ++problems;
    } catch (const PeerError& e) {
      const double ms = std::chrono::duration<double, std::milli>(Clock::now() - last).count();
      worst_ms = std::max(worst_ms, ms);
      const bool ok = e.peer() == victim && (e.code() == ErrorCode::peer_lost || e.code() == ErrorCode::timeout) &&
                      ms < timeout_ms + 2000.0;
      if (!ok) ++problems;
      line = std::string(ok ? "ok" : "WRONG") + " (" + std::to_string(static_cast<int>(ms)) + " ms): " + e.what();
    } catch (const std::exception& e) {
      ++problems;
      line = std::string("WRONG (not a PeerError): ") + e.what();
    }
    std::printf("round %d, %d ranks on %d host(s), victim %d (world rank %d) at '%s' #%d: world rank %d: %s\n", round, n, hosts,
                victim, alive[static_cast<std::size_t>(victim)], phase.c_str(), occurrence, me, line.c_str());
    std::fflush(stdout);
    // The old communicator keeps requests to the dead rank; it is left as it is (freeing it could wait).
    alive.erase(alive.begin() + victim);
    ++kills;
  }
  // The survivors' last group: correct results, checked against the oracle.
  const int n = static_cast<int>(alive.size());
  const int g = static_cast<int>(std::find(alive.begin(), alive.end(), me) - alive.begin());
  MPI_Comm comm = comm_of(1000);
  casefile::Case c = round_case(n, rng);
  int mismatches = 0;
  try {
    MpiOptions o;
    o.wait.timeout = std::chrono::milliseconds(20000);
    auto group = join_mpi(comm, testing::rank_config(c, g), o);
    const std::vector<oracle::RankOutput> want = oracle::run(testing::to_oracle_case(c));
    for (int call = 0; call < 5; ++call) {
      const casefile::RankOutputs got = testing::run_rank(*group, c, g, testing::RunOptions{});
      if (!testing::compare_rank_with_oracle(c, g, got, want[static_cast<std::size_t>(g)]).empty()) ++mismatches;
    }
  } catch (const std::exception& e) {
    std::printf("world rank %d: the survivors' group failed: %s\n", me, e.what());
    ++problems;
  }
  const int fds_after = testing::proc_entries("/proc/self/fd"), threads_after = testing::proc_entries("/proc/self/task");
  if (fds_after != fds_before || threads_after != threads_before) {
    std::printf("world rank %d: WRONG: %d descriptors and %d threads before the first group, %d and %d after the last\n", me,
                fds_before, threads_before, fds_after, threads_after);
    ++problems;
  }
  int totals[2] = {problems, mismatches}, sums[2] = {0, 0};
  MPI_Allreduce(totals, sums, 2, MPI_INT, MPI_SUM, comm);
  if (g == 0) {
    std::printf("mpi faults: %d kills, %s (slowest %.0f ms on this rank); the survivors' last group %s\n", kills,
                sums[0] == 0 ? "every survivor named the victim, descriptors and threads as before"
                             : "SOME SURVIVORS DID NOT NAME THE VICTIM OR LEAKED", worst_ms,
                sums[1] == 0 ? "matched the oracle" : "DIFFERED FROM THE ORACLE");
  }
  std::fflush(stdout);
  // Open MPI would wait in MPI_Finalize for the dead ranks' connections: leave without it.
  _exit(sums[0] + sums[1] == 0 ? 0 : 1);
}
