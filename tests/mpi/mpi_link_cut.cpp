// One host's link is cut in the middle of a run (tests/netns/link_cut_test.sh): every rank keeps calling
// dispatch and combine until one fails, then writes what it saw to $MOEDIST_NETNS_DIR/rank-R.txt:
//   rank R: FAILED after N calls, T ms after its last completed call: CODE: MESSAGE
// Rank 0 creates $MOEDIST_NETNS_CUT_FILE after --calls-before-cut calls, which tells the harness to cut.
// A rank exits without MPI_Finalize (which would wait for the unreachable host): _exit(1) after a
// failure, _exit(3) when no failure came within --max-seconds.
#include <mpi.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <random>
#include <string>

#include "moedist/error.h"
#include "moedist/mpi.h"
#include "test_support.h"

using namespace moedist;
using Clock = std::chrono::steady_clock;

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int world = 0, rank = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  CLI::App app("dispatch and combine until the network fails");
  int timeout_ms = 3000, calls_before_cut = 20, max_seconds = 60;
  app.add_option("--timeout-ms", timeout_ms, "MpiOptions::wait.timeout");
  app.add_option("--calls-before-cut", calls_before_cut, "rank 0 asks for the cut after this many calls");
  app.add_option("--max-seconds", max_seconds, "give up (exit 3) when nothing failed by then");
  CLI11_PARSE(app, argc, argv);
  const char* dir = std::getenv("MOEDIST_NETNS_DIR");
  const char* cut_file = std::getenv("MOEDIST_NETNS_CUT_FILE");
  if (dir == nullptr || cut_file == nullptr) {
    std::fprintf(stderr, "run me through tests/netns/netns_mpi.sh --cut-after-file\n");
    return 2;
  }
  const auto report = [&](const std::string& line) {
    std::ofstream(std::string(dir) + "/rank-" + std::to_string(rank) + ".txt") << line << "\n";
    std::fprintf(stderr, "%s\n", line.c_str());
  };

  testing::CaseLimits limits;
  limits.world_size = world;
  limits.allow_tp = false;
  limits.max_h = 256;
  limits.max_bs = 4;
  limits.max_k = 4;
  std::mt19937_64 rng(42);
  casefile::Case c = testing::random_case(rng, limits);
  MpiOptions options;
  options.wait.timeout = std::chrono::milliseconds(timeout_ms);
  const Clock::time_point start = Clock::now();
  Clock::time_point last_done = start;
  long calls = 0;
  try {
    const std::unique_ptr<Group> group = join_mpi_world(testing::rank_config(c, rank), MPI_COMM_WORLD, options);
    last_done = Clock::now();
    while (Clock::now() - start < std::chrono::seconds(max_seconds)) {
      testing::run_rank(*group, c, rank, testing::RunOptions{});
      last_done = Clock::now();
      if (++calls == calls_before_cut && rank == 0) std::ofstream(cut_file) << "cut\n";
    }
  } catch (const Error& e) {
    const auto waited = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - last_done).count();
    report("rank " + std::to_string(rank) + ": FAILED after " + std::to_string(calls) + " calls, " + std::to_string(waited) +
           " ms after its last completed call: " + error_code_name(e.code()) + ": " + e.what());
    std::fflush(nullptr);
    _exit(1);
  }
  report("rank " + std::to_string(rank) + ": NO FAILURE after " + std::to_string(calls) + " calls");
  std::fflush(nullptr);
  _exit(3);
}
