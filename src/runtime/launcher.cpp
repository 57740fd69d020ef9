// `moedist launch`: fork/exec one process per rank with the MOEDIST_* environment, forward signals,
// collect every exit status.
#include <signal.h>
#include <sys/random.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>

#include "common/format.h"
#include "moedist/error.h"
#include "moedist/launch.h"

namespace moedist {
namespace {

// The children of the launch in progress, for the signal handler (async-signal-safe reads only).
constexpr int kMaxRanks = 4096;
pid_t g_children[kMaxRanks];
std::atomic<int> g_child_count{0};

void forward_signal(int sig) {
  const int n = g_child_count.load();
  for (int i = 0; i < n; ++i) {
    if (g_children[i] > 0) ::kill(g_children[i], sig);
  }
}

constexpr int kForwarded[] = {SIGINT, SIGTERM, SIGHUP, SIGQUIT};

}  // namespace

bool RankExit::ok() const noexcept { return WIFEXITED(wait_status) && WEXITSTATUS(wait_status) == 0; }

std::string RankExit::describe() const {
  std::string who = "rank " + std::to_string(rank) + " (pid " + std::to_string(pid) + ")";
  if (WIFEXITED(wait_status)) return who + " exited with status " + std::to_string(WEXITSTATUS(wait_status));
  if (WIFSIGNALED(wait_status)) {
    const int sig = WTERMSIG(wait_status);
    return who + " was killed by signal " + std::to_string(sig) + " (" + ::strsignal(sig) + ")";
  }
  return who + " ended with wait status " + std::to_string(wait_status);
}

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
  if (g_child_count.load() != 0) throw Error(ErrorCode::internal, "launch() is already running in this process");

  LaunchResult result;
  result.job = options.job.empty() ? new_job_name() : options.job;
  std::vector<char*> argv;
  for (const std::string& a : options.argv) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);

  // Forward signals from here on; restore the old handlers when done.
  struct sigaction forward {}, previous[std::size(kForwarded)];
  forward.sa_handler = forward_signal;
  sigemptyset(&forward.sa_mask);
  for (std::size_t i = 0; i < std::size(kForwarded); ++i) ::sigaction(kForwarded[i], &forward, &previous[i]);
  const auto restore = [&] {
    for (std::size_t i = 0; i < std::size(kForwarded); ++i) ::sigaction(kForwarded[i], &previous[i], nullptr);
    g_child_count.store(0);
  };

  const std::string world = std::to_string(options.ranks);
  for (int rank = 0; rank < options.ranks; ++rank) {
    const pid_t pid = ::fork();
    if (pid < 0) {
      const int err = errno;
      forward_signal(SIGKILL);
      for (int i = 0; i < g_child_count.load(); ++i) ::waitpid(g_children[i], nullptr, 0);
      restore();
      throw Error(ErrorCode::internal, "cannot start rank " + std::to_string(rank) + ": fork: " + std::strerror(err));
    }
    if (pid == 0) {
      for (std::size_t i = 0; i < std::size(kForwarded); ++i) ::sigaction(kForwarded[i], &previous[i], nullptr);
      ::setenv("MOEDIST_RANK", std::to_string(rank).c_str(), 1);
      ::setenv("MOEDIST_WORLD_SIZE", world.c_str(), 1);
      ::setenv("MOEDIST_JOB", result.job.c_str(), 1);
      // Never pass on a TP size this launch did not ask for (the launcher may itself run under one).
      if (options.tp_world_size > 0) ::setenv("MOEDIST_TP_WORLD_SIZE", std::to_string(options.tp_world_size).c_str(), 1);
      else ::unsetenv("MOEDIST_TP_WORLD_SIZE");
      ::execvp(argv[0], argv.data());
      std::fprintf(stderr, "moedist launch: rank %d: cannot run '%s': %s\n", rank, argv[0], std::strerror(errno));
      ::_exit(127);
    }
    g_children[rank] = pid;
    g_child_count.store(rank + 1);
  }

  result.ranks.resize(static_cast<std::size_t>(options.ranks));
  int remaining = options.ranks;
  while (remaining > 0) {
    int status = 0;
    const pid_t pid = ::waitpid(-1, &status, 0);
    if (pid < 0) {
      if (errno == EINTR) continue;
      break;
    }
    for (int rank = 0; rank < options.ranks; ++rank) {
      if (g_children[rank] == pid) {
        result.ranks[static_cast<std::size_t>(rank)] = RankExit{rank, pid, status};
        g_children[rank] = -pid;  // no more signals for it
        --remaining;
        break;
      }
    }
  }
  restore();
  return result;
}

}  // namespace moedist
