// `moedist demo`: a whole MoE layer over N ranks, checked against a dense computation (demo_layer.h).
//
// With --transport shm every rank is a process of this binary, started through moedist::launch with the
// parent's own flags plus --shm-worker-dir DIR. Each worker runs its rank (demo::run_shm_rank) and writes its
// record to DIR (casefile::run_rank_worker); the parent reads the records back and checks them as the
// in-process demo does.
#include <charconv>
#include <cstdint>
#include <cstdio>
#include <iostream>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "casefile/case_file.h"
#include "casefile/safetensors.h"
#include "commands.h"
#include "demo_layer.h"
#include "moedist/error.h"
#ifdef MOEDIST_HAVE_MPI
#include "common/format.h"
#include "mpi_ranks.h"
#endif

namespace moedist::cli {

namespace {

constexpr const char* kWorkerFlag = "--shm-worker-dir";

struct DemoFlags {
  demo::DemoOptions options;
  bool no_scales = false;
  std::string dtype = "bf16";
  std::string profile = "portable";
  std::string fault = "none";
  std::string op = "v1";
  std::string worker_dir;  // set (by the parent) in the rank processes of --transport shm
};

demo::DemoOptions resolve(const DemoFlags& flags) {
  demo::DemoOptions o = flags.options;
  o.smooth_scales = !flags.no_scales;
  o.dtype = flags.dtype == "fp16" ? DType::fp16 : DType::bf16;
  // The CLI11 checks below already limit these names to valid ones.
  profile_from_name(flags.profile.c_str(), &o.profile);
  demo::fault_from_name(flags.fault, &o.fault);
  o.op = flags.op == "v2" ? 2 : 1;
  return o;
}

// A rank record as a worker hands it to the parent: a safetensors file with its tensors, and its timings and
// row counts as metadata (doubles printed with 17 significant digits, so they come back exactly).
using demo::RankRecord;
constexpr std::pair<const char*, Tensor RankRecord::*> kRecordTensors[] = {
    {"x", &RankRecord::x}, {"expert_ids", &RankRecord::expert_ids}, {"expert_scales", &RankRecord::expert_scales},
    {"out", &RankRecord::out}};
constexpr std::pair<const char*, double RankRecord::*> kRecordTimes[] = {
    {"setup_ms", &RankRecord::setup_ms},       {"route_ms", &RankRecord::route_ms},
    {"dispatch_ms", &RankRecord::dispatch_ms}, {"experts_ms", &RankRecord::experts_ms},
    {"combine_ms", &RankRecord::combine_ms}};
constexpr std::pair<const char*, std::int64_t RankRecord::*> kRecordCounts[] = {
    {"valid_rows", &RankRecord::valid_rows}, {"rows_sent", &RankRecord::rows_sent}};

void write_record(const std::string& path, const RankRecord& record) {
  casefile::SafetensorsWriter writer;
  for (const auto& [name, field] : kRecordTensors) writer.add(name, record.*field);
  char text[32];
  for (const auto& [name, field] : kRecordTimes) {
    std::snprintf(text, sizeof text, "%.17g", record.*field);
    writer.set_metadata(name, text);
  }
  for (const auto& [name, field] : kRecordCounts) writer.set_metadata(name, std::to_string(record.*field));
  writer.write(path);
}

RankRecord read_record(const std::string& path) {
  const casefile::SafetensorsReader reader(path);
  const auto missing = [&](const char* what, const char* name) {
    return Error(ErrorCode::internal, "demo: the rank record '" + path + "' lacks a valid " + what + " '" + name + "'");
  };
  const auto number = [&](const char* name, auto* value) {
    const auto it = reader.metadata().find(name);
    if (it == reader.metadata().end()) throw missing("metadata value", name);
    const std::string& text = it->second;
    const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), *value);
    if (ec != std::errc() || end != text.data() + text.size()) throw missing("metadata value", name);
  };
  RankRecord record;
  for (const auto& [name, field] : kRecordTensors) {
    const casefile::SafetensorsEntry* entry = reader.find(name);
    if (entry == nullptr) throw missing("tensor", name);
    record.*field = reader.read_tensor(*entry);
  }
  for (const auto& [name, field] : kRecordTimes) number(name, &(record.*field));
  for (const auto& [name, field] : kRecordCounts) number(name, &(record.*field));
  return record;
}

// The shm runner: a process of this binary per rank, with the parent's flags plus the worker flag.
std::vector<RankRecord> run_rank_processes(const demo::DemoOptions& o) {
  std::vector<RankRecord> records(static_cast<std::size_t>(demo::world_size(o)));
  casefile::run_rank_processes(
      demo::world_size(o), o.tp_world_size,
      [](const std::string& dir) { return casefile::own_command_line({kWorkerFlag, dir}); },
      [&](int g, const std::string& path) { records[static_cast<std::size_t>(g)] = read_record(path); });
  return records;
}

#ifdef MOEDIST_HAVE_MPI
// `mpirun -np N moedist demo --transport mpi`: every process runs its rank; the records travel to rank 0,
// which checks them and prints the report.
int run_demo_mpi(const demo::DemoOptions& o) {
  MpiSession mpi;
  std::vector<RankRecord> records(static_cast<std::size_t>(mpi.size()));
  const auto run = [&](const std::string& path) {
    try {
      if (demo::world_size(o) != mpi.size()) {
        fail(ErrorCode::config_mismatch, "mpirun -np", concat(mpi.size()),
             concat("must equal --ep-world-size * max(--tp-world-size, 1) = ", demo::world_size(o)));
      }
      write_record(path, demo::run_mpi_rank(o));
    } catch (const Error& e) {
      throw Error(e.code(), concat("rank ", mpi.rank(), ": ", e.what()));
    }
  };
  const auto gather = [&] {
    gather_rank_files(run, [&](int g, const std::string& path) { records[static_cast<std::size_t>(g)] = read_record(path); });
  };
  return share_exit_status(report_or_error([&] {
    // Every rank checks the options first, so that none waits in the gather for a rank that stopped.
    demo::validate_options(o);
    if (mpi.rank() != 0) {
      gather();
      return 0;
    }
    // Rank 0 gathers inside run_demo, which times its runner as the ranks' wall time.
    const demo::DemoReport report = demo::run_demo(o, std::cout, [&](const demo::DemoOptions&) {
      gather();
      return std::move(records);
    });
    std::cout.flush();
    return report.passed ? 0 : 1;
  }));
}
#endif

}  // namespace

void add_demo(CLI::App& app, int* exit_code) {
  auto flags = std::make_shared<DemoFlags>();
  demo::DemoOptions& o = flags->options;
  CLI::App* cmd = app.add_subcommand(
      "demo",
      "Run a whole MoE layer (softmax top-K router, dispatch, a per-expert SiLU MLP on OpenBLAS, combine) on "
      "in-process ranks (threads) or, with --transport shm, on rank processes over shared memory, and check it "
      "against a dense single-process fp64 computation of the same layer. The defaults are the operator page's "
      "example: 16 ranks, 2 shared-expert ranks, 14 MoE experts, BS 8, H 7168, K 8, quant_mode 2 with smooth "
      "scales, bf16. --op v2 runs the layer on the V2 operators: a quarter of each rank's tokens padding (masked), a "
      "zero and a copy expert among the router's choices, and 2 shared experts.");
  cmd->footer("Exit status: 0 when the combine output matches the reference within --tolerance, 1 on a mismatch, "
              "2 on an error (with shm, the message names the failed rank: its own error, or how its process "
              "died).");

  cmd->add_option("--ep-world-size", o.ep_world_size, "EP domain size W")->capture_default_str()->check(
      CLI::PositiveNumber);
  cmd->add_option("--tp-world-size", o.tp_world_size,
                  "TP domain size: 0 or 1 for none; 2 makes TP pairs that hold the same experts, each rank computing "
                  "half of the MLP's intermediate dimension, which combine's TP reduce adds up (needs 1 expert per "
                  "MoE rank)")
      ->capture_default_str()
      ->check(CLI::IsMember({0, 1, 2}));
  cmd->add_option("--shared-expert-rank-num", o.shared_expert_rank_num,
                  "ranks [0, S) host the shared expert (0: no shared expert)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--moe-expert-num", o.moe_expert_num, "MoE experts E, a multiple of W - S")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--bs", o.bs, "tokens per rank")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--hidden", o.hidden, "hidden size H")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--topk", o.topk, "experts per token K")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--quant-mode", o.quant_mode, "0: none; 2: dynamic per-token int8 in dispatch")
      ->capture_default_str()
      ->check(CLI::IsMember({0, 2}));
  cmd->add_flag("--no-scales", flags->no_scales,
                "do not pass smooth scales to dispatch (they are passed with --quant-mode 2 by default, and never "
                "with --quant-mode 0, which rejects them)");
  cmd->add_option("--dtype", flags->dtype, "token dtype")->capture_default_str()->check(CLI::IsMember({"bf16", "fp16"}));
  cmd->add_option("--intermediate", o.intermediate, "expert MLP intermediate size")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--global-bs", o.global_bs, "global_bs: 0 (= BS * W) or a multiple of W that is >= BS * W")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--expert-token-nums-type", o.expert_token_nums_type,
                  "0: expert_token_nums is a prefix sum; 1: a count per local expert")
      ->capture_default_str()
      ->check(CLI::IsMember({0, 1}));
  cmd->add_option("--comm-quant-mode", o.comm_quant_mode, "combine: 0 none; 2 int8 communication of expert outputs")
      ->capture_default_str()
      ->check(CLI::IsMember({0, 2}));
  cmd->add_option("--seed", o.seed, "seed of every generated input and weight")->capture_default_str();
  cmd->add_option("--timeout-ms", o.timeout_ms, "longest wait for a peer in any phase (shm: connecting included)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--tolerance", o.tolerance,
                  "pass when max|output - reference| <= tolerance * max|reference|; 0 = automatic: 4 unit roundoffs "
                  "of the dtype (2^-8 bf16, 2^-11 fp16), plus 1/127 with --comm-quant-mode 2")
      ->capture_default_str();
  cmd->add_option("--profile", flags->profile, "limits enforced on top of the contract's rules")
      ->capture_default_str()
      ->check(CLI::IsMember({"portable", "ascend_a3", "ascend_a2"}));
  cmd->add_option("--transport", o.transport, transport_help("demo", "", "N = W * max(T, 1); rank 0 reports"))
      ->capture_default_str()
      ->check(CLI::IsMember(transport_names()));
  cmd->add_option("--inject-fault", flags->fault,
                  "self-test of the checker: plant a bug, after which the run must report MISMATCH. drop-expert: the "
                  "first MoE rank returns zeros; swap-rows: it swaps two expert-output rows; swap-weights: rank 0 "
                  "gives combine its expert_scales with columns 0 and K-1 swapped")
      ->capture_default_str()
      ->check(CLI::IsMember({"none", "drop-expert", "swap-rows", "swap-weights"}));

  cmd->add_option("--op", flags->op,
                  "the operators: v1 = npu_moe_distribute_dispatch / combine; v2 = their _v2 pair, with padding tokens "
                  "masked by x_active_mask, zero and copy experts among the router's choices, and several shared "
                  "experts (the --op v2 flags below)")
      ->capture_default_str()
      ->check(CLI::IsMember({"v1", "v2"}));
  // The flags of --op v2 only; given with v1 they are an error, not ignored.
  const std::vector<CLI::Option*> v2_flags = {
      cmd->add_option(
             "--shared-expert-num", o.shared_expert_num,
             "--op v2: shared experts Sn, each on S / Sn shared-expert ranks (S a multiple of Sn; 0 with S = 0)")
          ->capture_default_str()
          ->check(CLI::Range(0, 4)),
      cmd->add_option("--zero-expert-num", o.zero_expert_num,
                      "--op v2: zero experts Z (ids E..E+Z-1) the router may pick; their output is zero")
          ->capture_default_str()
          ->check(CLI::NonNegativeNumber),
      cmd->add_option("--copy-expert-num", o.copy_expert_num,
                      "--op v2: copy experts C (ids E+Z..E+Z+C-1) the router may pick; they return ori_x, the layer "
                      "input")
          ->capture_default_str()
          ->check(CLI::NonNegativeNumber),
      cmd->add_option("--padding-tokens", o.padding_tokens,
                      "--op v2: the last P tokens of every rank are padding, masked off by a (BS,) x_active_mask "
                      "(their combine rows must come back zero); -1 = BS / 4")
          ->capture_default_str()
          ->check(CLI::Range(std::int64_t{-1}, std::numeric_limits<std::int64_t>::max()))};

  // Internal: makes this process one rank of a --transport shm run, writing its record to the directory.
  cmd->add_option(kWorkerFlag, flags->worker_dir)->group("");

  cmd->callback([flags, exit_code, v2_flags] {
    for (const CLI::Option* flag : v2_flags) {
      if (flags->op != "v2" && flag->count() > 0) {
        throw ValidationError(ErrorCode::invalid_argument, flag->get_name(), flag->as<std::string>(),
                              "applies to --op v2 only");
      }
    }
    const demo::DemoOptions options = resolve(*flags);
    const TransportKind& kind = require_transport_built(options.transport);
#ifdef MOEDIST_HAVE_MPI
    if (kind.id == TransportId::mpi) {
      *exit_code = run_demo_mpi(options);
      return;
    }
#endif
    if (!flags->worker_dir.empty()) {
      *exit_code = casefile::run_rank_worker(flags->worker_dir, [&](int, const std::string& path) {
        write_record(path, demo::run_shm_rank(options));
      });
      return;
    }
    const demo::DemoReport report = demo::run_demo(
        options, std::cout,
        kind.id == TransportId::shm ? demo::RankRunner(run_rank_processes) : demo::RankRunner(demo::run_inproc_ranks));
    std::cout.flush();
    *exit_code = report.passed ? 0 : 1;
  });
}

}  // namespace moedist::cli
