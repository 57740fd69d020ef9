// `moedist replay CASE OUT`: run a recorded case and write every rank's outputs.
//
// With --transport shm every rank is a process of this binary, started through moedist::launch with the
// parent's own arguments plus --shm-worker-dir DIR. Each worker runs its rank over shared memory and writes its
// outputs to DIR (casefile::run_case_worker); the parent merges them into OUT, the same file the in-process
// replay writes.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "casefile/case_file.h"
#include "commands.h"
#include "common/format.h"
#ifdef MOEDIST_HAVE_MPI
#include "moedist/mpi.h"
#include "mpi_ranks.h"
#endif

namespace moedist::cli {

namespace {

void print_summary(const casefile::Case& c, const std::vector<casefile::RankOutputs>& outputs, const std::string& out_path) {
  const int tp = std::max(c.tp_world_size, 1);
  for (std::size_t g = 0; g < outputs.size(); ++g) {
    const int rank = static_cast<int>(g);
    std::printf("rank %d (ep_rank %d, tp_rank %d): BS %lld, valid rows %lld\n", rank, rank / tp, rank % tp,
                static_cast<long long>(c.ranks[g].x.rows()), static_cast<long long>(outputs[g].expand_x.rows()));
  }
  std::printf("wrote the outputs of %zu ranks to %s\n", outputs.size(), out_path.c_str());
}

#ifdef MOEDIST_HAVE_MPI
// One process of `mpirun -np N moedist replay --transport mpi CASE OUT`: every rank reads CASE (the path
// must be readable on every host), runs its own rank, and rank 0 writes OUT.
int replay_mpi(const std::string& case_path, const std::string& out_path, std::chrono::milliseconds timeout) {
  MpiSession mpi;
  std::vector<casefile::RankOutputs> outputs(static_cast<std::size_t>(mpi.size()));
  const auto run = [&](const std::string& path) {
    std::string prefix = concat("rank ", mpi.rank(), ": ");
    try {
      const casefile::Case c = casefile::read_case(case_path);
      const int tp = std::max(c.tp_world_size, 1);
      prefix = concat("rank ", mpi.rank(), " (ep_rank ", mpi.rank() / tp, ", tp_rank ", mpi.rank() % tp, "): ");
      const int ranks = static_cast<int>(c.ranks.size());
      if (ranks != mpi.size()) {
        fail(ErrorCode::config_mismatch, "mpirun -np", concat(mpi.size()),
             concat("must equal the case's ep_world_size * max(tp_world_size, 1) = ", ranks));
      }
      MpiOptions options;
      options.wait.timeout = timeout;
      const std::unique_ptr<Group> group = join_mpi(MPI_COMM_WORLD, casefile::group_config(c, mpi.rank()), options);
      casefile::write_rank_outputs(path, mpi.rank(), casefile::run_case_rank(*group, c, mpi.rank()));
    } catch (const Error& e) {
      throw Error(e.code(), prefix + e.what());
    }
  };
  return share_exit_status(report_or_error([&] {
    gather_rank_files(run, [&](int g, const std::string& path) { outputs[static_cast<std::size_t>(g)] = casefile::read_rank_outputs(path, g); });
    if (mpi.rank() != 0) return 0;
    casefile::write_outputs(out_path, outputs);
    print_summary(casefile::read_case(case_path), outputs, out_path);
    return 0;
  }));
}
#endif

}  // namespace

void add_replay(CLI::App& app, int* exit_code) {
  constexpr const char* kWorkerFlag = "--shm-worker-dir";
  struct Args {
    std::string case_path;
    std::string out_path;
    std::int64_t timeout_ms = 30000;
    std::string transport{transport_name(TransportId::inproc)};
    std::string worker_dir;  // set (by the parent) in the rank processes of --transport shm
  };
  auto args = std::make_shared<Args>();

  CLI::App* sub = app.add_subcommand(
      "replay", "Run a recorded case file (every rank's dispatch and combine) and write every rank's outputs");
  sub->footer(
      "CASE is a safetensors file holding the group configuration (as __metadata__ strings) and each rank's\n"
      "inputs rank{g}.x, rank{g}.expert_ids and optionally .scales, .expert_scales, .x_active_mask, .combine_x\n"
      "(and with metadata op = \"v2\" also .ori_x, .shared_expert_x, .const_expert_alpha_1/_2, .const_expert_v).\n"
      "replay runs dispatch then combine (dispatch_v2 then combine_v2 for a V2 case) on every rank, each a thread\n"
      "of one process (--transport inproc), a process of its own over shared memory (--transport shm) or a\n"
      "process of mpirun (--transport mpi), and writes OUT, a safetensors file with rank{g}.expand_x,\n"
      ".dynamic_scales, .expand_scales, .expand_idx (V2: .assist_info_for_combine), .expert_token_nums,\n"
      ".ep_recv_counts, .tp_recv_counts and .combine_out; every transport writes the same bytes. Without\n"
      "combine_x the experts are identities. It\n"
      "prints one line per rank and exits 0; a malformed case or a rule the inputs break exits 2 with a message\n"
      "naming the rank, the tensor and the rule. The format is in docs/case-files.md.");
  sub->add_option("CASE", args->case_path, "Case file to run (safetensors; see docs/case-files.md)")->required();
  sub->add_option("OUT", args->out_path, "Where to write every rank's outputs (safetensors)")->required();
  sub->add_option("--timeout-ms", args->timeout_ms,
                  "Longest wait for a peer in any phase, in milliseconds (shm: connecting included)")
      ->capture_default_str()
      ->check(CLI::Range(std::int64_t{1}, std::int64_t{24} * 3600 * 1000));
  sub->add_option("--transport", args->transport,
                  transport_help("replay", " CASE OUT", "CASE readable on every host; rank 0 writes OUT"))
      ->capture_default_str()
      ->check(CLI::IsMember(transport_names()));
  // Internal: makes this process one rank of a --transport shm run, writing its outputs to the directory.
  sub->add_option(kWorkerFlag, args->worker_dir)->group("");

  sub->callback([args, exit_code] {
    const std::chrono::milliseconds timeout(args->timeout_ms);
    const TransportKind& kind = require_transport_built(args->transport);
#ifdef MOEDIST_HAVE_MPI
    if (kind.id == TransportId::mpi) {
      *exit_code = replay_mpi(args->case_path, args->out_path, timeout);
      return;
    }
#endif
    if (!args->worker_dir.empty()) {
      ShmOptions shm;
      shm.wait.timeout = timeout;
      *exit_code = casefile::run_case_worker(args->case_path, args->worker_dir, shm);
      return;
    }
    const casefile::Case c = casefile::read_case(args->case_path);
    std::vector<casefile::RankOutputs> outputs;
    if (kind.id == TransportId::shm) {
      outputs = casefile::run_case_processes(
          c, [](const std::string& dir) { return casefile::own_command_line({kWorkerFlag, dir}); });
    } else {
      RuntimeOptions options;
      options.wait.timeout = timeout;
      outputs = casefile::run_case(c, options);
    }
    casefile::write_outputs(args->out_path, outputs);

    print_summary(c, outputs, args->out_path);
    *exit_code = 0;
  });
}

}  // namespace moedist::cli
