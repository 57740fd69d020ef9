// The process-per-rank harness (src/process): it reaps only its own children, a rank's leftover background
// process does not hold the caller up, every rank that failed or died is named, the ranks start with a clean
// signal state, and the one rule of which errors only follow a peer's failure.
#include "process/rank_processes.h"

#include <gtest/gtest.h>
#include <pthread.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include "common/child_processes.h"

namespace moedist::process {
namespace {

using Clock = std::chrono::steady_clock;

Command shell(const std::string& script) {
  Command c;
  c.argv = {"/bin/sh", "-c", script};
  return c;
}

// A child of this process that is none of the harness's: exits 7 at once.
pid_t unrelated_child() {
  const pid_t pid = ::fork();
  if (pid == 0) ::_exit(7);
  // Let it exit first, so that a harness that reaped any child (waitpid(-1)) would take its status.
  ::usleep(50 * 1000);
  return pid;
}

void expect_exit_7(pid_t pid) {
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid) << "the harness reaped a child that was not its own";
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 7) << status;
}

TEST(RankProcesses, AnUnrelatedChildKeepsItsExitStatus) {
  const pid_t other = unrelated_child();
  const auto exits = run_commands(
      2, [](int) { return shell("exit 0"); }, false);
  ASSERT_EQ(exits.size(), 2u);
  for (const RankExit& e : exits) EXPECT_TRUE(e.ok()) << e.describe();
  expect_exit_7(other);

  const pid_t other2 = unrelated_child();
  const auto results = run_in_children(2, [](int i) { return std::to_string(i); });
  EXPECT_EQ(results[1].text, "1");
  expect_exit_7(other2);

  const pid_t other3 = unrelated_child();
  LaunchOptions options;
  options.ranks = 2;
  options.argv = {"true"};
  EXPECT_TRUE(launch(options).ok());
  expect_exit_7(other3);
}

TEST(RankProcesses, ALeftoverBackgroundProcessDoesNotHoldTheCallerUp) {
  const Clock::time_point start = Clock::now();
  const auto results = run_in_children(2, [](int i) {
    if (std::system("sleep 5 &") != 0) return std::string("system failed");
    return "done " + std::to_string(i);
  });
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(3));
  ASSERT_EQ(results.size(), 2u);
  EXPECT_TRUE(results[0].finished);
  EXPECT_EQ(results[1].text, "done 1");
}

TEST(RankProcesses, EveryRankThatFailedOrDiedIsNamed) {
  const auto exits = run_commands(
      4, [](int rank) { return shell(rank == 1   ? "kill -9 $$"
                                     : rank == 3 ? "exit 3"
                                                 : "exit 0"); }, false);
  const std::string report = describe_failures(exits);
  EXPECT_NE(report.find("rank 1 (pid " + std::to_string(exits[1].pid) + ") was killed by signal 9"), std::string::npos)
      << report;
  EXPECT_NE(report.find("rank 3 (pid " + std::to_string(exits[3].pid) + ") exited with status 3"), std::string::npos)
      << report;
  EXPECT_EQ(report.find("rank 0"), std::string::npos) << report;
  EXPECT_EQ(report.find("rank 2"), std::string::npos) << report;
  EXPECT_EQ(describe_failures(run_commands(
                2, [](int) { return shell("exit 0"); }, false)),
            "");

  // Ranks that died without an error file fail the run, all of them named; a rank's own error file is read back.
  const TempDir dir("moedist-harness-test");
  write_error_file(error_file(dir.path(), 3), ErrorCode::invalid_argument, "bad value");
  try {
    (void)collect_errors(dir.path(), exits);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::peer_lost);
    EXPECT_NE(std::string(e.what()).find("rank 1 (pid"), std::string::npos) << e.what();
    EXPECT_EQ(std::string(e.what()).find("rank 3"), std::string::npos) << e.what();
  }
}

TEST(RankProcesses, TheRootCauseIsTheErrorThatFollowsNoPeer) {
  EXPECT_TRUE(is_consequence_of_peer_failure(ErrorCode::peer_failed));
  EXPECT_TRUE(is_consequence_of_peer_failure(ErrorCode::peer_lost));
  EXPECT_TRUE(is_consequence_of_peer_failure(ErrorCode::timeout));
  EXPECT_FALSE(is_consequence_of_peer_failure(ErrorCode::invalid_argument));
  EXPECT_FALSE(is_consequence_of_peer_failure(Error(ErrorCode::internal, "x")));
  std::vector<std::exception_ptr> errors(4);
  EXPECT_EQ(root_cause(errors), -1);
  errors[0] = std::make_exception_ptr(Error(ErrorCode::peer_failed, "follows"));
  EXPECT_EQ(root_cause(errors), 0);
  errors[2] = std::make_exception_ptr(Error(ErrorCode::capacity, "cause"));
  errors[3] = std::make_exception_ptr(Error(ErrorCode::invalid_shape, "later cause"));
  EXPECT_EQ(root_cause(errors), 2);
}

// Reads "Name:\t<hex>" from /proc/self/status.
unsigned long long status_mask(const std::string& name) {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind(name + ":", 0) == 0) return std::stoull(line.substr(name.size() + 1), nullptr, 16);
  }
  return ~0ull;
}

void on_usr2(int) {}

TEST(RankProcesses, RanksStartWithACleanSignalState) {
  // The caller blocks SIGUSR1 and catches SIGUSR2; ignores SIGPIPE (which stays ignored, as across exec).
  struct sigaction catcher {
  }, saved_usr2{}, ignore{}, saved_pipe{};
  catcher.sa_handler = on_usr2;
  sigemptyset(&catcher.sa_mask);
  ASSERT_EQ(::sigaction(SIGUSR2, &catcher, &saved_usr2), 0);
  ignore.sa_handler = SIG_IGN;
  sigemptyset(&ignore.sa_mask);
  ASSERT_EQ(::sigaction(SIGPIPE, &ignore, &saved_pipe), 0);
  sigset_t usr1, saved_mask;
  sigemptyset(&usr1);
  sigaddset(&usr1, SIGUSR1);
  ASSERT_EQ(::pthread_sigmask(SIG_BLOCK, &usr1, &saved_mask), 0);

  const auto results = run_in_children(1, [](int) {
    std::ostringstream out;
    out << status_mask("SigBlk") << " " << status_mask("SigCgt") << " " << status_mask("SigIgn");
    return out.str();
  });

  ::pthread_sigmask(SIG_SETMASK, &saved_mask, nullptr);
  ::sigaction(SIGUSR2, &saved_usr2, nullptr);
  ::sigaction(SIGPIPE, &saved_pipe, nullptr);
  ASSERT_TRUE(results[0].finished);
  std::istringstream in(results[0].text);
  unsigned long long blocked = 1, caught = 1, ignored = 0;
  in >> blocked >> caught >> ignored;
  EXPECT_EQ(blocked, 0u) << "the child inherited a blocked signal";
  EXPECT_EQ(caught & (1ull << (SIGUSR2 - 1)), 0u) << "the child kept a handler of the parent's";
  EXPECT_NE(ignored & (1ull << (SIGPIPE - 1)), 0u) << "an ignored signal must stay ignored";
}

TEST(RankProcesses, TheFolderIsGoneAfterwards) {
  std::string path;
  {
    const TempDir dir("moedist-harness-test");
    path = dir.path();
    std::ofstream(rank_file(path, 0, ".result")) << "x";
    EXPECT_TRUE(std::filesystem::is_directory(path));
  }
  EXPECT_FALSE(std::filesystem::exists(path));
}

TEST(RankProcesses, AFailedExecIsStatus127WithTheReason) {
  Command c;
  c.argv = {"moedist-harness-test-no-such-program"};
  c.exec_failure_prefix = "harness test";
  const auto exits = run_commands(
      1, [&](int) { return c; }, false);
  EXPECT_EQ(exits[0].describe(), "rank 0 (pid " + std::to_string(exits[0].pid) + ") exited with status 127");
}

}  // namespace
}  // namespace moedist::process
