// moedist_mpi_baseline: the MPI transports of `moedist bench`, run under mpirun: the MPI baseline
// (bench/mpi_baseline.h) and moedist's own MPI transport (moedist::join_mpi).
//
//   mpirun -np W moedist_mpi_baseline --point BS,H,K,E,QUANT [--point ...] [timing flags]
//       times dispatch, combine and the round trip at each point with the bench's loop (bench/workload.h) and
//       prints one JSON line per point on rank 0: the per-iteration latencies (slowest rank) in microseconds.
//       --impl alltoallv (the default) times the baseline, MPI_Alltoall + MPI_Alltoallv + a local sort.
//       --impl moedist times moedist over MPI with the ranks split into --hosts virtual hosts of ceil(W / hosts)
//       ranks (MpiOptions::ranks_per_node), each rank running the same body as the bench's inproc and shm
//       transports (bench/moedist_rank.h); its lines also carry "between_hosts": the bytes that crossed between
//       hosts in one dispatch and one combine, summed over the ranks, and a flat all-to-all's for the same calls.
//   mpirun -np W moedist_mpi_baseline --check
//       runs random cases and compares expand_x, dynamic_scales, expand_idx, ep_recv_counts, expert_token_nums
//       and the combine output bit for bit with moedist's reference oracle; exit status 0 when all match.
#include <mpi.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <exception>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "kernels/row_kernels.h"
#include "moedist/mpi.h"
#include "moedist_rank.h"
#include "mpi_baseline.h"
#include "oracle/oracle.h"
#include "runners.h"
#include "workload.h"

namespace moedist::bench {
namespace {

class MpiSync : public RankSync {
 public:
  void barrier() override { MPI_Barrier(MPI_COMM_WORLD); }
  int agree(int rank0_value) override {
    MPI_Bcast(&rank0_value, 1, MPI_INT, 0, MPI_COMM_WORLD);
    return rank0_value;
  }
};

numeric::Half half_of(DType dtype) { return dtype == DType::fp16 ? numeric::Half::fp16 : numeric::Half::bf16; }

// Identity experts for quant_mode 2: the dispatched rows dequantized, as the oracle and the bench do.
std::vector<std::uint16_t> dequantized(const MpiAlltoallvMoe& moe, const Point& p) {
  std::vector<std::uint16_t> rows(static_cast<std::size_t>(moe.rows() * p.h));
  const auto* q = static_cast<const std::int8_t*>(moe.expand_x());
  for (std::int64_t i = 0; i < moe.rows(); ++i)
    kernels::dequantize_row(q + i * p.h, moe.dynamic_scales()[i], half_of(p.dtype), p.h, rows.data() + i * p.h);
  return rows;
}

// ---- timing ----

// Every rank's samples to rank 0, which takes the slowest rank per iteration; rank 0 gets the point's JSON line
// (the others an empty value).
nlohmann::json gathered_times(const Point& p, int rank, const std::vector<RoundTimes>& times) {
  std::vector<double> flat;
  for (const RoundTimes& t : times) flat.insert(flat.end(), {t.dispatch_us, t.combine_us, t.roundtrip_us});
  std::vector<double> all(rank == 0 ? flat.size() * static_cast<std::size_t>(p.ranks()) : 0);
  MPI_Gather(flat.data(), static_cast<int>(flat.size()), MPI_DOUBLE, all.data(), static_cast<int>(flat.size()), MPI_DOUBLE,
             0, MPI_COMM_WORLD);
  if (rank != 0) return {};
  std::vector<std::vector<RoundTimes>> per_rank(static_cast<std::size_t>(p.ranks()));
  for (int r = 0; r < p.ranks(); ++r) {
    for (std::size_t i = 0; i < times.size(); ++i) {
      const double* t = all.data() + (static_cast<std::size_t>(r) * times.size() + i) * 3;
      per_rank[static_cast<std::size_t>(r)].push_back({t[0], t[1], t[2]});
    }
  }
  const OpSamples s = slowest_rank(per_rank);
  return {{"point", {{"W", p.W}, {"bs", p.bs}, {"h", p.h}, {"k", p.k}, {"E", p.E}, {"quant_mode", p.quant_mode}}},
          {"dispatch_us", s.dispatch_us},
          {"combine_us", s.combine_us},
          {"roundtrip_us", s.roundtrip_us}};
}

// The baseline at one point.
nlohmann::json bench_point_alltoallv(const Point& p, const LoopOptions& loop, int rank) {
  const RankInputs in = make_rank_inputs(p, rank);
  const Tensor smooth = p.scales() ? make_smooth_scales(p) : Tensor();
  MpiAlltoallvMoe moe(MPI_COMM_WORLD, MpiMoeShape{p.E, p.h, p.k, p.quant_mode, p.dtype});
  std::vector<std::uint16_t> out(static_cast<std::size_t>(p.bs * p.h));
  const auto* x = in.x.data<std::uint16_t>();
  const auto* ids = in.expert_ids.data<std::int32_t>();
  const auto* weights = in.expert_scales.data<float>();
  const float* smooth_rows = smooth.present() ? smooth.data<float>() : nullptr;

  // Untimed first call: sizes the buffers and, for quant_mode 2, makes the identity experts' rows (the same
  // every iteration, since the inputs are).
  moe.dispatch(x, p.bs, ids, smooth_rows);
  std::vector<std::uint16_t> identity;
  if (p.quant_mode == 2) identity = dequantized(moe, p);
  const auto expert_out = [&] {
    return p.quant_mode == 2 ? identity.data() : static_cast<const std::uint16_t*>(moe.expand_x());
  };
  moe.combine(expert_out(), weights, out.data());

  MpiSync sync;
  const RankOps ops{[&] { moe.dispatch(x, p.bs, ids, smooth_rows); },
                    [&] { moe.combine(expert_out(), weights, out.data()); }};
  return gathered_times(p, rank, run_rank_loop(rank, sync, loop, ops));
}

// moedist over MPI at one point, the EP ranks split into `hosts` virtual hosts (a TP pair on one host). The same
// body as the inproc and shm transports (MoedistRank, its traffic self-check included), timed by the same loop.
nlohmann::json bench_point_moedist(const Point& p, const LoopOptions& loop, int rank, int hosts,
                                   std::int64_t timeout_ms, int threads_per_rank) {
  MpiOptions options;
  options.wait.timeout = std::chrono::milliseconds(timeout_ms);
  options.group.worker_threads = threads_per_rank;
  options.ranks_per_node = ranks_per_host_of(p.W, hosts) * p.tp();
  const std::unique_ptr<Group> group = join_mpi(MPI_COMM_WORLD, group_config(p, rank), options);
  MoedistRank body(p, rank, *group);
  body.prime(count_bytes(p));
  MpiSync sync;
  nlohmann::json line = gathered_times(p, rank, run_rank_loop(rank, sync, loop, body.ops()));

  // The last iteration's bytes between hosts (the same every iteration: the inputs are), summed on rank 0.
  const TrafficCounters& t = group->traffic();
  const std::int64_t mine[4] = {t.dispatch_bytes_between_hosts, t.dispatch_bytes_between_hosts_flat,
                                t.combine_bytes_between_hosts, t.combine_bytes_between_hosts_flat};
  std::int64_t sum[4] = {0, 0, 0, 0};
  MPI_Reduce(mine, sum, 4, MPI_INT64_T, MPI_SUM, 0, MPI_COMM_WORLD);
  if (rank != 0) return {};
  line["between_hosts"] = {{"hosts", hosts_of(p.ranks(), options.ranks_per_node)},
                           {"ranks_per_host", options.ranks_per_node},
                           {"dispatch", sum[0]},
                           {"dispatch_flat", sum[1]},
                           {"combine", sum[2]},
                           {"combine_flat", sum[3]}};
  return line;
}

// ---- check against the oracle ----

struct CheckCase {
  int local_experts;
  int k;
  std::int64_t h;
  int quant_mode;
  DType dtype;
  std::uint64_t seed;
  bool smooth = true;  // quant_mode 2: smooth scales given (false: each token quantized once)
};

// Tokens per rank vary (some ranks have none); the oracle then needs global_bs = W * max BS.
std::int64_t check_bs(const CheckCase& c, int rank) { return static_cast<std::int64_t>((c.seed * 5 + static_cast<std::uint64_t>(rank) * 3) % 7); }

template <class A, class B>
std::string first_difference(const char* name, const A* got, const B& want, std::size_t n) {
  if (want.size() != n) return std::string(name) + ": " + std::to_string(n) + " entries, oracle has " + std::to_string(want.size());
  for (std::size_t i = 0; i < n; ++i) {
    if (std::memcmp(&got[i], &want[i], sizeof(got[i])) != 0) {
      std::ostringstream msg;
      msg << name << "[" << i << "] = " << +got[i] << ", oracle " << +want[i];
      return msg.str();
    }
  }
  return "";
}

// "" when this rank's results equal the oracle's bit for bit, else the first difference.
std::string check_case(const CheckCase& c, int W, int rank) {
  const Point base{.W = W, .h = c.h, .k = c.k, .E = c.local_experts * W, .quant_mode = c.quant_mode, .dtype = c.dtype,
                   .seed = c.seed};

  oracle::Case oc;
  oc.ep_world_size = W;
  oc.moe_expert_num = base.E;
  oc.quant_mode = c.quant_mode;
  oc.dtype = half_of(c.dtype);
  oc.h = c.h;
  oc.k = c.k;
  std::int64_t max_bs = 1;
  const Tensor smooth = make_smooth_scales(base);
  std::vector<RankInputs> inputs;
  for (int r = 0; r < W; ++r) {
    Point p = base;
    p.bs = check_bs(c, r);
    max_bs = std::max(max_bs, p.bs);
    inputs.push_back(make_rank_inputs(p, r));
    const RankInputs& in = inputs.back();
    oracle::RankInput oi;
    oi.bs = p.bs;
    oi.x.assign(in.x.data<std::uint16_t>(), in.x.data<std::uint16_t>() + p.bs * p.h);
    oi.expert_ids.assign(in.expert_ids.data<std::int32_t>(), in.expert_ids.data<std::int32_t>() + p.bs * p.k);
    oi.expert_scales.assign(in.expert_scales.data<float>(), in.expert_scales.data<float>() + p.bs * p.k);
    if (c.quant_mode == 2 && c.smooth) oi.scales.assign(smooth.data<float>(), smooth.data<float>() + base.E * c.h);
    oc.ranks.push_back(std::move(oi));
  }
  oc.global_bs = max_bs * W;
  const oracle::RankOutput want = oracle::run(oc)[static_cast<std::size_t>(rank)];

  const RankInputs& in = inputs[static_cast<std::size_t>(rank)];
  const std::int64_t bs = check_bs(c, rank);
  MpiAlltoallvMoe moe(MPI_COMM_WORLD, MpiMoeShape{base.E, c.h, c.k, c.quant_mode, c.dtype});
  moe.dispatch(in.x.data<std::uint16_t>(), bs, in.expert_ids.data<std::int32_t>(),
               c.quant_mode == 2 && c.smooth ? smooth.data<float>() : nullptr);
  const auto n = static_cast<std::size_t>(moe.rows() * c.h);
  std::string diff = moe.rows() == want.valid_rows
                         ? ""
                         : "valid rows " + std::to_string(moe.rows()) + ", oracle " + std::to_string(want.valid_rows);
  if (diff.empty() && c.quant_mode == 2) {
    diff = first_difference("expand_x", static_cast<const std::int8_t*>(moe.expand_x()), want.expand_x_int8, n);
    if (diff.empty()) diff = first_difference("dynamic_scales", moe.dynamic_scales(), want.dynamic_scales, static_cast<std::size_t>(moe.rows()));
  } else if (diff.empty()) {
    diff = first_difference("expand_x", static_cast<const std::uint16_t*>(moe.expand_x()), want.expand_x, n);
  }
  if (diff.empty()) diff = first_difference("expand_idx", moe.expand_idx().data(), want.expand_idx, moe.expand_idx().size());
  const std::vector<std::int32_t> counts = moe.ep_recv_counts();
  if (diff.empty()) diff = first_difference("ep_recv_counts", counts.data(), want.ep_recv_counts, counts.size());
  const std::vector<std::int64_t> nums = moe.expert_token_nums();
  if (diff.empty()) diff = first_difference("expert_token_nums", nums.data(), want.expert_token_nums, nums.size());

  // Combine runs whatever dispatch gave (every rank must join the collective), with identity experts.
  const std::vector<std::uint16_t> identity = c.quant_mode == 2 ? dequantized(moe, base) : std::vector<std::uint16_t>();
  std::vector<std::uint16_t> out(static_cast<std::size_t>(bs * c.h));
  moe.combine(c.quant_mode == 2 ? identity.data() : static_cast<const std::uint16_t*>(moe.expand_x()),
              in.expert_scales.data<float>(), out.data());
  if (diff.empty()) diff = first_difference("combine output", out.data(), want.combine_out, out.size());
  return diff;
}

int run_check(int rank, int W) {
  const CheckCase cases[] = {
      {2, 3, 96, 0, DType::bf16, 11},        {3, 5, 200, 2, DType::bf16, 12},       {1, 2, 64, 2, DType::fp16, 13},
      {2, 4, 33, 0, DType::fp16, 14},        {4, 8, 130, 2, DType::bf16, 15},       {1, 1, 17, 0, DType::bf16, 16},
      {3, 4, 96, 2, DType::bf16, 17, false}, {2, 3, 40, 2, DType::fp16, 18, false},
  };
  bool all_passed = true;
  for (const CheckCase& c : cases) {
    const std::string diff = check_case(c, W, rank);
    if (!diff.empty()) std::fprintf(stderr, "rank %d: %s\n", rank, diff.c_str());
    int ok = diff.empty() ? 1 : 0, all_ok = 0;
    MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    all_passed = all_passed && all_ok == 1;
    if (rank == 0) {
      std::string sizes;
      for (int r = 0; r < W; ++r) sizes += (r ? "," : "") + std::to_string(check_bs(c, r));
      std::printf("check W=%d E=%d K=%d H=%lld quant=%d%s %s BS=[%s]: %s\n", W, c.local_experts * W, c.k,
                  static_cast<long long>(c.h), c.quant_mode, c.quant_mode == 2 && !c.smooth ? " no-scales" : "",
                  c.dtype == DType::fp16 ? "fp16" : "bf16", sizes.c_str(), all_ok ? "PASS" : "MISMATCH");
      std::fflush(stdout);
    }
  }
  if (rank == 0) std::printf("mpi baseline vs oracle: %s\n", all_passed ? "PASS" : "MISMATCH");
  return all_passed ? 0 : 1;
}

// "BS,H,K,E,QUANT"; `shape` gives W, S, T, the dtype, the seed and whether smooth scales are given.
Point parse_point(const std::string& text, const Point& shape) {
  long long v[5];
  char tail = 0;
  if (std::sscanf(text.c_str(), "%lld,%lld,%lld,%lld,%lld%c", &v[0], &v[1], &v[2], &v[3], &v[4], &tail) != 5)
    throw CLI::ValidationError("--point", "'" + text + "' is not BS,H,K,E,QUANT");
  Point p = shape;
  p.bs = v[0];
  p.h = v[1];
  p.k = static_cast<int>(v[2]);
  p.E = static_cast<int>(v[3]);
  p.quant_mode = static_cast<int>(v[4]);
  const std::string problem = point_problem(p);
  if (!problem.empty()) throw CLI::ValidationError("--point", text + ": " + problem);
  return p;
}

int run(int argc, char** argv, int rank, int W) {
  CLI::App app{"The MPI transports of `moedist bench`. --impl alltoallv: the MPI baseline, MPI_Alltoall of the counts, "
               "MPI_Alltoallv of the rows, a local sort into expert-major order, and the reverse for combine. --impl "
               "moedist: moedist over MPI (join_mpi), the ranks split into --hosts virtual hosts. Run it under mpirun."};
  bool check = false;
  std::vector<std::string> points;
  std::string dtype = "bf16";
  std::string impl = "alltoallv";
  int hosts = 2;
  std::int64_t timeout_ms = 60000;
  int threads_per_rank = 1;
  std::uint64_t seed = 1;
  LoopOptions loop;
  int shared_ranks = 0, tp_world_size = 0;
  bool no_scales = false;
  app.add_flag("--check", check, "compare with moedist's reference oracle on random cases instead of timing");
  app.add_option("--impl", impl, "what to time: the MPI_Alltoallv baseline, or moedist over MPI")
      ->check(CLI::IsMember({"alltoallv", "moedist"}))
      ->capture_default_str();
  app.add_option("--hosts", hosts, "moedist: virtual hosts of ceil(W / hosts) ranks each (1: all ranks on one host)")
      ->check(CLI::Range(1, 1024))
      ->capture_default_str();
  app.add_option("--timeout-ms", timeout_ms, "moedist: longest wait for a peer (MpiOptions::wait.timeout)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--shared-expert-rank-num", shared_ranks,
                 "moedist: S shared-expert ranks (the alltoallv baseline supports only 0)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--tp-world-size", tp_world_size,
                 "moedist: 2 runs a TP pair per EP rank, W = ranks / 2 (the alltoallv baseline supports only 0 or 1)")
      ->check(CLI::IsMember({0, 1, 2}))
      ->capture_default_str();
  app.add_flag("--no-scales", no_scales, "quant_mode 2 without smooth scales: each token is quantized once");
  app.add_option("--threads-per-rank", threads_per_rank,
                 "moedist: worker threads of each rank (GroupOptions::worker_threads)")
      ->check(CLI::Range(1, GroupOptions::kMaxWorkerThreads))
      ->capture_default_str();
  app.add_option("--point", points, "a grid point BS,H,K,E,QUANT (repeatable)");
  app.add_option("--dtype", dtype, "token dtype")->check(CLI::IsMember({"bf16", "fp16"}))->capture_default_str();
  app.add_option("--seed", seed, "seed of the inputs (the same as moedist bench's)")->capture_default_str();
  app.add_option("--warmup", loop.warmup, "untimed iterations")->check(CLI::Range(1, 1000000))->capture_default_str();
  app.add_option("--iters", loop.max_iters, "timed iterations at most")->check(CLI::Range(1, 10000000))->capture_default_str();
  app.add_option("--min-iters", loop.min_iters, "timed iterations at least")->check(CLI::Range(1, 10000000))->capture_default_str();
  app.add_option("--max-seconds", loop.max_seconds, "time budget of a point's timed iterations")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return rank == 0 ? app.exit(e) : (e.get_exit_code() == 0 ? 0 : 2);
  }
  if (check) return run_check(rank, W);

  Point shape;
  shape.dtype = dtype == "fp16" ? DType::fp16 : DType::bf16;
  shape.seed = seed;
  shape.S = shared_ranks;
  shape.T = tp_world_size;
  shape.smooth = !no_scales;
  shape.W = W / shape.tp();
  std::vector<Point> parsed;
  try {
    if (impl == "alltoallv" && shared_ranks != 0)
      throw CLI::ValidationError(
          "--shared-expert-rank-num",
          std::to_string(shared_ranks) + ": the MPI baseline has no shared-expert ranks (must be 0)");
    if (impl == "alltoallv" && tp_world_size == 2)
      throw CLI::ValidationError("--tp-world-size", "2: the MPI baseline has no TP domain (must be 0 or 1)");
    if (W % shape.tp() != 0)
      throw CLI::ValidationError("--tp-world-size", "2 needs an even number of MPI ranks, not " + std::to_string(W));
    for (const std::string& text : points) parsed.push_back(parse_point(text, shape));
  } catch (const CLI::ParseError& e) {
    return rank == 0 ? app.exit(e) : 2;
  }
  if (rank == 0) {
    char version[MPI_MAX_LIBRARY_VERSION_STRING];
    int length = 0;
    MPI_Get_library_version(version, &length);
    std::string first_line(version, static_cast<std::size_t>(length));
    first_line = first_line.substr(0, first_line.find_first_of(std::string("\r\n\0", 3)));  // Open MPI counts the NUL
    std::printf("%s\n", nlohmann::json{{"mpi_library", first_line}}.dump().c_str());
    std::fflush(stdout);
  }
  for (const Point& p : parsed) {
    const nlohmann::json line = impl == "moedist"
                                    ? bench_point_moedist(p, loop, rank, hosts, timeout_ms, threads_per_rank)
                                    : bench_point_alltoallv(p, loop, rank);
    if (rank == 0) {
      std::printf("%s\n", line.dump().c_str());
      std::fflush(stdout);  // the parent reads the lines as they come, for its progress bar
    }
  }
  return 0;
}

}  // namespace
}  // namespace moedist::bench

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, world = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  int status = 0;
  try {
    status = moedist::bench::run(argc, argv, rank, world);
  } catch (const std::exception& e) {
    // A failed rank cannot leave its peers waiting in a collective.
    std::fprintf(stderr, "moedist_mpi_baseline: rank %d: error: %s\n", rank, e.what());
    MPI_Abort(MPI_COMM_WORLD, 2);
  }
  MPI_Finalize();
  return status;
}
