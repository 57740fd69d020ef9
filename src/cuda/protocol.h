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
constexpr int kMaxSharedExperts = 4;   // Sn <= 4 (V2 §3.5)
constexpr int kMaxTargets = 1024 + kMaxSharedExperts;  // K <= 1024 (checked at join) plus the shared experts
// A validation's mark is the entry it names, and the lowest mark is reported; the rules a check applies
// first get the lower categories (the high bits), so that the error reported is the CPU path's.
constexpr int kMarkShift = 60;
constexpr std::uint64_t kNoMark = ~std::uint64_t{0};
MOEDIST_HD std::uint64_t mark_of(int category, std::int64_t entry) {
  return (static_cast<std::uint64_t>(category) << kMarkShift) | static_cast<std::uint64_t>(entry);
}
MOEDIST_HD int mark_category(std::uint64_t mark) { return static_cast<int>(mark >> kMarkShift); }
MOEDIST_HD std::int64_t mark_entry(std::uint64_t mark) {
  return static_cast<std::int64_t>(mark & ((std::uint64_t{1} << kMarkShift) - 1));
}

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

// 64-bit atomics on window words that other ranks' threads update too.
MOEDIST_HD std::uint64_t exchange_u64(std::uint64_t* p, std::uint64_t v) {
#if defined(__CUDA_ARCH__)
  return atomicExch(reinterpret_cast<unsigned long long*>(p), static_cast<unsigned long long>(v));
#else
  return __atomic_exchange_n(p, v, __ATOMIC_ACQ_REL);
#endif
}
MOEDIST_HD void add_i64(std::int64_t* p, std::int64_t v) {
#if defined(__CUDA_ARCH__)
  atomicAdd(reinterpret_cast<unsigned long long*>(p), static_cast<unsigned long long>(v));
#else
  __atomic_fetch_add(p, v, __ATOMIC_ACQ_REL);
#endif
}
MOEDIST_HD void max_i64(std::int64_t* p, std::int64_t v) {
#if defined(__CUDA_ARCH__)
  atomicMax(reinterpret_cast<long long*>(p), static_cast<long long>(v));
#else
  std::int64_t old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (v > old && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED)) {
  }
#endif
}

// performance_info: entry `ep` becomes max(entry, waited_ns in µs) (V2 §5.1).
MOEDIST_HD void record_wait(const PerfOut& perf, int ep, std::uint64_t waited_ns) {
  if (perf.data != nullptr) max_i64(perf.data + ep * perf.stride, static_cast<std::int64_t>(waited_ns / 1000));
}

MOEDIST_HD int global_rank(const DeviceGroup& g, int ep, int tp) { return ep * g.T + tp; }
// Whether `rank` is on this rank's host: its window is mapped here (other hosts' are null).
MOEDIST_HD bool on_this_host(const DeviceGroup& g, int rank) { return g.windows[rank] != nullptr; }
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

// ---- V2: masks, special experts, the entries that take part (V2 §3.1-§3.4) ----

MOEDIST_HD bool mask_value(const TokenMask& m, std::int64_t b, std::int64_t k) {
  return m.data[b * m.row_stride + k * m.col_stride] != 0;
}
// Entry (b, k) is not switched off by a (BS, K) mask.
MOEDIST_HD bool entry_on(const TokenMask& m, std::int64_t b, std::int64_t k) {
  return m.data == nullptr || m.two_d == 0 || mask_value(m, b, k);
}
// Token b takes part: no mask, its (BS,) entry (a prefix: mask_breaks_prefix), or a true in its (BS, K) row.
MOEDIST_HD bool token_on(const TokenMask& m, std::int64_t b, std::int64_t k) {
  if (m.data == nullptr) return true;
  if (m.two_d == 0) return mask_value(m, b, 0);
  for (std::int64_t j = 0; j < k; ++j) {
    if (mask_value(m, b, j)) return true;
  }
  return false;
}
// Whether x_active_mask[b] is the first true after a false of a (BS,) mask (whose trues must come first).
MOEDIST_HD bool mask_breaks_prefix(const TokenMask& m, std::int64_t b) {
  return m.data != nullptr && m.two_d == 0 && b > 0 && mask_value(m, b, 0) && !mask_value(m, b - 1, 0);
}

enum class IdKind : std::int32_t { routed = 0, zero, copy, constant };
MOEDIST_HD std::int64_t id_limit(const DeviceGroup& g, const SpecialIds& s) {
  return static_cast<std::int64_t>(g.E) + s.zero + s.copy + s.constant;
}
MOEDIST_HD IdKind id_kind(const DeviceGroup& g, const SpecialIds& s, std::int32_t e) {
  if (e < g.E) return IdKind::routed;
  if (e - g.E < s.zero) return IdKind::zero;
  if (e - g.E - s.zero < s.copy) return IdKind::copy;
  return IdKind::constant;
}

// The rule entry (b, j) of a token that takes part breaks, if any: an unmasked id outside [0, E+Z+C+Q), or
// one its row already routes (V2 §7.1). Masked entries are never read.
MOEDIST_HD Rule v2_entry_fault(const DeviceGroup& g, const std::int32_t* ids, std::int64_t rs, std::int64_t cs,
                               const TokenMask& mask, const SpecialIds& special, std::int64_t b, std::int64_t j) {
  if (!entry_on(mask, b, j)) return Rule::none;
  const std::int32_t e = ids[b * rs + j * cs];
  const std::int64_t limit = id_limit(g, special);
  if (e < 0 || e >= limit) return limit > g.E ? Rule::id_range_special : Rule::id_range;
  for (std::int64_t i = 0; i < j; ++i) {
    if (entry_on(mask, b, i) && ids[b * rs + i * cs] == e) return Rule::id_repeated_routed;
  }
  return Rule::none;
}

// V2 dispatch, token b: its ids into the handle, its activity into token_slot[b] (1 or 0; numbered by
// number_tokens), and per entry the sort key (its expert when it is sent, E when not) and the handle's
// state (-1: not taking part; -2: taking part, sent or not; index_and_count gives sent ones their slot).
// Returns the lowest mark of what it breaks: category 0 a (BS,) mask that is no prefix (entry b), 1 an id.
MOEDIST_HD std::uint64_t classify_token_v2(const DeviceGroup& g, const DispatchArgs& a, std::int64_t b) {
  std::uint64_t lowest = kNoMark;
  if (mask_breaks_prefix(a.mask, b)) lowest = mark_of(0, b);
  const bool on = token_on(a.mask, b, a.k);
  g.token_slot[b] = on ? 1 : 0;
  for (std::int64_t j = 0; j < a.k; ++j) {
    const std::int64_t t = b * a.k + j;
    const std::int32_t e = a.ids[b * a.ids_row_stride + j * a.ids_col_stride];
    const bool entry = on && entry_on(a.mask, b, j);
    const bool bad =
        entry && v2_entry_fault(g, a.ids, a.ids_row_stride, a.ids_col_stride, a.mask, a.special, b, j) != Rule::none;
    if (bad && lowest == kNoMark) lowest = mark_of(1, t);
    g.dispatch_ids[t] = e;
    g.sort_keys_in[t] = entry && !bad && e < g.E ? e : g.E;
    g.sort_vals_in[t] = static_cast<std::int32_t>(t);
    g.dispatch_expand_idx[t] = entry ? -2 : -1;
  }
  return lowest;
}

// Numbers the active tokens among slot[begin, end) (1 active, 0 not) from `first` on, inactive ones -1;
// returns the number after them.
MOEDIST_HD std::int64_t number_tokens(std::int32_t* slot, std::int64_t begin, std::int64_t end, std::int64_t first) {
  for (std::int64_t b = begin; b < end; ++b) slot[b] = slot[b] != 0 ? static_cast<std::int32_t>(first++) : -1;
  return first;
}

// The error of a V2 dispatch's lowest mark.
MOEDIST_HD void report_dispatch_mark_v2(const DeviceGroup& g, const DispatchArgs& a, std::uint64_t mark) {
  const std::int64_t entry = mark_entry(mark);
  if (mark_category(mark) == 0) {
    return record_failure(g.status, ErrorCode::invalid_argument, g.me, Phase::dispatch_ids, Rule::mask_not_prefix,
                          entry);
  }
  const std::int64_t b = entry / a.k, j = entry % a.k;
  const Rule rule = v2_entry_fault(g, a.ids, a.ids_row_stride, a.ids_col_stride, a.mask, a.special, b, j);
  record_failure(g.status, ErrorCode::invalid_argument, g.me, Phase::dispatch_ids, rule, entry,
                 a.ids[b * a.ids_row_stride + j * a.ids_col_stride],
                 rule == Rule::id_range ? g.E : id_limit(g, a.special));
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

// The same in a V2 dispatch (V2 §3.5, §3.7): a shared-expert rank d gets this rank's active tokens when
// it hosts one of the Sn shared experts this rank sends to (d % R == this rank % R), else nothing.
MOEDIST_HD std::int32_t record_entry_v2(const DeviceGroup& g, std::int64_t active, int i) {
  const int d = i / g.L, l = i % g.L;
  if (d >= g.S) return g.expert_counts[(d - g.S) * g.L + l];
  return l == 0 && g.ep_rank % g.R == d % g.R ? static_cast<std::int32_t>(active) : 0;
}

MOEDIST_HD RecordHeader record_header_of(const DispatchArgs& a, bool failed, std::int64_t active) {
  RecordHeader h;
  h.active = active;
  h.version = a.version;
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

// Rows source EP rank r sends local expert l of EP rank d in lane `lane`: its record's entry, but for
// the V1 split of a shared-expert rank's own rows (contract/blocks.h).
MOEDIST_HD std::int64_t lane_block_rows(const DeviceGroup& g, bool v2, int lane, int d, int l, int r) {
  const LaneRecords records{&g, lane};
  return v2 ? records(r)[d * g.L + l] : contract::block_rows(g.S, g.L, records, d, l, r, dest_bs(g, d, lane));
}

// ep_recv_counts of EP rank d in lane `lane` (its own part) into out (unless null); returns its rows.
MOEDIST_HD std::int64_t lane_prefix_sums(const DeviceGroup& g, bool v2, int lane, int d, std::int32_t* out) {
  const LaneRecords records{&g, lane};
  if (v2) return contract::receive_prefix_sums_v2(g.W, g.S, g.L, records, d, out);
  return contract::receive_prefix_sums(g.W, g.S, g.L, records, d, dest_bs(g, d, lane), out);
}

// Rows EP rank d receives in lane u (its own part).
MOEDIST_HD std::int64_t rows_received(const DeviceGroup& g, bool v2, int d, int lane) {
  return lane_prefix_sums(g, v2, lane, d, nullptr);
}

// Checks peer r's record with the CPU path's checks (contract/record_checks.h): the same call, a BS in
// [0, global_bs / W] (this rank's BS with global_bs = 0), and counts its BS and K allow. (K, H >= 1,
// which the CPU path checks too, follow here from the same-call check.)
MOEDIST_HD void check_record(const DeviceGroup& g, const DispatchArgs& a, int r) {
  const RecordHeader& hd = record_header(g, r);
  Status* st = g.status;
  const Phase ph = Phase::dispatch_counts;
  if (hd.version != a.version)
    return record_failure(st, ErrorCode::config_mismatch, r, ph, Rule::other_operator, 0, hd.version, a.version);
  const contract::CallMismatch m = contract::first_call_mismatch(
      contract::CallFields{hd.bs, hd.k, hd.h, hd.dtype, hd.mode, hd.has_expert_scales},
      contract::CallFields{a.bs, a.k, a.h, a.dtype_code, a.quant, a.expert_scales != nullptr ? 1 : 0},
      g.global_bs == 0);
  if (m.found) {
    return record_failure(st, ErrorCode::config_mismatch, r, ph, Rule::same_call, static_cast<std::int64_t>(m.field),
                          m.theirs, m.mine);
  }
  const std::int64_t max_bs = contract::peer_bs_limit(g.global_bs, g.W, a.bs);
  const bool v2 = a.version == 2;
  const contract::RecordCheck c =
      v2 ? contract::check_send_counts_v2(record_counts(g, r), g.W, g.S, g.L, g.R, r / g.T, hd.bs, hd.active, hd.k,
                                          max_bs)
         : contract::check_send_counts(record_counts(g, r), g.W, g.S, g.L, r / g.T, hd.bs, hd.bs, hd.k, max_bs);
  switch (c.fault) {
    case contract::RecordFault::none:
      return;
    case contract::RecordFault::bs_range:
    case contract::RecordFault::entry_range:
    case contract::RecordFault::entry_shared_local:
      return record_failure(st, ErrorCode::protocol, r, ph, Rule::bad_record, c.entry, c.value, c.bound);
    case contract::RecordFault::active_range:
      return record_failure(st, ErrorCode::protocol, r, ph, Rule::bad_record, -4, c.value, c.bound);
    case contract::RecordFault::moe_rows:
      return record_failure(st, ErrorCode::protocol, r, ph, Rule::bad_record, -2, c.value, c.bound);
    case contract::RecordFault::shared_rows:  // V2 names the entry
      return record_failure(st, ErrorCode::protocol, r, ph, Rule::bad_record, v2 ? c.entry : -3, c.value, c.bound);
  }
}

// For destination EP rank d: the capacity checks, where this rank's blocks start in d's own rows, and
// (T == 2) how many rows d's TP peer owns before the copies this rank also writes there.
MOEDIST_HD void plan_destination(const DeviceGroup& g, const DispatchArgs& a, int d) {
  const int t = g.tp_rank, other = g.T == 2 ? 1 - t : -1;
  const bool v2 = a.version == 2;
  const std::int64_t own = rows_received(g, v2, d, t);
  const std::int64_t twin = other >= 0 ? rows_received(g, v2, d, other) : 0;
  const std::int64_t most = d < g.S ? a.capacity_shared : a.capacity_moe;
  const Phase ph = Phase::dispatch_counts;
  if (own > most) record_failure(g.status, ErrorCode::capacity, global_rank(g, d, t), ph, Rule::capacity, 0, own, most);
  if (twin > most) record_failure(g.status, ErrorCode::capacity, global_rank(g, d, other), ph, Rule::capacity, 0, twin, most);
  if (own + twin > g.off.dispatch_rows) {
    record_failure(g.status, ErrorCode::capacity, global_rank(g, d, t), ph, Rule::capacity, 1, own + twin, g.off.dispatch_rows);
  }
  if (other >= 0) g.tp_shift[d] = twin;
  std::int64_t running = 0;
  for (int l = 0; l < (d < g.S ? 1 : g.L); ++l) {
    for (int r = 0; r < g.W; ++r) {
      if (r == g.ep_rank) {  // V2 keeps a shared-expert rank's start in block_start too
        if (d < g.S && !v2)
          g.shared_start[d] = running;
        else
          g.block_start[d * g.L + l] = running;
      }
      running += lane_block_rows(g, v2, t, d, l, r);
    }
  }
}

// This rank's dispatch outputs: ep_recv_counts (own half, then the TP peer's), expert_token_nums,
// tp_recv_counts, and the valid rows; plus the handle combine checks against.
MOEDIST_HD void plan_outputs(const DeviceGroup& g, const DispatchArgs& a) {
  const int t = g.tp_rank, other = g.T == 2 ? 1 - t : -1;
  const int d = g.ep_rank, lanes = g.T == 2 ? 2 : 1;
  const int local = g.local_experts;
  const bool v2 = a.version == 2;
  std::int64_t part_rows[2] = {0, 0};
  for (int half = 0; half < lanes; ++half) {
    const int lane = half == 0 ? t : other;
    std::int32_t* out = a.ep_recv_counts + half * g.W * local;
    part_rows[half] = lane_prefix_sums(g, v2, lane, d, out);
    for (int i = 0; i < g.W * local; ++i) g.recv_counts[half * g.W * local + i] = out[i];
  }
  for (int r = 0; r < g.W; ++r) g.source_bs[r] = dest_bs(g, r, t);  // V2 combine checks the triples' tokens
  std::int64_t cumulative = 0;
  for (int l = 0; l < local; ++l) {
    std::int64_t rows = 0;
    for (int half = 0; half < lanes; ++half) {
      const int lane = half == 0 ? t : other;
      for (int r = 0; r < g.W; ++r) rows += lane_block_rows(g, v2, lane, d, l, r);
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
  int ep = 0;                  // EP rank holding the row (in this rank's TP lane); -1: none (V2)
  std::int64_t row = 0;        // row in that rank's own part
  std::int64_t smooth_row = 0; // row of `scales` for quantizing it
  float weight = 1.0f;         // expert_scales[b, j]; 1 for the shared expert
  std::int32_t k = 0;          // V2: the triple's k (j for expert j, K + j for shared expert j)
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

// Target j of token b in a V2 dispatch (V2 §3.1-§3.5): j < K its entry k = j when it is sent (a MoE
// expert, slot from the handle), j = K + i its shared expert i (rank (r % R) + i * R, row its place among
// the active tokens, smooth row i); ep = -1 when nothing goes there.
MOEDIST_HD Target target_of_v2(const DeviceGroup& g, std::int64_t b, std::int64_t k, std::int64_t j,
                               const float* expert_scales, std::int64_t es_rs, std::int64_t es_cs) {
  Target none;
  none.ep = -1;
  if (j < k) {
    const std::int64_t t = b * k + j;
    const std::int32_t slot = g.dispatch_expand_idx[t];
    if (slot < 0) return none;
    const std::int32_t e = g.dispatch_ids[t];
    const int d = g.S + e / g.L, l = e % g.L;
    return Target{d, g.block_start[d * g.L + l] + slot, g.Sn + e,
                  expert_scales != nullptr ? expert_scales[b * es_rs + j * es_cs] : 1.0f, static_cast<std::int32_t>(j)};
  }
  const std::int32_t token = g.token_slot[b];
  if (token < 0) return none;
  const int i = static_cast<int>(j - k), d = g.ep_rank % g.R + i * g.R;
  return Target{d, g.block_start[d * g.L] + token, i, 1.0f, static_cast<std::int32_t>(k + i)};
}

// How many targets a token has: K, plus its shared expert when S > 0 (V1), its Sn shared experts (V2).
MOEDIST_HD int target_count(const DeviceGroup& g, std::int64_t k, int version = 1) {
  return static_cast<int>(k) + (version == 2 ? g.Sn : g.S > 0 ? 1 : 0);
}

// Target j of a call of either version.
template <class Args>
MOEDIST_HD Target call_target(const DeviceGroup& g, const Args& a, std::int64_t b, std::int64_t j) {
  if (a.version == 2)
    return target_of_v2(g, b, a.k, j, a.expert_scales, a.expert_scales_row_stride, a.expert_scales_col_stride);
  return target_of(g, b, a.k, j, a.expert_scales, a.expert_scales_row_stride, a.expert_scales_col_stride, a.bs);
}

// All of token b's targets in order (the K MoE targets in top-k order, then the shared ones). Returns how many.
template <class Args>
MOEDIST_HD int targets_of(const DeviceGroup& g, const Args& a, std::int64_t b, Target* out) {
  const int n = target_count(g, a.k, a.version);
  for (int j = 0; j < n; ++j) out[j] = call_target(g, a, b, j);
  return n;
}

// V2: where a target's triple goes (its copy in the target itself; the TP peer's copy has none, V2 §3.6).
MOEDIST_HD std::int32_t* triple_at(const DeviceGroup& g, const Target& tg) {
  if (tg.row < 0 || tg.row >= g.off.dispatch_rows || !on_this_host(g, global_rank(g, tg.ep, g.tp_rank))) return nullptr;
  return reinterpret_cast<std::int32_t*>(g.windows[global_rank(g, tg.ep, g.tp_rank)] + g.off.assist) + 3 * tg.row;
}
MOEDIST_HD void write_triple(const DeviceGroup& g, const Target& tg, std::int64_t b) {
  std::int32_t* at = triple_at(g, tg);
  if (at == nullptr) return;
  at[0] = g.ep_rank;
  at[1] = static_cast<std::int32_t>(b);
  at[2] = tg.k;
}

// Address of a target's row in `region` (row pitch `pitch`): copy 0 in the target itself, copy 1 in the
// target's TP peer after that peer's own rows. nullptr if the row is outside the window (it cannot be
// after plan_destination's checks; the test keeps a bad address from ever being formed), and for a
// target on another host (its host's proxy writes it there).
MOEDIST_HD std::byte* target_row(const DeviceGroup& g, const Target& tg, int copy, std::size_t region, std::size_t pitch) {
  const int lane = copy == 0 ? g.tp_rank : 1 - g.tp_rank;
  const std::int64_t row = tg.row + (copy == 0 ? 0 : g.tp_shift[tg.ep]);
  if (row < 0 || row >= g.off.dispatch_rows || !on_this_host(g, global_rank(g, tg.ep, lane))) return nullptr;
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
MOEDIST_HD void stage_chunk(bool bf16, bool comm_quant, std::uint16_t y[kChunk], const std::uint16_t* partner, int n,
                            std::int64_t h, std::int64_t c, std::byte* dst_row, std::int8_t q[kChunk],
                            bool round_even = false) {
  if (partner != nullptr) {  // V1's TP add rounds bf16 half away from zero, V2's half to even
    for (int u = 0; u < n; ++u)
      y[u] = round_even ? tp_add_even(bf16, y[u], partner[u]) : tp_add(bf16, y[u], partner[u]);
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

// tp_send_counts and the rows of expand_x against dispatch's (both versions).
MOEDIST_HD void report_combine_rows(const DeviceGroup& g, const CombineArgs& a) {
  const Phase ph = Phase::combine_args;
  if (g.T == 2) {
    for (int i = 0; i < 2; ++i) {
      const std::int32_t v = a.tp_send_counts[i * a.tp_send_counts_stride];
      if (v != g.tp_counts[i])
        return record_failure(g.status, ErrorCode::invalid_argument, g.me, ph, Rule::tp_counts_differ, i, v,
                              g.tp_counts[i]);
    }
  }
  if (a.expand_x_rows < g.status->valid_rows) {
    record_failure(g.status, ErrorCode::invalid_shape, g.me, ph, Rule::expand_x_rows, 0, a.expand_x_rows,
                   g.status->valid_rows);
  }
}

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
  report_combine_rows(g, a);
}

// ---- V2 combine (V2 §4): the rows come back by their triples ----

// Entry t = b * K + j of a V2 combine against the dispatch handle: kNoMark when it agrees, else the
// mark of what it breaks, in the CPU path's order: a (BS,) mask that is no prefix (category 0, entry b),
// an id (1), the mask differing from dispatch's (2), an id differing from dispatch's (3).
MOEDIST_HD std::uint64_t combine_entry_mark_v2(const DeviceGroup& g, const CombineArgs& a, std::int64_t t) {
  const std::int64_t b = t / a.k, j = t % a.k;
  if (j == 0 && mask_breaks_prefix(a.mask, b)) return mark_of(0, b);
  const bool on = token_on(a.mask, b, a.k) && entry_on(a.mask, b, j);
  if (on && v2_entry_fault(g, a.ids, a.ids_row_stride, a.ids_col_stride, a.mask, a.special, b, j) != Rule::none)
    return mark_of(1, t);
  if (on != (g.dispatch_expand_idx[t] != -1)) return mark_of(2, t);
  if (on && a.ids[b * a.ids_row_stride + j * a.ids_col_stride] != g.dispatch_ids[t]) return mark_of(3, t);
  return kNoMark;
}

// Turns the lowest mark (or the counts) into the error; nothing when combine's arguments are dispatch's.
// Of ep_send_counts only the entries the kernels read are compared: the last of each half (V2 §4.1).
MOEDIST_HD void report_combine_args_v2(const DeviceGroup& g, const CombineArgs& a, std::uint64_t lowest_mark) {
  const Phase ph = Phase::combine_args;
  Status* st = g.status;
  if (lowest_mark != kNoMark) {
    const std::int64_t t = mark_entry(lowest_mark), b = t / a.k, j = t % a.k;
    switch (mark_category(lowest_mark)) {
      case 0:
        return record_failure(st, ErrorCode::invalid_argument, g.me, ph, Rule::mask_not_prefix, t);
      case 1: {
        const Rule rule = v2_entry_fault(g, a.ids, a.ids_row_stride, a.ids_col_stride, a.mask, a.special, b, j);
        return record_failure(st, ErrorCode::invalid_argument, g.me, ph, rule, t,
                              a.ids[b * a.ids_row_stride + j * a.ids_col_stride],
                              rule == Rule::id_range ? g.E : id_limit(g, a.special));
      }
      case 2:
        return record_failure(st, ErrorCode::invalid_argument, g.me, ph, Rule::mask_differs, t,
                              g.dispatch_expand_idx[t] == -1 ? 1 : 0);
      default:
        return record_failure(st, ErrorCode::invalid_argument, g.me, ph, Rule::ids_differ, t,
                              a.ids[b * a.ids_row_stride + j * a.ids_col_stride], g.dispatch_ids[t]);
    }
  }
  const int own_len = g.W * g.local_experts;
  for (int i = own_len - 1; i < own_len * (g.T == 2 ? 2 : 1); i += own_len) {
    const std::int32_t v = a.ep_send_counts[i * a.ep_send_counts_stride];
    if (v != g.recv_counts[i])
      return record_failure(st, ErrorCode::invalid_argument, g.me, ph, Rule::ep_counts_differ, i, v, g.recv_counts[i]);
  }
  report_combine_rows(g, a);
  if (a.assist_len < 3 * st->own_rows)
    record_failure(st, ErrorCode::invalid_shape, g.me, ph, Rule::assist_short, 0, a.assist_len, 3 * st->own_rows);
}

// Where this rank's row index lives (its window; a holder's for a source) and what it holds.
MOEDIST_HD std::uint64_t* index_of(const DeviceGroup& g, int global) {
  return reinterpret_cast<std::uint64_t*>(g.windows[global] + g.off.index);
}
MOEDIST_HD std::int64_t* index_counts_of(const DeviceGroup& g, int global) {
  return reinterpret_cast<std::int64_t*>(g.windows[global] + g.off.index_counts);
}
MOEDIST_HD std::size_t index_entry(const DeviceGroup& g, int source, std::int64_t b, std::int64_t slot) {
  return (static_cast<std::size_t>(source) * static_cast<std::size_t>(g.off.index_tokens) +
          static_cast<std::size_t>(b)) *
             static_cast<std::size_t>(g.off.index_slots) +
         static_cast<std::size_t>(slot);
}
// An index entry of call `seq`: the call's number in the high half, so that what an earlier call left
// never passes for this call's.
MOEDIST_HD std::uint64_t tagged_row(std::uint64_t seq, std::int64_t row) {
  return (seq << 32) | static_cast<std::uint32_t>(row);
}
MOEDIST_HD bool tag_is(std::uint64_t entry, std::uint64_t seq) { return (entry >> 32) == (seq & 0xffffffffu); }

// Row i's triple (assist_info_for_combine[3i .. 3i+2]) names a source EP rank, one of its tokens and a k
// this rank holds (< K on a MoE rank, K + its shared expert on a shared one). kNoMark, or the mark of
// the first entry of the triple that does not (category 0).
MOEDIST_HD std::uint64_t triple_mark(const DeviceGroup& g, const CombineArgs& a, std::int64_t i) {
  const std::int32_t source = a.assist[3 * i * a.assist_stride];
  const std::int32_t b = a.assist[(3 * i + 1) * a.assist_stride];
  const std::int32_t k = a.assist[(3 * i + 2) * a.assist_stride];
  if (source < 0 || source >= g.W) return mark_of(0, 3 * i);
  if (b < 0 || b >= g.source_bs[source]) return mark_of(0, 3 * i + 1);
  const bool shared = g.ep_rank < g.S;
  if (shared ? k != a.k + g.ep_rank / g.R : (k < 0 || k >= a.k)) return mark_of(0, 3 * i + 2);
  return kNoMark;
}
MOEDIST_HD void report_triple_mark(const DeviceGroup& g, const CombineArgs& a, std::uint64_t mark) {
  const std::int64_t at = mark_entry(mark);
  const std::int32_t value = a.assist[at * a.assist_stride];
  const std::int32_t source = a.assist[(at - at % 3) * a.assist_stride];
  const Phase ph = Phase::combine_index;
  if (at % 3 == 0)
    return record_failure(g.status, ErrorCode::invalid_argument, g.me, ph, Rule::triple_source, at, value, g.W);
  if (at % 3 == 1)
    return record_failure(g.status, ErrorCode::invalid_argument, g.me, ph, Rule::triple_token, at, value,
                          g.source_bs[source]);
  if (g.ep_rank < g.S)
    return record_failure(g.status, ErrorCode::invalid_argument, g.me, ph, Rule::triple_k_shared, at, value,
                          a.k + g.ep_rank / g.R);
  record_failure(g.status, ErrorCode::invalid_argument, g.me, ph, Rule::triple_k, at, value, a.k);
}

// Enters own row i (its triple checked) into this rank's index and counts it for its source; a triple
// that another row of this call already entered is an error.
MOEDIST_HD void index_row(const DeviceGroup& g, const CombineArgs& a, std::int64_t i, std::uint64_t seq) {
  const std::int32_t source = a.assist[3 * i * a.assist_stride];
  const std::int32_t b = a.assist[(3 * i + 1) * a.assist_stride];
  const std::int32_t k = a.assist[(3 * i + 2) * a.assist_stride];
  const std::uint64_t old = exchange_u64(index_of(g, g.me) + index_entry(g, source, b, k), tagged_row(seq, i));
  if (tag_is(old, seq)) {
    record_failure(g.status, ErrorCode::invalid_argument, g.me, Phase::combine_index, Rule::triple_repeated, 3 * i,
                   static_cast<std::int64_t>(old & 0xffffffffu));
  }
  add_i64(index_counts_of(g, g.me) + source, 1);
}

// The EP rank holding slot s of token b (s < K: entry s; K + j: shared expert j), -1 when no row comes
// back for it (an inactive token, a masked entry, a special expert).
MOEDIST_HD int holder_of_slot(const DeviceGroup& g, const CombineArgs& a, std::int64_t b, std::int64_t s) {
  if (!token_on(a.mask, b, a.k)) return -1;
  if (s >= a.k) return g.ep_rank % g.R + static_cast<int>(s - a.k) * g.R;
  if (!entry_on(a.mask, b, s)) return -1;
  const std::int32_t e = a.ids[b * a.ids_row_stride + s * a.ids_col_stride];
  return e < g.E ? g.S + e / g.L : -1;
}

// After the exchange: the row of slot s of token b in its holder's index, into found_rows. kNoMark, or
// the mark (category 1) of a slot its holder has no row for.
MOEDIST_HD std::uint64_t find_row(const DeviceGroup& g, const CombineArgs& a, std::int64_t b, std::int64_t s,
                                  std::uint64_t seq) {
  const int d = holder_of_slot(g, a, b, s);
  if (d < 0) return kNoMark;
  const int holder = global_rank(g, d, g.tp_rank);
  const std::uint64_t entry = on_this_host(g, holder) ? index_of(g, holder)[index_entry(g, g.ep_rank, b, s)]
                                                      : g.remote_index[b * g.remote_slots + s];
  if (!tag_is(entry, seq)) return mark_of(1, b * g.off.index_slots + s);
  g.found_rows[b * g.off.index_slots + s] = static_cast<std::int64_t>(entry & 0xffffffffu);
  return kNoMark;
}
// The rows holder d (EP rank, this lane) has of this rank: in its window, or as its host's proxy said.
MOEDIST_HD std::int64_t holder_count(const DeviceGroup& g, int d) {
  const int holder = global_rank(g, d, g.tp_rank);
  return on_this_host(g, holder) ? index_counts_of(g, holder)[g.ep_rank] : g.remote_counts[d];
}
// Holder d must hold exactly the rows this rank's dispatch record sent it: kNoMark, or the mark
// (category 0, the CPU path's first check) naming d.
MOEDIST_HD std::uint64_t holder_count_mark(const DeviceGroup& g, int d) {
  std::int64_t sent = 0;
  for (int l = 0; l < (d < g.S ? 1 : g.L); ++l) sent += g.record[d * g.L + l];
  return holder_count(g, d) == sent ? kNoMark : mark_of(0, d);
}
MOEDIST_HD void report_find_mark(const DeviceGroup& g, const CombineArgs& a, std::uint64_t mark) {
  const std::int64_t entry = mark_entry(mark);
  const Phase ph = Phase::combine_find;
  if (mark_category(mark) == 0) {
    const int d = static_cast<int>(entry), holder = global_rank(g, d, g.tp_rank);
    std::int64_t sent = 0;
    for (int l = 0; l < (d < g.S ? 1 : g.L); ++l) sent += g.record[d * g.L + l];
    return record_failure(g.status, ErrorCode::invalid_argument, holder, ph, Rule::rows_count_differ, d,
                          holder_count(g, d), sent);
  }
  const std::int64_t b = entry / g.off.index_slots, s = entry % g.off.index_slots;
  record_failure(g.status, ErrorCode::invalid_argument, global_rank(g, holder_of_slot(g, a, b, s), g.tp_rank), ph,
                 Rule::row_missing, b, s);
}

// <alpha_{which+1}[q], ori_x[b]> for entry t = b * K + j when it names const expert q, else 0.
MOEDIST_HD float const_logit(const DeviceGroup& g, const CombineArgs& a, std::int64_t t, int which) {
  const std::int64_t b = t / a.k, j = t % a.k;
  if (!token_on(a.mask, b, a.k) || !entry_on(a.mask, b, j)) return 0.0f;
  const std::int32_t e = a.ids[b * a.ids_row_stride + j * a.ids_col_stride];
  if (id_kind(g, a.special, e) != IdKind::constant) return 0.0f;
  const HalfRows& alpha = which == 0 ? a.alpha_1 : a.alpha_2;
  const std::uint16_t* w = alpha.data + (e - id_limit(g, a.special) + a.special.constant) * alpha.row_stride;
  const std::uint16_t* x = a.ori_x.data + b * a.ori_x.row_stride;
  const bool bf16 = a.bf16 != 0;
  float sum = 0.0f;
  for (std::int64_t h = 0; h < a.h; ++h) sum = dot_step(sum, bf16, w[h * alpha.col_stride], x[h * a.ori_x.col_stride]);
  return sum;
}

// One term of token b's sum (V2 §4.3), in the order of the slots: K entries, Sn shared experts, then
// shared_expert_x.
enum class TermKind : std::int32_t { none = 0, expert_row, copy, constant, plain };
struct TermV2 {
  TermKind kind = TermKind::none;
  bool weighted = false;
  int ep = 0;            // expert_row: the EP rank holding it (this lane)
  std::int64_t row = 0;  // expert_row: its row there; constant: the const expert
  float weight = 1.0f;
  ConstGate gate;
};
MOEDIST_HD int term_count(const DeviceGroup& g, std::int64_t k) { return static_cast<int>(k) + g.Sn + 1; }
MOEDIST_HD TermV2 term_of(const DeviceGroup& g, const CombineArgs& a, std::int64_t b, std::int64_t s) {
  TermV2 t;
  const std::int64_t slots = g.off.index_slots;
  if (s == a.k + g.Sn) {
    if (a.shared_x.data != nullptr && token_on(a.mask, b, a.k)) t.kind = TermKind::plain;
    return t;
  }
  const int d = holder_of_slot(g, a, b, s);
  if (d >= 0) {
    t.kind = TermKind::expert_row;
    t.ep = d;
    t.row = g.found_rows[b * slots + s];
  }
  if (s >= a.k || !token_on(a.mask, b, a.k) || !entry_on(a.mask, b, s)) return t;  // shared experts: weight 1
  t.weighted = true;
  t.weight = a.expert_scales != nullptr
                 ? a.expert_scales[b * a.expert_scales_row_stride + s * a.expert_scales_col_stride]
                 : 1.0f;
  const std::int32_t e = a.ids[b * a.ids_row_stride + s * a.ids_col_stride];
  switch (id_kind(g, a.special, e)) {
    case IdKind::routed:
    case IdKind::zero:
      break;
    case IdKind::copy:
      t.kind = TermKind::copy;
      break;
    case IdKind::constant: {
      t.kind = TermKind::constant;
      t.row = e - (id_limit(g, a.special) - a.special.constant);
      const float* logits = g.const_logits + 2 * (b * a.k + s);
      t.gate = const_gate(logits[0], logits[1]);
      break;
    }
  }
  return t;
}
// The rows a term's chunk is read from, besides a holder's window row: ori_x (copy, constant), the const
// expert's vector (constant), shared_expert_x (plain).
MOEDIST_HD const std::uint16_t* term_row(const CombineArgs& a, const TermV2& t, std::int64_t b,
                                         std::int64_t* col_stride) {
  const HalfRows& rows = t.kind == TermKind::plain ? a.shared_x : a.ori_x;
  *col_stride = rows.col_stride;
  return rows.data + b * rows.row_stride;
}
MOEDIST_HD const std::uint16_t* const_vector_row(const CombineArgs& a, const TermV2& t, std::int64_t* col_stride) {
  *col_stride = a.const_v.col_stride;
  return a.const_v.data + t.row * a.const_v.row_stride;
}
// Adds a term's chunk: y its row's 16-bit values (dequantized with comm quant), v the const vector's.
MOEDIST_HD void accumulate_term(bool bf16, float acc[kChunk], const TermV2& t, const std::uint16_t y[kChunk],
                                const std::uint16_t v[kChunk], int n) {
  for (int u = 0; u < n; ++u) {
    if (t.kind == TermKind::constant)
      acc[u] = accumulate_const(acc[u], bf16, y[u], v[u], t.gate, t.weight);
    else
      acc[u] =
          t.weighted ? accumulate_weighted(acc[u], bf16, y[u], t.weight) : accumulate_unweighted(acc[u], bf16, y[u]);
  }
}

// ---- across hosts ----

// Where slot `slot` of token b comes back from: row `row` of EP rank ep's combine region (this lane) when
// ep is on this host, else the copy its host's proxy sent.
MOEDIST_HD const std::byte* staged_row(const DeviceGroup& g, int ep, std::int64_t row, std::int64_t b,
                                       std::int64_t slot) {
  const int holder = global_rank(g, ep, g.tp_rank);
  if (on_this_host(g, holder))
    return g.windows[holder] + g.off.combine_rows + static_cast<std::size_t>(row) * g.off.combine_pitch;
  return g.remote_rows + static_cast<std::size_t>(b * g.remote_slots + slot) * g.off.combine_pitch;
}

// What slot `slot` of token b asks of another host (holder -1: nothing, its row is on this host or none
// comes back). V1: the row its target got; V2: the slot, found by the proxy in the holder's index.
MOEDIST_HD RemoteRequest remote_request_of(const DeviceGroup& g, const CombineArgs& a, std::int64_t b,
                                           std::int64_t slot) {
  RemoteRequest q;
  if (a.version == 2) {
    if (slot >= a.k + g.Sn) return q;
    const int d = holder_of_slot(g, a, b, slot);
    if (d < 0 || d >= g.W || on_this_host(g, global_rank(g, d, g.tp_rank))) return q;
    q.holder = global_rank(g, d, g.tp_rank);
  } else {
    if (slot >= target_count(g, a.k, 1)) return q;
    const Target tg = call_target(g, a, b, slot);
    if (tg.ep < 0 || tg.ep >= g.W || on_this_host(g, global_rank(g, tg.ep, g.tp_rank))) return q;
    q.holder = global_rank(g, tg.ep, g.tp_rank);
    q.row = tg.row;
  }
  q.source_ep = g.ep_rank;
  q.b = b;
  q.slot = slot;
  return q;
}

// A proxy answering request q of EP rank `source_ep` (sent by another host: every field is checked before
// it forms an address): the staged row it names, or nullptr when it names none. *entry is the holder's
// index entry for V2 (for a slot the holder has no row of call `seq` for, a tag of another call: the
// source reports the missing row), and for V1 1 when the row is there, 0 when not.
MOEDIST_HD const std::byte* requested_row(const DeviceGroup& g, const RemoteRequest& q, int version, std::uint64_t seq,
                                          int source_ep, std::uint64_t* entry) {
  *entry = 0;
  if (q.source_ep != source_ep) return nullptr;  // a source asks for its own rows only
  // A holder of this host and of this rank's TP lane: the ones whose combine flags this rank waited for.
  if (q.holder < 0 || q.holder >= g.world || q.holder % g.T != g.tp_rank || !on_this_host(g, q.holder)) return nullptr;
  std::int64_t row = q.row;
  if (version == 2) {
    if (q.source_ep < 0 || q.source_ep >= g.W || q.b < 0 || q.b >= g.off.index_tokens || q.slot < 0 ||
        q.slot >= g.off.index_slots)
      return nullptr;
    *entry = index_of(g, q.holder)[index_entry(g, q.source_ep, q.b, q.slot)];
    if (!tag_is(*entry, seq)) return nullptr;
    row = static_cast<std::int64_t>(*entry & 0xffffffffu);
  }
  if (row < 0 || row >= g.off.receive_rows) return nullptr;
  if (version != 2) *entry = 1;
  return g.windows[q.holder] + g.off.combine_rows + static_cast<std::size_t>(row) * g.off.combine_pitch;
}

}  // namespace moedist::cuda
