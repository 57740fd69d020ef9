// `moedist bench`: dispatch / combine latency and bandwidth over a grid of shapes and transports, next to an MPI
// baseline and a memcpy floor, with moedist's MPI transport across virtual hosts (bench/sweep.h). Also the hidden `moedist bench-rank DIR`, the body of each rank
// process of the shm transport.
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "commands.h"
#include "sweep.h"

namespace moedist::cli {

namespace {

struct BenchFlags {
  bench::SweepOptions sweep;
  std::string dtype = "bf16";
  bool quick = false;
  bool no_progress = false;
  std::string json, csv, plot;
  std::string grid;
};

// The command line exactly as given (from /proc/self/cmdline), quoted for a POSIX shell where needed.
std::string command_line() {
  std::ifstream f("/proc/self/cmdline", std::ios::binary);
  std::string all((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  std::string out;
  std::size_t start = 0;
  while (start < all.size()) {
    const std::size_t end = all.find('\0', start);
    const std::string arg = all.substr(start, end == std::string::npos ? std::string::npos : end - start);
    const bool plain = !arg.empty() && arg.find_first_not_of(
                                           "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_=,./:+@%") ==
                                           std::string::npos;
    std::string quoted = "'";
    for (char c : arg) quoted += c == '\'' ? std::string("'\\''") : std::string(1, c);
    out += (out.empty() ? "" : " ") + (plain ? arg : quoted + "'");
    if (end == std::string::npos) break;
    start = end + 1;
  }
  return out;
}

std::string self_exe() {
  std::error_code ec;
  const std::filesystem::path p = std::filesystem::read_symlink("/proc/self/exe", ec);
  return ec ? std::string() : p.string();
}

void run_bench(BenchFlags& f, CLI::App* cmd, int* exit_code) {
  bench::SweepOptions& o = f.sweep;
  // --quick: a tiny grid for smoke tests; flags given explicitly still win.
  if (f.quick) {
    const auto unset = [&](const char* name) { return cmd->get_option(name)->count() == 0; };
    if (unset("--ep-world-size")) o.world_sizes = {2};
    if (unset("--bs")) o.bs = {1, 16};
    if (unset("--hidden")) o.hidden = {256};
    if (unset("--topk")) o.topk = {2};
    if (unset("--warmup")) o.run.loop.warmup = 1;
    if (unset("--iters")) o.run.loop.max_iters = 3;
    if (unset("--min-iters")) o.run.loop.min_iters = 3;
  }
  // --grid sets the lists it names (after --quick, which it overrides); naming one of them as well is ambiguous.
  if (!f.grid.empty()) {
    try {
      bench::apply_grid(f.grid, o);
    } catch (const std::invalid_argument& e) {
      throw CLI::ValidationError(e.what());
    }
    bench::SweepOptions named;  // what the grid sets: the lists it leaves empty here are not its
    named.bs.clear();
    named.world_sizes.clear();
    bench::apply_grid(f.grid, named);
    for (const auto& [list, set] :
         {std::pair{"--bs", !named.bs.empty()}, {"--ep-world-size", !named.world_sizes.empty()}}) {
      if (set && cmd->get_option(list)->count() > 0)
        throw CLI::ValidationError(std::string("--grid ") + f.grid + " sets " + bench::grid_description(f.grid) +
                                   "; give " + list + " or the grid, not both");
    }
  }
  // A TP pair needs one expert per MoE rank: --tp-world-size 2 makes that the default of --local-experts.
  if (o.tp_world_size == 2 && cmd->get_option("--local-experts")->count() == 0) o.local_experts = 1;
  o.dtype = f.dtype == "fp16" ? DType::fp16 : DType::bf16;
  const std::string exe = self_exe();
  if (!exe.empty()) {
    o.rank_program = {exe, "bench-rank"};
    o.self_dir = std::filesystem::path(exe).parent_path().string();
  }
  try {
    bench::validate(o);
  } catch (const std::invalid_argument& e) {
    throw CLI::ValidationError(e.what());
  }

  const bench::RunInfo info = bench::collect_run_info(command_line(), o);
  bench::print_header(std::cout, info, o);
  std::cout.flush();
  const bool tty = !f.no_progress && ::isatty(STDERR_FILENO);
  std::ofstream discard;  // a stream in a failed state swallows everything: no progress at all
  std::ostream& progress = f.no_progress ? static_cast<std::ostream&>(discard) : std::cerr;
  const bench::SweepResult result = bench::run_sweep(o, std::cout, progress, tty);

  if (!f.json.empty()) {
    bench::write_json(f.json, info, o, result);
    std::cout << "wrote " << f.json << "\n";
  }
  if (!f.csv.empty()) {
    bench::write_csv(f.csv, result);
    std::cout << "wrote " << f.csv << "\n";
  }
  if (!f.plot.empty()) {
    const std::string why_not = bench::write_plot(f.plot, result);
    if (why_not.empty()) std::cout << "wrote " << f.plot << "\n";
    else std::cout << "skipped the plot: " << why_not << "\n";
  }
  if (result.failures > 0) std::cout << result.failures << " run(s) FAILED (see above)\n";
  std::cout.flush();
  *exit_code = result.failures > 0 ? 1 : 0;
}

}  // namespace

void add_bench(CLI::App& app, int* exit_code) {
  auto flags = std::make_shared<BenchFlags>();
  bench::SweepOptions& o = flags->sweep;
  CLI::App* cmd = app.add_subcommand(
      "bench",
      "Time dispatch, combine and the round trip over a grid of shapes and transports, with an MPI baseline "
      "(MPI_Alltoall + MPI_Alltoallv + a local sort, as a user would write it) and a memcpy floor in the same run. "
      "Prints the command, machine, kernel ISA and date, then a table per grid point: p50/p99/mean latency, "
      "logical and wire GB/s, and each latency relative to the baselines; for moedist over MPI across --hosts virtual "
      "hosts, "
      "also the bytes that crossed between hosts against a flat all-to-all.");
  cmd->footer("Definitions:\n" + bench::definitions_text() +
              "\nA run that would not fit in memory (moedist::capacity() per rank x W, against MemAvailable) is skipped "
              "with a line saying so. Exit status: 0 when every run that was tried succeeded, 1 when one failed, 2 on "
              "an error.");
  std::string targets;
  for (const std::string& name : bench::target_names()) targets += (targets.empty() ? "" : ", ") + name;
  cmd->add_option("--transport", o.transports, "comma list of " + targets)->delimiter(',')->capture_default_str();
  cmd->add_option("--ep-world-size", o.world_sizes, "comma list of W (ranks)")->delimiter(',')->capture_default_str();
  cmd->add_option("--bs", o.bs, "comma list of BS (tokens per rank)")->delimiter(',')->capture_default_str();
  cmd->add_option("--hidden", o.hidden, "comma list of H")->delimiter(',')->capture_default_str();
  cmd->add_option("--topk", o.topk, "comma list of K")->delimiter(',')->capture_default_str();
  cmd->add_option("--quant-mode", o.quant_modes, "comma list of quant_mode (0, 2)")->delimiter(',')->capture_default_str();
  cmd->add_option("--moe-expert-num", o.moe_expert_num,
                  "E for every W (a multiple of each W - S); 0: (W - S) * --local-experts")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--local-experts", o.local_experts, "experts per rank L when --moe-expert-num is 0")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--hosts", o.hosts,
                  "moedist-mpi: virtual hosts the W ranks are split into, ceil(W / hosts) ranks each (1: all on one "
                  "host)")
      ->capture_default_str()
      ->check(CLI::Range(1, 1024));
  cmd->add_option("--shared-expert-rank-num", o.shared_expert_rank_num,
                  "S: EP ranks [0, S) host the shared expert, W - S the E MoE experts (every W a multiple of S, "
                  "larger than it); the mpi baseline refuses S > 0")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--tp-world-size", o.tp_world_size,
                  "T: 2 runs a TP pair per EP rank (W x 2 threads or processes, one expert per MoE rank: "
                  "--local-experts defaults to 1); the mpi baseline refuses 2")
      ->capture_default_str()
      ->check(CLI::IsMember({0, 1, 2}));
  cmd->add_flag("--no-scales", o.no_scales,
                "quant_mode 2 without smooth scales: each token is quantized once for all its experts (needs 2 in "
                "--quant-mode)");
  cmd->add_option("--background-load", o.background_load,
                  "N busy threads (normal priority, spinning) run by the bench while it times every transport, a "
                  "competing load; they stop when the bench ends")
      ->capture_default_str()
      ->check(CLI::Range(0, 1024));
  std::string grids;
  for (const std::string& name : bench::grid_names())
    grids += (grids.empty() ? "" : "; ") + name + ": " + bench::grid_description(name);
  cmd->add_option("--grid", flags->grid,
                  "a named grid that sets the lists it names (" + grids + "); the other options combine with it");
  cmd->add_option("--dtype", flags->dtype, "token dtype")->capture_default_str()->check(CLI::IsMember({"bf16", "fp16"}));
  cmd->add_option("--warmup", o.run.loop.warmup, "untimed iterations per transport and point (at least 1)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--iters", o.run.loop.max_iters, "timed iterations at most")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--min-iters", o.run.loop.min_iters, "timed iterations at least, whatever --max-point-seconds says")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--max-point-seconds", o.run.loop.max_seconds,
                  "time budget of the timed iterations of one transport at one point (sized from the warm-up)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--threads-per-rank", o.run.threads_per_rank,
                  "worker threads of every moedist rank for its row work (GroupOptions::worker_threads; results do not "
                  "depend on it)")
      ->capture_default_str()
      ->check(CLI::Range(1, GroupOptions::kMaxWorkerThreads));
  cmd->add_option("--seed", o.seed, "seed of the inputs and routing")->capture_default_str();
  cmd->add_option("--timeout-ms", o.run.timeout_ms, "longest wait for a peer rank")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_flag("--quick", flags->quick,
                "tiny grid for smoke tests: W 2, BS 1,16, H 256, K 2, 1 warm-up and 3 timed iterations (explicit flags "
                "win)");
  cmd->add_option("--json", flags->json, "also write every number to this JSON file");
  cmd->add_option("--csv", flags->csv, "also write every result row to this CSV file");
  cmd->add_option("--plot", flags->plot,
                  "also draw round-trip p50 latency against BS (log-log), a line per transport, into this PNG (gnuplot)");
  cmd->add_option("--mpi-baseline", o.mpi_baseline,
                  "path of moedist_mpi_baseline, which runs mpi and moedist-mpi (default: the one this build made)");
  cmd->add_flag("--no-progress", flags->no_progress, "no progress output on stderr");
  cmd->callback([flags, cmd, exit_code] { run_bench(*flags, cmd, exit_code); });

  // The body of one rank process of the shm transport; started by `moedist bench` itself.
  auto dir = std::make_shared<std::string>();
  CLI::App* rank = app.add_subcommand("bench-rank", "one rank process of `moedist bench --transport shm` (internal)");
  rank->group("");
  rank->add_option("dir", *dir, "the run's work directory")->required();
  rank->callback([dir, exit_code] { *exit_code = bench::shm_rank_main(*dir); });
}

}  // namespace moedist::cli
