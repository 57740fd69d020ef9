#include "process/rank_processes.h"

#include <pthread.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string_view>

#include "moedist/shm.h"

namespace moedist::process {
namespace {

// The processes of the RankProcesses that forwards signals, for the handler (async-signal-safe reads
// only). 0: a slot whose process was reaped (its pid may be reused).
constexpr int kMaxForwarded = 4096;
pid_t g_forward_pids[kMaxForwarded];
std::atomic<int> g_forward_count{0};
std::atomic<bool> g_forwarding{false};
// The last signal forwarded: a rank started after it (the signal came during start-up) gets it too,
// else it would run on while its siblings stop and the launch would wait for it.
std::atomic<int> g_forward_pending{0};

constexpr int kForwarded[] = {SIGINT, SIGTERM, SIGHUP, SIGQUIT};
struct sigaction g_previous[std::size(kForwarded)];

void forward_signal(int sig) {
  g_forward_pending.store(sig);
  const int n = g_forward_count.load();
  for (int i = 0; i < n; ++i) {
    if (g_forward_pids[i] > 0) ::kill(g_forward_pids[i], sig);
  }
}

// In a fresh child, before anything else runs: no handler of the parent's may run here (the forwarding
// handler would signal the siblings), so caught signals go back to their default; ignored ones stay
// ignored, as exec would keep them (nohup relies on that). Then the mask the fork blocked is cleared, so
// that the ranks can be interrupted even when the caller's thread blocks signals.
void reset_signals_in_child(bool forwarding) noexcept {
  struct sigaction dfl {};
  dfl.sa_handler = SIG_DFL;
  sigemptyset(&dfl.sa_mask);
  for (int sig = 1; sig < NSIG; ++sig) {
    if (sig == SIGKILL || sig == SIGSTOP) continue;
    struct sigaction current {};
    if (::sigaction(sig, nullptr, &current) != 0) continue;  // glibc's internal signals
    for (std::size_t i = 0; forwarding && i < std::size(kForwarded); ++i) {
      if (kForwarded[i] == sig) current = g_previous[i];
    }
    const bool ignored = (current.sa_flags & SA_SIGINFO) == 0 && current.sa_handler == SIG_IGN;
    if (!ignored) ::sigaction(sig, &dfl, nullptr);
  }
  sigset_t none;
  sigemptyset(&none);
  ::sigprocmask(SIG_SETMASK, &none, nullptr);
}

void write_all(int fd, std::string_view text) noexcept {
  while (!text.empty()) {
    const ssize_t w = ::write(fd, text.data(), text.size());
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return;
    text.remove_prefix(static_cast<std::size_t>(w));
  }
}

// The environment of a command: this process's, with `changes` applied ("NAME=value" sets, "NAME" removes).
std::vector<std::string> environment_with(const std::vector<std::string>& changes) {
  const auto name_of = [](const std::string& entry) { return std::string_view(entry).substr(0, entry.find('=')); };
  std::vector<std::string> env;
  for (char** e = environ; *e != nullptr; ++e) {
    const std::string entry(*e);
    const bool changed =
        std::any_of(changes.begin(), changes.end(), [&](const std::string& c) { return name_of(c) == name_of(entry); });
    if (!changed) env.push_back(entry);
  }
  for (const std::string& c : changes) {
    if (c.find('=') != std::string::npos) env.push_back(c);
  }
  return env;
}

std::string read_whole(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
}

}  // namespace

bool is_consequence_of_peer_failure(ErrorCode code) noexcept {
  return code == ErrorCode::peer_failed || code == ErrorCode::peer_lost || code == ErrorCode::timeout;
}

bool is_consequence_of_peer_failure(const Error& error) noexcept {
  return is_consequence_of_peer_failure(error.code());
}

// ---- the folder and its files ----

TempDir::TempDir(const std::string& prefix) {
  std::string pattern = (std::filesystem::temp_directory_path() / (prefix + "-XXXXXX")).string();
  if (::mkdtemp(pattern.data()) == nullptr) {
    throw Error(ErrorCode::internal,
                "cannot create a private directory from '" + pattern + "': " + std::strerror(errno));
  }
  path_ = pattern;
}

TempDir::~TempDir() {
  std::error_code ignored;
  std::filesystem::remove_all(path_, ignored);
}

std::string rank_file(const std::string& dir, int rank, const std::string& suffix) {
  return dir + "/rank" + std::to_string(rank) + suffix;
}
std::string result_file(const std::string& dir, int rank) { return rank_file(dir, rank, ".result"); }
std::string error_file(const std::string& dir, int rank) { return rank_file(dir, rank, ".error"); }

void write_error_file(const std::string& path, ErrorCode code, const std::string& message) {
  std::ofstream file(path, std::ios::binary | std::ios::trunc);
  file << static_cast<int>(code) << '\n' << message;
  file.close();
  if (!file) throw Error(ErrorCode::internal, "cannot write '" + path + "': " + std::strerror(errno));
}

Error read_error_file(const std::string& path) {
  const std::string text = read_whole(path);
  const std::size_t newline = text.find('\n');
  int code = 0;
  const char* end = text.data() + (newline == std::string::npos ? text.size() : newline);
  const auto [parsed_end, ec] = std::from_chars(text.data(), end, code);
  if (newline == std::string::npos || ec != std::errc() || parsed_end != end ||
      error_code_name(static_cast<ErrorCode>(code)) == std::string_view("unknown")) {
    return Error(ErrorCode::internal, "the worker's error file '" + path + "' is malformed: '" + text + "'");
  }
  return Error(static_cast<ErrorCode>(code), text.substr(newline + 1));
}

std::vector<std::string> own_command_line(const std::vector<std::string>& extra) {
  const std::string text = read_whole("/proc/self/cmdline");
  if (text.empty()) throw Error(ErrorCode::internal, "cannot read this process's arguments from /proc/self/cmdline");
  // NUL-terminated arguments. argv[0] becomes /proc/self/exe: in a forked child it still names this
  // binary, without a PATH lookup, and even if the file was replaced since this process started.
  std::vector<std::string> argv{"/proc/self/exe"};
  std::size_t begin = text.find('\0');
  while (begin != std::string::npos && begin + 1 < text.size()) {
    const std::size_t end = text.find('\0', begin + 1);
    argv.push_back(text.substr(begin + 1, (end == std::string::npos ? text.size() : end) - begin - 1));
    begin = end;
  }
  // Before a "--" separator, if there is one, so that the extra arguments are still read as options.
  argv.insert(std::find(argv.begin() + 1, argv.end(), "--"), extra.begin(), extra.end());
  return argv;
}

}  // namespace moedist::process

namespace moedist {

// ---- naming how a process ended ----

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

}  // namespace moedist

namespace moedist::process {

// ---- the processes ----

RankProcesses::RankProcesses(bool forward_signals) {
  if (!forward_signals) return;
  if (g_forwarding.exchange(true)) {
    throw Error(ErrorCode::internal, "launch() is already running in this process");
  }
  forwarding_ = true;
  g_forward_count.store(0);
  g_forward_pending.store(0);
  struct sigaction forward {};
  forward.sa_handler = forward_signal;
  sigemptyset(&forward.sa_mask);
  for (std::size_t i = 0; i < std::size(kForwarded); ++i) ::sigaction(kForwarded[i], &forward, &g_previous[i]);
}

RankProcesses::~RankProcesses() {
  abandon();
  if (forwarding_) {
    for (std::size_t i = 0; i < std::size(kForwarded); ++i) ::sigaction(kForwarded[i], &g_previous[i], nullptr);
    g_forward_count.store(0);
    g_forwarding.store(false);
  }
}

void RankProcesses::abandon() noexcept {
  for (std::size_t i = 0; i < pids_.size(); ++i) {
    if (!waited_[i]) ::kill(pids_[i], SIGKILL);
  }
  for (std::size_t i = 0; i < pids_.size(); ++i) {
    if (waited_[i]) continue;
    while (::waitpid(pids_[i], nullptr, 0) < 0 && errno == EINTR) {
    }
    waited_[i] = true;
    if (forwarding_ && i < static_cast<std::size_t>(kMaxForwarded)) g_forward_pids[i] = 0;
  }
}

pid_t RankProcesses::fork_rank(const std::function<void()>& in_child) {
  const int rank = size();
  if (forwarding_ && rank >= kMaxForwarded) {
    throw Error(ErrorCode::internal, "cannot start rank " + std::to_string(rank) + ": more than " +
                                         std::to_string(kMaxForwarded) + " processes forward signals");
  }
  pids_.reserve(pids_.size() + 1);
  waited_.reserve(waited_.size() + 1);
  // Blocked across fork, so that no handler of this process runs in the child before it resets them.
  sigset_t all, previous;
  sigfillset(&all);
  ::pthread_sigmask(SIG_SETMASK, &all, &previous);
  const pid_t pid = ::fork();
  if (pid == 0) {
    // Any forwarding object's saved dispositions, not only this one's: they are the caller's.
    reset_signals_in_child(g_forwarding.load());
    in_child();
    ::_exit(127);
  }
  const int err = errno;
  if (pid > 0) {
    pids_.push_back(pid);
    waited_.push_back(false);
    if (forwarding_) {
      g_forward_pids[rank] = pid;
      g_forward_count.store(rank + 1);
      // Signals are blocked here, so the handler either ran before (pending set) or will see this pid.
      if (const int sig = g_forward_pending.load(); sig != 0) ::kill(pid, sig);
    }
  }
  ::pthread_sigmask(SIG_SETMASK, &previous, nullptr);
  if (pid < 0) {
    abandon();
    throw Error(ErrorCode::internal, "cannot start rank " + std::to_string(rank) + ": fork: " + std::strerror(err));
  }
  return pid;
}

pid_t RankProcesses::start(const Command& command) {
  if (command.argv.empty()) throw Error(ErrorCode::invalid_argument, "a process to start needs a program");
  // Everything the child needs is built here: between fork and exec only async-signal-safe calls.
  std::vector<std::string> env = environment_with(command.env);
  std::vector<std::string> args = command.argv;
  std::vector<char*> envp, argv;
  for (std::string& e : env) envp.push_back(e.data());
  envp.push_back(nullptr);
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  const std::string failure = (command.exec_failure_prefix.empty() ? "" : command.exec_failure_prefix + ": ") +
                              "cannot run '" + command.argv[0] + "': ";
  const int out = command.stdout_fd, err = command.stderr_fd;
  return fork_rank([&] {
    if (out >= 0) ::dup2(out, STDOUT_FILENO);
    if (err >= 0) ::dup2(err, STDERR_FILENO);
    ::execvpe(argv[0], argv.data(), envp.data());
    // One write of the whole line: ranks that fail at once share the stream, and a line written in
    // pieces would interleave with theirs (a pipe keeps writes up to PIPE_BUF bytes whole).
    const char* why = ::strerror(errno);
    char line[1024];
    std::size_t n = std::min(failure.size(), sizeof line - 2);
    std::copy_n(failure.data(), n, line);
    const std::size_t why_len = std::min(std::strlen(why), sizeof line - 1 - n);
    std::copy_n(why, why_len, line + n);
    n += why_len;
    line[n++] = '\n';
    write_all(STDERR_FILENO, std::string_view(line, n));
    ::_exit(127);
  });
}

pid_t RankProcesses::start(const std::function<int()>& body) {
  return fork_rank([&] {
    int status = 1;
    try {
      status = body();
    } catch (...) {
    }
    ::_exit(status);
  });
}

void RankProcesses::signal_all(int sig) noexcept {
  for (std::size_t i = 0; i < pids_.size(); ++i) {
    if (!waited_[i]) ::kill(pids_[i], sig);
  }
}

std::vector<RankExit> RankProcesses::wait() {
  std::vector<RankExit> exits(pids_.size());
  for (std::size_t i = 0; i < pids_.size(); ++i) {
    exits[i].rank = static_cast<int>(i);
    exits[i].pid = pids_[i];
    if (waited_[i]) continue;
    int status = 0;
    pid_t got;
    while ((got = ::waitpid(pids_[i], &status, 0)) < 0 && errno == EINTR) {
    }
    // Reaped by someone else (SIGCHLD ignored): the status is lost; say it failed rather than invent a success.
    exits[i].wait_status = got == pids_[i] ? status : 255 << 8;
    waited_[i] = true;
    if (forwarding_) g_forward_pids[i] = 0;  // no more signals for it: its pid may be reused
  }
  return exits;
}

std::vector<RankExit> run_commands(int n, const std::function<Command(int rank)>& command, bool forward_signals) {
  std::vector<Command> commands;
  commands.reserve(static_cast<std::size_t>(std::max(n, 0)));
  for (int rank = 0; rank < n; ++rank) commands.push_back(command(rank));
  RankProcesses processes(forward_signals);
  for (const Command& c : commands) processes.start(c);
  return processes.wait();
}

std::string describe_failures(const std::vector<RankExit>& exits) {
  std::string text;
  for (const RankExit& e : exits) {
    if (e.ok()) continue;
    text += (text.empty() ? "" : "; ") + e.describe();
  }
  return text;
}

// ---- workers that leave files ----

int run_worker(const std::string& dir, const std::function<void(int rank, const std::string& path)>& produce,
               const char* who) {
  int rank = -1;
  ErrorCode code = ErrorCode::internal;
  std::string message;
  try {
    rank = launch_environment().rank;
    produce(rank, result_file(dir, rank));
    return 0;
  } catch (const Error& e) {
    code = e.code();
    message = e.what();
  } catch (const std::exception& e) {
    message = e.what();
  }
  if (rank >= 0) {
    try {
      write_error_file(error_file(dir, rank), code, message);
      return 2;
    } catch (const std::exception& e) {
      message += std::string(" (and then: ") + e.what() + ")";
    }
  }
  // No rank or no error file: stderr is all that is left, and the parent sees a failure without a report.
  std::fprintf(stderr, "%s: error (%s): %s\n", who, error_code_name(code), message.c_str());
  return 2;
}

std::vector<std::exception_ptr> collect_errors(const std::string& dir, const std::vector<RankExit>& exits) {
  std::vector<std::exception_ptr> errors(exits.size());
  std::string died;
  for (const RankExit& exit : exits) {
    const std::string path = error_file(dir, exit.rank);
    if (std::filesystem::exists(path)) {
      errors[static_cast<std::size_t>(exit.rank)] = std::make_exception_ptr(read_error_file(path));
    } else if (!exit.ok()) {
      died += (died.empty() ? "" : "; ") + exit.describe() + " without reporting an error";
    }
  }
  if (!died.empty()) throw Error(ErrorCode::peer_lost, died);
  return errors;
}

int root_cause(const std::vector<std::exception_ptr>& errors) {
  int chosen = -1;
  for (std::size_t g = 0; g < errors.size(); ++g) {
    if (!errors[g]) continue;
    try {
      std::rethrow_exception(errors[g]);
    } catch (const Error& e) {
      if (!is_consequence_of_peer_failure(e)) return static_cast<int>(g);
      if (chosen < 0) chosen = static_cast<int>(g);
    } catch (...) {
      if (chosen < 0) chosen = static_cast<int>(g);
    }
  }
  return chosen;
}

}  // namespace moedist::process
