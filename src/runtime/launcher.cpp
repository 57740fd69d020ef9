// `moedist launch`: one process per rank (src/process) with the MOEDIST_* environment, signals
// forwarded, every exit status collected.
#include <sys/random.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "common/format.h"
#include "moedist/error.h"
#include "moedist/launch.h"
#include "process/rank_processes.h"

namespace moedist {
namespace {

constexpr int kMaxRanks = 4096;

}  // namespace

bool LaunchResult::ok() const noexcept {
  for (const RankExit& r : ranks) {
    if (!r.ok()) return false;
  }
  return true;
}

int LaunchResult::exit_code() const noexcept {
  for (const RankExit& r : ranks) {
    if (r.ok()) continue;
    if (WIFEXITED(r.wait_status)) return WEXITSTATUS(r.wait_status);
    if (WIFSIGNALED(r.wait_status)) return 128 + WTERMSIG(r.wait_status);
    return 1;
  }
  return 0;
}

std::string new_job_name() {
  unsigned char bytes[16];
  std::size_t got = 0;
  while (got < sizeof(bytes)) {
    const ssize_t n = ::getrandom(bytes + got, sizeof(bytes) - got, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw Error(ErrorCode::internal, std::string("getrandom: ") + std::strerror(errno));
    got += static_cast<std::size_t>(n);
  }
  char hex[33];
  for (std::size_t i = 0; i < sizeof(bytes); ++i) std::snprintf(hex + 2 * i, 3, "%02x", bytes[i]);
  return hex;
}

LaunchResult launch(const LaunchOptions& options) {
  if (options.ranks < 1 || options.ranks > kMaxRanks)
    fail_value("ranks (-n)", options.ranks, concat("must be in [1, ", kMaxRanks, "]"));
  if (options.tp_world_size < 0 || options.tp_world_size > 2)
    fail_value("tp_world_size (--tp)", options.tp_world_size, "must be 0, 1 or 2");
  if (options.tp_world_size == 2 && options.ranks % 2 != 0)
    fail_value("ranks (-n)", options.ranks, "must be even with a TP domain of 2 (--tp 2)");
  if (options.argv.empty()) fail(ErrorCode::invalid_argument, "program", "none", "name the program to start after --");

  LaunchResult result;
  result.job = options.job.empty() ? new_job_name() : options.job;
  const std::string world = std::to_string(options.ranks);
  result.ranks = process::run_commands(
      options.ranks,
      [&](int rank) {
        process::Command command;
        command.argv = options.argv;
        // Never pass on a TP size this launch did not ask for (the launcher may itself run under one).
        command.env = {"MOEDIST_RANK=" + std::to_string(rank), "MOEDIST_WORLD_SIZE=" + world,
                       "MOEDIST_JOB=" + result.job,
                       options.tp_world_size > 0 ? "MOEDIST_TP_WORLD_SIZE=" + std::to_string(options.tp_world_size)
                                                 : std::string("MOEDIST_TP_WORLD_SIZE")};
        command.exec_failure_prefix = "moedist launch: rank " + std::to_string(rank);
        return command;
      },
      /*forward_signals=*/true);
  return result;
}

}  // namespace moedist
