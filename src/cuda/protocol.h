// The logic of the CUDA dispatch / combine protocol, as host+device functions: what a rank publishes,
// how it checks its peers' records, where its blocks land, which rows a token goes to and comes back
// from, and the per-chunk arithmetic. The kernels (kernels.cu) only add the parallel structure (which
// thread does which part, waits, fences) around these; tests/cuda_protocol_test.cpp runs the same
// functions rank by rank on the CPU, with host memory as the windows, and compares with the oracle.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/hd.h"
#include "contract/blocks.h"
#include "contract/record_checks.h"
#include "contract/shared_split.h"
#include "cuda/device_state.h"
#include "cuda/row_math.h"
#include "moedist/error.h"

namespace moedist::cuda {

constexpr int kChunk = 8;              // elements per thread step: 16 bytes of 16-bit values
constexpr int kMaxTargets = 1 + 1024;  // K <= 1024 (checked at join) plus the shared expert

// The rank's error code as other threads see it (it is set while other threads of the rank run).
MOEDIST_HD std::int32_t status_code(const Status* st) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const volatile std::int32_t*>(&st->code);
#else
  return __atomic_load_n(&st->code, __ATOMIC_ACQUIRE);  // GCC/Clang builtin: C++17 (nvcc's host pass) has no atomic_ref
#endif
}
MOEDIST_HD bool status_failed(const Status* st) { return status_code(st) != 0; }
MOEDIST_HD std::uint64_t status_seq(const Status* st) { return *reinterpret_cast<const volatile std::uint64_t*>(&st->seq); }

// Records the first error of the rank (later ones are dropped).
MOEDIST_HD void record_failure(Status* st, ErrorCode code, int peer, Phase phase, Rule rule, std::int64_t index = 0,
                               std::int64_t value = 0, std::int64_t limit = 0) {
#if defined(__CUDA_ARCH__)
  if (atomicCAS(&st->code, 0, static_cast<std::int32_t>(code)) != 0) return;
#else
  std::int32_t expected = 0;
  if (!__atomic_compare_exchange_n(&st->code, &expected, static_cast<std::int32_t>(code), false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) return;
#endif
  st->peer = peer;
  st->phase = static_cast<std::int32_t>(phase);
  st->rule = static_cast<std::int32_t>(rule);
  st->index = index;
  st->value = value;
  st->limit = limit;
#if defined(__CUDA_ARCH__)
  __threadfence();
#endif
}

MOEDIST_HD int global_rank(const DeviceGroup& g, int ep, int tp) { return ep * g.T + tp; }
MOEDIST_HD std::uint64_t* flag_at(const DeviceGroup& g, int rank, std::size_t region, int slot) {
  return reinterpret_cast<std::uint64_t*>(g.windows[rank] + region) + slot;
}
MOEDIST_HD std::byte* inbox_slot(const DeviceGroup& g, int owner, int sender) {
  return g.windows[owner] + g.off.inbox + static_cast<std::size_t>(sender) * g.off.record_stride;
}
MOEDIST_HD const RecordHeader& record_header(const DeviceGroup& g, int rank) {
  return *reinterpret_cast<const RecordHeader*>(inbox_slot(g, g.me, rank));
}
MOEDIST_HD const std::int32_t* record_counts(const DeviceGroup& g, int rank) {
  return reinterpret_cast<const std::int32_t*>(inbox_slot(g, g.me, rank) + sizeof(RecordHeader));
}

MOEDIST_HD std::int64_t lower_bound(const std::int32_t* keys, std::int64_t n, std::int32_t key) {
  std::int64_t lo = 0, hi = n;
  while (lo < hi) {
    const std::int64_t mid = (lo + hi) / 2;
    if (keys[mid] < key) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// ---- dispatch: ids ----

// Whether expert_ids[b, j] breaks a rule (range, or repeats an earlier id of its row).
MOEDIST_HD bool id_is_bad(const DeviceGroup& g, const DispatchArgs& a, std::int64_t b, std::int64_t j) {
  const std::int32_t e = a.ids[b * a.ids_row_stride + j * a.ids_col_stride];
  if (e < 0 || e >= g.E) return true;
  for (std::int64_t i = 0; i < j; ++i) {
    if (a.ids[b * a.ids_row_stride + i * a.ids_col_stride] == e) return true;
  }
  return false;
}

// The error for the lowest failing routing entry t (the check only marked it).
MOEDIST_HD void report_bad_id(const DeviceGroup& g, const DispatchArgs& a, std::uint64_t t) {
  const auto b = static_cast<std::int64_t>(t) / a.k, j = static_cast<std::int64_t>(t) % a.k;
  const std::int32_t e = a.ids[b * a.ids_row_stride + j * a.ids_col_stride];
  const bool in_range = e >= 0 && e < g.E;
  record_failure(g.status, ErrorCode::invalid_argument, g.me, Phase::dispatch_ids, in_range ? Rule::id_repeated : Rule::id_range,
                 static_cast<std::int64_t>(t), e, g.E);
}

// ---- dispatch: the count record ----

// Entry i = d * L + l of this rank's record: rows for EP rank d's local expert l (a shared rank d: the
// V1 split of this MoE rank's tokens, entry l = 0).
MOEDIST_HD std::int32_t record_entry(const DeviceGroup& g, std::int64_t bs, int i) {
  const int d = i / g.L, l = i % g.L;
  if (d >= g.S) return g.expert_counts[(d - g.S) * g.L + l];
  if (l == 0 && g.ep_rank >= g.S) return static_cast<std::int32_t>(contract::shared_range_count(g.ep_rank, d, bs, g.S));
  return 0;
}

MOEDIST_HD RecordHeader record_header_of(const DispatchArgs& a, bool failed) {
  RecordHeader h;
  h.bs = a.bs;
  h.k = a.k;
  h.h = a.h;
  h.dtype = a.dtype_code;
  h.mode = a.quant;
  h.has_expert_scales = a.expert_scales != nullptr ? 1 : 0;
  h.failed = failed ? 1 : 0;
  return h;
}

// Source EP rank r's count record in TP lane `lane` (contract/blocks.h's records(r)).
struct LaneRecords {
  const DeviceGroup* g;
  int lane;
  MOEDIST_HD const std::int32_t* operator()(int r) const { return record_counts(*g, global_rank(*g, r, lane)); }
};

// BS of EP rank d in TP lane `lane`, which the V1 split of a shared rank's own rows needs.
MOEDIST_HD std::int64_t dest_bs(const DeviceGroup& g, int d, int lane) {
  return record_header(g, global_rank(g, d, lane)).bs;
}

// Rows EP rank d receives in lane u (its own part).
MOEDIST_HD std::int64_t rows_received(const DeviceGroup& g, int d, int lane) {
  return contract::receive_prefix_sums(g.W, g.S, g.L, LaneRecords{&g, lane}, d, dest_bs(g, d, lane), nullptr);
}

// Checks peer r's record with the CPU path's checks (contract/record_checks.h): the same call, a BS in
// [0, global_bs / W] (this rank's BS with global_bs = 0), and counts its BS and K allow. (K, H >= 1,
// which the CPU path checks too, follow here from the same-call check.)
MOEDIST_HD void check_record(const DeviceGroup& g, const DispatchArgs& a, int r) {
  const RecordHeader& hd = record_header(g, r);
  Status* st = g.status;
  const Phase ph = Phase::dispatch_counts;
  const contract::CallMismatch m = contract::first_call_mismatch(
      contract::CallFields{hd.bs, hd.k, hd.h, hd.dtype, hd.mode, hd.has_expert_scales},
      contract::CallFields{a.bs, a.k, a.h, a.dtype_code, a.quant, a.expert_scales != nullptr ? 1 : 0},
      g.global_bs == 0);
  if (m.found) {
    return record_failure(st, ErrorCode::config_mismatch, r, ph, Rule::same_call, static_cast<std::int64_t>(m.field),
                          m.theirs, m.mine);
  }
  const contract::RecordCheck c = contract::check_send_counts(record_counts(g, r), g.W, g.S, g.L, r / g.T, hd.bs, hd.bs,
                                                              hd.k, contract::peer_bs_limit(g.global_bs, g.W, a.bs));
  switch (c.fault) {
    case contract::RecordFault::none:
      return;
    case contract::RecordFault::bs_range:
    case contract::RecordFault::active_range:  // cannot happen here: every token is active on the GPU
    case contract::RecordFault::entry_range:
    case contract::RecordFault::entry_shared_local:
      return record_failure(st, ErrorCode::protocol, r, ph, Rule::bad_record, c.entry, c.value, c.bound);
    case contract::RecordFault::moe_rows:
      return record_failure(st, ErrorCode::protocol, r, ph, Rule::bad_record, -2, c.value, c.bound);
    case contract::RecordFault::shared_rows:
      return record_failure(st, ErrorCode::protocol, r, ph, Rule::bad_record, -3, c.value, c.bound);
  }
}

// For destination EP rank d: the capacity checks, where this rank's blocks start in d's own rows, and
// (T == 2) how many rows d's TP peer owns before the copies this rank also writes there.
MOEDIST_HD void plan_destination(const DeviceGroup& g, const DispatchArgs& a, int d) {
  const int t = g.tp_rank, other = g.T == 2 ? 1 - t : -1;
  const std::int64_t own = rows_received(g, d, t);
  const std::int64_t twin = other >= 0 ? rows_received(g, d, other) : 0;
  const std::int64_t most = d < g.S ? a.capacity_shared : a.capacity_moe;
  const Phase ph = Phase::dispatch_counts;
  if (own > most) record_failure(g.status, ErrorCode::capacity, global_rank(g, d, t), ph, Rule::capacity, 0, own, most);
  if (twin > most) record_failure(g.status, ErrorCode::capacity, global_rank(g, d, other), ph, Rule::capacity, 0, twin, most);
  if (own + twin > g.off.dispatch_rows) {
    record_failure(g.status, ErrorCode::capacity, global_rank(g, d, t), ph, Rule::capacity, 1, own + twin, g.off.dispatch_rows);
  }
  if (other >= 0) g.tp_shift[d] = twin;
  const LaneRecords records{&g, t};
  const std::int64_t bs_d = dest_bs(g, d, t);
  std::int64_t running = 0;
  for (int l = 0; l < (d < g.S ? 1 : g.L); ++l) {
    for (int r = 0; r < g.W; ++r) {
      if (r == g.ep_rank) {
        if (d < g.S) g.shared_start[d] = running; else g.block_start[d * g.L + l] = running;
      }
      running += contract::block_rows(g.S, g.L, records, d, l, r, bs_d);
    }
  }
}

// This rank's dispatch outputs: ep_recv_counts (own half, then the TP peer's), expert_token_nums,
// tp_recv_counts, and the valid rows; plus the handle combine checks against.
MOEDIST_HD void plan_outputs(const DeviceGroup& g, const DispatchArgs& a) {
  const int t = g.tp_rank, other = g.T == 2 ? 1 - t : -1;
  const int d = g.ep_rank, lanes = g.T == 2 ? 2 : 1;
  const int local = g.local_experts;
  std::int64_t part_rows[2] = {0, 0};
  for (int half = 0; half < lanes; ++half) {
    const int lane = half == 0 ? t : other;
    std::int32_t* out = a.ep_recv_counts + half * g.W * local;
    part_rows[half] = contract::receive_prefix_sums(g.W, g.S, g.L, LaneRecords{&g, lane}, d, dest_bs(g, d, lane), out);
    for (int i = 0; i < g.W * local; ++i) g.recv_counts[half * g.W * local + i] = out[i];
  }
  std::int64_t cumulative = 0;
  for (int l = 0; l < local; ++l) {
    std::int64_t rows = 0;
    for (int half = 0; half < lanes; ++half) {
      const int lane = half == 0 ? t : other;
      const std::int64_t bs_d = dest_bs(g, d, lane);
      for (int r = 0; r < g.W; ++r) rows += contract::block_rows(g.S, g.L, LaneRecords{&g, lane}, d, l, r, bs_d);
    }
    cumulative += rows;
    a.expert_token_nums[l] = a.expert_token_nums_type == 0 ? cumulative : rows;
  }
  if (g.T == 2) {
    g.tp_counts[t] = static_cast<std::int32_t>(part_rows[0]);
    g.tp_counts[other] = static_cast<std::int32_t>(part_rows[1]);
    if (a.tp_recv_counts != nullptr) {
      a.tp_recv_counts[t] = g.tp_counts[t];
      a.tp_recv_counts[other] = g.tp_counts[other];
    }
  }
  g.status->own_rows = part_rows[0];
  g.status->peer_rows = part_rows[1];
  g.status->valid_rows = part_rows[0] + part_rows[1];
  g.call_shape[0] = a.bs;
  g.call_shape[1] = a.k;
  g.call_shape[2] = a.h;
}

// ---- rows: where token b goes (dispatch) and comes back from (combine) ----

struct Target {
  int ep = 0;                  // EP rank holding the row (in this rank's TP lane)
  std::int64_t row = 0;        // row in that rank's own part
  std::int64_t smooth_row = 0; // row of `scales` for quantizing it
  float weight = 1.0f;         // expert_scales[b, j]; 1 for the shared expert
};

// Target j of token b: j < K its top-k expert j, j == K (when S > 0) its shared expert. Each is
// independent of the others, so a block finds them in parallel.
MOEDIST_HD Target target_of(const DeviceGroup& g, std::int64_t b, std::int64_t k, std::int64_t j, const float* expert_scales,
                            std::int64_t es_rs, std::int64_t es_cs, std::int64_t bs) {
  if (j < k) {
    const std::int64_t t = b * k + j;
    const std::int32_t e = g.dispatch_ids[t];
    const int d = g.S + e / g.L, l = e % g.L;
    return Target{d, g.block_start[d * g.L + l] + g.dispatch_expand_idx[t], g.S > 0 ? e + 1 : e,
                  expert_scales != nullptr ? expert_scales[b * es_rs + j * es_cs] : 1.0f};
  }
  if (g.ep_rank < g.S) return Target{g.ep_rank, b, 0, 1.0f};  // a shared rank keeps its own tokens, rows 0..BS-1
  int s = 0;
  while (s + 1 < g.S && contract::shared_range_begin(g.ep_rank, s + 1, bs, g.S) <= b) ++s;
  return Target{s, g.shared_start[s] + b - contract::shared_range_begin(g.ep_rank, s, bs, g.S), 0, 1.0f};
}

// How many targets a token has: K, plus its shared expert when S > 0.
MOEDIST_HD int target_count(const DeviceGroup& g, std::int64_t k) { return static_cast<int>(k) + (g.S > 0 ? 1 : 0); }

// All of token b's targets in order (the K MoE targets in top-k order, then the shared one). Returns how many.
MOEDIST_HD int targets_of(const DeviceGroup& g, std::int64_t b, std::int64_t k, const float* expert_scales, std::int64_t es_rs,
                          std::int64_t es_cs, std::int64_t bs, Target* out) {
  const int n = target_count(g, k);
  for (int j = 0; j < n; ++j) out[j] = target_of(g, b, k, j, expert_scales, es_rs, es_cs, bs);
  return n;
}

// Address of a target's row in `region` (row pitch `pitch`): copy 0 in the target itself, copy 1 in the
// target's TP peer after that peer's own rows. nullptr if the row is outside the window (it cannot be
// after plan_destination's checks; the test keeps a bad address from ever being formed).
MOEDIST_HD std::byte* target_row(const DeviceGroup& g, const Target& tg, int copy, std::size_t region, std::size_t pitch) {
  const int lane = copy == 0 ? g.tp_rank : 1 - g.tp_rank;
  const std::int64_t row = tg.row + (copy == 0 ? 0 : g.tp_shift[tg.ep]);
  if (row < 0 || row >= g.off.dispatch_rows) return nullptr;
  return g.windows[global_rank(g, tg.ep, lane)] + region + static_cast<std::size_t>(row) * pitch;
}

MOEDIST_HD std::int64_t chunks_of(std::int64_t h) { return (h + kChunk - 1) / kChunk; }
MOEDIST_HD int chunk_len(std::int64_t h, std::int64_t i0) { return h - i0 < kChunk ? static_cast<int>(h - i0) : kChunk; }

// ---- per-chunk arithmetic ----

MOEDIST_HD float chunk_amax(bool bf16, const std::uint16_t v[kChunk], int n, const float* smooth, std::int64_t i0, float amax) {
  for (int u = 0; u < n; ++u) amax = max_ignoring_nan(amax, abs_f(quant_input(bf16, v[u], smooth, i0 + u)));
  return amax;
}
MOEDIST_HD void quantize_chunk(bool bf16, const std::uint16_t v[kChunk], int n, const float* smooth, std::int64_t i0, float ds,
                               std::int8_t q[kChunk]) {
  for (int u = 0; u < kChunk; ++u) q[u] = u < n ? quantize(quant_input(bf16, v[u], smooth, i0 + u), ds) : 0;
}

// Combine rows in the window: 16-bit values, or (comm_quant_mode 2) int8 values then the group scales.
MOEDIST_HD std::size_t comm_scales_offset(std::int64_t h) { return (static_cast<std::size_t>(h) + 15) / 16 * 16; }

// Stages chunk c of an expert-output row: TP-reduced with `partner` (T == 2), then stored as 16-bit
// values or quantized (the chunk is exactly one group of 8).
MOEDIST_HD void stage_chunk(bool bf16, bool comm_quant, std::uint16_t y[kChunk], const std::uint16_t* partner, int n, std::int64_t h,
                            std::int64_t c, std::byte* dst_row, std::int8_t q[kChunk]) {
  if (partner != nullptr) {
    for (int u = 0; u < n; ++u) y[u] = tp_add(bf16, y[u], partner[u]);
  }
  if (comm_quant) {
    for (int u = 0; u < kChunk; ++u) q[u] = 0;
    const std::uint16_t scale = comm_quantize_group(bf16, y, n, q);
    reinterpret_cast<std::uint16_t*>(dst_row + comm_scales_offset(h))[c] = scale;
  }
}

// Adds target i's chunk (already in 16-bit form) to the accumulators: weighted for MoE targets
// (i < K), weight 1 for the shared expert.
MOEDIST_HD void accumulate_chunk(bool bf16, float acc[kChunk], const std::uint16_t y[kChunk], int n, bool moe_target, float weight) {
  for (int u = 0; u < n; ++u) acc[u] = moe_target ? accumulate_weighted(acc[u], bf16, y[u], weight) : accumulate_unweighted(acc[u], bf16, y[u]);
}

// A combine row's chunk c in 16-bit form: the stored values, or the dequantized int8 values.
MOEDIST_HD void dequantize_chunk(bool bf16, const std::int8_t q[kChunk], std::uint16_t scale, std::uint16_t y[kChunk]) {
  for (int u = 0; u < kChunk; ++u) y[u] = comm_dequantize(bf16, q[u], scale);
}

// ---- combine: checks against the dispatch handle ----

// 0 when routing entry t matches dispatch, else the entry's mark (2t + 1: ids differ; 2t + 2: expand_idx).
MOEDIST_HD std::uint64_t combine_entry_mark(const DeviceGroup& g, const CombineArgs& a, std::int64_t t) {
  const std::int64_t b = t / a.k, j = t % a.k;
  if (a.ids[b * a.ids_row_stride + j * a.ids_col_stride] != g.dispatch_ids[t]) return static_cast<std::uint64_t>(2 * t + 1);
  if (a.expand_idx[t * a.expand_idx_stride] != g.dispatch_expand_idx[t]) return static_cast<std::uint64_t>(2 * t + 2);
  return 0;
}

// Turns the lowest mark (or the counts) into the error; nothing when combine's arguments are dispatch's.
MOEDIST_HD void report_combine_args(const DeviceGroup& g, const CombineArgs& a, std::uint64_t lowest_mark) {
  const Phase ph = Phase::combine_args;
  if (lowest_mark != ~std::uint64_t{0}) {
    const auto t = static_cast<std::int64_t>((lowest_mark - 1) / 2);
    const std::int64_t b = t / a.k, j = t % a.k;
    if (lowest_mark % 2 == 1) {
      return record_failure(g.status, ErrorCode::invalid_argument, g.me, ph, Rule::ids_differ, t, a.ids[b * a.ids_row_stride + j * a.ids_col_stride],
                            g.dispatch_ids[t]);
    }
    return record_failure(g.status, ErrorCode::invalid_argument, g.me, ph, Rule::expand_idx_differs, t, a.expand_idx[t * a.expand_idx_stride],
                          g.dispatch_expand_idx[t]);
  }
  const int len = g.W * g.local_experts * (g.T == 2 ? 2 : 1);
  for (int i = 0; i < len; ++i) {
    const std::int32_t v = a.ep_send_counts[i * a.ep_send_counts_stride];
    if (v != g.recv_counts[i]) return record_failure(g.status, ErrorCode::invalid_argument, g.me, ph, Rule::ep_counts_differ, i, v, g.recv_counts[i]);
  }
  if (g.T == 2) {
    for (int i = 0; i < 2; ++i) {
      const std::int32_t v = a.tp_send_counts[i * a.tp_send_counts_stride];
      if (v != g.tp_counts[i]) return record_failure(g.status, ErrorCode::invalid_argument, g.me, ph, Rule::tp_counts_differ, i, v, g.tp_counts[i]);
    }
  }
  if (a.expand_x_rows < g.status->valid_rows) {
    record_failure(g.status, ErrorCode::invalid_shape, g.me, ph, Rule::expand_x_rows, 0, a.expand_x_rows, g.status->valid_rows);
  }
}

}  // namespace moedist::cuda
