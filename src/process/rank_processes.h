// One process per rank: the harness behind `moedist launch`, the case-file runner (replay and demo over
// shm), the benchmark's shm and MPI runners, run_in_children and the MPI tool's result gathering.
//
// It starts the processes with a clean signal state (signals blocked around fork; the child resets the
// caller's handlers and mask before it runs anything), builds every argv and environment before fork,
// waits on its own children only (never waitpid(-1), which would reap a caller's unrelated children),
// and names every rank that failed or died. Per-rank result and error files live in one private
// temporary folder that is removed afterwards.
#pragma once

#include <sys/types.h>

#include <exception>
#include <functional>
#include <string>
#include <vector>

#include "moedist/error.h"
#include "moedist/launch.h"

namespace moedist::process {

// The one definition of "this rank's error only follows another rank's failure": a peer failed or was
// lost, or a peer never arrived (timeout). Reports prefer any other error, the cause.
bool is_consequence_of_peer_failure(ErrorCode code) noexcept;
bool is_consequence_of_peer_failure(const Error& error) noexcept;

// A fresh folder only this user can enter (mkdtemp: mode 0700) under the temporary directory, removed
// with everything in it on destruction, so that no rank's file outlives the run, whatever way it ends.
class TempDir {
 public:
  explicit TempDir(const std::string& prefix);  // "<tmp>/<prefix>-XXXXXX"
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const noexcept { return path_; }

 private:
  std::string path_;
};

// A rank's file in a run's folder: "<dir>/rank<g><suffix>".
std::string rank_file(const std::string& dir, int rank, const std::string& suffix);
// The files a worker leaves: its result, or its error (see write_error_file).
std::string result_file(const std::string& dir, int rank);
std::string error_file(const std::string& dir, int rank);

// An error file: the numeric error code, a newline, the message. read_error_file returns an internal
// error that quotes the file when it is malformed.
void write_error_file(const std::string& path, ErrorCode code, const std::string& message);
Error read_error_file(const std::string& path);

// This process's own command line (/proc/self/exe, then the arguments from /proc/self/cmdline) with
// `extra` inserted before a "--" separator, if any (else appended): how a command starts copies of
// itself, with the same flags.
std::vector<std::string> own_command_line(const std::vector<std::string>& extra);

// How one process is started with exec.
struct Command {
  std::vector<std::string> argv;  // argv[0] is looked up in PATH
  std::vector<std::string> env;   // over this process's environment: "NAME=value" sets, "NAME" removes
  int stdout_fd = -1;             // >= 0: the child's stdout (else inherited)
  int stderr_fd = -1;             // >= 0: the child's stderr (else inherited)
  // Printed to stderr, followed by ": cannot run '<argv[0]>': <reason>", when exec fails (status 127).
  std::string exec_failure_prefix;
};

// Processes started one per rank, in rank order, and waited for. Not thread-safe; one object per run.
class RankProcesses {
 public:
  // forward_signals: while the object lives, SIGINT, SIGTERM, SIGHUP and SIGQUIT sent to this process
  // are passed on to the started processes (the previous dispositions come back on destruction). One
  // such object at a time in a process; a second one throws.
  explicit RankProcesses(bool forward_signals = false);
  // Kills (SIGKILL) and reaps every process not yet waited for: an exception between start and wait
  // leaves no process behind.
  ~RankProcesses();
  RankProcesses(const RankProcesses&) = delete;
  RankProcesses& operator=(const RankProcesses&) = delete;

  // Starts the next rank. A failed fork throws an internal Error naming the rank, after killing and
  // reaping the ranks already started.
  pid_t start(const Command& command);
  // The next rank runs body() in a forked copy of this process and exits with what it returns (1 when
  // it throws). Meant for bodies that need a process of their own; the body may allocate, so the
  // caller must not hold locks other threads may hold at fork (as with any fork of a threaded program).
  pid_t start(const std::function<int()>& body);

  int size() const noexcept { return static_cast<int>(pids_.size()); }
  // Sends `sig` to every started process not yet waited for.
  void signal_all(int sig) noexcept;
  // Waits for every started process (each by its pid); their exits in rank order.
  std::vector<RankExit> wait();

 private:
  pid_t fork_rank(const std::function<void()>& in_child);
  void abandon() noexcept;

  std::vector<pid_t> pids_;
  std::vector<bool> waited_;
  bool forwarding_ = false;
};

// Starts n ranks of command(rank) (every command built before the first fork) and waits for all.
std::vector<RankExit> run_commands(int n, const std::function<Command(int rank)>& command, bool forward_signals);

// Every rank that did not exit 0, each described ("rank 3 (pid 1234) was killed by signal 9 (Killed)"),
// joined with "; "; "" when every rank exited 0.
std::string describe_failures(const std::vector<RankExit>& exits);

// Worker side of a run whose ranks leave result and error files in `dir`, in a process that moedist::launch
// started: produce(rank, path) writes the result of the rank MOEDIST_RANK names to result_file(dir, rank).
// An exception is written to error_file(dir, rank). Returns the exit status for the process: 0, or 2 on
// error. Without a rank or an error file, the error goes to stderr, prefixed with `who`.
int run_worker(const std::string& dir, const std::function<void(int rank, const std::string& path)>& produce,
               const char* who);

// Parent side: after the ranks exited, each rank's error from its error file (or null), in rank order.
// A rank that did not exit 0 and left no error file makes the whole run fail: throws a peer_lost Error
// naming every such rank ("rank 1 (pid 1234) was killed by signal 9 (Killed) without reporting an
// error"), since the other ranks' errors follow from it.
std::vector<std::exception_ptr> collect_errors(const std::string& dir, const std::vector<RankExit>& exits);

// The index of the error that explains a failed run best: the first one that is not a consequence of
// a peer's failure, else the first one; -1 when there is none.
int root_cause(const std::vector<std::exception_ptr>& errors);

}  // namespace moedist::process
