// `moedist bench`'s sweep: every transport at every point of the grid, the statistics and ratios of each, and
// the outputs (text tables, JSON, CSV, plot). The `moedist bench` subcommand (tools/cmd_bench.cpp) is a thin
// layer of flags over this; tests/bench_test.cpp drives it directly.
#pragma once

#include <cstdint>
#include <iosfwd>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "runners.h"
#include "transport/registry.h"
#include "workload.h"

namespace moedist::bench {

inline constexpr const char* kOps[] = {"dispatch", "combine", "roundtrip"};

// What the sweep times besides moedist's transports. Baselines are not transports: nothing joins them.
enum class Baseline {
  none,           // a moedist transport
  mpi_alltoallv,  // MPI_Alltoall + MPI_Alltoallv + a local sort, under mpirun (moedist_mpi_baseline)
  memcpy_floor,   // the same bytes moved by memcpy in one process
};

// A column of the sweep (a --transport value): one of the registry's transports, or a baseline.
struct SweepTarget {
  std::string name;                    // the --transport value and the rows' label
  std::optional<TransportId> moedist;  // the moedist transport timed; empty for a baseline
  Baseline baseline = Baseline::none;
  bool under_mpirun = false;  // runs in moedist_mpi_baseline, one mpirun for all points of a W
};

// Every target, in the default order: moedist's transports (the one an outside launcher starts is named
// moedist-<name>, apart from the MPI baseline), and the baselines.
const std::vector<SweepTarget>& sweep_targets();
// The target named `name`, or nullptr.
const SweepTarget* find_target(std::string_view name) noexcept;
std::vector<std::string> target_names();

// The targets that run under mpirun (moedist_mpi_baseline): the MPI baseline and moedist over MPI.
bool is_mpi_transport(const std::string& transport);

struct SweepOptions {
  std::vector<std::string> transports = target_names();
  std::vector<int> world_sizes = {2, 4, 8, 16};
  std::vector<std::int64_t> bs = {1, 16, 64, 256, 1024, 4096};
  std::vector<std::int64_t> hidden = {7168};
  std::vector<int> topk = {8};
  std::vector<int> quant_modes = {0, 2};
  int moe_expert_num = 0;  // 0: E = (W - S) * local_experts for each W
  int local_experts = 4;
  int shared_expert_rank_num = 0;  // S: EP ranks [0, S) host the shared expert (W a multiple of S)
  int tp_world_size = 0;           // T: 2 runs a TP pair per EP rank (W * 2 ranks, one expert per MoE rank)
  bool no_scales = false;          // quant_mode 2 without smooth scales (each token quantized once)
  int background_load = 0;         // busy threads this process runs while it times (a competing load)
  std::string grid;                // the named grid (--grid) that set the lists, or ""
  int hosts = 2;  // moedist-mpi: virtual hosts of ceil(W / hosts) ranks each (1: all ranks on one host)
  DType dtype = DType::bf16;
  std::uint64_t seed = 1;
  RunSettings run;
  double memory_fraction = 0.8;           // skip a run that needs more than this share of MemAvailable
  std::vector<std::string> rank_program;  // shm: the program (and arguments) of a rank process
  std::string mpi_baseline;               // explicit moedist_mpi_baseline (mpi, moedist-mpi), or "" to look for it
  std::string self_dir;                   // directory of the running tool (where the baseline may also be)
};

// Throws std::invalid_argument naming the flag when an option is unusable.
void validate(const SweepOptions& options);

// The named grids of --grid: decode (BS 1, 2, 4, ..., 128) and prefill (BS 4096, W 2). apply_grid sets the lists
// the grid names (and options.grid) and leaves the rest; it throws std::invalid_argument naming --grid, the value
// and the known names for an unknown grid.
std::vector<std::string> grid_names();
void apply_grid(const std::string& name, SweepOptions& options);
// What a grid sets, e.g. "BS 1,2,4,8,16,32,64,128" ("" for an unknown name).
std::string grid_description(const std::string& name);

// The points of one W, in the order they run: quant_mode, H, K, then BS.
std::vector<Point> grid_points(const SweepOptions& options, int W);

struct ResultRow {
  std::string transport;
  Point point;
  std::string op;  // dispatch, combine, roundtrip
  Stats stats;
  OpBytes bytes;
  double logical_gbps = 0, wire_gbps = 0;                     // bytes / p50 latency
  double x_mpi = std::numeric_limits<double>::quiet_NaN();    // p50 / the mpi baseline's p50 (NaN: none)
  double x_floor = std::numeric_limits<double>::quiet_NaN();  // p50 / the memcpy floor's p50 (NaN: none)
  std::int64_t peak_rss_bytes = -1;   // shm: the largest rank process's peak resident set (-1: not measured)
  std::int64_t predicted_bytes = -1;  // inproc/shm: what moedist::capacity() says a rank's group allocates
  BetweenHosts between_hosts;         // moedist-mpi: bytes between hosts, node-aware and flat (hosts 0: none)
  int threads_per_rank = 0;           // moedist's transports and the memcpy floor: threads per rank (0: MPI)
};

struct SkipRow {
  std::string transport;  // "*": every transport (the point itself is unusable)
  Point point;
  std::string reason;
  bool failed = false;  // the run was tried and failed (an error), rather than not tried (memory, no MPI)
};

struct SweepResult {
  std::vector<ResultRow> rows;
  std::vector<SkipRow> skipped;
  std::string mpi_library;      // the MPI library's version line, when mpi or moedist-mpi ran
  std::string mpi_unavailable;  // why mpi and moedist-mpi did not run at all ("" if they ran or were not asked for)
  int failures = 0;             // runs that were tried and failed
  int background_load = 0;      // busy threads that ran beside the timed runs
};

// Bytes a transport needs at a point, summed over its ranks, estimated before running it (moedist's from
// moedist::capacity()); and the memory the system has available now (MemAvailable, -1 if unknown).
std::int64_t memory_needed(const std::string& transport, const Point& p, const PointBytes& bytes);
std::int64_t memory_available();

// Runs the sweep. A table per point goes to `out` as the point completes; progress goes to `progress` (a bar
// redrawn in place when progress_tty, else one "[i/N]" line per run).
SweepResult run_sweep(const SweepOptions& options, std::ostream& out, std::ostream& progress, bool progress_tty);

// ---- outputs (report.cpp) ----

// The exact command, the machine, the kernel ISA and the date, for the top of every output.
struct RunInfo {
  std::string command;
  std::string date;
  std::string cpu_model;
  int logical_cpus = 0, usable_cpus = 0;
  double memory_gib = 0;
  std::string kernel;
  std::string isa;  // the row-kernel variant in use, how it was chosen, and what the CPU supports
  std::string version;
  std::string build;
  std::string mpi;  // the MPI that mpi and moedist-mpi run on, why they cannot run, or "not asked for"
  // The machine's own interruptions: one thread times a fixed piece of work (about 10 us, no
  // communication) many times at the start of the run. Its p99 over p50 is what no transport can go below
  // at latencies of that size.
  Stats noise;
};
// `options` says whether and where the MPI baseline runs.
RunInfo collect_run_info(const std::string& command, const SweepOptions& options);

// What each column means; printed at the top of the text output and by `moedist bench --help`.
std::string definitions_text();

void print_header(std::ostream& out, const RunInfo& info, const SweepOptions& options);
void print_point(std::ostream& out, const Point& p, const PointBytes& bytes, const std::vector<ResultRow>& rows,
                 const std::vector<SkipRow>& skipped);

void write_json(const std::string& path, const RunInfo& info, const SweepOptions& options, const SweepResult& result);
void write_csv(const std::string& path, const SweepResult& result);
// Round-trip p50 latency against BS (log-log), a panel per (W, H, K, quant_mode), a line per transport, with
// gnuplot. Returns "" when the PNG was written, else why not.
std::string write_plot(const std::string& png_path, const SweepResult& result);

}  // namespace moedist::bench
