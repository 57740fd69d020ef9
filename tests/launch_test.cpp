// moedist::launch (the library behind `moedist launch`) and the environment it hands to the ranks:
// variables, exit statuses and their descriptions, exit_code(), signal forwarding, invalid options, a
// program that cannot be started; launch_environment() and join_shm_from_env() with missing or bad
// variables; and a job of this very test binary launched as ranks that join over shared memory.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "moedist/moedist.h"
#include "test_support.h"

namespace moedist::testing {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

const char* const kLaunchVariables[] = {"MOEDIST_RANK", "MOEDIST_WORLD_SIZE", "MOEDIST_TP_WORLD_SIZE", "MOEDIST_JOB"};

// Saves the given environment variables and restores them (set or unset) when it goes away.
class EnvGuard {
 public:
  explicit EnvGuard(std::vector<std::string> names) {
    for (std::string& name : names) {
      const char* v = std::getenv(name.c_str());
      saved_.emplace_back(std::move(name), v == nullptr ? std::nullopt : std::optional<std::string>(v));
    }
  }
  EnvGuard() : EnvGuard(std::vector<std::string>(std::begin(kLaunchVariables), std::end(kLaunchVariables))) {}
  ~EnvGuard() {
    for (const auto& [name, value] : saved_) {
      if (value) ::setenv(name.c_str(), value->c_str(), 1);
      else ::unsetenv(name.c_str());
    }
  }
  EnvGuard(const EnvGuard&) = delete;
  EnvGuard& operator=(const EnvGuard&) = delete;

  // Sets (or, with nullptr, unsets) every launch variable at once.
  static void set_launch(const char* rank, const char* world, const char* tp, const char* job) {
    const char* values[] = {rank, world, tp, job};
    for (std::size_t i = 0; i < 4; ++i) {
      if (values[i] != nullptr) ::setenv(kLaunchVariables[i], values[i], 1);
      else ::unsetenv(kLaunchVariables[i]);
    }
  }

 private:
  std::vector<std::pair<std::string, std::optional<std::string>>> saved_;
};

class TempDir {
 public:
  TempDir() {
    std::string pattern = (fs::temp_directory_path() / "moedist-launch-test-XXXXXX").string();
    if (::mkdtemp(pattern.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    path_ = pattern;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  std::string file(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::map<std::string, std::string> parse_env(const std::string& text) {
  std::map<std::string, std::string> vars;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    const std::size_t eq = line.find('=');
    if (eq != std::string::npos) vars[line.substr(0, eq)] = line.substr(eq + 1);
  }
  return vars;
}

std::string pid_text(const RankExit& r) { return "rank " + std::to_string(r.rank) + " (pid " + std::to_string(r.pid) + ")"; }

// Runs launch() with a watchdog: if it has not returned after `limit`, the processes whose pids the
// ranks wrote into `dir`/pid.<rank> are SIGKILLed (so that a broken launcher cannot hang the test).
LaunchResult launch_with_watchdog(const LaunchOptions& options, const TempDir& dir, milliseconds limit = milliseconds(20000)) {
  std::atomic<bool> done{false};
  std::thread watchdog([&] {
    const auto deadline = Clock::now() + limit;
    while (!done && Clock::now() < deadline) std::this_thread::sleep_for(milliseconds(5));
    if (done) return;
    for (int r = 0; r < options.ranks; ++r) {
      const std::string text = read_file(dir.file("pid." + std::to_string(r)));
      if (!text.empty()) ::kill(static_cast<pid_t>(std::stol(text)), SIGKILL);
    }
  });
  LaunchResult result;
  try {
    result = launch(options);
  } catch (...) {
    done = true;
    watchdog.join();
    throw;
  }
  done = true;
  watchdog.join();
  return result;
}

// ----- the environment of the ranks -----

TEST(Launch, EnvironmentVariablesReachEveryRank) {
  EnvGuard guard({"MOEDIST_RANK", "MOEDIST_WORLD_SIZE", "MOEDIST_TP_WORLD_SIZE", "MOEDIST_JOB", "MOEDIST_LAUNCH_TEST_MARK"});
  EnvGuard::set_launch(nullptr, nullptr, nullptr, nullptr);
  ::setenv("MOEDIST_LAUNCH_TEST_MARK", "inherited value", 1);
  TempDir dir;
  LaunchOptions o;
  o.ranks = 4;
  o.tp_world_size = 2;
  o.job = "launch-test-job";
  o.argv = {"/bin/sh", "-c", "echo $$ > \"$0/pid.$MOEDIST_RANK\"; env > \"$0/env.$MOEDIST_RANK\"", dir.path()};
  const LaunchResult result = launch_with_watchdog(o, dir);
  EXPECT_TRUE(result.ok());
  EXPECT_EQ(result.exit_code(), 0);
  EXPECT_EQ(result.job, "launch-test-job");
  ASSERT_EQ(result.ranks.size(), 4u);
  for (int r = 0; r < 4; ++r) {
    const RankExit& e = result.ranks[static_cast<std::size_t>(r)];
    EXPECT_EQ(e.rank, r);
    EXPECT_GT(e.pid, 0);
    EXPECT_TRUE(e.ok());
    EXPECT_EQ(e.describe(), pid_text(e) + " exited with status 0");
    const auto vars = parse_env(read_file(dir.file("env." + std::to_string(r))));
    EXPECT_EQ(vars.count("MOEDIST_RANK") ? vars.at("MOEDIST_RANK") : "<unset>", std::to_string(r));
    EXPECT_EQ(vars.count("MOEDIST_WORLD_SIZE") ? vars.at("MOEDIST_WORLD_SIZE") : "<unset>", "4");
    EXPECT_EQ(vars.count("MOEDIST_TP_WORLD_SIZE") ? vars.at("MOEDIST_TP_WORLD_SIZE") : "<unset>", "2");
    EXPECT_EQ(vars.count("MOEDIST_JOB") ? vars.at("MOEDIST_JOB") : "<unset>", "launch-test-job");
    EXPECT_EQ(vars.count("MOEDIST_LAUNCH_TEST_MARK") ? vars.at("MOEDIST_LAUNCH_TEST_MARK") : "<unset>", "inherited value");
    EXPECT_EQ(read_file(dir.file("pid." + std::to_string(r))), std::to_string(e.pid) + "\n") << "exec replaces the forked child";
  }
}

TEST(Launch, WithoutAJobNameEveryRankGetsTheSameFreshOne) {
  EnvGuard guard;
  EnvGuard::set_launch(nullptr, nullptr, nullptr, nullptr);
  TempDir dir;
  LaunchOptions o;
  o.ranks = 3;
  o.argv = {"/bin/sh", "-c", "echo $$ > \"$0/pid.$MOEDIST_RANK\"; env > \"$0/env.$MOEDIST_RANK\"", dir.path()};
  const LaunchResult result = launch_with_watchdog(o, dir);
  ASSERT_TRUE(result.ok());
  EXPECT_EQ(result.job.size(), 32u);
  EXPECT_EQ(result.job.find_first_not_of("0123456789abcdef"), std::string::npos) << result.job;
  for (int r = 0; r < 3; ++r) {
    const auto vars = parse_env(read_file(dir.file("env." + std::to_string(r))));
    EXPECT_EQ(vars.count("MOEDIST_JOB") ? vars.at("MOEDIST_JOB") : "<unset>", result.job);
    EXPECT_EQ(vars.count("MOEDIST_WORLD_SIZE") ? vars.at("MOEDIST_WORLD_SIZE") : "<unset>", "3");
    EXPECT_EQ(vars.count("MOEDIST_TP_WORLD_SIZE"), 0u) << "no TP domain: the variable is not set";
  }
  const std::string a = new_job_name(), b = new_job_name();
  EXPECT_NE(a, b);
  EXPECT_EQ(a.size(), 32u);
}

// A launcher started from inside another job's rank (nested launch) must not hand its children the
// outer job's MOEDIST_TP_WORLD_SIZE: with tp_world_size 0 they must see no TP domain. (The other three
// variables are always overwritten; this one is only set when tp_world_size > 0.)
TEST(Launch, NoTpDomainIsNotOverriddenByAStaleTpVariable) {
  EnvGuard guard;
  EnvGuard::set_launch("1", "4", "2", "outer-job");  // as if this process were rank 1 of a TP job
  TempDir dir;
  LaunchOptions o;
  o.ranks = 2;
  o.argv = {"/bin/sh", "-c", "echo $$ > \"$0/pid.$MOEDIST_RANK\"; env > \"$0/env.$MOEDIST_RANK\"", dir.path()};
  const LaunchResult result = launch_with_watchdog(o, dir);
  ASSERT_TRUE(result.ok());
  for (int r = 0; r < 2; ++r) {
    const auto vars = parse_env(read_file(dir.file("env." + std::to_string(r))));
    EXPECT_EQ(vars.at("MOEDIST_RANK"), std::to_string(r));
    EXPECT_EQ(vars.at("MOEDIST_WORLD_SIZE"), "2");
    EXPECT_EQ(vars.at("MOEDIST_JOB"), result.job);
    EXPECT_EQ(vars.count("MOEDIST_TP_WORLD_SIZE") ? vars.at("MOEDIST_TP_WORLD_SIZE") : "<unset>", "<unset>")
        << "rank " << r << " inherits the outer job's MOEDIST_TP_WORLD_SIZE and would join as a TP rank";
  }
}

// ----- exit statuses -----

TEST(Launch, ExitStatusesSignalsAndTheirDescriptions) {
  TempDir dir;
  LaunchOptions o;
  o.ranks = 4;
  o.argv = {"/bin/sh", "-c",
            "echo $$ > \"$0/pid.$MOEDIST_RANK\"; case $MOEDIST_RANK in 0) exit 0;; 1) exit 3;; 2) kill -TERM $$;; 3) kill -KILL $$;; esac; exit 99",
            dir.path()};
  const LaunchResult result = launch_with_watchdog(o, dir);
  ASSERT_EQ(result.ranks.size(), 4u);
  const auto& r = result.ranks;
  EXPECT_TRUE(r[0].ok());
  EXPECT_EQ(r[0].describe(), pid_text(r[0]) + " exited with status 0");
  EXPECT_FALSE(r[1].ok());
  EXPECT_TRUE(WIFEXITED(r[1].wait_status) && WEXITSTATUS(r[1].wait_status) == 3);
  EXPECT_EQ(r[1].describe(), pid_text(r[1]) + " exited with status 3");
  EXPECT_FALSE(r[2].ok());
  EXPECT_TRUE(WIFSIGNALED(r[2].wait_status) && WTERMSIG(r[2].wait_status) == SIGTERM);
  EXPECT_EQ(r[2].describe(), pid_text(r[2]) + " was killed by signal 15 (" + ::strsignal(SIGTERM) + ")");
  EXPECT_FALSE(r[3].ok());
  EXPECT_EQ(r[3].describe(), pid_text(r[3]) + " was killed by signal 9 (" + ::strsignal(SIGKILL) + ")");
  EXPECT_NE(r[3].describe().find("Killed"), std::string::npos);
  EXPECT_FALSE(result.ok());
  EXPECT_EQ(result.exit_code(), 3) << "the exit status of the first failing rank";
}

TEST(Launch, ExitCodeIsThatOfTheFirstFailingRankInRankOrder) {
  struct Scenario {
    const char* script;  // run by every rank; $MOEDIST_RANK picks its fate
    int expected;
  };
  const Scenario scenarios[] = {
      {"exit 0", 0},
      // rank 1 fails last (in time) but first in rank order
      {"case $MOEDIST_RANK in 1) sleep 0.3; exit 5;; 2) exit 7;; esac; exit 0", 5},
      {"case $MOEDIST_RANK in 0) kill -KILL $$;; 2) exit 4;; esac; exit 0", 128 + SIGKILL},
      {"case $MOEDIST_RANK in 2) kill -TERM $$;; esac; exit 0", 128 + SIGTERM},
      {"exit $((MOEDIST_RANK + 1))", 1},
      {"case $MOEDIST_RANK in 2) exit 255;; esac; exit 0", 255},
  };
  for (const Scenario& s : scenarios) {
    SCOPED_TRACE(s.script);
    TempDir dir;
    LaunchOptions o;
    o.ranks = 3;
    o.argv = {"/bin/sh", "-c", std::string("echo $$ > \"$0/pid.$MOEDIST_RANK\"; ") + s.script, dir.path()};
    const LaunchResult result = launch_with_watchdog(o, dir);
    EXPECT_EQ(result.exit_code(), s.expected);
    EXPECT_EQ(result.ok(), s.expected == 0);
  }
  LaunchResult empty;
  EXPECT_EQ(empty.exit_code(), 0);
  EXPECT_TRUE(empty.ok());
}

// ----- signal forwarding -----

class LaunchForwards : public ::testing::TestWithParam<int> {};

TEST_P(LaunchForwards, SignalToTheLauncherReachesEveryRank) {
  const int sig = GetParam();
  const char* name = sig == SIGINT ? "INT" : sig == SIGTERM ? "TERM" : sig == SIGHUP ? "HUP" : "QUIT";
  // The ranks inherit this process's dispositions; a runner may start tests with SIGINT/SIGQUIT
  // ignored, and a shell cannot trap a signal ignored on entry. Make it the default for this test.
  struct sigaction dfl {}, saved {};
  dfl.sa_handler = SIG_DFL;
  sigemptyset(&dfl.sa_mask);
  ASSERT_EQ(::sigaction(sig, &dfl, &saved), 0);
  TempDir dir;
  LaunchOptions o;
  o.ranks = 3;
  o.argv = {"/bin/sh", "-c",
            std::string("trap 'echo got > \"$0/sig.$MOEDIST_RANK\"; exit 40' ") + name +
                "; echo $$ > \"$0/pid.$MOEDIST_RANK.tmp\"; mv \"$0/pid.$MOEDIST_RANK.tmp\" \"$0/pid.$MOEDIST_RANK\"; "
                "while :; do sleep 0.02; done",
            dir.path()};
  std::atomic<bool> returned{false}, sent{false};
  std::thread sender([&] {
    // Wait until every rank has set its trap (it writes its pid after), then signal this process.
    const auto deadline = Clock::now() + milliseconds(10000);
    for (int r = 0; r < o.ranks; ++r) {
      while (!fs::exists(dir.file("pid." + std::to_string(r))) && Clock::now() < deadline && !returned) {
        std::this_thread::sleep_for(milliseconds(2));
      }
    }
    if (!returned) {  // launch() is running and its handler installed: forwarding must happen
      sent = true;
      ::kill(::getpid(), sig);
    }
  });
  LaunchResult result;
  try {
    result = launch_with_watchdog(o, dir);
  } catch (...) {
    returned = true;
    sender.join();
    ::sigaction(sig, &saved, nullptr);
    throw;
  }
  returned = true;
  sender.join();
  struct sigaction after {};
  ::sigaction(sig, nullptr, &after);
  EXPECT_EQ(after.sa_handler, SIG_DFL) << "launch() must restore the previous disposition";
  ::sigaction(sig, &saved, nullptr);
  ASSERT_TRUE(sent) << "the ranks never became ready";
  ASSERT_EQ(result.ranks.size(), 3u);
  for (const RankExit& r : result.ranks) {
    EXPECT_EQ(read_file(dir.file("sig." + std::to_string(r.rank))), "got\n") << "rank " << r.rank << " did not get SIG" << name;
    EXPECT_EQ(r.describe(), pid_text(r) + " exited with status 40");
  }
  EXPECT_EQ(result.exit_code(), 40);
}

INSTANTIATE_TEST_SUITE_P(Signals, LaunchForwards, ::testing::Values(SIGTERM, SIGINT, SIGHUP, SIGQUIT),
                         [](const ::testing::TestParamInfo<int>& param) {
                           return std::string(param.param == SIGINT ? "INT" : param.param == SIGTERM ? "TERM" : param.param == SIGHUP ? "HUP" : "QUIT");
                         });

// ----- invalid options, missing programs -----

void expect_validation(const LaunchOptions& o, const std::string& parameter, const std::string& value, const std::string& rule_part) {
  try {
    launch(o);
    ADD_FAILURE() << "launch() accepted invalid options (" << parameter << " = " << value << ")";
  } catch (const ValidationError& e) {
    EXPECT_EQ(e.code(), ErrorCode::invalid_argument);
    EXPECT_EQ(e.parameter(), parameter);
    EXPECT_EQ(e.value(), value);
    EXPECT_NE(e.rule().find(rule_part), std::string::npos) << e.what();
  }
}

TEST(Launch, InvalidOptionsAreValidationErrors) {
  LaunchOptions o;
  o.argv = {"/bin/true"};
  o.ranks = 0;
  expect_validation(o, "ranks (-n)", "0", "must be in [1, ");
  o.ranks = -3;
  expect_validation(o, "ranks (-n)", "-3", "must be in [1, ");
  o.ranks = 4097;
  expect_validation(o, "ranks (-n)", "4097", "must be in [1, 4096]");
  o.ranks = 3;
  o.tp_world_size = 2;
  expect_validation(o, "ranks (-n)", "3", "must be even");
  o.tp_world_size = 3;
  expect_validation(o, "tp_world_size (--tp)", "3", "must be 0, 1 or 2");
  o.tp_world_size = -1;
  expect_validation(o, "tp_world_size (--tp)", "-1", "must be 0, 1 or 2");
  o.tp_world_size = 0;
  o.argv.clear();
  expect_validation(o, "program", "none", "name the program");
}

TEST(Launch, AProgramThatDoesNotExistExits127WithAMessage) {
  TempDir dir;
  LaunchOptions o;
  o.ranks = 2;
  o.argv = {"moedist-launch-test-no-such-program", "--flag"};
  // Capture what the ranks write to stderr (the test's own stderr, inherited).
  const std::string err_path = dir.file("stderr");
  const int saved = ::dup(2);
  ASSERT_GE(saved, 0);
  const int file = ::open(err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
  ASSERT_GE(file, 0);
  std::fflush(stderr);
  ::dup2(file, 2);
  ::close(file);
  LaunchResult result;
  try {
    result = launch_with_watchdog(o, dir);
  } catch (...) {
    ::dup2(saved, 2);
    ::close(saved);
    throw;
  }
  std::fflush(stderr);
  ::dup2(saved, 2);
  ::close(saved);
  const std::string err = read_file(err_path);
  ASSERT_EQ(result.ranks.size(), 2u);
  for (const RankExit& r : result.ranks) {
    EXPECT_TRUE(WIFEXITED(r.wait_status) && WEXITSTATUS(r.wait_status) == 127) << r.describe();
    EXPECT_EQ(r.describe(), pid_text(r) + " exited with status 127");
    const std::string line = "moedist launch: rank " + std::to_string(r.rank) + ": cannot run 'moedist-launch-test-no-such-program': " + std::strerror(ENOENT);
    EXPECT_NE(err.find(line), std::string::npos) << "stderr was: " << err;
  }
  EXPECT_EQ(result.exit_code(), 127);
  EXPECT_FALSE(result.ok());
}

// ----- launch_environment() and join_shm_from_env() -----

void expect_env_error(const std::string& parameter, const std::string& value) {
  try {
    launch_environment();
    ADD_FAILURE() << "launch_environment() accepted " << parameter << " = " << value;
  } catch (const ValidationError& e) {
    EXPECT_EQ(e.code(), ErrorCode::invalid_argument) << e.what();
    EXPECT_EQ(e.parameter(), parameter) << e.what();
    EXPECT_EQ(e.value(), value) << e.what();
    EXPECT_NE(std::string(e.what()).find(parameter), std::string::npos);
  }
}

TEST(LaunchEnvironment, ReadsTheVariables) {
  EnvGuard guard;
  EnvGuard::set_launch("3", "4", "2", "some-job");
  LaunchEnvironment env = launch_environment();
  EXPECT_EQ(env.rank, 3);
  EXPECT_EQ(env.world_size, 4);
  EXPECT_EQ(env.tp_world_size, 2);
  EXPECT_EQ(env.job, "some-job");
  EnvGuard::set_launch("0", "1", nullptr, "j");
  env = launch_environment();
  EXPECT_EQ(env.rank, 0);
  EXPECT_EQ(env.world_size, 1);
  EXPECT_EQ(env.tp_world_size, 0) << "unset means no TP domain";
  ::setenv("MOEDIST_TP_WORLD_SIZE", "", 1);
  EXPECT_EQ(launch_environment().tp_world_size, 0) << "empty means unset";
}

TEST(LaunchEnvironment, MissingOrBadVariablesAreNamed) {
  EnvGuard guard;
  EnvGuard::set_launch(nullptr, nullptr, nullptr, nullptr);
  expect_env_error("MOEDIST_RANK", "unset");
  EnvGuard::set_launch("", "4", nullptr, "j");
  expect_env_error("MOEDIST_RANK", "unset");
  EnvGuard::set_launch("0", nullptr, nullptr, "j");
  expect_env_error("MOEDIST_WORLD_SIZE", "unset");
  EnvGuard::set_launch("0", "4", nullptr, nullptr);
  expect_env_error("MOEDIST_JOB", "unset");
  EnvGuard::set_launch("0", "4", nullptr, "");
  expect_env_error("MOEDIST_JOB", "unset");
  for (const char* bad : {"abc", "-1", "1x", "0x1", "99999999999", "1.0"}) {
    EnvGuard::set_launch(bad, "4", nullptr, "j");
    expect_env_error("MOEDIST_RANK", bad);
    EnvGuard::set_launch("0", bad, nullptr, "j");
    expect_env_error("MOEDIST_WORLD_SIZE", bad);
    EnvGuard::set_launch("0", "4", bad, "j");
    expect_env_error("MOEDIST_TP_WORLD_SIZE", bad);
  }
  EnvGuard::set_launch("4", "4", nullptr, "j");
  expect_env_error("MOEDIST_RANK", "4");
  EnvGuard::set_launch("0", "0", nullptr, "j");
  expect_env_error("MOEDIST_WORLD_SIZE", "0");
  EnvGuard::set_launch("0", "4", "3", "j");
  expect_env_error("MOEDIST_TP_WORLD_SIZE", "3");
}

TEST(LaunchEnvironment, JoinFromEnvChecksTheWorldSize) {
  EnvGuard guard;
  EnvGuard::set_launch("0", "4", nullptr, "join-env-mismatch");
  GroupConfig config;
  config.ep_world_size = 2;
  config.moe_expert_num = 2;
  try {
    join_shm_from_env(config);
    ADD_FAILURE() << "joined a world of 2 in a job of 4";
  } catch (const ValidationError& e) {
    EXPECT_EQ(e.code(), ErrorCode::config_mismatch) << e.what();
    EXPECT_EQ(e.parameter(), "ep_world_size * max(tp_world_size, 1)");
    EXPECT_EQ(e.value(), "2");
    EXPECT_NE(e.rule().find("MOEDIST_WORLD_SIZE = 4"), std::string::npos) << e.what();
  }
  // With MOEDIST_TP_WORLD_SIZE = 2 the same config spans 4 ranks; a config that sets its own
  // tp_world_size wins over the variable.
  ::setenv("MOEDIST_TP_WORLD_SIZE", "2", 1);
  config.tp_world_size = 1;
  try {
    join_shm_from_env(config);
    ADD_FAILURE() << "the config's tp_world_size = 1 must win over MOEDIST_TP_WORLD_SIZE";
  } catch (const ValidationError& e) {
    EXPECT_EQ(e.code(), ErrorCode::config_mismatch) << e.what();
    EXPECT_EQ(e.value(), "2");
  }
  EnvGuard::set_launch(nullptr, "4", nullptr, "j");
  try {
    join_shm_from_env(config);
    ADD_FAILURE() << "joined without MOEDIST_RANK";
  } catch (const ValidationError& e) {
    EXPECT_EQ(e.parameter(), "MOEDIST_RANK");
  }
}

TEST(LaunchEnvironment, OneRankJobJoinsFromEnv) {
  EnvGuard guard;
  const std::string job = "join-env-one-" + std::to_string(::getpid());
  EnvGuard::set_launch("0", "1", nullptr, job.c_str());
  GroupConfig config;
  config.ep_world_size = 1;
  config.moe_expert_num = 3;
  auto group = join_shm_from_env(config);
  EXPECT_EQ(group->config().ep_rank_id, 0);
  EXPECT_EQ(group->config().ep_world_size, 1);
  EXPECT_EQ(group->local_expert_num(), 3);
}

// ----- a real job: this binary launched as 4 ranks (W = 2, T = 2) that join from the environment -----

constexpr std::uint64_t kJobSeed = 8128;

// The case every rank of the launched job builds (the same on every rank: a fixed seed).
casefile::Case launched_case() {
  std::mt19937_64 rng(kJobSeed);
  casefile::Case c;
  c.ep_world_size = 2;
  c.tp_world_size = 2;
  c.moe_expert_num = 2;
  CaseLimits lim;
  lim.max_k = 2;
  lim.max_h = 24;
  random_inputs(c, rng, lim, 3);
  return c;
}

// Runs only inside a launched job (MOEDIST_LAUNCH_TEST_DIR set by the test below); skipped otherwise.
TEST(LaunchChild, RankOfALaunchedJob) {
  const char* dir = std::getenv("MOEDIST_LAUNCH_TEST_DIR");
  if (dir == nullptr) GTEST_SKIP() << "only runs as a rank launched by Launch.RanksJoinFromTheirEnvironment";
  const LaunchEnvironment env = launch_environment();
  std::ofstream(std::string(dir) + "/pid." + std::to_string(env.rank)) << ::getpid() << "\n";
  const casefile::Case c = launched_case();
  GroupConfig config;  // ranks and TP come from the environment
  config.ep_world_size = c.ep_world_size;
  config.moe_expert_num = c.moe_expert_num;
  ShmOptions options;
  options.wait.timeout = milliseconds(10000);
  auto group = join_shm_from_env(config, options);
  const int g = env.rank;
  ASSERT_EQ(group->config().ep_rank_id, g / 2);
  ASSERT_EQ(group->config().tp_rank_id, g % 2);
  ASSERT_EQ(group->config().tp_world_size, 2);
  const casefile::RankOutputs got = run_rank(*group, c, g, RunOptions{});
  const oracle::RankOutput want = oracle::run(to_oracle_case(c))[static_cast<std::size_t>(g)];
  ASSERT_EQ(got.combine_out.numel(), static_cast<std::int64_t>(want.combine_out.size()));
  ASSERT_EQ(std::memcmp(got.combine_out.raw(), want.combine_out.data(), want.combine_out.size() * 2), 0);
  ASSERT_EQ(got.expand_x.rows(), want.valid_rows);
  std::ofstream(std::string(dir) + "/ok." + std::to_string(g)) << "ok\n";
}

TEST(Launch, RanksJoinFromTheirEnvironment) {
  EnvGuard guard({"MOEDIST_RANK", "MOEDIST_WORLD_SIZE", "MOEDIST_TP_WORLD_SIZE", "MOEDIST_JOB", "MOEDIST_LAUNCH_TEST_DIR"});
  EnvGuard::set_launch(nullptr, nullptr, nullptr, nullptr);
  TempDir dir;
  ::setenv("MOEDIST_LAUNCH_TEST_DIR", dir.path().c_str(), 1);
  std::error_code ec;
  const std::string self = fs::read_symlink("/proc/self/exe", ec).string();
  ASSERT_FALSE(ec) << ec.message();
  LaunchOptions o;
  o.ranks = 4;
  o.tp_world_size = 2;
  o.argv = {self, "--gtest_filter=LaunchChild.RankOfALaunchedJob"};
  const LaunchResult result = launch_with_watchdog(o, dir, milliseconds(60000));
  for (const RankExit& r : result.ranks) {
    EXPECT_TRUE(r.ok()) << r.describe();
    EXPECT_EQ(read_file(dir.file("ok." + std::to_string(r.rank))), "ok\n") << "rank " << r.rank << " did not finish its check";
  }
  EXPECT_EQ(result.exit_code(), 0);
  EXPECT_EQ(moedist_shm_entries(), std::vector<std::string>{});
}

}  // namespace
}  // namespace moedist::testing
