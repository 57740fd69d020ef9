// `moedist launch -n N [--tp 2] -- PROGRAM ARGS...`
#include <cstdio>

#include "commands.h"
#include "moedist/launch.h"

namespace moedist::cli {

void add_launch(CLI::App& app, int* exit_code) {
  struct Args {
    int ranks = 0;
    int tp = 0;
    std::string job;
    std::vector<std::string> program;
  };
  auto args = std::make_shared<Args>();
  CLI::App* cmd = app.add_subcommand(
      "launch", "Start N processes of PROGRAM as the ranks of one job on this host (like torchrun), wait for them, and exit "
                "non-zero if any rank fails, saying which");
  cmd->add_option("-n,--ranks", args->ranks, "number of ranks (processes): ep_world_size * max(tp_world_size, 1)")
      ->required()
      ->check(CLI::Range(1, 4096));
  cmd->add_option("--tp", args->tp, "TP domain size exported to the ranks as MOEDIST_TP_WORLD_SIZE (0: unset)")
      ->check(CLI::IsMember({0, 1, 2}))
      ->capture_default_str();
  cmd->add_option("--job", args->job, "job name (default: 128 random bits; ranks find each other by it)");
  cmd->add_option("program", args->program, "PROGRAM ARGS... (after --)")->required();
  cmd->footer(
      "Each rank gets MOEDIST_RANK (0..N-1), MOEDIST_WORLD_SIZE (N), MOEDIST_JOB and, with --tp, MOEDIST_TP_WORLD_SIZE "
      "in its environment; moedist::join_shm_from_env() builds its group from them (global rank g = ep_rank * max(T,1) + "
      "tp_rank). SIGINT, SIGTERM, SIGHUP and SIGQUIT are forwarded to every rank. The exit status is 0 when every rank "
      "exited 0, else the first failing rank's status (128 + signal when it was killed).");
  cmd->callback([args, exit_code] {
    LaunchOptions options;
    options.ranks = args->ranks;
    options.tp_world_size = args->tp;
    options.job = args->job;
    options.argv = args->program;
    const LaunchResult result = launch(options);
    for (const RankExit& r : result.ranks) {
      if (!r.ok()) std::fprintf(stderr, "moedist launch: %s\n", r.describe().c_str());
    }
    *exit_code = result.exit_code();
  });
}

}  // namespace moedist::cli
