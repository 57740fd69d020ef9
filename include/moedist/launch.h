// Starting the ranks of a job as processes on this host, like torchrun: every process gets
// MOEDIST_RANK, MOEDIST_WORLD_SIZE, MOEDIST_JOB (and MOEDIST_TP_WORLD_SIZE when set) in its environment.
#pragma once

#include <string>
#include <sys/types.h>
#include <vector>

namespace moedist {

struct LaunchOptions {
  int ranks = 0;                  // processes to start (the world size)
  int tp_world_size = 0;          // exported as MOEDIST_TP_WORLD_SIZE when > 0
  std::string job;                // empty: a fresh unguessable name
  std::vector<std::string> argv;  // program and arguments; the program is looked up in PATH
};

struct RankExit {
  int rank = 0;
  pid_t pid = 0;
  int wait_status = 0;  // as waitpid reports it
  bool ok() const noexcept;
  std::string describe() const;  // "rank 3 (pid 1234) was killed by signal 9 (Killed)"
};

struct LaunchResult {
  std::string job;
  std::vector<RankExit> ranks;
  bool ok() const noexcept;
  // 0 when every rank exited 0; else the exit status of the first failing rank, or 128 + its signal.
  int exit_code() const noexcept;
};

// What `moedist launch` (or any launcher that sets the same variables) tells a process.
struct LaunchEnvironment {
  int rank = 0;           // MOEDIST_RANK
  int world_size = 0;     // MOEDIST_WORLD_SIZE
  int tp_world_size = 0;  // MOEDIST_TP_WORLD_SIZE (0 when unset)
  std::string job;        // MOEDIST_JOB
};

// Reads the MOEDIST_* variables; throws moedist::Error naming the variable when one is missing or bad.
LaunchEnvironment launch_environment();

// A fresh job name: 128 random bits in hex.
std::string new_job_name();

// Starts the ranks, forwards SIGINT, SIGTERM, SIGHUP and SIGQUIT to them while they run, and waits for
// every one. Throws moedist::Error if a process cannot be started (the ones already started are killed).
LaunchResult launch(const LaunchOptions& options);

}  // namespace moedist
