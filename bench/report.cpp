// The outputs of `moedist bench`: header, per-point tables, JSON, CSV and the gnuplot plot.
#include <sched.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <ostream>
#include <set>
#include <sstream>
#include <stdexcept>
#include <tuple>
#include <utility>

#include "kernels/row_kernels.h"
#include "moedist/version.h"
#include "sweep.h"

#ifndef MOEDIST_BENCH_BUILD_TYPE
#define MOEDIST_BENCH_BUILD_TYPE "unknown"
#endif

namespace moedist::bench {

namespace {

std::string fixed(double v, int decimals) {
  if (std::isnan(v)) return "-";
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", decimals, v);
  return buf;
}

// Latencies keep 3 significant digits at least, without exponent notation.
std::string micros(double us) { return fixed(us, us < 10 ? 2 : us < 100 ? 1 : 0); }

std::string megabytes(std::int64_t bytes) { return fixed(static_cast<double>(bytes) * 1e-6, 3) + " MB"; }

const char* dtype_text(DType d) { return d == DType::fp16 ? "fp16" : "bf16"; }

std::string cpu_model() {
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line;
  while (std::getline(cpuinfo, line)) {
    if (line.rfind("model name", 0) == 0) {
      const std::size_t colon = line.find(':');
      if (colon != std::string::npos) return line.substr(line.find_first_not_of(" \t", colon + 1));
    }
  }
  return "unknown";
}

std::string isa_description() {
  using kernels::Isa;
  std::string supported;
  for (Isa isa : {Isa::scalar, Isa::avx2, Isa::avx512}) {
    if (kernels::isa_supported(isa)) supported += std::string(supported.empty() ? "" : " ") + kernels::isa_name(isa);
  }
  const char* forced = std::getenv("MOEDIST_KERNELS");
  return std::string(kernels::isa_name(kernels::active_isa())) + " (" +
         (forced ? std::string("MOEDIST_KERNELS=") + forced : std::string("chosen at run time")) +
         "; the CPU supports: " + supported + ")";
}

nlohmann::json point_json(const Point& p) {
  return {{"W", p.W},
          {"BS", p.bs},
          {"H", p.h},
          {"K", p.k},
          {"E", p.E},
          {"S", p.S},
          {"T", p.T},
          {"ranks", p.ranks()},
          {"quant_mode", p.quant_mode},
          {"smooth_scales", p.scales()},
          {"dtype", dtype_text(p.dtype)}};
}

// "2 hosts of 2 ranks", "3 hosts of 3 ranks (the last of 2)", "1 host of 4 ranks"
std::string host_layout(int W, const BetweenHosts& b) {
  const auto count = [](int n, const char* one, const char* many) {
    return std::to_string(n) + " " + (n == 1 ? one : many);
  };
  std::string s = count(b.hosts, "host", "hosts") + " of " + count(b.ranks_per_host, "rank", "ranks");
  const int last = W - (b.hosts - 1) * b.ranks_per_host;
  if (last != b.ranks_per_host) s += " (the last of " + std::to_string(last) + ")";
  return s;
}

// "1.234 MB node-aware vs 2.345 MB flat all-to-all (0.53x)"
std::string node_aware_vs_flat(std::int64_t node_aware, std::int64_t flat) {
  return megabytes(node_aware) + " node-aware vs " + megabytes(flat) + " flat all-to-all (" +
         (flat > 0 ? fixed(static_cast<double>(node_aware) / static_cast<double>(flat), 2) + "x" : std::string("-")) +
         ")";
}

nlohmann::json number_or_null(double v) { return std::isnan(v) ? nlohmann::json(nullptr) : nlohmann::json(v); }

// Times a fixed loop of dependent multiplies, sized to about 10 us, `iters` times (see RunInfo::noise).
Stats measure_noise(int iters) {
  using Clock = std::chrono::steady_clock;
  volatile float sink = 1.0f;
  const auto work = [&sink](long n) {
    float x = sink;
    for (long i = 0; i < n; ++i) x = x * 1.0000001f + 1e-9f;
    sink = x;
  };
  const auto us = [](Clock::time_point a, Clock::time_point b) {
    return std::chrono::duration<double, std::micro>(b - a).count();
  };
  long n = 1000;  // calibrate: grow until one piece takes about 10 us
  for (;;) {
    const auto t0 = Clock::now();
    work(n);
    const double took = us(t0, Clock::now());
    if (took >= 10.0 || n > (1L << 30)) break;
    n = took <= 0.5 ? n * 8 : static_cast<long>(static_cast<double>(n) * 10.0 / took) + 1;
  }
  std::vector<double> samples;
  samples.reserve(static_cast<std::size_t>(iters));
  for (int i = 0; i < iters; ++i) {
    const auto t0 = Clock::now();
    work(n);
    samples.push_back(us(t0, Clock::now()));
  }
  return summarize(std::move(samples));
}

// A string for gnuplot's single quotes, where '' stands for '.
std::string gnuplot_quoted(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("''") : std::string(1, c);
  return out + "'";
}

}  // namespace

RunInfo collect_run_info(const std::string& command, const SweepOptions& options) {
  RunInfo info;
  if (std::none_of(options.transports.begin(), options.transports.end(), is_mpi_transport)) {
    info.mpi = "not asked for";
  } else {
    MpiTools tools;
    const std::string why_not = find_mpi_tools(options.mpi_baseline, options.self_dir, &tools);
    info.mpi = why_not.empty() ? describe_mpi(tools) : "unavailable: " + why_not;
  }
  info.command = command;
  char date[64];
  const std::time_t now = std::time(nullptr);
  std::tm local{};
  localtime_r(&now, &local);
  std::strftime(date, sizeof date, "%Y-%m-%d %H:%M:%S %z", &local);
  info.date = date;
  info.cpu_model = cpu_model();
  info.logical_cpus = static_cast<int>(::sysconf(_SC_NPROCESSORS_ONLN));
  cpu_set_t set;
  CPU_ZERO(&set);
  info.usable_cpus = ::sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set) : info.logical_cpus;
  info.memory_gib = static_cast<double>(::sysconf(_SC_PHYS_PAGES)) * static_cast<double>(::sysconf(_SC_PAGE_SIZE)) /
                    (1024.0 * 1024.0 * 1024.0);
  utsname u{};
  if (::uname(&u) == 0) info.kernel = std::string(u.sysname) + " " + u.release + " " + u.machine;
  info.isa = isa_description();
  info.noise = measure_noise(2000);
  info.version = version_string();
  info.build = std::string(MOEDIST_BENCH_BUILD_TYPE) + ", " +
#if defined(__clang__)
               "clang " __clang_version__;
#elif defined(__GNUC__)
               "GCC " __VERSION__;
#else
               "unknown compiler";
#endif
  return info;
}

std::string definitions_text() {
  // clang-format off
  return
      "  latency       per iteration every rank leaves an untimed barrier and times its own call; the iteration's\n"
      "                latency is the slowest rank's (the operation ends when the last rank ends). p50 / p99 are\n"
      "                nearest-rank percentiles over the timed iterations (below 100 iterations p99 is the maximum);\n"
      "                mean is their arithmetic mean.\n"
      "                The count exchange and everything else the call does is inside the timed region.\n"
      "  roundtrip     dispatch, identity experts, combine: one span per rank, with no barrier in between. The\n"
      "                identity experts cost nothing: combine gets dispatch's expand_x (quant 0) or a dequantized\n"
      "                copy of it made before timing (quant 2) - for moedist written into Group::combine_buffer(),\n"
      "                where an engine's experts would write, for MPI into an ordinary buffer.\n"
      "  logical GB/s  sum over ranks of one row per (token, expert), times the row bytes, divided by the p50\n"
      "                latency; GB = 1e9 bytes.\n"
      "  wire GB/s     the same with one row per (token, destination rank): the experts of a token that live on\n"
      "                one rank count once; rows a rank sends to itself count.\n"
      "  row bytes     dispatch: H bytes + 4 (the fp32 dynamic scale) with quant 2, 2H bytes with quant 0;\n"
      "                combine: 2H (the bf16/fp16 expert output); roundtrip: both.\n"
      "  x mpi/floor   p50 latency divided by the p50 of the mpi baseline / the memcpy floor at the same point and\n"
      "                operation (below 1: faster than it).\n"
      "  inproc        moedist, ranks as threads of this process.\n"
      "  shm           moedist, ranks as processes (moedist::launch), rows written straight into shared windows.\n"
      "  mpi           baseline: MPI_Alltoall of the counts, MPI_Alltoallv of the rows (and scales), a local sort\n"
      "                into expert-major order; the reverse and the weighted sum for combine (bench/mpi_baseline.h;\n"
      "                mpirun --oversubscribe --bind-to none).\n"
      "  moedist-mpi   moedist over MPI (moedist::join_mpi) under mpirun, as mpi: the ranks in --hosts virtual hosts\n"
      "                of ceil(W / hosts) ranks each, shared memory within a host and MPI messages between hosts, a\n"
      "                token crossing to each remote host once, to a proxy rank there that fans it out.\n"
      "  between hosts moedist-mpi: the bytes all ranks sent to other hosts in one dispatch (the tokens, once per\n"
      "                remote host, with their destinations) and one combine (the requests, and the rows carried back),\n"
      "                against what a flat all-to-all sending every row to its destination rank would send.\n"
      "  memcpy-floor  baseline: the logical bytes of every rank memcpy'd, nothing else, by min(ranks x threads\n"
      "                per rank, usable CPUs) threads at once, back to back where pieces outnumber threads; with\n"
      "                --threads-per-rank N a rank's bytes are cut into N pieces while there are cores for them.\n"
      "  workload      E = (W - S) x L experts (L = --local-experts unless --moe-expert-num), uniform random\n"
      "                top-K routing; inputs are random but the same for every transport.\n"
      "  S             --shared-expert-rank-num: EP ranks [0, S) host the shared expert; every token also sends\n"
      "                one row to a shared rank (the V1 split), counted as one more (token, expert) and (token,\n"
      "                rank). The mpi baseline has no shared experts: it refuses S > 0.\n"
      "  T             --tp-world-size 2: a TP pair per EP rank, W x 2 ranks (threads or processes), each with\n"
      "                its own tokens; one expert per MoE rank; bytes are summed over all W x 2 ranks. The mpi\n"
      "                baseline has no TP domain: it refuses T = 2.\n"
      "  no-scales     --no-scales: quant 2 without smooth scales, so each token is quantized once and the same\n"
      "                int8 row goes to all its experts (with scales: once per expert); row bytes are the same.\n"
      "  background    --background-load N: N busy threads of the bench process spin at normal priority while\n"
      "                every transport is timed, a competing load for all of them.\n";
  // clang-format on
}

void print_header(std::ostream& out, const RunInfo& info, const SweepOptions& o) {
  out << "moedist bench (moedist " << info.version << ")\n"
      << "command   : " << info.command << "\n"
      << "date      : " << info.date << "\n"
      << "machine   : " << info.cpu_model << "; " << info.logical_cpus << " logical CPUs (" << info.usable_cpus
      << " usable); " << fixed(info.memory_gib, 1) << " GiB RAM; " << info.kernel << "\n"
      << "kernels   : " << info.isa << "\n"
      << "build     : " << info.build << "\n"
      << "mpi       : " << info.mpi << "\n"
      << "noise     : a fixed piece of work without communication, timed " << info.noise.iters
      << " times on one thread at the start: p50 " << fixed(info.noise.p50_us, 1) << " us, mean "
      << fixed(info.noise.mean_us, 1) << ", p99 " << fixed(info.noise.p99_us, 1) << ", max "
      << fixed(info.noise.max_us, 1) << " (the machine's own interruptions)\n"
      << "timing    : " << o.run.loop.warmup << " warm-up iterations, then up to " << o.run.loop.max_iters
      << " timed iterations or " << o.run.loop.max_seconds << " s per transport and point (at least "
      << o.run.loop.min_iters << ")\n"
      << "workload  : S = " << o.shared_expert_rank_num << " shared-expert ranks; T = " << o.tp_world_size
      << (o.tp_world_size == 2 ? " (a TP pair per EP rank: W x 2 ranks)" : " (no TP domain)") << "; quant 2 "
      << (o.no_scales ? "without smooth scales (--no-scales)" : "with smooth scales") << "; grid "
      << (o.grid.empty() ? std::string("from the lists") : o.grid + " (" + grid_description(o.grid) + ")") << "\n"
      << "load      : "
      << (o.background_load > 0
              ? std::to_string(o.background_load) + " busy threads beside every timed run (--background-load)"
              : std::string("none besides the bench"))
      << "\n"
      << "threads   : " << o.run.threads_per_rank << " per moedist rank (GroupOptions::worker_threads)\n"
      << "definitions:\n"
      << definitions_text() << "\n";
}

void print_point(std::ostream& out, const Point& p, const PointBytes& bytes, const std::vector<ResultRow>& rows,
                 const std::vector<SkipRow>& skipped) {
  out << "== " << describe(p);
  if (skipped.empty() || skipped.front().transport != "*") {
    out << "  (logical: dispatch " << megabytes(bytes.dispatch.logical) << ", combine "
        << megabytes(bytes.combine.logical) << "; wire: dispatch " << megabytes(bytes.dispatch.wire) << ", combine "
        << megabytes(bytes.combine.wire) << ")";
  }
  out << "\n";
  if (!rows.empty()) {
    char line[256];
    std::snprintf(line, sizeof line, "%-13s %-10s %6s %10s %10s %10s %13s %10s %7s %8s\n", "transport", "op", "iters",
                  "p50 us", "p99 us", "mean us", "logical GB/s", "wire GB/s", "x mpi", "x floor");
    out << line;
    for (const ResultRow& r : rows) {
      std::snprintf(line, sizeof line, "%-13s %-10s %6d %10s %10s %10s %13s %10s %7s %8s\n", r.transport.c_str(),
                    r.op.c_str(), r.stats.iters, micros(r.stats.p50_us).c_str(), micros(r.stats.p99_us).c_str(),
                    micros(r.stats.mean_us).c_str(), fixed(r.logical_gbps, 2).c_str(), fixed(r.wire_gbps, 2).c_str(),
                    fixed(r.x_mpi, 2).c_str(), fixed(r.x_floor, 2).c_str());
      out << line;
    }
  }
  for (const ResultRow& r : rows) {  // once per transport that measured its memory
    if (r.op != "roundtrip" || r.peak_rss_bytes < 0) continue;
    out << "memory        " << r.transport << " rank process peak RSS " << megabytes(r.peak_rss_bytes)
        << "; moedist size predicts " << megabytes(r.predicted_bytes)
        << " for its group (window + outputs), plus the bench's inputs and the process itself\n";
  }
  for (const ResultRow& r : rows) {  // once per transport that measured its bytes between hosts
    if (r.op != "roundtrip" || r.between_hosts.hosts <= 0) continue;
    out << "between hosts " << host_layout(r.point.ranks(), r.between_hosts) << ": dispatch "
        << node_aware_vs_flat(r.between_hosts.dispatch, r.between_hosts.dispatch_flat) << ", combine "
        << node_aware_vs_flat(r.between_hosts.combine, r.between_hosts.combine_flat) << "\n";
  }
  for (const SkipRow& s : skipped) {
    out << (s.failed ? "FAILED " : "skipped ") << (s.transport == "*" ? std::string("point") : s.transport) << ": "
        << s.reason << "\n";
  }
  out << "\n";
}

void write_json(const std::string& path, const RunInfo& info, const SweepOptions& o, const SweepResult& result) {
  nlohmann::json j;
  j["info"] = {{"command", info.command},
               {"date", info.date},
               {"moedist_version", info.version},
               {"build", info.build},
               {"cpu_model", info.cpu_model},
               {"logical_cpus", info.logical_cpus},
               {"usable_cpus", info.usable_cpus},
               {"memory_gib", info.memory_gib},
               {"kernel", info.kernel},
               {"kernels_isa", info.isa},
               {"mpi", info.mpi},
               {"noise",
                {{"iters", info.noise.iters},
                 {"p50_us", info.noise.p50_us},
                 {"mean_us", info.noise.mean_us},
                 {"p99_us", info.noise.p99_us},
                 {"max_us", info.noise.max_us}}},
               {"mpi_library", result.mpi_library},
               {"mpi_unavailable", result.mpi_unavailable}};
  j["settings"] = {{"transports", o.transports},
                   {"warmup", o.run.loop.warmup},
                   {"max_iters", o.run.loop.max_iters},
                   {"min_iters", o.run.loop.min_iters},
                   {"max_point_seconds", o.run.loop.max_seconds},
                   {"seed", o.seed},
                   {"local_experts", o.local_experts},
                   {"hosts", o.hosts},
                   {"moe_expert_num", o.moe_expert_num},
                   {"shared_expert_rank_num", o.shared_expert_rank_num},
                   {"tp_world_size", o.tp_world_size},
                   {"no_scales", o.no_scales},
                   {"background_load", result.background_load},
                   {"grid", o.grid},
                   {"bs", o.bs},
                   {"world_sizes", o.world_sizes},
                   {"threads_per_rank", o.run.threads_per_rank}};
  j["definitions"] = definitions_text();
  j["results"] = nlohmann::json::array();
  for (const ResultRow& r : result.rows) {
    nlohmann::json row = point_json(r.point);
    row["transport"] = r.transport;
    row["op"] = r.op;
    row["iters"] = r.stats.iters;
    row["p50_us"] = r.stats.p50_us;
    row["p99_us"] = r.stats.p99_us;
    row["mean_us"] = r.stats.mean_us;
    row["min_us"] = r.stats.min_us;
    row["max_us"] = r.stats.max_us;
    row["logical_bytes"] = r.bytes.logical;
    row["wire_bytes"] = r.bytes.wire;
    row["logical_gbps"] = r.logical_gbps;
    row["wire_gbps"] = r.wire_gbps;
    row["x_mpi"] = number_or_null(r.x_mpi);
    row["x_floor"] = number_or_null(r.x_floor);
    if (r.peak_rss_bytes >= 0) row["peak_rss_bytes"] = r.peak_rss_bytes;
    if (r.predicted_bytes >= 0) row["predicted_group_bytes"] = r.predicted_bytes;
    if (r.threads_per_rank > 0) row["threads_per_rank"] = r.threads_per_rank;
    if (r.between_hosts.hosts > 0) {
      const BetweenHosts& b = r.between_hosts;
      row["between_hosts"] = {{"hosts", b.hosts},       {"ranks_per_host", b.ranks_per_host},
                              {"dispatch", b.dispatch}, {"dispatch_flat", b.dispatch_flat},
                              {"combine", b.combine},   {"combine_flat", b.combine_flat}};
    }
    j["results"].push_back(row);
  }
  j["skipped"] = nlohmann::json::array();
  for (const SkipRow& s : result.skipped) {
    nlohmann::json row = point_json(s.point);
    row["transport"] = s.transport;
    row["reason"] = s.reason;
    row["failed"] = s.failed;
    j["skipped"].push_back(row);
  }
  std::ofstream f(path);
  f << j.dump(2) << "\n";
  if (!f) throw std::runtime_error("cannot write " + path);
}

void write_csv(const std::string& path, const SweepResult& result) {
  std::ofstream f(path);
  f << "transport,W,BS,H,K,E,quant_mode,dtype,op,iters,p50_us,p99_us,mean_us,min_us,max_us,logical_bytes,wire_bytes,"
       "logical_gbps,wire_gbps,x_mpi,x_floor,hosts,ranks_per_host,dispatch_bytes_between_hosts,"
       "dispatch_bytes_between_hosts_flat,combine_bytes_between_hosts,combine_bytes_between_hosts_flat,S,T,ranks,"
       "smooth_scales,background_load,threads_per_rank\n";
  const auto num = [](double v) {
    if (std::isnan(v)) return std::string();
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.6g", v);
    return std::string(buf);
  };
  for (const ResultRow& r : result.rows) {
    const Point& p = r.point;
    f << r.transport << "," << p.W << "," << p.bs << "," << p.h << "," << p.k << "," << p.E << "," << p.quant_mode
      << "," << dtype_text(p.dtype) << "," << r.op << "," << r.stats.iters << "," << num(r.stats.p50_us) << ","
      << num(r.stats.p99_us) << "," << num(r.stats.mean_us) << "," << num(r.stats.min_us) << "," << num(r.stats.max_us)
      << "," << r.bytes.logical << "," << r.bytes.wire << "," << num(r.logical_gbps) << "," << num(r.wire_gbps) << ","
      << num(r.x_mpi) << "," << num(r.x_floor);
    const BetweenHosts& b = r.between_hosts;
    if (b.hosts > 0) {
      f << "," << b.hosts << "," << b.ranks_per_host << "," << b.dispatch << "," << b.dispatch_flat << "," << b.combine
        << "," << b.combine_flat;
    } else {
      f << ",,,,,,";  // not measured: a transport with one host
    }
    f << "," << p.S << "," << p.T << "," << p.ranks() << "," << (p.scales() ? 1 : 0) << "," << result.background_load
      << ",";
    if (r.threads_per_rank > 0) f << r.threads_per_rank;  // empty for the baselines
    f << "\n";
  }
  if (!f) throw std::runtime_error("cannot write " + path);
}

std::string write_plot(const std::string& png_path, const SweepResult& result) {
  const std::string gnuplot = find_in_path("gnuplot");
  if (gnuplot.empty()) return "gnuplot is not in PATH (Debian: gnuplot-nox)";

  // A panel per (W, H, K, E, quant, dtype); in each, BS -> round-trip p50 per transport (log axes: BS >= 1).
  using PanelKey = std::tuple<int, std::int64_t, int, int, int, int>;
  std::map<PanelKey, std::map<std::string, std::map<std::int64_t, double>>> panels;
  for (const ResultRow& r : result.rows) {
    if (r.op != "roundtrip" || r.point.bs < 1) continue;
    const Point& p = r.point;
    panels[{p.W, p.h, p.k, p.E, p.quant_mode, static_cast<int>(p.dtype)}][r.transport][p.bs] = r.stats.p50_us;
  }
  if (panels.empty()) return "no round-trip results with BS >= 1 to plot";

  const WorkDir dir("moedist-plot");
  const std::string data_path = dir.path() + "/data", script_path = dir.path() + "/plot.gp";

  // gnuplot-nox has pngcairo; the plain png terminal is the fallback.
  std::string probe_err;
  const int probe = run_program({gnuplot, "-e", "set terminal pngcairo"}, {}, nullptr, &probe_err);
  const bool cairo = WIFEXITED(probe) && WEXITSTATUS(probe) == 0 && probe_err.find("unknown") == std::string::npos;

  std::ofstream data(data_path);
  std::ostringstream plots;
  int block = 0;
  for (const auto& [key, transports] : panels) {
    const auto& [W, H, K, E, quant, dtype] = key;
    plots << "set title "
          << gnuplot_quoted("W=" + std::to_string(W) + " H=" + std::to_string(H) + " K=" + std::to_string(K) +
                            " E=" + std::to_string(E) + " quant=" + std::to_string(quant) + " " +
                            dtype_text(static_cast<DType>(dtype)))
          << "\nplot ";
    bool first = true;
    for (const auto& [transport, series] : transports) {
      data << "# " << transport << "\n";
      for (const auto& [bs, us] : series) data << bs << " " << us << "\n";
      data << "\n\n";
      plots << (first ? "" : ", ") << gnuplot_quoted(data_path) << " index " << block
            << " using 1:2 with linespoints title " << gnuplot_quoted(transport);
      first = false;
      ++block;
    }
    plots << "\n";
  }
  data.close();
  const int n = static_cast<int>(panels.size());
  const int cols = n == 1 ? 1 : n <= 4 ? 2 : n <= 9 ? 3 : 4;
  const int rows = (n + cols - 1) / cols;
  std::ofstream script(script_path);
  script << "set terminal " << (cairo ? "pngcairo" : "png") << " size " << cols * 560 << "," << rows * 420 << "\n"
         << "set output " << gnuplot_quoted(png_path) << "\n"
         << "set logscale xy\nset grid\nset key top left Left reverse\n"
         << "set xlabel 'BS (tokens per rank)'\nset ylabel 'round trip p50 (us)'\n"
         << "set multiplot layout " << rows << "," << cols << " title 'moedist bench: round-trip p50 latency'\n"
         << plots.str() << "unset multiplot\n";
  script.close();
  std::string err;
  const int status = run_program({gnuplot, script_path}, {}, nullptr, &err);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) return "gnuplot failed: " + err;
  return "";
}

}  // namespace moedist::bench
