// What every transport of `moedist bench` shares: the grid point, its deterministic inputs, the bytes an
// operation counts, the timed loop each rank runs, and the statistics over iterations. The MPI baseline
// (bench/mpi_baseline_main.cpp) links the same code, so every transport sees the same tokens and routing and is
// timed by the same loop.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "moedist/dtype.h"
#include "moedist/tensor.h"

namespace moedist::bench {

// One point of the grid. The MPI baseline implements S = 0, T <= 1 only.
struct Point {
  int W = 2;               // ep_world_size: EP ranks
  std::int64_t bs = 1;     // tokens per rank (per process with T = 2)
  std::int64_t h = 7168;   // hidden size
  int k = 8;               // experts per token
  int E = 8;               // moe_expert_num, a multiple of W - S
  int quant_mode = 0;      // 0 or 2
  DType dtype = DType::bf16;
  std::uint64_t seed = 1;
  int S = 0;           // shared_expert_rank_num: EP ranks [0, S) host the shared expert
  int T = 0;           // tp_world_size: 0 or 1 (no TP domain) or 2 (a TP pair per EP rank)
  bool smooth = true;  // quant_mode 2: smooth scales given (false: each token is quantized once)

  int local_experts() const noexcept { return E / (W - S); }  // L: experts per MoE rank
  int tp() const noexcept { return T > 1 ? T : 1; }           // max(T, 1)
  int ranks() const noexcept { return W * tp(); }             // processes or threads: W * max(T, 1)
  int ep_rank(int g) const noexcept { return g / tp(); }      // the EP rank of global rank g
  int tp_rank(int g) const noexcept { return g % tp(); }
  bool scales() const noexcept { return quant_mode == 2 && smooth; }  // dispatch gets smooth scales
};

// "W=2 BS=16 H=7168 K=8 E=8 quant=2 bf16", with " S=1", " T=2" and " no-scales" where they apply
std::string describe(const Point& p);
// "" when the point is usable, else why not ("K = 9 > E = 8").
std::string point_problem(const Point& p);

// Bytes of one row. Dispatch: H * elem (1 with quant_mode 2, else 2) plus the fp32 dynamic scale with quant_mode 2.
// Combine: the expert-output row, H * 2.
std::int64_t dispatch_row_bytes(const Point& p) noexcept;
std::int64_t combine_row_bytes(const Point& p) noexcept;

// One rank's inputs: tokens uniform in [-2, 2) rounded to the dtype, uniform random top-K routing (K distinct
// experts), router weights positive and summing to 1 per token. Deterministic in (seed, rank); `rank` is the
// global rank (ep_rank * max(T, 1) + tp_rank).
struct RankInputs {
  Tensor x;              // (BS, H) bf16/fp16
  Tensor expert_ids;     // (BS, K) int32
  Tensor expert_scales;  // (BS, K) fp32: combine's weights
};
RankInputs make_rank_inputs(const Point& p, int rank);
// The routing alone (what make_rank_inputs puts in expert_ids), for byte counts without the tokens.
std::vector<std::int32_t> make_expert_ids(const Point& p, int rank);
// Smooth scales (E, H) fp32 in [0.5, 2), (E + 1, H) with shared-expert ranks, the same on every rank.
Tensor make_smooth_scales(const Point& p);

// Routing entries of one rank's tokens. A (token, expert) entry is one dispatched row; a (token, destination
// rank) pair counts once however many of the token's K experts live on that rank.
struct RouteCounts {
  std::int64_t entries = 0;      // (token, expert) pairs
  std::int64_t rank_pairs = 0;   // distinct (token, destination rank) pairs, the rank itself included
  std::vector<std::int64_t> rows_to;  // entries per destination rank (size W)
};
// Expert e lives on EP rank S + e / local_experts; the shared expert's rows are not counted here.
RouteCounts count_routes(const std::int32_t* expert_ids, std::int64_t bs, int k, int W, int local_experts, int S = 0);

// Bytes of each operation at a point, summed over ranks (all W * max(T, 1) of them). With S > 0 every token
// also has one row for a shared-expert rank (the V1 split), which counts as an expert and a destination rank.
struct OpBytes {
  std::int64_t logical = 0;  // one row per (token, expert)
  std::int64_t wire = 0;     // one row per (token, destination rank)
};
struct PointBytes {
  OpBytes dispatch, combine, roundtrip;  // roundtrip = dispatch + combine
  // Per global rank (W * max(T, 1) entries):
  std::vector<std::int64_t> dispatch_per_rank;  // logical bytes each rank sends (the memcpy floor copies these)
  std::vector<std::int64_t> combine_per_rank;   // logical bytes of the expert outputs each rank reads back
  std::vector<std::int64_t> received_rows;      // rows each rank receives in dispatch from its EP group
};
PointBytes count_bytes(const Point& p);

// ---- timing ----

// How ranks meet between iterations. barrier() is untimed; agree() returns rank 0's value on every rank.
class RankSync {
 public:
  virtual ~RankSync() = default;
  virtual void barrier() = 0;
  virtual int agree(int rank0_value) = 0;
};

struct LoopOptions {
  int warmup = 2;            // untimed iterations (at least 1: rank 0 sizes the timed run from them)
  int max_iters = 200;       // timed iterations at most
  int min_iters = 3;         // timed iterations at least, whatever max_seconds says
  double max_seconds = 1.0;  // stop adding iterations once they would take longer than this (from the warm-up)
};

// One iteration of one rank, in microseconds.
struct RoundTimes {
  double dispatch_us = 0, combine_us = 0, roundtrip_us = 0;
};

struct RankOps {
  std::function<void()> dispatch;
  std::function<void()> combine;  // back to back with dispatch: identity experts cost nothing
};

// Each iteration: barrier (untimed), then dispatch and combine timed on this rank's clock; the round trip is
// the span of both. Warm-up first; rank 0 then picks the timed count from the warm-up's pace (agreed by all
// ranks). Ends with a barrier so that no rank tears down while a peer still works.
std::vector<RoundTimes> run_rank_loop(int rank, RankSync& sync, const LoopOptions& options, const RankOps& ops);

// The latency of each iteration: the slowest rank's (the operation ends when the last rank ends).
struct OpSamples {
  std::vector<double> dispatch_us, combine_us, roundtrip_us;
};
OpSamples slowest_rank(const std::vector<std::vector<RoundTimes>>& per_rank);

struct Stats {
  int iters = 0;
  double p50_us = 0, p99_us = 0, mean_us = 0, min_us = 0, max_us = 0;
};
// Nearest-rank percentiles (p99 of fewer than 100 samples is the maximum).
Stats summarize(std::vector<double> samples_us);

}  // namespace moedist::bench
