#include "runners.h"

#include <fcntl.h>
#include <sched.h>
#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>

#include "moedist/config.h"
#include "moedist/error.h"
#include "moedist/group.h"
#include "moedist/inproc.h"
#include "moedist/launch.h"
#include "moedist/shm.h"
#include "moedist_rank.h"

extern char** environ;

namespace moedist::bench {

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

RunOutcome failure(const std::string& why) {
  RunOutcome o;
  o.error = why;
  return o;
}

RunOutcome success(const std::vector<std::vector<RoundTimes>>& per_rank) {
  RunOutcome o;
  o.ok = true;
  o.samples = slowest_rank(per_rank);
  return o;
}

// ---- the bench's own barrier ----

// Lives in memory every rank maps: the heap for threads, a shared file for processes. Plain words used through
// std::atomic_ref, so that the futex calls see the same addresses.
struct ControlBlock {
  std::uint32_t arrived = 0;
  std::uint32_t generation = 0;
  std::uint32_t failed = 0;  // set by a rank that gives up: the others stop waiting
  std::int32_t value = 0;    // agree()'s value
};

// Thrown on a rank whose peer failed first: a consequence, not the cause worth reporting.
class PeerFailed : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

void futex_wait(std::uint32_t* word, std::uint32_t expected, long nanoseconds) {
  const timespec ts{0, nanoseconds};
  ::syscall(SYS_futex, word, FUTEX_WAIT, expected, &ts, nullptr, 0);  // shared: works across processes
}
void futex_wake_all(std::uint32_t* word) { ::syscall(SYS_futex, word, FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0); }

int usable_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  return ::sched_getaffinity(0, sizeof set, &set) == 0 ? std::max(CPU_COUNT(&set), 1) : 1;
}

// A generation barrier. When every rank has a core of its own, waiters spin (up to 1 ms), as MPI_Barrier
// busy-polls: a waiter that sleeps lets a virtual machine halt its vCPU, and the wake-up (hundreds of
// microseconds here) would land inside the next timed call. With more ranks than cores they spin only
// briefly and then sleep on a futex, so that 16 ranks on 2 cores do not steal the cores from the ranks
// still working.
class ControlSync final : public RankSync {
 public:
  ControlSync(ControlBlock* block, int ranks, int rank, std::chrono::milliseconds timeout)
      : block_(block),
        ranks_(ranks),
        rank_(rank),
        timeout_(timeout),
        spin_(ranks <= usable_cpus() ? std::chrono::microseconds(1000) : std::chrono::microseconds(20)) {}

  void barrier() override {
    std::atomic_ref<std::uint32_t> generation(block_->generation), arrived(block_->arrived);
    throw_if_failed();
    const std::uint32_t gen = generation.load(std::memory_order_acquire);
    if (arrived.fetch_add(1, std::memory_order_acq_rel) + 1 == static_cast<std::uint32_t>(ranks_)) {
      arrived.store(0, std::memory_order_relaxed);
      generation.store(gen + 1, std::memory_order_release);
      futex_wake_all(&block_->generation);
      return;
    }
    const Clock::time_point spin_end = Clock::now() + spin_;
    do {
      if (generation.load(std::memory_order_acquire) != gen) return;
      __builtin_ia32_pause();
    } while (Clock::now() < spin_end);
    const Clock::time_point deadline = Clock::now() + timeout_;
    while (generation.load(std::memory_order_acquire) == gen) {
      throw_if_failed();
      if (Clock::now() > deadline)
        throw std::runtime_error("rank " + std::to_string(rank_) + " waited more than " + std::to_string(timeout_.count()) +
                                 " ms for the other ranks at the bench's barrier");
      futex_wait(&block_->generation, gen, 20'000'000);
    }
  }

  int agree(int rank0_value) override {
    std::atomic_ref<std::int32_t> value(block_->value);
    if (rank_ == 0) value.store(rank0_value, std::memory_order_relaxed);
    barrier();
    const int agreed = value.load(std::memory_order_relaxed);
    barrier();  // nobody may change the value before every rank has read it
    return agreed;
  }

  void fail() noexcept {
    std::atomic_ref<std::uint32_t>(block_->failed).store(1, std::memory_order_release);
    futex_wake_all(&block_->generation);
  }

 private:
  void throw_if_failed() const {
    if (std::atomic_ref<std::uint32_t>(block_->failed).load(std::memory_order_acquire) != 0)
      throw PeerFailed("another rank failed");
  }

  ControlBlock* block_;
  int ranks_, rank_;
  std::chrono::milliseconds timeout_;
  std::chrono::microseconds spin_;
};

// The first root-cause error of a run of threads.
class FirstError {
 public:
  void record(int rank, const char* what) {
    const std::lock_guard<std::mutex> lock(mutex_);
    if (message_.empty()) message_ = "rank " + std::to_string(rank) + ": " + what;
  }
  std::string message() const {
    const std::lock_guard<std::mutex> lock(mutex_);
    return message_;
  }

 private:
  mutable std::mutex mutex_;
  std::string message_;
};

// Runs body(thread, sync) on `threads` threads around one control block; failures become the outcome's error.
RunOutcome run_threads(int threads, const RunSettings& settings,
                       const std::function<std::vector<RoundTimes>(int rank, ControlSync& sync)>& body) {
  ControlBlock block;
  FirstError first;
  std::vector<std::vector<RoundTimes>> per_rank(static_cast<std::size_t>(threads));
  try {
    run_ranks(threads, [&](int rank) {
      ControlSync sync(&block, threads, rank, std::chrono::milliseconds(settings.timeout_ms));
      try {
        per_rank[static_cast<std::size_t>(rank)] = body(rank, sync);
      } catch (const PeerFailed&) {
        throw;
      } catch (const std::exception& e) {
        first.record(rank, e.what());
        sync.fail();
        throw;
      }
    });
  } catch (const std::exception& e) {
    const std::string cause = first.message();
    return failure(cause.empty() ? e.what() : cause);
  }
  return success(per_rank);
}

// Keeps the compiler from dropping a copy nobody reads.
void escape(void* p) { asm volatile("" : : "g"(p) : "memory"); }

// ---- processes ----

std::string rank_file(const std::string& dir, int rank, const char* suffix) {
  return dir + "/rank" + std::to_string(rank) + suffix;
}

void write_spec(const std::string& dir, const Point& p, const RunSettings& s) {
  std::ofstream f(dir + "/spec");
  f << "W " << p.W << "\nbs " << p.bs << "\nh " << p.h << "\nk " << p.k << "\nE " << p.E << "\nquant_mode " << p.quant_mode
    << "\ndtype " << (p.dtype == DType::fp16 ? "fp16" : "bf16") << "\nseed " << p.seed << "\nwarmup " << s.loop.warmup
    << "\nmax_iters " << s.loop.max_iters << "\nmin_iters " << s.loop.min_iters << "\nmax_seconds " << s.loop.max_seconds
    << "\ntimeout_ms " << s.timeout_ms << "\n";
  if (!f) throw std::runtime_error("cannot write " + dir + "/spec");
}

void read_spec(const std::string& dir, Point* p, RunSettings* s) {
  std::ifstream f(dir + "/spec");
  if (!f) throw std::runtime_error("cannot read " + dir + "/spec");
  std::string key;
  while (f >> key) {
    if (key == "W") f >> p->W;
    else if (key == "bs") f >> p->bs;
    else if (key == "h") f >> p->h;
    else if (key == "k") f >> p->k;
    else if (key == "E") f >> p->E;
    else if (key == "quant_mode") f >> p->quant_mode;
    else if (key == "seed") f >> p->seed;
    else if (key == "warmup") f >> s->loop.warmup;
    else if (key == "max_iters") f >> s->loop.max_iters;
    else if (key == "min_iters") f >> s->loop.min_iters;
    else if (key == "max_seconds") f >> s->loop.max_seconds;
    else if (key == "timeout_ms") f >> s->timeout_ms;
    else if (key == "dtype") {
      std::string name;
      f >> name;
      p->dtype = name == "fp16" ? DType::fp16 : DType::bf16;
    } else {
      throw std::runtime_error("unknown key '" + key + "' in " + dir + "/spec");
    }
  }
}

// The control block as a shared file mapping: the parent creates the file, every rank maps it.
class SharedControl {
 public:
  explicit SharedControl(const std::string& path) {
    const int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
    if (fd < 0) throw std::runtime_error("open " + path + ": " + std::strerror(errno));
    void* m = ::mmap(nullptr, sizeof(ControlBlock), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    ::close(fd);
    if (m == MAP_FAILED) throw std::runtime_error("mmap " + path + ": " + std::strerror(errno));
    block_ = static_cast<ControlBlock*>(m);
  }
  ~SharedControl() { ::munmap(block_, sizeof(ControlBlock)); }
  SharedControl(const SharedControl&) = delete;
  SharedControl& operator=(const SharedControl&) = delete;
  ControlBlock* block() const noexcept { return block_; }

 private:
  ControlBlock* block_ = nullptr;
};

void create_control_file(const std::string& path) {
  std::ofstream f(path, std::ios::binary);
  const ControlBlock zero;
  f.write(reinterpret_cast<const char*>(&zero), sizeof zero);
  if (!f) throw std::runtime_error("cannot write " + path);
}

void write_times(const std::string& path, const std::vector<RoundTimes>& times) {
  std::ofstream f(path, std::ios::binary);
  const std::uint64_t n = times.size();
  f.write(reinterpret_cast<const char*>(&n), sizeof n);
  f.write(reinterpret_cast<const char*>(times.data()), static_cast<std::streamsize>(n * sizeof(RoundTimes)));
  if (!f) throw std::runtime_error("cannot write " + path);
}

std::vector<RoundTimes> read_times(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::uint64_t n = 0;
  f.read(reinterpret_cast<char*>(&n), sizeof n);
  if (!f || n > (1u << 28)) throw std::runtime_error("cannot read " + path);
  std::vector<RoundTimes> times(n);
  f.read(reinterpret_cast<char*>(times.data()), static_cast<std::streamsize>(n * sizeof(RoundTimes)));
  if (!f) throw std::runtime_error("cannot read " + path);
  return times;
}

// First line "cause" or "consequence", then the message.
void write_error(const std::string& path, bool cause, const std::string& message) {
  std::ofstream f(path);
  f << (cause ? "cause" : "consequence") << "\n" << message << "\n";
}

std::string read_file(const std::string& path) {
  std::ifstream f(path);
  std::stringstream text;
  text << f.rdbuf();
  return text.str();
}

// The last `count` non-empty lines of a program's output, on one line.
std::string last_lines(const std::string& text, std::size_t count) {
  std::vector<std::string> lines;
  std::stringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (!line.empty()) lines.push_back(line);
  }
  std::string out;
  for (std::size_t i = lines.size() > count ? lines.size() - count : 0; i < lines.size(); ++i)
    out += (out.empty() ? "" : " | ") + lines[i];
  return out;
}

std::string describe_status(int status) {
  if (WIFEXITED(status)) return "exited with status " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return "was killed by signal " + std::to_string(WTERMSIG(status));
  return "ended with wait status " + std::to_string(status);
}

}  // namespace

WorkDir::WorkDir(const std::string& prefix) {
  std::string templ = (fs::temp_directory_path() / (prefix + "-XXXXXX")).string();
  if (::mkdtemp(templ.data()) == nullptr) throw std::runtime_error("mkdtemp: " + std::string(std::strerror(errno)));
  path_ = templ;
}

WorkDir::~WorkDir() {
  std::error_code ignored;
  fs::remove_all(path_, ignored);
}

RunOutcome run_inproc(const Point& p, const RunSettings& settings) {
  const PointBytes bytes = count_bytes(p);
  RuntimeOptions runtime;
  runtime.wait.timeout = std::chrono::milliseconds(settings.timeout_ms);
  InProcessWorld world(p.W, runtime);
  return run_threads(p.W, settings, [&](int rank, ControlSync& sync) {
    const std::unique_ptr<Group> group = world.join(group_config(p, rank));
    MoedistRank body(p, rank, *group);
    body.prime(bytes);
    return run_rank_loop(rank, sync, settings.loop, body.ops());
  });
}


RunOutcome run_memcpy_floor(const Point& p, const RunSettings& settings) {
  const PointBytes bytes = count_bytes(p);
  // One thread per rank while there are cores for them. Past that, threads that each time only their own copy
  // would take turns on the cores and each report one rank's time, although the last copy ends several rank
  // times after the first starts (moedist's and MPI's ranks wait for each other inside the call, so their
  // slowest rank sees that). So thread t copies the bytes of ranks t, t + T, ... back to back and times them all.
  const int threads = std::min(p.W, usable_cpus());
  return run_threads(threads, settings, [&](int thread, ControlSync& sync) {
    // Buffers written once here, so that the timed copies do not fault pages in (moedist's windows are warm too).
    struct Copy {
      std::vector<unsigned char> src, dst;
    };
    std::vector<Copy> dispatch, combine;
    for (int rank = thread; rank < p.W; rank += threads) {
      const auto d = static_cast<std::size_t>(bytes.dispatch_per_rank[static_cast<std::size_t>(rank)]);
      const auto c = static_cast<std::size_t>(bytes.combine_per_rank[static_cast<std::size_t>(rank)]);
      dispatch.push_back({std::vector<unsigned char>(d, 1), std::vector<unsigned char>(d, 2)});
      combine.push_back({std::vector<unsigned char>(c, 3), std::vector<unsigned char>(c, 4)});
    }
    const auto copy_all = [](std::vector<Copy>& copies) {
      for (Copy& c : copies) {
        std::memcpy(c.dst.data(), c.src.data(), c.src.size());
        escape(c.dst.data());
      }
    };
    const RankOps ops{[&] { copy_all(dispatch); }, [&] { copy_all(combine); }};
    return run_rank_loop(thread, sync, settings.loop, ops);
  });
}

RunOutcome run_shm(const Point& p, const RunSettings& settings, const std::vector<std::string>& rank_program) {
  if (rank_program.empty()) return failure("no rank program to start (the `moedist` tool provides one)");
  try {
    const WorkDir dir("moedist-bench");
    write_spec(dir.path(), p, settings);
    create_control_file(dir.path() + "/control");
    LaunchOptions launch_options;
    launch_options.ranks = p.W;
    launch_options.argv = rank_program;
    launch_options.argv.push_back(dir.path());
    const LaunchResult result = launch(launch_options);
    if (!result.ok()) {
      // The most telling reason: a rank's own error, else a rank that died, else a rank that saw a peer fail.
      std::string crashed, consequence;
      for (const RankExit& r : result.ranks) {
        const std::string text = read_file(rank_file(dir.path(), r.rank, ".error"));
        const std::string message = "rank " + std::to_string(r.rank) + ": " + last_lines(text.substr(text.find('\n') + 1), 3);
        if (text.rfind("cause\n", 0) == 0) return failure(message);
        if (text.rfind("consequence\n", 0) == 0) {
          if (consequence.empty()) consequence = message;
        } else if (!r.ok() && crashed.empty()) {
          crashed = r.describe();
        }
      }
      return failure(!crashed.empty() ? crashed : consequence);
    }
    std::vector<std::vector<RoundTimes>> per_rank;
    for (int rank = 0; rank < p.W; ++rank) per_rank.push_back(read_times(rank_file(dir.path(), rank, ".times")));
    RunOutcome outcome = success(per_rank);
    for (int rank = 0; rank < p.W; ++rank) {
      std::ifstream rss(rank_file(dir.path(), rank, ".rss"));
      std::int64_t bytes = -1;
      if (rss >> bytes) outcome.peak_rss_bytes = std::max(outcome.peak_rss_bytes, bytes);
    }
    return outcome;
  } catch (const std::exception& e) {
    return failure(e.what());
  }
}

int shm_rank_main(const std::string& dir) {
  int rank = -1;
  try {
    Point p;
    RunSettings settings;
    read_spec(dir, &p, &settings);
    rank = launch_environment().rank;
    const SharedControl control(dir + "/control");
    ControlSync sync(control.block(), p.W, rank, std::chrono::milliseconds(settings.timeout_ms));
    try {
      ShmOptions shm;
      shm.wait.timeout = std::chrono::milliseconds(settings.timeout_ms);
      const std::unique_ptr<Group> group = join_shm_from_env(group_config(p, rank), shm);
      MoedistRank body(p, rank, *group);
      body.prime(count_bytes(p));
      write_times(rank_file(dir, rank, ".times"), run_rank_loop(rank, sync, settings.loop, body.ops()));
      rusage usage{};
      ::getrusage(RUSAGE_SELF, &usage);
      std::ofstream(rank_file(dir, rank, ".rss")) << static_cast<std::int64_t>(usage.ru_maxrss) * 1024 << "\n";  // ru_maxrss is KiB
      return 0;
    } catch (const PeerFailed& e) {
      write_error(rank_file(dir, rank, ".error"), false, e.what());
    } catch (const PeerError& e) {
      // A peer that failed or died first; moedist names it.
      sync.fail();
      const bool cause = e.code() != ErrorCode::peer_failed && e.code() != ErrorCode::peer_lost;
      write_error(rank_file(dir, rank, ".error"), cause, e.what());
    } catch (const std::exception& e) {
      sync.fail();
      write_error(rank_file(dir, rank, ".error"), true, e.what());
    }
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moedist bench-rank %d: %s\n", rank, e.what());
    if (rank >= 0) write_error(rank_file(dir, rank, ".error"), true, e.what());
    return 2;
  }
}

// ---- MPI ----

std::string find_in_path(const std::string& name) {
  const char* path = std::getenv("PATH");
  if (path == nullptr || name.empty()) return "";
  std::stringstream dirs(path);
  std::string dir;
  while (std::getline(dirs, dir, ':')) {
    const std::string candidate = (dir.empty() ? std::string(".") : dir) + "/" + name;
    if (::access(candidate.c_str(), X_OK) == 0) return candidate;
  }
  return "";
}

std::string find_mpi_tools(const std::string& explicit_baseline, const std::string& self_dir, MpiTools* tools) {
  tools->mpirun = find_in_path("mpirun");
  if (tools->mpirun.empty()) return "mpirun is not in PATH (Debian: openmpi-bin)";
  if (!explicit_baseline.empty()) {
    if (::access(explicit_baseline.c_str(), X_OK) != 0) return "--mpi-baseline " + explicit_baseline + " is not an executable";
    tools->baseline = explicit_baseline;
    return "";
  }
  std::vector<std::string> candidates;
#ifdef MOEDIST_MPI_BASELINE_PATH
  candidates.push_back(MOEDIST_MPI_BASELINE_PATH);
#endif
  if (!self_dir.empty()) candidates.push_back(self_dir + "/moedist_mpi_baseline");
  candidates.push_back(find_in_path("moedist_mpi_baseline"));
  for (const std::string& c : candidates) {
    if (!c.empty() && ::access(c.c_str(), X_OK) == 0) {
      tools->baseline = c;
      return "";
    }
  }
#ifdef MOEDIST_MPI_BASELINE_PATH
  return "moedist_mpi_baseline is not at " + std::string(MOEDIST_MPI_BASELINE_PATH) + ", next to moedist, or in PATH";
#else
  return "moedist_mpi_baseline was not built (MPI was not found when the build was configured; Debian: libopenmpi-dev)";
#endif
}

std::string describe_mpi(const MpiTools& tools) {
  std::string version;
  std::string ignored;
  run_program({tools.mpirun, "--version"}, {},
              [&](const std::string& line) {
                if (version.empty() && !line.empty()) version = line;
              },
              &ignored);
  return (version.empty() ? tools.mpirun : version + " (" + tools.mpirun + ")") + "; baseline " + tools.baseline;
}

int run_program(const std::vector<std::string>& argv, const std::vector<std::string>& extra_env,
                const std::function<void(const std::string& line)>& on_line, std::string* stderr_text) {
  // Everything the child needs is built before fork: after fork only async-signal-safe calls are made.
  std::vector<std::string> env_strings;
  for (char** e = environ; *e != nullptr; ++e) {
    const std::string entry(*e);
    bool overridden = false;
    for (const std::string& extra : extra_env) {
      overridden = overridden || entry.compare(0, extra.find('=') + 1, extra, 0, extra.find('=') + 1) == 0;
    }
    if (!overridden) env_strings.push_back(entry);
  }
  env_strings.insert(env_strings.end(), extra_env.begin(), extra_env.end());
  std::vector<char*> envp, args;
  for (std::string& e : env_strings) envp.push_back(e.data());
  envp.push_back(nullptr);
  std::vector<std::string> argv_copy(argv);
  for (std::string& a : argv_copy) args.push_back(a.data());
  args.push_back(nullptr);

  int out[2];
  if (::pipe2(out, O_CLOEXEC) != 0) throw std::runtime_error("pipe: " + std::string(std::strerror(errno)));
  std::FILE* err_file = stderr_text ? std::tmpfile() : nullptr;
  const int err_fd = err_file ? ::fileno(err_file) : -1;
  const pid_t pid = ::fork();
  if (pid < 0) {
    const int err = errno;
    ::close(out[0]);
    ::close(out[1]);
    if (err_file) std::fclose(err_file);
    throw std::runtime_error("fork: " + std::string(std::strerror(err)));
  }
  if (pid == 0) {
    ::dup2(out[1], STDOUT_FILENO);
    if (err_fd >= 0) ::dup2(err_fd, STDERR_FILENO);
    ::execvpe(args[0], args.data(), envp.data());
    static const char msg[] = "cannot start the program\n";
    (void)!::write(STDERR_FILENO, msg, sizeof msg - 1);
    ::_exit(127);
  }
  ::close(out[1]);
  std::FILE* lines = ::fdopen(out[0], "r");
  char* line = nullptr;
  std::size_t capacity = 0;
  ssize_t n = 0;
  while ((n = ::getline(&line, &capacity, lines)) >= 0) {
    std::string text(line, static_cast<std::size_t>(n));
    while (!text.empty() && (text.back() == '\n' || text.back() == '\r')) text.pop_back();
    if (on_line) on_line(text);
  }
  std::free(line);
  std::fclose(lines);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (err_file) {
    std::rewind(err_file);
    std::string text;
    char buf[4096];
    std::size_t got = 0;
    while ((got = std::fread(buf, 1, sizeof buf, err_file)) > 0) text.append(buf, got);
    std::fclose(err_file);
    *stderr_text = text;
  }
  return status;
}

int ranks_per_host_of(int W, int hosts) {
  hosts = std::max(hosts, 1);
  return std::max((W + hosts - 1) / hosts, 1);
}

int hosts_of(int W, int ranks_per_host) {
  ranks_per_host = std::max(ranks_per_host, 1);
  return (W + ranks_per_host - 1) / ranks_per_host;
}

void run_mpi_points(const MpiTools& tools, const MpiImpl& impl, const std::vector<Point>& points,
                    const RunSettings& settings,
                    const std::function<void(std::size_t index, RunOutcome outcome)>& on_point, std::string* library) {
  if (points.empty()) return;
  const Point& first = points.front();
  std::vector<std::string> argv = {tools.mpirun, "--oversubscribe", "--bind-to", "none", "-np", std::to_string(first.W),
                                   tools.baseline, "--impl", impl.impl, "--hosts", std::to_string(impl.hosts),
                                   "--timeout-ms", std::to_string(settings.timeout_ms),
                                   "--dtype", first.dtype == DType::fp16 ? "fp16" : "bf16",
                                   "--seed", std::to_string(first.seed), "--warmup", std::to_string(settings.loop.warmup),
                                   "--iters", std::to_string(settings.loop.max_iters), "--min-iters",
                                   std::to_string(settings.loop.min_iters), "--max-seconds",
                                   std::to_string(settings.loop.max_seconds)};
  for (const Point& p : points) {
    argv.push_back("--point");
    argv.push_back(std::to_string(p.bs) + "," + std::to_string(p.h) + "," + std::to_string(p.k) + "," +
                   std::to_string(p.E) + "," + std::to_string(p.quant_mode));
  }
  // Open MPI refuses to run as root without these; harmless otherwise.
  const std::vector<std::string> env = {"OMPI_ALLOW_RUN_AS_ROOT=1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1"};
  std::size_t next = 0;
  std::string protocol_error;
  const auto on_line = [&](const std::string& line) {
    if (line.empty() || line.front() != '{' || !protocol_error.empty()) return;  // anything else MPI prints
    const nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded()) return;
    try {
      if (j.contains("mpi_library") && library) *library = j["mpi_library"].get<std::string>();
      if (!j.contains("point") || next >= points.size()) return;
      const Point& want = points[next];
      const nlohmann::json& got = j["point"];
      if (got.value("bs", -1LL) != want.bs || got.value("h", -1LL) != want.h || got.value("k", -1) != want.k ||
          got.value("E", -1) != want.E || got.value("quant_mode", -1) != want.quant_mode) {
        protocol_error = "the baseline answered for another point than " + describe(want);
        return;
      }
      RunOutcome o;
      o.ok = true;
      o.samples.dispatch_us = j.at("dispatch_us").get<std::vector<double>>();
      o.samples.combine_us = j.at("combine_us").get<std::vector<double>>();
      o.samples.roundtrip_us = j.at("roundtrip_us").get<std::vector<double>>();
      if (j.contains("between_hosts")) {
        const nlohmann::json& b = j["between_hosts"];
        o.between_hosts.hosts = b.at("hosts").get<int>();
        o.between_hosts.ranks_per_host = b.at("ranks_per_host").get<int>();
        o.between_hosts.dispatch = b.at("dispatch").get<std::int64_t>();
        o.between_hosts.dispatch_flat = b.at("dispatch_flat").get<std::int64_t>();
        o.between_hosts.combine = b.at("combine").get<std::int64_t>();
        o.between_hosts.combine_flat = b.at("combine_flat").get<std::int64_t>();
      }
      on_point(next++, std::move(o));
    } catch (const nlohmann::json::exception& e) {
      protocol_error = std::string("unreadable line from the baseline: ") + e.what();
    }
  };
  std::string err;
  std::string reason;
  try {
    const int status = run_program(argv, env, on_line, &err);
    if (next < points.size()) {
      reason = !protocol_error.empty() ? protocol_error : "mpirun " + describe_status(status);
      const std::string tail = last_lines(err, 2);
      if (!tail.empty()) reason += ": " + tail;
    }
  } catch (const std::exception& e) {
    reason = e.what();
  }
  for (; next < points.size(); ++next) on_point(next, failure(reason));
}

}  // namespace moedist::bench
