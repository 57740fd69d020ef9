// The randomized oracle suite over MPI: run under mpirun, every rank joins groups of random
// configurations (shared experts, TP, both quant modes and dtypes, uneven BS, comm quant) with
// join_mpi / join_mpi_world, runs dispatch and combine on random inputs, and compares its own outputs
// with the oracle's bit for bit. MOEDIST_RANKS_PER_NODE splits the ranks into virtual hosts, so the
// node-aware paths between hosts run on one machine too.
//
//   mpirun -np 8 -x MOEDIST_RANKS_PER_NODE=2 mpi_oracle_check --configs 12 --calls 3
//
// --worker-threads N gives every rank N threads for its row work (MpiOptions::group); with
// --min-chunk-bytes 1 every row loop is split between them, however small the case.
//
// Exit status 0 when every output of every rank matched, 1 on a mismatch; an error aborts the job (2).
#include <mpi.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <random>
#include <string>

#include "moedist/mpi.h"
#include "test_support.h"

using namespace moedist;

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int world = 0, rank = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);

  CLI::App app("moedist's randomized oracle suite over MPI");
  int configs = 10, calls = 3, timeout_ms = 60000, worker_threads = 1;
  std::int64_t min_chunk_bytes = 0;
  std::uint64_t seed = 1;
  app.add_option("--configs", configs, "random group configurations")->capture_default_str();
  app.add_option("--calls", calls, "dispatch + combine calls per configuration, each with new random inputs")->capture_default_str();
  app.add_option("--seed", seed, "seed of the first configuration")->capture_default_str();
  app.add_option("--timeout-ms", timeout_ms, "MpiOptions::wait.timeout")->capture_default_str();
  app.add_option("--worker-threads", worker_threads, "MpiOptions::group.worker_threads")->capture_default_str();
  app.add_option("--min-chunk-bytes", min_chunk_bytes, "MpiOptions::group.min_chunk_bytes (0 = automatic)")
      ->capture_default_str();
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int code = app.exit(e);
    MPI_Finalize();
    return code;
  }
  // Ranks per host: virtual hosts, or the network-namespace hosts of tests/netns/netns_mpi.sh.
  const char* rpn_text = std::getenv("MOEDIST_RANKS_PER_NODE");
  if (rpn_text == nullptr || *rpn_text == '\0') rpn_text = std::getenv("MOEDIST_NETNS_RANKS_PER_HOST");
  const int rpn = rpn_text != nullptr && *rpn_text != '\0' ? std::atoi(rpn_text) : world;

  MpiOptions options;
  options.wait.timeout = std::chrono::milliseconds(timeout_ms);
  options.group.worker_threads = worker_threads;  // out of range: join_mpi's ValidationError aborts the job
  options.group.min_chunk_bytes = min_chunk_bytes;
  testing::CaseLimits limits;
  limits.world_size = world;
  limits.allow_tp = rpn % 2 == 0;  // a TP pair must share a host
  limits.max_h = 96;
  limits.max_bs = 5;
  limits.max_k = 8;
  limits.token_masks = true;
  limits.v2 = 0.5;
  long checked = 0, mismatches = 0, options_lost = 0;
  int with_tp = 0, with_shared = 0, v2_calls = 0;
  std::int64_t between_hosts = 0, between_hosts_flat = 0;
  for (int i = 0; i < configs; ++i) {
    std::mt19937_64 rng(seed + static_cast<std::uint64_t>(i));
    casefile::Case c = testing::random_case(rng, limits);
    with_tp += c.tp_world_size == 2 ? 1 : 0;
    with_shared += c.shared_expert_rank_num > 0 ? 1 : 0;
    try {
      // Alternate the two factories; both place comm rank g at global rank g.
      std::unique_ptr<Group> group;
      if (i % 2 == 0) {
        group = join_mpi(MPI_COMM_WORLD, testing::rank_config(c, rank), options);
      } else {
        GroupConfig config = testing::rank_config(c, rank);
        group = join_mpi_world(config, MPI_COMM_WORLD, options);
      }
      // A group that ran on other options than asked would pass the comparison without testing them.
      if (group->options().worker_threads != worker_threads || group->options().min_chunk_bytes != min_chunk_bytes) {
        ++options_lost;
        std::fprintf(stderr,
                     "rank %d: configuration %d joined with worker_threads %d, min_chunk_bytes %lld, not %d, %lld\n",
                     rank, i, group->options().worker_threads, static_cast<long long>(group->options().min_chunk_bytes),
                     worker_threads, static_cast<long long>(min_chunk_bytes));
      }
      for (int call = 0; call < calls; ++call) {
        if (call > 0) {
          // The V1 and V2 operators take turns on a group whose configuration both accept.
          if (testing::v1_compatible(c)) c.op = call % 2 == 0 ? c.op : 3 - c.op;
          testing::random_inputs(c, rng, limits, std::max<std::int64_t>(1, c.global_bs / c.ep_world_size));
        }
        testing::RunOptions run;
        run.strided_inputs = (i + call) % 3 == 1;
        run.caller_outputs = (i + call) % 2 == 1;
        run.outputs_in_window = (i + call) % 3 == 2;
        testing::RankTraffic traffic;
        const casefile::RankOutputs got = testing::run_rank(*group, c, rank, run, &traffic);
        between_hosts += traffic.after_dispatch.dispatch_bytes_between_hosts + traffic.after_combine.combine_bytes_between_hosts;
        between_hosts_flat += traffic.after_dispatch.dispatch_bytes_between_hosts_flat + traffic.after_combine.combine_bytes_between_hosts_flat;
        const std::string diff = testing::compare_rank(c, rank, got, testing::expected_outputs(c));
        v2_calls += c.op == 2 ? 1 : 0;
        ++checked;
        if (!diff.empty()) {
          ++mismatches;
          std::fprintf(stderr, "rank %d: MISMATCH in configuration %d (seed %llu) call %d: %s: %s\n", rank, i,
                       static_cast<unsigned long long>(seed + static_cast<std::uint64_t>(i)), call, testing::describe(c).c_str(), diff.c_str());
        }
      }
    } catch (const std::exception& e) {
      std::fprintf(stderr, "rank %d: ERROR in configuration %d (seed %llu): %s: %s\n", rank, i,
                   static_cast<unsigned long long>(seed + static_cast<std::uint64_t>(i)), testing::describe(c).c_str(), e.what());
      std::fflush(stderr);
      MPI_Abort(MPI_COMM_WORLD, 2);
    }
  }
  long totals[2] = {checked, mismatches};
  long sums[2] = {0, 0};
  MPI_Reduce(totals, sums, 2, MPI_LONG, MPI_SUM, 0, MPI_COMM_WORLD);
  std::int64_t bytes[2] = {between_hosts, between_hosts_flat};
  std::int64_t byte_sums[2] = {0, 0};
  MPI_Reduce(bytes, byte_sums, 2, MPI_INT64_T, MPI_SUM, 0, MPI_COMM_WORLD);
  long failed = 0;
  const long local_failures = mismatches + options_lost;
  MPI_Allreduce(&local_failures, &failed, 1, MPI_LONG, MPI_SUM, MPI_COMM_WORLD);
  // The draws are the same on every rank and fixed by the seed: a run that drew no TP pair (where
  // hosts allow one), no shared-expert rank or no V2 call has not tested them, which counts as a failure.
  const bool tp_possible = limits.allow_tp && world % 2 == 0;
  const bool covered = with_shared > 0 && (!tp_possible || with_tp > 0) && v2_calls > 0;
  if (!covered) failed += 1;
  if (rank == 0) {
    std::printf(
        "mpi oracle check: %d ranks, %d per host (%d hosts), %d worker threads each, %d configurations (%d with TP, "
        "%d with shared experts) x %d calls (%d V2): %ld rank outputs compared, %ld mismatches: %s\n",
        world, rpn, (world + rpn - 1) / rpn, worker_threads, configs, with_tp, with_shared, calls, v2_calls, sums[0],
        sums[1], failed == 0 ? "PASS" : "FAIL");
    std::printf("bytes between hosts: %lld node-aware, %lld with a flat all-to-all\n", static_cast<long long>(byte_sums[0]),
                static_cast<long long>(byte_sums[1]));
  }
  MPI_Finalize();
  return failed == 0 ? 0 : 1;
}
