// Review items 8 and 9: the process harness behind launch() and run_in_children.
#include "moedist/launch.h"

#include <dlfcn.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>

#include "common/child_processes.h"
#include "moedist/error.h"
#include "process/rank_processes.h"

// A fork that fails on demand, to provoke the failed-fork path (RLIMIT_NPROC does not bind root). The
// executable's definition takes the place of the C library's for the library linked into it.
namespace {
std::atomic<int> g_forks_before_failure{-1};  // < 0: never fail
}  // namespace

extern "C" pid_t fork() {
  using Fork = pid_t (*)();
  static const auto real = reinterpret_cast<Fork>(::dlsym(RTLD_NEXT, "fork"));
  const int left = g_forks_before_failure.load();
  if (left == 0) {
    errno = EAGAIN;
    return -1;
  }
  if (left > 0) g_forks_before_failure.store(left - 1);
  return real();
}

namespace moedist::testing {
namespace {

using Clock = std::chrono::steady_clock;

// Waits for pid at most `limit`; SIGKILLs it past that. Returns its status, or -1 when it had to be killed.
int wait_bounded(pid_t pid, std::chrono::seconds limit) {
  const auto end = Clock::now() + limit;
  int status = 0;
  for (;;) {
    const pid_t got = ::waitpid(pid, &status, WNOHANG);
    if (got == pid) return status;
    if (Clock::now() > end) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &status, 0);
      return -1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

// Item 8: launch() waits on its own children only; a caller's unrelated child keeps its status.
TEST(ReviewLaunch, UnrelatedChildStatusSurvivesLaunch) {
  const pid_t unrelated = ::fork();
  ASSERT_GE(unrelated, 0);
  if (unrelated == 0) ::_exit(7);
  std::this_thread::sleep_for(std::chrono::milliseconds(50));  // let it exit before launch waits
  LaunchOptions options;
  options.ranks = 2;
  options.argv = {"true"};
  const LaunchResult result = launch(options);
  EXPECT_TRUE(result.ok());
  int status = 0;
  ASSERT_EQ(::waitpid(unrelated, &status, 0), unrelated) << std::strerror(errno);
  EXPECT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 7);
}

// Item 8: SIGTERM at a random moment of launch()'s start-up never leaves a rank running and never
// hangs: the launching process either dies of it before it starts anything, or launch() returns with
// the signal reported (exit code 128 + 15). This process is a subreaper, so a rank orphaned by a dead
// launcher would become its child and be seen.
TEST(ReviewLaunch, SigtermDuringStartupNeverLeavesARankOrHangs) {
  ASSERT_EQ(::prctl(PR_SET_CHILD_SUBREAPER, 1), 0);
  std::mt19937 random(12345);
  for (int iteration = 0; iteration < 150; ++iteration) {
    SCOPED_TRACE("iteration " + std::to_string(iteration));
    const pid_t launcher = ::fork();
    ASSERT_GE(launcher, 0);
    if (launcher == 0) {
      ::setpgid(0, 0);  // its own group, so that a hung launcher is killed with its ranks
      LaunchOptions options;
      options.ranks = 4;
      options.argv = {"sleep", "30"};
      int code = 100;
      try {
        code = launch(options).exit_code();
      } catch (...) {
      }
      ::_exit(code);
    }
    // From a thread, as a signal from elsewhere would come, after 0 to 8 ms.
    const auto delay = std::chrono::microseconds(random() % 8000);
    std::thread killer([&] {
      std::this_thread::sleep_for(delay);
      ::kill(launcher, SIGTERM);
    });
    killer.join();
    const int status = wait_bounded(launcher, std::chrono::seconds(20));
    if (status == -1) {
      ::kill(-launcher, SIGKILL);
      while (::waitpid(-1, nullptr, 0) > 0) {
      }
    }
    ASSERT_NE(status, -1) << "launch() hung after SIGTERM at " << delay.count() << " us";
    const bool died_of_it = WIFSIGNALED(status) && WTERMSIG(status) == SIGTERM;
    const bool reported = WIFEXITED(status) && WEXITSTATUS(status) == 128 + SIGTERM;
    EXPECT_TRUE(died_of_it || reported) << "status " << status << " after SIGTERM at " << delay.count() << " us";
    // No rank left behind: every orphan would be our child now.
    int orphan_status = 0;
    const pid_t orphan = ::waitpid(-1, &orphan_status, WNOHANG);
    if (orphan != -1) {
      ADD_FAILURE() << "a rank outlived its launcher (SIGTERM at " << delay.count() << " us)";
      ::kill(-launcher, SIGKILL);
      while (::waitpid(-1, nullptr, 0) > 0) {
      }
    }
    if (::testing::Test::HasFailure()) break;
  }
  ::prctl(PR_SET_CHILD_SUBREAPER, 0);
}

// Item 9: a body that leaves a background process behind (holding whatever descriptors it inherited)
// must not keep run_in_children waiting for it.
TEST(ReviewLaunch, RunInChildrenDoesNotWaitForABackgroundGrandchild) {
  const auto start = Clock::now();
  const std::vector<ChildResult> results =
      run_in_children(2, [](int i) { return std::to_string(std::system("sleep 5 &")) + "/" + std::to_string(i); });
  const auto took = Clock::now() - start;
  ASSERT_EQ(results.size(), 2u);
  EXPECT_TRUE(results[0].finished);
  EXPECT_EQ(results[1].text, "0/1");
  EXPECT_LT(took, std::chrono::milliseconds(4000));
}

// Items 8 and 9: a fork that fails after some ranks started kills and reaps them (no zombie, no rank
// left running) and raises a named error; run_in_children passes the error on.
TEST(ReviewLaunch, FailedForkReapsEarlierRanks) {
  pid_t started[2] = {};
  {
    process::RankProcesses ranks;
    started[0] = ranks.start([] { return ::pause(); });
    started[1] = ranks.start([] { return ::pause(); });
    g_forks_before_failure.store(0);
    try {
      ranks.start([] { return 0; });
      ADD_FAILURE() << "the third start did not fail";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::internal);
      EXPECT_NE(std::string(e.what()).find("rank 2"), std::string::npos) << e.what();
    }
    g_forks_before_failure.store(-1);
    // Reaped, not merely killed: a zombie would still answer kill(pid, 0).
    for (const pid_t pid : started) EXPECT_EQ(::kill(pid, 0), -1) << "pid " << pid << " is still there";
  }
  g_forks_before_failure.store(1);
  EXPECT_THROW(run_in_children(3, [](int) { return std::string("x"); }), Error);
  g_forks_before_failure.store(-1);
  int status = 0;
  EXPECT_EQ(::waitpid(-1, &status, WNOHANG), -1);  // nothing of ours left
  EXPECT_EQ(errno, ECHILD);
}

}  // namespace
}  // namespace moedist::testing
