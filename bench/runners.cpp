#include "runners.h"

#include <fcntl.h>
#include <sched.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
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
#include "process/rank_processes.h"
#include "transport/inproc/inproc_transport.h"
#include "transport/shm/shm_transport.h"

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

// ---- ranks meet through their transport ----

// The ranks meet through the collectives of the transport they already share (allgather is also a barrier),
// so that the bench waits the way moedist's own calls do (WaitPolicy) and a peer's failure or death ends the
// wait with moedist's errors, not a barrier of the bench's own.
class TransportSync final : public RankSync {
 public:
  explicit TransportSync(Transport& transport)
      : transport_(transport), all_(static_cast<std::size_t>(transport.size())) {}

  void barrier() override {
    const std::int32_t nothing = 0;
    transport_.allgather(&nothing, sizeof nothing, all_.data(), "bench.barrier");
  }

  int agree(int rank0_value) override {
    const std::int32_t mine = rank0_value;
    transport_.allgather(&mine, sizeof mine, all_.data(), "bench.agree");
    return all_.front();
  }

 private:
  Transport& transport_;
  std::vector<std::int32_t> all_;
};

int usable_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  return ::sched_getaffinity(0, sizeof set, &set) == 0 ? std::max(CPU_COUNT(&set), 1) : 1;
}

// "rank g: <its error>" for the error that explains a failed run best (process::root_cause), or "". lines > 0:
// only the error's last that many lines.
std::string root_cause_message(const std::vector<std::exception_ptr>& errors, std::size_t lines);

// Runs body(thread, sync) on `threads` threads that meet through one in-process transport of `threads` ranks,
// which the body may also give its group (its transport, taken from the hub). Failures become the outcome's error.
RunOutcome run_threads(
    int threads, const RunSettings& settings,
    const std::function<std::vector<RoundTimes>(int rank, std::unique_ptr<Transport> transport)>& body) {
  const auto hub = std::make_shared<inproc::InProcHub>(threads, std::chrono::milliseconds(settings.timeout_ms),
                                                       std::chrono::microseconds(-1));
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(threads));
  std::vector<std::vector<RoundTimes>> per_rank(static_cast<std::size_t>(threads));
  run_ranks(threads, [&](int rank) {
    try {
      hub->claim(rank);
      per_rank[static_cast<std::size_t>(rank)] = body(rank, std::make_unique<inproc::InProcTransport>(hub, rank));
    } catch (const Error&) {
      errors[static_cast<std::size_t>(rank)] = std::current_exception();
    } catch (const std::exception& e) {
      // A cause, as a worker process reports it (internal): root_cause prefers it to a peer's consequences.
      errors[static_cast<std::size_t>(rank)] = std::make_exception_ptr(Error(ErrorCode::internal, e.what()));
    }
  });
  const std::string cause = root_cause_message(errors, 0);
  return cause.empty() ? success(per_rank) : failure(cause);
}

// Keeps the compiler from dropping a copy nobody reads.
void escape(void* p) { asm volatile("" : : "g"(p) : "memory"); }

// ---- processes ----

void write_spec(const std::string& dir, const Point& p, const RunSettings& s) {
  std::ofstream f(dir + "/spec");
  f << "W " << p.W << "\nbs " << p.bs << "\nh " << p.h << "\nk " << p.k << "\nE " << p.E << "\nS " << p.S << "\nT "
    << p.T << "\nsmooth " << (p.smooth ? 1 : 0) << "\nquant_mode " << p.quant_mode << "\ndtype "
    << (p.dtype == DType::fp16 ? "fp16" : "bf16") << "\nseed " << p.seed << "\nwarmup " << s.loop.warmup
    << "\nmax_iters " << s.loop.max_iters << "\nmin_iters " << s.loop.min_iters << "\nmax_seconds "
    << s.loop.max_seconds << "\ntimeout_ms " << s.timeout_ms << "\nthreads_per_rank " << s.threads_per_rank << "\n";
  if (!f) throw std::runtime_error("cannot write " + dir + "/spec");
}

void read_spec(const std::string& dir, Point* p, RunSettings* s) {
  std::ifstream f(dir + "/spec");
  if (!f) throw std::runtime_error("cannot read " + dir + "/spec");
  std::string key;
  while (f >> key) {
    if (key == "W")
      f >> p->W;
    else if (key == "bs")
      f >> p->bs;
    else if (key == "h")
      f >> p->h;
    else if (key == "k")
      f >> p->k;
    else if (key == "E")
      f >> p->E;
    else if (key == "S")
      f >> p->S;
    else if (key == "T")
      f >> p->T;
    else if (key == "smooth")
      f >> p->smooth;
    else if (key == "quant_mode")
      f >> p->quant_mode;
    else if (key == "seed")
      f >> p->seed;
    else if (key == "warmup")
      f >> s->loop.warmup;
    else if (key == "max_iters")
      f >> s->loop.max_iters;
    else if (key == "min_iters")
      f >> s->loop.min_iters;
    else if (key == "max_seconds")
      f >> s->loop.max_seconds;
    else if (key == "timeout_ms")
      f >> s->timeout_ms;
    else if (key == "threads_per_rank")
      f >> s->threads_per_rank;
    else if (key == "dtype") {
      std::string name;
      f >> name;
      p->dtype = name == "fp16" ? DType::fp16 : DType::bf16;
    } else {
      throw std::runtime_error("unknown key '" + key + "' in " + dir + "/spec");
    }
  }
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

std::string root_cause_message(const std::vector<std::exception_ptr>& errors, std::size_t lines) {
  const int g = process::root_cause(errors);
  if (g < 0) return "";
  try {
    std::rethrow_exception(errors[static_cast<std::size_t>(g)]);
  } catch (const std::exception& e) {
    return "rank " + std::to_string(g) + ": " + (lines > 0 ? last_lines(e.what(), lines) : std::string(e.what()));
  } catch (...) {
  }
  return "rank " + std::to_string(g) + ": an unknown exception";
}

}  // namespace

GroupOptions group_options(const RunSettings& settings) {
  GroupOptions options;
  options.worker_threads = settings.threads_per_rank;
  return options;
}

RunOutcome run_inproc(const Point& p, const RunSettings& settings) {
  const PointBytes bytes = count_bytes(p);
  return run_threads(p.ranks(), settings, [&](int rank, std::unique_ptr<Transport> transport) {
    // The group gets the transport the ranks also meet through between iterations.
    TransportSync sync(*transport);
    const GroupConfig config = group_config(p, rank);
    validate_config(config);
    Group group(config, std::move(transport), group_options(settings));
    MoedistRank body(p, rank, group);
    body.prime(bytes);
    return run_rank_loop(rank, sync, settings.loop, body.ops());
  });
}

std::vector<std::vector<std::size_t>> memcpy_floor_pieces(const std::vector<std::int64_t>& per_rank, int threads) {
  const int ranks = static_cast<int>(per_rank.size());
  threads = std::max(threads, 1);
  const int parts = std::max(1, threads / std::max(ranks, 1));  // pieces per rank
  std::vector<std::vector<std::size_t>> pieces(static_cast<std::size_t>(threads));
  for (int i = 0; i < ranks * parts; ++i) {
    const std::int64_t b = per_rank[static_cast<std::size_t>(i / parts)];
    const int part = i % parts;
    pieces[static_cast<std::size_t>(i % threads)].push_back(
        static_cast<std::size_t>(b * (part + 1) / parts - b * part / parts));
  }
  return pieces;
}

RunOutcome run_memcpy_floor(const Point& p, const RunSettings& settings) {
  const PointBytes bytes = count_bytes(p);
  // One thread per rank while there are cores for them. Past that, threads that each time only their own copy
  // would take turns on the cores and each report one rank's time, although the last copy ends several rank
  // times after the first starts (moedist's and MPI's ranks wait for each other inside the call, so their
  // slowest rank sees that). So thread t copies pieces t, t + T, ... back to back and times them all. With
  // --threads-per-rank N, a rank's bytes are cut into N pieces while there are cores for them, as its
  // worker threads split its row work: the floor of a rank that uses several cores.
  const int threads = std::min(p.ranks() * std::max(settings.threads_per_rank, 1), usable_cpus());
  const std::vector<std::vector<std::size_t>> dispatch_pieces = memcpy_floor_pieces(bytes.dispatch_per_rank, threads);
  const std::vector<std::vector<std::size_t>> combine_pieces = memcpy_floor_pieces(bytes.combine_per_rank, threads);
  return run_threads(threads, settings, [&](int thread, std::unique_ptr<Transport> transport) {
    TransportSync sync(*transport);
    // Buffers written once here, so that the timed copies do not fault pages in (moedist's windows are warm too).
    struct Copy {
      std::vector<unsigned char> src, dst;
    };
    std::vector<Copy> dispatch, combine;
    for (std::size_t n : dispatch_pieces[static_cast<std::size_t>(thread)])
      dispatch.push_back({std::vector<unsigned char>(n, 1), std::vector<unsigned char>(n, 2)});
    for (std::size_t n : combine_pieces[static_cast<std::size_t>(thread)])
      combine.push_back({std::vector<unsigned char>(n, 3), std::vector<unsigned char>(n, 4)});
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
    const process::TempDir dir("moedist-bench");
    write_spec(dir.path(), p, settings);
    LaunchOptions launch_options;
    launch_options.ranks = p.ranks();
    launch_options.argv = rank_program;
    launch_options.argv.push_back(dir.path());
    const LaunchResult result = launch(launch_options);
    if (!result.ok()) {
      // The most telling reason: a rank that died without a word (collect_errors throws), else the first
      // rank's own error rather than the ones it caused elsewhere.
      const std::string cause = root_cause_message(process::collect_errors(dir.path(), result.ranks), 3);
      return failure(!cause.empty() ? cause : process::describe_failures(result.ranks));
    }
    std::vector<std::vector<RoundTimes>> per_rank;
    for (int rank = 0; rank < p.ranks(); ++rank) per_rank.push_back(read_times(process::result_file(dir.path(), rank)));
    RunOutcome outcome = success(per_rank);
    for (int rank = 0; rank < p.ranks(); ++rank) {
      std::ifstream rss(process::rank_file(dir.path(), rank, ".rss"));
      std::int64_t bytes = -1;
      if (rss >> bytes) outcome.peak_rss_bytes = std::max(outcome.peak_rss_bytes, bytes);
    }
    return outcome;
  } catch (const std::exception& e) {
    return failure(e.what());
  }
}

int shm_rank_main(const std::string& dir) {
  return process::run_worker(
      dir,
      [&](int rank, const std::string& result) {
        Point p;
        RunSettings settings;
        read_spec(dir, &p, &settings);
        ShmOptions options;
        options.wait.timeout = std::chrono::milliseconds(settings.timeout_ms);
        const GroupConfig config = group_config(p, rank);
        validate_config(config);
        // The transport is made here, not by join_shm, so that the rank also meets its peers through it.
        auto transport = std::make_unique<shm::ShmTransport>(launch_environment().job, rank, p.ranks(), options);
        TransportSync sync(*transport);
        Group group(config, std::move(transport), group_options(settings));
        MoedistRank body(p, rank, group);
        body.prime(count_bytes(p));
        write_times(result, run_rank_loop(rank, sync, settings.loop, body.ops()));
        rusage usage{};
        ::getrusage(RUSAGE_SELF, &usage);
        std::ofstream(process::rank_file(dir, rank, ".rss"))
            << static_cast<std::int64_t>(usage.ru_maxrss) * 1024 << "\n";  // ru_maxrss is KiB
      },
      "moedist bench-rank");
}

// ---- a competing load ----

BackgroundLoad::BackgroundLoad(int threads) {
  threads_.reserve(static_cast<std::size_t>(std::max(threads, 0)));
  try {
    for (int i = 0; i < threads; ++i) {
      threads_.emplace_back([this] {
        // Spins on plain arithmetic at normal priority until stopped; the volatile keeps the loop.
        volatile std::uint64_t x = 0;
        while (!stop_.load(std::memory_order_relaxed)) x = x + 1;
      });
    }
  } catch (...) {
    stop();
    throw;
  }
}

BackgroundLoad::~BackgroundLoad() { stop(); }

void BackgroundLoad::stop() noexcept {
  stop_.store(true, std::memory_order_relaxed);
  for (std::thread& t : threads_) {
    if (t.joinable()) t.join();
  }
  threads_.clear();
}

// ---- MPI ----

std::string find_in_path(const std::string& name) {
  const char* path = std::getenv("PATH");
  if (path == nullptr || name.empty()) return "";
  std::stringstream dirs(path);
  std::string dir;
  while (std::getline(dirs, dir, ':')) {
    std::string candidate = (dir.empty() ? std::string(".") : dir) + "/" + name;
    if (::access(candidate.c_str(), X_OK) == 0) return candidate;
  }
  return "";
}

std::string find_mpi_tools(const std::string& explicit_baseline, const std::string& self_dir, MpiTools* tools) {
  tools->mpirun = find_in_path("mpirun");
  if (tools->mpirun.empty()) return "mpirun is not in PATH (Debian: openmpi-bin)";
  if (!explicit_baseline.empty()) {
    if (::access(explicit_baseline.c_str(), X_OK) != 0)
      return "--mpi-baseline " + explicit_baseline + " is not an executable";
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
  run_program(
      {tools.mpirun, "--version"}, {},
      [&](const std::string& line) {
        if (version.empty() && !line.empty()) version = line;
      },
      &ignored);
  return (version.empty() ? tools.mpirun : version + " (" + tools.mpirun + ")") + "; baseline " + tools.baseline;
}

int run_program(const std::vector<std::string>& argv, const std::vector<std::string>& extra_env,
                const std::function<void(const std::string& line)>& on_line, std::string* stderr_text) {
  // Both descriptors close on exec, so that no other process started meanwhile holds them open; the child
  // gets them as its stdout and stderr only.
  int out[2];
  if (::pipe2(out, O_CLOEXEC) != 0) throw std::runtime_error("pipe: " + std::string(std::strerror(errno)));
  std::unique_ptr<process::TempDir> err_dir;
  int err_fd = -1;
  if (stderr_text) {
    err_dir = std::make_unique<process::TempDir>("moedist-program");
    err_fd = ::open((err_dir->path() + "/stderr").c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (err_fd < 0) {
      const int err = errno;
      ::close(out[0]);
      ::close(out[1]);
      throw std::runtime_error("cannot create a file for the program's stderr: " + std::string(std::strerror(err)));
    }
  }
  process::Command command;
  command.argv = argv;
  command.env = extra_env;
  command.stdout_fd = out[1];
  command.stderr_fd = err_fd;
  command.exec_failure_prefix = "moedist bench";
  process::RankProcesses program;
  try {
    program.start(command);
  } catch (...) {
    ::close(out[0]);
    ::close(out[1]);
    if (err_fd >= 0) ::close(err_fd);
    throw;
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
  const int status = program.wait().front().wait_status;
  if (err_fd >= 0) {
    std::string text;
    char buf[4096];
    ssize_t got = 0;
    off_t at = 0;
    while ((got = ::pread(err_fd, buf, sizeof buf, at)) > 0) {
      text.append(buf, static_cast<std::size_t>(got));
      at += got;
    }
    ::close(err_fd);
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
  // clang-format off
  std::vector<std::string> argv = {tools.mpirun, "--oversubscribe", "--bind-to", "none", "-np", std::to_string(first.ranks()),
                                   tools.baseline, "--impl", impl.impl, "--hosts", std::to_string(impl.hosts),
                                   "--timeout-ms", std::to_string(settings.timeout_ms),
                                   "--threads-per-rank", std::to_string(settings.threads_per_rank),
                                   "--dtype", first.dtype == DType::fp16 ? "fp16" : "bf16",
                                   "--seed", std::to_string(first.seed), "--warmup", std::to_string(settings.loop.warmup),
                                   "--iters", std::to_string(settings.loop.max_iters), "--min-iters",
                                   std::to_string(settings.loop.min_iters), "--max-seconds",
                                   std::to_string(settings.loop.max_seconds)};
  // clang-format on
  // The workload's shape beyond the points: the same for all of them.
  argv.insert(argv.end(),
              {"--shared-expert-rank-num", std::to_string(first.S), "--tp-world-size", std::to_string(first.T)});
  if (!first.smooth) argv.push_back("--no-scales");
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
