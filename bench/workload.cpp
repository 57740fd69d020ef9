#include "workload.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>
#include <random>
#include <stdexcept>

#include "contract/shared_split.h"
#include "numeric/convert.h"

namespace moedist::bench {

namespace {

enum class Stream : std::uint64_t { tokens = 1, routing = 2, weights = 3, smooth = 4 };

// A generator per (seed, stream, rank). std::mt19937_64 is specified bit for bit by the standard, and the values
// below are made from its raw output (not from std::*_distribution, which differ between libraries).
std::mt19937_64 generator(std::uint64_t seed, Stream stream, int rank) {
  std::seed_seq seq{static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32),
                    static_cast<std::uint32_t>(stream), static_cast<std::uint32_t>(rank)};
  return std::mt19937_64(seq);
}

float unit(std::mt19937_64& g) { return static_cast<float>(g() >> 40) * 0x1p-24f; }  // [0, 1)

numeric::Half half_of(DType dtype) { return dtype == DType::fp16 ? numeric::Half::fp16 : numeric::Half::bf16; }

// Uniform K distinct experts of E for each token: a partial Fisher-Yates shuffle on a running permutation.
void fill_routing(const Point& p, int rank, std::int32_t* ids) {
  std::mt19937_64 g = generator(p.seed, Stream::routing, rank);
  std::vector<std::int32_t> perm(static_cast<std::size_t>(p.E));
  std::iota(perm.begin(), perm.end(), 0);
  for (std::int64_t b = 0; b < p.bs; ++b) {
    for (int k = 0; k < p.k; ++k) {
      const auto j = static_cast<std::size_t>(k) + static_cast<std::size_t>(g() % static_cast<std::uint64_t>(p.E - k));
      std::swap(perm[static_cast<std::size_t>(k)], perm[j]);
      ids[b * p.k + k] = perm[static_cast<std::size_t>(k)];
    }
  }
}

using Clock = std::chrono::steady_clock;

double micros(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::micro>(b - a).count();
}

}  // namespace

std::string describe(const Point& p) {
  return "W=" + std::to_string(p.W) + " BS=" + std::to_string(p.bs) + " H=" + std::to_string(p.h) +
         " K=" + std::to_string(p.k) + " E=" + std::to_string(p.E) + (p.S > 0 ? " S=" + std::to_string(p.S) : "") +
         (p.T == 2 ? " T=2" : "") + " quant=" + std::to_string(p.quant_mode) +
         (p.quant_mode == 2 && !p.smooth ? " no-scales" : "") + " " + (p.dtype == DType::fp16 ? "fp16" : "bf16");
}

std::string point_problem(const Point& p) {
  if (p.W < 1) return "W = " + std::to_string(p.W) + " < 1";
  if (p.bs < 0) return "BS = " + std::to_string(p.bs) + " < 0";
  if (p.h < 1) return "H = " + std::to_string(p.h) + " < 1";
  if (p.T < 0 || p.T > 2) return "T = " + std::to_string(p.T) + " is not 0, 1 or 2";
  if (p.S < 0 || p.S >= p.W) return "S = " + std::to_string(p.S) + " is not in [0, W = " + std::to_string(p.W) + ")";
  if (p.S > 0 && p.W % p.S != 0)
    return "W = " + std::to_string(p.W) + " is not a multiple of S = " + std::to_string(p.S) +
           " (the V1 operators' rule)";
  if (p.E < 1 || p.E % (p.W - p.S) != 0)
    return "E = " + std::to_string(p.E) + " is not a positive multiple of W - S = " + std::to_string(p.W - p.S);
  if (p.T == 2 && p.local_experts() != 1)
    return "T = 2 needs one expert per MoE rank, but E / (W - S) = " + std::to_string(p.local_experts());
  if (p.k < 1 || p.k > p.E) return "K = " + std::to_string(p.k) + " is not in [1, E = " + std::to_string(p.E) + "]";
  if (p.quant_mode != 0 && p.quant_mode != 2) return "quant_mode = " + std::to_string(p.quant_mode) + " is not 0 or 2";
  if (p.dtype != DType::bf16 && p.dtype != DType::fp16) return "dtype is not bf16 or fp16";
  return "";
}

std::int64_t dispatch_row_bytes(const Point& p) noexcept { return p.quant_mode == 2 ? p.h + 4 : 2 * p.h; }
std::int64_t combine_row_bytes(const Point& p) noexcept { return 2 * p.h; }

RankInputs make_rank_inputs(const Point& p, int rank) {
  RankInputs in{Tensor(p.dtype, p.bs, p.h), Tensor(DType::int32, p.bs, p.k), Tensor(DType::fp32, p.bs, p.k)};
  std::mt19937_64 g = generator(p.seed, Stream::tokens, rank);
  const numeric::Half half = half_of(p.dtype);
  auto* x = in.x.data<std::uint16_t>();
  for (std::int64_t i = 0; i < p.bs * p.h; ++i) x[i] = numeric::f32_to_half_rne(half, 4.0f * unit(g) - 2.0f);
  fill_routing(p, rank, in.expert_ids.data<std::int32_t>());
  std::mt19937_64 gw = generator(p.seed, Stream::weights, rank);
  auto* w = in.expert_scales.data<float>();
  for (std::int64_t b = 0; b < p.bs; ++b) {
    float sum = 0;
    for (int k = 0; k < p.k; ++k) {
      w[b * p.k + k] = 0.05f + unit(gw);  // bounded away from 0, like a softmax weight that made the top K
      sum += w[b * p.k + k];
    }
    for (int k = 0; k < p.k; ++k) w[b * p.k + k] /= sum;
  }
  return in;
}

std::vector<std::int32_t> make_expert_ids(const Point& p, int rank) {
  std::vector<std::int32_t> ids(static_cast<std::size_t>(p.bs * p.k));
  fill_routing(p, rank, ids.data());
  return ids;
}

Tensor make_smooth_scales(const Point& p) {
  const std::int64_t rows = p.E + (p.S > 0 ? 1 : 0);
  Tensor scales(DType::fp32, rows, p.h);
  std::mt19937_64 g = generator(p.seed, Stream::smooth, 0);
  auto* s = scales.data<float>();
  for (std::int64_t i = 0; i < rows * p.h; ++i) s[i] = 0.5f + 1.5f * unit(g);
  return scales;
}

RouteCounts count_routes(const std::int32_t* expert_ids, std::int64_t bs, int k, int W, int local_experts, int S) {
  RouteCounts c;
  c.rows_to.assign(static_cast<std::size_t>(W), 0);
  std::vector<std::int64_t> last_token(static_cast<std::size_t>(W), -1);  // dedups a token's experts per rank
  for (std::int64_t b = 0; b < bs; ++b) {
    for (int j = 0; j < k; ++j) {
      const auto rank = static_cast<std::size_t>(S + expert_ids[b * k + j] / local_experts);
      ++c.entries;
      ++c.rows_to[rank];
      if (last_token[rank] != b) {
        last_token[rank] = b;
        ++c.rank_pairs;
      }
    }
  }
  return c;
}

PointBytes count_bytes(const Point& p) {
  PointBytes out;
  const std::int64_t drow = dispatch_row_bytes(p), crow = combine_row_bytes(p);
  const int tp = p.tp();
  out.received_rows.assign(static_cast<std::size_t>(p.ranks()), 0);
  for (int g = 0; g < p.ranks(); ++g) {
    const int ep = p.ep_rank(g);
    const std::vector<std::int32_t> ids = make_expert_ids(p, g);
    RouteCounts c = count_routes(ids.data(), p.bs, p.k, p.W, p.local_experts(), p.S);
    if (p.S > 0) {
      // One more row per token, to a shared-expert rank (a destination no MoE expert lives on): a shared rank
      // keeps its own tokens, a MoE rank splits its tokens over the S shared ranks (contract §3.4.1).
      c.entries += p.bs;
      c.rank_pairs += p.bs;
      for (int s = 0; s < p.S; ++s) {
        c.rows_to[static_cast<std::size_t>(s)] +=
            ep < p.S ? (s == ep ? p.bs : 0) : contract::shared_range_count(ep, s, p.bs, p.S);
      }
    }
    out.dispatch.logical += c.entries * drow;
    out.dispatch.wire += c.rank_pairs * drow;
    out.combine.logical += c.entries * crow;
    out.combine.wire += c.rank_pairs * crow;
    out.dispatch_per_rank.push_back(c.entries * drow);
    out.combine_per_rank.push_back(c.entries * crow);
    // Its EP group is the ranks of the same TP rank.
    for (int d = 0; d < p.W; ++d)
      out.received_rows[static_cast<std::size_t>(d * tp + p.tp_rank(g))] += c.rows_to[static_cast<std::size_t>(d)];
  }
  out.roundtrip = {out.dispatch.logical + out.combine.logical, out.dispatch.wire + out.combine.wire};
  return out;
}

std::vector<RoundTimes> run_rank_loop(int rank, RankSync& sync, const LoopOptions& options, const RankOps& ops) {
  if (options.warmup < 1) throw std::invalid_argument("warmup must be at least 1");
  const auto iteration = [&] {
    sync.barrier();
    const Clock::time_point t0 = Clock::now();
    ops.dispatch();
    const Clock::time_point t1 = Clock::now();
    ops.combine();
    const Clock::time_point t2 = Clock::now();
    return RoundTimes{micros(t0, t1), micros(t1, t2), micros(t0, t2)};
  };
  const Clock::time_point warm_start = Clock::now();
  for (int i = 0; i < options.warmup; ++i) iteration();
  // Rank 0 sizes the timed run from the warm-up's pace (barriers included), so big points stay within
  // max_seconds and small ones get max_iters.
  int chosen = options.max_iters;
  if (rank == 0) {
    const double per_iteration_s = micros(warm_start, Clock::now()) * 1e-6 / options.warmup;
    if (per_iteration_s > 0 && options.max_seconds / per_iteration_s < options.max_iters)
      chosen = static_cast<int>(options.max_seconds / per_iteration_s);
    chosen = std::max(chosen, std::min(options.min_iters, options.max_iters));
  }
  const int iters = sync.agree(chosen);
  std::vector<RoundTimes> times;
  times.reserve(static_cast<std::size_t>(iters));
  for (int i = 0; i < iters; ++i) times.push_back(iteration());
  sync.barrier();
  return times;
}

OpSamples slowest_rank(const std::vector<std::vector<RoundTimes>>& per_rank) {
  OpSamples s;
  if (per_rank.empty()) return s;
  const std::size_t n = per_rank.front().size();
  for (const auto& r : per_rank) {
    if (r.size() != n) throw std::runtime_error("ranks timed different numbers of iterations");
  }
  for (std::size_t i = 0; i < n; ++i) {
    RoundTimes m;
    for (const auto& r : per_rank) {
      m.dispatch_us = std::max(m.dispatch_us, r[i].dispatch_us);
      m.combine_us = std::max(m.combine_us, r[i].combine_us);
      m.roundtrip_us = std::max(m.roundtrip_us, r[i].roundtrip_us);
    }
    s.dispatch_us.push_back(m.dispatch_us);
    s.combine_us.push_back(m.combine_us);
    s.roundtrip_us.push_back(m.roundtrip_us);
  }
  return s;
}

Stats summarize(std::vector<double> samples_us) {
  Stats s;
  if (samples_us.empty()) return s;
  std::sort(samples_us.begin(), samples_us.end());
  const std::size_t n = samples_us.size();
  const auto nearest_rank = [&](double q) {
    const auto r = static_cast<std::size_t>(std::ceil(q * static_cast<double>(n)));
    return samples_us[std::clamp<std::size_t>(r, 1, n) - 1];
  };
  s.iters = static_cast<int>(n);
  s.p50_us = nearest_rank(0.50);
  s.p99_us = nearest_rank(0.99);
  s.min_us = samples_us.front();
  s.max_us = samples_us.back();
  s.mean_us = std::accumulate(samples_us.begin(), samples_us.end(), 0.0) / static_cast<double>(n);
  return s;
}

}  // namespace moedist::bench
