#include "sweep.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <map>
#include <optional>
#include <ostream>
#include <sstream>
#include <stdexcept>

#include "moedist/config.h"
#include "moedist_rank.h"

namespace moedist::bench {

namespace {

bool contains(const std::vector<std::string>& list, const std::string& item) {
  return std::find(list.begin(), list.end(), item) != list.end();
}

bool contains_value(const std::vector<int>& list, int item) {
  return std::find(list.begin(), list.end(), item) != list.end();
}

std::string gb(std::int64_t bytes) {
  std::ostringstream s;
  s.precision(1);
  s << std::fixed << static_cast<double>(bytes) * 1e-9 << " GB";
  return s.str();
}

// Progress on stderr: a bar redrawn in place on a terminal, else a line per run.
class Progress {
 public:
  Progress(std::ostream& os, int total, bool tty) : os_(os), total_(total), tty_(tty) {}

  void begin(const std::string& what) {
    what_ = what;
    if (tty_) {
      draw();
    } else {
      os_ << "[" << done_ + 1 << "/" << total_ << "] " << what << "\n";
      os_.flush();
    }
  }
  void end(int runs = 1) {
    done_ += runs;
    if (tty_) draw();
  }
  // Erases the bar so that other output starts on a clean line.
  void clear() {
    if (tty_) {
      os_ << "\r\033[K";
      os_.flush();
    }
  }

 private:
  void draw() {
    constexpr int kWidth = 30;
    const int filled = total_ > 0 ? done_ * kWidth / total_ : kWidth;
    os_ << "\r\033[K[" << std::string(static_cast<std::size_t>(filled), '#')
        << std::string(static_cast<std::size_t>(kWidth - filled), '.') << "] " << done_ << "/" << total_ << "  "
        << what_;
    os_.flush();
  }

  std::ostream& os_;
  int total_, done_ = 0;
  bool tty_;
  std::string what_;
};

std::vector<ResultRow> rows_of(const std::string& transport, const Point& p, const PointBytes& bytes,
                               const OpSamples& samples) {
  const std::vector<double>* per_op[] = {&samples.dispatch_us, &samples.combine_us, &samples.roundtrip_us};
  const OpBytes op_bytes[] = {bytes.dispatch, bytes.combine, bytes.roundtrip};
  std::vector<ResultRow> rows;
  for (std::size_t i = 0; i < std::size(kOps); ++i) {
    ResultRow r;
    r.transport = transport;
    r.point = p;
    r.op = kOps[i];
    r.stats = summarize(*per_op[i]);
    r.bytes = op_bytes[i];
    if (r.stats.p50_us > 0) {  // bytes per microsecond * 1e-3 = GB/s
      r.logical_gbps = static_cast<double>(r.bytes.logical) / r.stats.p50_us * 1e-3;
      r.wire_gbps = static_cast<double>(r.bytes.wire) / r.stats.p50_us * 1e-3;
    }
    rows.push_back(r);
  }
  return rows;
}

// The target of a name validate() accepted.
const SweepTarget& target_of(const std::string& name) {
  const SweepTarget* target = find_target(name);
  if (target == nullptr) throw std::invalid_argument("--transport: unknown transport '" + name + "'");
  return *target;
}

// The targets that time moedist's own groups: their memory is moedist::capacity() per rank, plus inputs.
bool runs_moedist(const std::string& transport) { return target_of(transport).moedist.has_value(); }

void add_ratios(std::vector<ResultRow>& rows) {
  for (ResultRow& r : rows) {
    for (const ResultRow& base : rows) {
      if (base.op != r.op || base.stats.p50_us <= 0) continue;
      const Baseline baseline = target_of(base.transport).baseline;
      if (baseline == Baseline::mpi_alltoallv) r.x_mpi = r.stats.p50_us / base.stats.p50_us;
      if (baseline == Baseline::memcpy_floor) r.x_floor = r.stats.p50_us / base.stats.p50_us;
    }
  }
}

// "" when the run fits in memory, else the skip reason.
std::string memory_problem(const std::string& transport, const Point& p, const PointBytes& bytes, double fraction) {
  const std::int64_t need = memory_needed(transport, p, bytes);
  const std::int64_t available = memory_available();
  if (available < 0 || static_cast<double>(need) <= fraction * static_cast<double>(available)) return "";
  std::string how =
      runs_moedist(transport) ? " (moedist::capacity() of " + std::to_string(p.W) + " ranks, plus inputs)" : "";
  return "needs about " + gb(need) + how + ", more than " + std::to_string(static_cast<int>(fraction * 100)) +
         "% of the " + gb(available) + " available";
}

}  // namespace

namespace {
SweepTarget moedist_target(TransportId id) {
  const TransportKind& kind = transport_kind(id);
  const bool launched = kind.ranks == RankModel::launcher;
  return {launched ? "moedist-" + std::string(kind.name) : std::string(kind.name), id, Baseline::none, launched};
}
}  // namespace

const std::vector<SweepTarget>& sweep_targets() {
  static const std::vector<SweepTarget> targets = {
      moedist_target(TransportId::inproc),
      moedist_target(TransportId::shm),
      {"mpi", std::nullopt, Baseline::mpi_alltoallv, true},
      moedist_target(TransportId::mpi),
      {"memcpy-floor", std::nullopt, Baseline::memcpy_floor, false},
  };
  return targets;
}

const SweepTarget* find_target(std::string_view name) noexcept {
  for (const SweepTarget& target : sweep_targets()) {
    if (target.name == name) return &target;
  }
  return nullptr;
}

std::vector<std::string> target_names() {
  std::vector<std::string> names;
  for (const SweepTarget& target : sweep_targets()) names.push_back(target.name);
  return names;
}

bool is_mpi_transport(const std::string& transport) {
  const SweepTarget* target = find_target(transport);
  return target != nullptr && target->under_mpirun;
}

namespace {
struct NamedGrid {
  const char* name;
  std::vector<std::int64_t> bs;
  std::vector<int> world_sizes;  // empty: not set by the grid
};
const std::vector<NamedGrid>& named_grids() {
  static const std::vector<NamedGrid> grids = {{"decode", {1, 2, 4, 8, 16, 32, 64, 128}, {}}, {"prefill", {4096}, {2}}};
  return grids;
}
const NamedGrid* find_grid(const std::string& name) {
  for (const NamedGrid& g : named_grids()) {
    if (name == g.name) return &g;
  }
  return nullptr;
}
std::string unknown_grid(const std::string& name) {
  std::string known;
  for (const NamedGrid& g : named_grids()) known += std::string(known.empty() ? "" : ", ") + g.name;
  return "--grid: unknown grid '" + name + "' (known: " + known + ")";
}
template <class T>
std::string comma_list(const std::vector<T>& values) {
  std::string out;
  for (const T& v : values) out += (out.empty() ? "" : ",") + std::to_string(v);
  return out;
}
}  // namespace

void validate(const SweepOptions& o) {
  const auto fail = [](const std::string& what) { throw std::invalid_argument(what); };
  if (o.transports.empty()) fail("--transport: name at least one transport");
  for (const std::string& t : o.transports) {
    if (find_target(t) == nullptr) {
      std::string known;
      for (const std::string& name : target_names()) known += (known.empty() ? "" : ", ") + name;
      fail("--transport: unknown transport '" + t + "' (" + known + ")");
    }
  }
  if (o.world_sizes.empty() || o.bs.empty() || o.hidden.empty() || o.topk.empty() || o.quant_modes.empty())
    fail("every grid list (--ep-world-size, --bs, --hidden, --topk, --quant-mode) needs at least one value");
  for (int w : o.world_sizes) {
    if (w < 1 || w > 1024) fail("--ep-world-size: " + std::to_string(w) + " is not in [1, 1024]");
  }
  for (std::int64_t b : o.bs) {
    if (b < 0) fail("--bs: " + std::to_string(b) + " is negative");
  }
  for (std::int64_t h : o.hidden) {
    if (h < 1) fail("--hidden: " + std::to_string(h) + " is not positive");
  }
  for (int k : o.topk) {
    if (k < 1) fail("--topk: " + std::to_string(k) + " is not positive");
  }
  for (int q : o.quant_modes) {
    if (q != 0 && q != 2) fail("--quant-mode: " + std::to_string(q) + " is not 0 or 2");
  }
  if (o.moe_expert_num < 0) fail("--moe-expert-num: must be positive (or 0 for (W - S) * --local-experts)");
  if (o.local_experts < 1) fail("--local-experts: must be positive");
  if (o.hosts < 1 || o.hosts > 1024) fail("--hosts: " + std::to_string(o.hosts) + " is not in [1, 1024]");
  if (o.run.loop.warmup < 1) fail("--warmup: at least 1 (the timed count is sized from the warm-up)");
  if (o.run.loop.max_iters < 1 || o.run.loop.min_iters < 1) fail("--iters and --min-iters: at least 1");
  if (!(o.run.loop.max_seconds >= 0)) fail("--max-point-seconds: must not be negative");
  if (o.run.timeout_ms < 1) fail("--timeout-ms: must be positive");
  if (o.run.threads_per_rank < 1 || o.run.threads_per_rank > GroupOptions::kMaxWorkerThreads)
    fail("--threads-per-rank: " + std::to_string(o.run.threads_per_rank) + " is not in [1, " +
         std::to_string(GroupOptions::kMaxWorkerThreads) + "]");
  if (!(o.memory_fraction > 0 && o.memory_fraction <= 1)) fail("memory fraction must be in (0, 1]");
  const int S = o.shared_expert_rank_num;
  if (S < 0) fail("--shared-expert-rank-num: " + std::to_string(S) + " is negative");
  for (int w : o.world_sizes) {
    if (S > 0 && (S >= w || w % S != 0))
      fail("--shared-expert-rank-num: " + std::to_string(S) + " does not fit --ep-world-size " + std::to_string(w) +
           " (every W must be larger than S and a multiple of it: ranks [0, S) host the shared expert, W - S the "
           "MoE experts)");
  }
  if (o.tp_world_size < 0 || o.tp_world_size > 2)
    fail("--tp-world-size: " + std::to_string(o.tp_world_size) +
         " is not 0, 1 (no TP domain) or 2 (a TP pair per EP rank)");
  if (o.tp_world_size == 2 && o.moe_expert_num == 0 && o.local_experts != 1)
    fail("--tp-world-size: 2 needs one expert per MoE rank, but --local-experts is " + std::to_string(o.local_experts) +
         " (give --local-experts 1 or --moe-expert-num W - S)");
  if (o.no_scales && !contains_value(o.quant_modes, 2))
    fail("--no-scales: smooth scales exist only with quant_mode 2, and --quant-mode has no 2");
  if (o.background_load < 0 || o.background_load > 1024)
    fail("--background-load: " + std::to_string(o.background_load) + " is not in [0, 1024] (busy threads)");
  if (!o.grid.empty() && find_grid(o.grid) == nullptr) fail(unknown_grid(o.grid));
  // The MPI baseline implements neither shared-expert ranks nor TP: comparing it with them would compare
  // different workloads.
  const auto baseline_lacks = [&](const char* option, const std::string& value, const char* what) {
    fail(std::string(option) + ": " + value + ": the mpi baseline (MPI_Alltoallv) has " + what +
         ", so it would time another workload; leave mpi out of --transport (e.g. --transport "
         "inproc,shm,moedist-mpi,memcpy-floor)");
  };
  if (contains(o.transports, "mpi") && S > 0)
    baseline_lacks("--shared-expert-rank-num", std::to_string(S), "no shared-expert ranks");
  if (contains(o.transports, "mpi") && o.tp_world_size == 2) baseline_lacks("--tp-world-size", "2", "no TP domain");
}

std::vector<std::string> grid_names() {
  std::vector<std::string> names;
  for (const NamedGrid& g : named_grids()) names.emplace_back(g.name);
  return names;
}

std::string grid_description(const std::string& name) {
  const NamedGrid* g = find_grid(name);
  if (g == nullptr) return "";
  return "BS " + comma_list(g->bs) + (g->world_sizes.empty() ? "" : ", W " + comma_list(g->world_sizes));
}

void apply_grid(const std::string& name, SweepOptions& o) {
  const NamedGrid* g = find_grid(name);
  if (g == nullptr) throw std::invalid_argument(unknown_grid(name));
  o.grid = name;
  o.bs = g->bs;
  if (!g->world_sizes.empty()) o.world_sizes = g->world_sizes;
}

std::vector<Point> grid_points(const SweepOptions& o, int W) {
  std::vector<Point> points;
  for (int q : o.quant_modes) {
    for (std::int64_t h : o.hidden) {
      for (int k : o.topk) {
        for (std::int64_t bs : o.bs) {
          Point p;
          p.W = W;
          p.bs = bs;
          p.h = h;
          p.k = k;
          p.S = o.shared_expert_rank_num;
          p.T = o.tp_world_size;
          p.E = o.moe_expert_num > 0 ? o.moe_expert_num : (W - p.S) * o.local_experts;
          p.quant_mode = q;
          p.smooth = !o.no_scales;
          p.dtype = o.dtype;
          p.seed = o.seed;
          points.push_back(p);
        }
      }
    }
  }
  return points;
}

// What moedist::capacity() says the group of global rank g allocates (window and group-owned outputs).
std::int64_t group_bytes_of(const Point& p, int g) {
  const GroupConfig config = group_config(p, g);
  const CapacityQuery query{.bs = p.bs, .k = p.k, .h = p.h, .x_dtype = p.dtype, .quant_mode = p.quant_mode};
  return capacity(config, query).total_bytes;
}

// A MoE rank's (the first one, EP rank S).
std::int64_t group_bytes_per_rank(const Point& p) { return group_bytes_of(p, p.S * p.tp()); }

// Every rank's: S * max(T, 1) shared-expert ranks and the MoE ranks.
std::int64_t group_bytes_total(const Point& p) {
  const std::int64_t moe_ranks = static_cast<std::int64_t>(p.W - p.S) * p.tp();
  return moe_ranks * group_bytes_per_rank(p) +
         (p.S > 0 ? static_cast<std::int64_t>(p.S) * p.tp() * group_bytes_of(p, 0) : 0);
}

std::int64_t memory_needed(const std::string& transport, const Point& p, const PointBytes& bytes) {
  const std::int64_t x = p.bs * p.h * 2, routing = p.bs * p.k * 8;
  const std::int64_t smooth = p.scales() ? (p.E + (p.S > 0 ? 1 : 0)) * p.h * 4 : 0;
  std::int64_t total = 0;
  const SweepTarget& target = target_of(transport);
  if (target.baseline == Baseline::memcpy_floor) {
    for (int r = 0; r < p.ranks(); ++r)
      total += 2 * (bytes.dispatch_per_rank[static_cast<std::size_t>(r)] +
                    bytes.combine_per_rank[static_cast<std::size_t>(r)]);
    return total;
  }
  for (int r = 0; r < p.ranks(); ++r) {
    const std::int64_t received = bytes.received_rows[static_cast<std::size_t>(r)];
    const std::int64_t identity = p.quant_mode == 2 ? received * p.tp() * 2 * p.h : 0;  // T = 2: the peer's rows too
    total += x + routing + smooth + identity;
    if (target.baseline == Baseline::mpi_alltoallv) {
      // send, receive and sorted dispatch rows; expert outputs sent back and received; combine output
      total += bytes.dispatch_per_rank[static_cast<std::size_t>(r)] + 2 * received * dispatch_row_bytes(p) +
               received * 2 * p.h + bytes.combine_per_rank[static_cast<std::size_t>(r)] + x;
    }
  }
  if (runs_moedist(transport)) total += group_bytes_total(p);
  if (target.moedist == TransportId::mpi) {
    // The messages between hosts: what a rank sends to other hosts and what it receives from them, each bounded
    // by its dispatch bytes.
    for (int r = 0; r < p.ranks(); ++r) total += 2 * bytes.dispatch_per_rank[static_cast<std::size_t>(r)];
  }
  return total;
}

std::int64_t memory_available() {
  std::ifstream meminfo("/proc/meminfo");
  std::string key;
  std::int64_t kib = 0;
  std::string unit;
  while (meminfo >> key >> kib >> unit) {
    if (key == "MemAvailable:") return kib * 1024;
  }
  return -1;
}

namespace {

// An MPI transport (mpi: the baseline; moedist-mpi: moedist over MPI) at every usable point of one W: one mpirun
// for all the points that fit in memory. Entries stay empty for unusable points.
std::vector<std::optional<RunOutcome>> run_mpi_for(const std::string& transport, const SweepOptions& o,
                                                   const MpiTools& tools, const std::string& unavailable,
                                                   const std::vector<Point>& points,
                                                   const std::vector<std::string>& problems,
                                                   const std::vector<PointBytes>& bytes, Progress& progress,
                                                   std::string* library) {
  std::vector<std::optional<RunOutcome>> outcomes(points.size());
  std::vector<Point> batch;
  std::vector<std::size_t> index;
  for (std::size_t i = 0; i < points.size(); ++i) {
    if (!problems[i].empty()) continue;
    RunOutcome skip;
    skip.tried = false;
    skip.error = unavailable.empty() ? memory_problem(transport, points[i], bytes[i], o.memory_fraction) : unavailable;
    if (skip.error.empty()) {
      batch.push_back(points[i]);
      index.push_back(i);
    } else {
      outcomes[i] = skip;
      progress.end();
    }
  }
  if (batch.empty()) return outcomes;
  MpiImpl impl;
  if (target_of(transport).moedist.has_value()) {
    impl.impl = "moedist";
    impl.hosts = o.hosts;
  }
  progress.begin(transport + " " + describe(batch.front()) + " (one mpirun for " + std::to_string(batch.size()) +
                 " points)");
  run_mpi_points(
      tools, impl, batch, o.run,
      [&](std::size_t i, RunOutcome outcome) {
        outcomes[index[i]] = std::move(outcome);
        progress.end();
        if (i + 1 < batch.size()) progress.begin(transport + " " + describe(batch[i + 1]));
      },
      library);
  return outcomes;
}

// One of the transports that run in or from this process, unless the point would not fit in memory.
RunOutcome run_local(const std::string& transport, const Point& p, const PointBytes& bytes, const SweepOptions& o,
                     Progress& progress) {
  RunOutcome outcome;
  outcome.error = memory_problem(transport, p, bytes, o.memory_fraction);
  outcome.tried = outcome.error.empty();
  if (outcome.tried) {
    progress.begin(transport + " " + describe(p));
    const SweepTarget& target = target_of(transport);
    if (target.moedist == TransportId::inproc)
      outcome = run_inproc(p, o.run);
    else if (target.moedist == TransportId::shm)
      outcome = run_shm(p, o.run, o.rank_program);
    else
      outcome = run_memcpy_floor(p, o.run);
  }
  progress.end();
  return outcome;
}

}  // namespace

SweepResult run_sweep(const SweepOptions& o, std::ostream& out, std::ostream& progress_stream, bool progress_tty) {
  validate(o);
  SweepResult result;
  // The competing load runs from here until the sweep returns or throws (its destructor stops it).
  const BackgroundLoad load(o.background_load);
  result.background_load = load.threads();
  MpiTools tools;
  std::vector<std::string> mpi_transports;  // the MPI transports asked for, in the order they run
  for (const std::string& t : o.transports) {
    if (is_mpi_transport(t) && !contains(mpi_transports, t)) mpi_transports.push_back(t);
  }
  if (!mpi_transports.empty()) {
    result.mpi_unavailable = find_mpi_tools(o.mpi_baseline, o.self_dir, &tools);
    if (!result.mpi_unavailable.empty()) {
      std::string names;
      for (const std::string& t : mpi_transports) names += (names.empty() ? "" : ", ") + t;
      out << "skipped " << names << ": " << result.mpi_unavailable << "\n\n";
    }
  }

  int total = 0;
  for (int W : o.world_sizes) total += static_cast<int>(grid_points(o, W).size() * o.transports.size());
  Progress progress(progress_stream, total, progress_tty);

  for (int W : o.world_sizes) {
    const std::vector<Point> points = grid_points(o, W);
    std::vector<std::string> problems;
    std::vector<PointBytes> bytes(points.size());
    for (std::size_t i = 0; i < points.size(); ++i) {
      problems.push_back(point_problem(points[i]));
      if (problems.back().empty()) bytes[i] = count_bytes(points[i]);
    }
    // The MPI transports first (one mpirun each for all the points), so that their numbers are there when each
    // point's table is printed.
    std::map<std::string, std::vector<std::optional<RunOutcome>>> mpi;
    for (const std::string& t : mpi_transports)
      mpi[t] = run_mpi_for(t, o, tools, result.mpi_unavailable, points, problems, bytes, progress, &result.mpi_library);

    for (std::size_t i = 0; i < points.size(); ++i) {
      const Point& p = points[i];
      std::vector<ResultRow> rows;
      std::vector<SkipRow> skipped;
      if (!problems[i].empty()) {
        skipped.push_back({"*", p, problems[i], false});
        progress.end(static_cast<int>(o.transports.size()));
      }
      for (const std::string& t : problems[i].empty() ? o.transports : std::vector<std::string>()) {
        const RunOutcome outcome =
            is_mpi_transport(t) ? mpi[t][i].value_or(RunOutcome{}) : run_local(t, p, bytes[i], o, progress);
        if (outcome.ok) {
          for (ResultRow& r : rows_of(t, p, bytes[i], outcome.samples)) {
            r.peak_rss_bytes = outcome.peak_rss_bytes;
            if (target_of(t).moedist.has_value() && !target_of(t).under_mpirun)
              r.predicted_bytes = group_bytes_per_rank(p);
            r.between_hosts = outcome.between_hosts;
            if (target_of(t).moedist.has_value() || target_of(t).baseline == Baseline::memcpy_floor)
              r.threads_per_rank = o.run.threads_per_rank;
            rows.push_back(std::move(r));
          }
        } else if (!(is_mpi_transport(t) &&
                     !result.mpi_unavailable.empty())) {  // MPI's absence was said once, at the top
          skipped.push_back({t, p, outcome.error, outcome.tried});
          if (outcome.tried) ++result.failures;
        }
      }
      add_ratios(rows);
      progress.clear();
      print_point(out, p, bytes[i], rows, skipped);
      out.flush();
      result.rows.insert(result.rows.end(), rows.begin(), rows.end());
      result.skipped.insert(result.skipped.end(), skipped.begin(), skipped.end());
    }
  }
  progress.clear();
  return result;
}

}  // namespace moedist::bench
