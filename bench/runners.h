// The transports `moedist bench` times at a grid point, each running every rank through run_rank_loop
// (workload.h):
//   inproc        moedist, ranks as threads of this process (InProcessWorld)
//   shm           moedist, ranks as processes (moedist::launch of a rank program, each on a shared-memory transport)
//   mpi           the MPI baseline (bench/mpi_baseline.h) under mpirun
//   moedist-mpi   moedist over MPI (join_mpi) under mpirun, the ranks split into virtual hosts whose traffic
//                 between each other goes through MPI messages (moedist_mpi_baseline --impl moedist)
//   memcpy-floor  the bytes every rank must move (its logical bytes) memcpy'd, nothing else, by min(W * max(T, 1),
//                 usable CPUs) threads at once (rank r's bytes by thread r mod that count)
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "moedist/group.h"
#include "process/rank_processes.h"
#include "workload.h"

namespace moedist::bench {

struct RunSettings {
  LoopOptions loop;
  std::int64_t timeout_ms = 60000;  // longest wait for a peer (moedist's timeout, also between iterations)
  int threads_per_rank = 1;         // moedist's ranks: GroupOptions::worker_threads (--threads-per-rank)
};

// What each of `threads` memcpy-floor threads copies, back to back: piece i goes to thread i mod threads,
// where a rank's bytes are one piece, or threads / ranks pieces when there are more threads than ranks.
std::vector<std::vector<std::size_t>> memcpy_floor_pieces(const std::vector<std::int64_t>& per_rank, int threads);

// The GroupOptions of every moedist rank of a run.
GroupOptions group_options(const RunSettings& settings);

// Bytes that crossed between hosts in one dispatch and one combine, summed over the ranks (moedist's
// TrafficCounters), next to what a flat all-to-all that sends every row to its destination rank would send.
struct BetweenHosts {
  int hosts = 0;           // 0: not measured (a transport with one host)
  int ranks_per_host = 0;  // the last host may have fewer
  std::int64_t dispatch = 0, dispatch_flat = 0;
  std::int64_t combine = 0, combine_flat = 0;
};

// What timing one transport at one point gave: samples, or why there are none.
struct RunOutcome {
  bool ok = false;
  bool tried = true;  // false: not run at all (too large for memory, tools missing)
  std::string error;
  OpSamples samples;
  std::int64_t peak_rss_bytes = -1;  // shm: the largest peak resident set of the rank processes (-1: unknown)
  BetweenHosts between_hosts;        // moedist-mpi: measured with hosts > 0
};

RunOutcome run_inproc(const Point& p, const RunSettings& settings);
RunOutcome run_memcpy_floor(const Point& p, const RunSettings& settings);

// Starts W processes of `rank_program` followed by the path of a private work directory (the `moedist` tool
// passes itself and its hidden `bench-rank` subcommand); each must call shm_rank_main with that directory.
RunOutcome run_shm(const Point& p, const RunSettings& settings, const std::vector<std::string>& rank_program);
// The body of one such process (rank MOEDIST_RANK): reads the point from the directory, joins the job's group,
// runs the loop, leaves its samples (or its error) in the directory. Returns the process's exit status.
int shm_rank_main(const std::string& dir);

// `threads` busy threads of this process (normal priority, each spinning on arithmetic) from construction until
// stop() or destruction, so that every transport can be timed under the same competing load
// (`moedist bench --background-load`).
class BackgroundLoad {
 public:
  explicit BackgroundLoad(int threads);
  ~BackgroundLoad();
  BackgroundLoad(const BackgroundLoad&) = delete;
  BackgroundLoad& operator=(const BackgroundLoad&) = delete;

  int threads() const noexcept { return static_cast<int>(threads_.size()); }
  void stop() noexcept;

 private:
  std::atomic<bool> stop_{false};
  std::vector<std::thread> threads_;
};

// Where the MPI transports (mpi, moedist-mpi) run from.
struct MpiTools {
  std::string mpirun;    // path of mpirun
  std::string baseline;  // path of moedist_mpi_baseline
};
// Finds mpirun in PATH and the baseline (`explicit_baseline` if given, else the one this build made, else next to
// `self_dir`, else in PATH). Returns "" when both are there, else why the MPI baseline cannot run.
std::string find_mpi_tools(const std::string& explicit_baseline, const std::string& self_dir, MpiTools* tools);

// "mpirun (Open MPI) 4.1.4 (/usr/bin/mpirun); baseline PATH", from `mpirun --version`.
std::string describe_mpi(const MpiTools& tools);

// Which implementation moedist_mpi_baseline times (its --impl and --hosts).
struct MpiImpl {
  std::string impl = "alltoallv";  // "alltoallv" (the mpi baseline) or "moedist" (moedist-mpi)
  int hosts = 1;                   // moedist: virtual hosts the ranks are split into (ranks_per_host_of)
};

// Ranks per virtual host when W ranks are split into `hosts` hosts: ceil(W / hosts) (so that fewer hosts than
// asked may result, e.g. W = 4 in 3 hosts gives 2 hosts of 2); and the number of hosts that gives.
int ranks_per_host_of(int W, int hosts);
int hosts_of(int W, int ranks_per_host);

// One mpirun of W ranks for all `points` (all with the same W): on_point(i, outcome) for each point in order, as
// its result arrives. Points the run never reached get an outcome with the reason. *library gets the MPI
// library's version line.
void run_mpi_points(const MpiTools& tools, const MpiImpl& impl, const std::vector<Point>& points,
                    const RunSettings& settings,
                    const std::function<void(std::size_t index, RunOutcome outcome)>& on_point, std::string* library);

// Runs argv (PATH lookup) with extra "NAME=value" environment entries, calling on_line for each line it writes to
// stdout; its stderr is captured into *stderr_text when given (else inherited). Returns the waitpid status, or
// -1 with *stderr_text set when it cannot start.
int run_program(const std::vector<std::string>& argv, const std::vector<std::string>& extra_env,
                const std::function<void(const std::string& line)>& on_line, std::string* stderr_text);

// A private (0700) directory under the temporary directory, removed with everything in it: "<tmp>/<prefix>-XXXXXX".
using WorkDir = process::TempDir;

// Path of a program in PATH, or "".
std::string find_in_path(const std::string& name);

}  // namespace moedist::bench
