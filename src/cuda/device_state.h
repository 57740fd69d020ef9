// Plain structs shared by the CUDA kernels (src/cuda/kernels.cu) and the host side of the CUDA group
// (src/cuda/cuda_group.cpp): the status block the GPU reports errors through, the byte layout of a
// rank's window, and the arguments of one call. No CUDA headers, so g++ compiles the host side.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/hd.h"
#include "contract/record_checks.h"

namespace moedist::cuda {

// Which step of a call a device-side error comes from (ErrorCode says what kind of error).
enum class Phase : std::int32_t {
  none = 0,
  dispatch_ids,
  dispatch_counts,
  dispatch_rows,
  combine_args,
  combine_tp,
  combine_rows,
  combine_index,  // V2: the expert rank indexes its rows by their triples
  combine_find,   // V2: the source rank finds its rows in the expert ranks' indexes
};

// The rule an error broke, for the host's message.
enum class Rule : std::int32_t {
  none = 0,
  id_range,     // expert_ids[index] = value is outside [0, limit)
  id_repeated,  // expert_ids[index] = value repeats an id of its row
  peer_failed,  // rank `peer` failed in the same call
  timeout,      // rank `peer` did not arrive within the timeout
  same_call,    // rank `peer` has another value (value) of the call field `index` (CallField) than this rank (limit)
  bad_record,   // rank `peer`'s count record breaks a rule (index: entry, value: its value, limit: bound)
  capacity,     // rank `peer` would receive `value` rows, more than `limit`
  ids_differ,   // combine: expert_ids[index] = value differs from dispatch's (limit)
  expand_idx_differs,  // combine: expand_idx[index] = value differs from dispatch's (limit)
  ep_counts_differ,    // combine: ep_send_counts[index] = value differs from dispatch's ep_recv_counts (limit)
  tp_counts_differ,    // combine: tp_send_counts[index] = value differs from dispatch's tp_recv_counts (limit)
  expand_x_rows,       // combine: expand_x has `value` rows, fewer than the `limit` valid rows
  out_of_step,         // rank `peer` signalled call `value` while this rank waits for call `limit`
  // The V2 operators.
  id_range_special,    // expert_ids[index] = value is outside [0, limit = E + Z + C + Q)
  id_repeated_routed,  // expert_ids[index] = value repeats an id its row routes (unmasked)
  mask_not_prefix,     // x_active_mask[index] is true after a false (a (BS,) mask must be a prefix)
  mask_differs,       // combine: x_active_mask has entry `index` (b * K + k) on (value 1) or off (0), unlike dispatch's
  other_operator,     // rank `peer` made a V`value` call while this rank made a V`limit` one
  triple_source,      // combine: assist_info_for_combine[index] = value is not an EP rank in [0, limit)
  triple_token,       // combine: assist_info_for_combine[index] = value is not a token of its source, [0, limit)
  triple_k,           // combine: assist_info_for_combine[index] = value is not a k in [0, K = limit) (a MoE rank)
  triple_k_shared,    // combine: assist_info_for_combine[index] = value is not K + this shared rank's expert = limit
  triple_repeated,    // combine: the triple at assist_info_for_combine[index] repeats the one of row `value`
  assist_short,       // combine: assist_info_for_combine has `value` entries, fewer than 3 * own rows = limit
  row_missing,        // combine: rank `peer` holds no row for token `index`, slot `value` (k, or K + j) of this rank
  rows_count_differ,  // combine: rank `peer` holds `value` rows of this rank, which sends it `limit`
};

// The same-call fields as contract/record_checks.h compares them; Status::index holds one.
using CallField = contract::CallField;

// Lives in device memory; every call ends with a copy into a pinned host mirror, which the host reads
// after synchronizing. The first error wins (atomicCAS on code); once it is set, a rank's kernels write
// no outputs (they still signal, with the failed bit, and still wait for their peers to arrive).
struct Status {
  std::int32_t code = 0;  // 0 = no error, else a moedist::ErrorCode
  std::int32_t peer = -1;
  std::int32_t phase = 0;
  std::int32_t rule = 0;
  std::int64_t index = 0, value = 0, limit = 0;
  std::uint64_t first_bad_entry = ~std::uint64_t{0};  // scratch: the lowest failing entry of a validation
  std::int64_t valid_rows = 0;                        // the latest dispatch's valid rows
  std::int64_t own_rows = 0, peer_rows = 0;           // ... and its split (T == 2)
  std::uint64_t seq = 0;                              // calls issued on the device so far
  std::int64_t active_tokens = 0;                     // V2 dispatch: this rank's active tokens (scratch)
  std::int64_t combine_signalled_failed = 0;          // the failed bit this rank's combine flags carried
};

// What a rank publishes to every rank at the start of a dispatch (into slot [rank] of their inbox).
struct RecordHeader {
  std::int64_t bs = 0, k = 0, h = 0;
  std::int32_t dtype = 0, mode = 0, has_expert_scales = 0, failed = 0;
  std::int64_t active = 0;   // tokens that take part (V2: x_active_mask); = bs in V1
  std::int32_t version = 0;  // 1: a V1 operator's record, 2: a V2 one
  std::int32_t unused = 0;
  std::int64_t reserved = 0;
};
static_assert(sizeof(RecordHeader) == 64);

// Byte offsets inside every rank's window. All ranks use the same layout, sized for the largest shape
// the group was created for, so any rank computes a peer's addresses from the peer's base alone.
struct WindowOffsets {
  std::size_t count_flags = 0;    // uint64[world]: rank r's count record for call n is in the inbox
  std::size_t rows_flags = 0;     // uint64[world]: rank r wrote its dispatch rows of call n
  std::size_t combine_flags = 0;  // uint64[world]: rank r staged its expert outputs of call n
  std::size_t tp_flag = 0;        // uint64: the TP peer wrote its partial rows of call n
  std::size_t inbox = 0;          // world records of record_stride bytes
  std::size_t record_stride = 0;
  std::size_t expand_x = 0;       // dispatch_rows rows of H elements (int8 or 16-bit)
  std::size_t dynamic_scales = 0, expand_scales = 0;  // dispatch_rows floats each
  std::size_t combine_rows = 0;   // receive_rows rows of combine_pitch bytes (16-bit rows or int8 + group scales)
  std::size_t combine_pitch = 0;
  std::size_t tp_inbox = 0;       // receive_rows rows of H 16-bit elements (T == 2)
  // V2: the triples of the dispatch rows (3 int32 per row), and combine's row index: for every source EP
  // rank, token and (token, k) slot (K + Sn of them) the row holding it, tagged with the call
  // ((seq << 32) | row, int64), then per source rank the rows it has here (int64).
  std::size_t assist = 0;
  std::size_t index = 0, index_counts = 0;
  std::int64_t index_tokens = 0, index_slots = 0;
  std::size_t total = 0;
  std::int64_t dispatch_rows = 0, receive_rows = 0;
};

// A flag word holds (seq << 1) | failed: the call it signals, and whether the signalling rank had failed.
MOEDIST_HD constexpr std::uint64_t flag_word(std::uint64_t seq, bool failed) { return (seq << 1) | (failed ? 1u : 0u); }

// The group as every kernel sees it (passed by value; arrays live in device memory).
struct DeviceGroup {
  int W = 0, S = 0, E = 0, L = 0, T = 1, ep_rank = 0, tp_rank = 0, world = 0, me = 0;
  int Sn = 0, R = 0;            // V2: shared experts, and the shared-expert ranks of each (contract Topology)
  int local_experts = 0;        // of this rank
  std::int64_t global_bs = 0;
  std::int64_t timeout_ns = 0;
  WindowOffsets off;
  std::byte* const* windows = nullptr;  // [world] base of each rank's window in this process
  Status* status = nullptr;             // device alias of the host-mapped status
  // Scratch and the dispatch handle (device memory, sized for the largest shape).
  std::int32_t* sort_keys_in = nullptr;  // [max BS*K]
  std::int32_t* sort_keys_out = nullptr;
  std::int32_t* sort_vals_in = nullptr;
  std::int32_t* sort_vals_out = nullptr;
  std::int32_t* dispatch_ids = nullptr;        // [max BS*K] the latest dispatch's expert_ids, for combine's check
  std::int32_t* dispatch_expand_idx = nullptr; // [max BS*K]
  std::int32_t* expert_counts = nullptr;       // [E] this rank's rows per expert
  std::int32_t* record = nullptr;              // [W*L] this rank's count record (staging)
  std::int64_t* block_start = nullptr;         // [W*L] first row of this rank's block at (d, l) in d's own rows
  std::int64_t* tp_shift = nullptr;            // [W] rows of (d, other TP lane)'s own part: where copies for it go
  std::int64_t* shared_start = nullptr;        // [S] first row of this rank's block on shared rank s
  std::int32_t* recv_counts = nullptr;         // [W*local*2] this rank's ep_recv_counts (copy kept for combine)
  std::int32_t* tp_counts = nullptr;           // [2]
  std::int64_t* call_shape = nullptr;          // [3] the latest dispatch's bs, k, h (combine checks against it)
  // V2 (the dispatch handle and combine's scratch, sized for the largest shape).
  std::int32_t* token_slot = nullptr;  // [max BS] an active token's place among them, -1 inactive
  std::int64_t* source_bs = nullptr;   // [W] BS of each EP rank of this lane (triples name its tokens)
  std::int64_t* found_rows = nullptr;  // [max BS * (K + Sn)] the holder's row of each of this rank's slots
  float* const_logits = nullptr;       // [max BS * K * 2] <alpha_1, x>, <alpha_2, x> of const entries
  // A group across hosts (docs/cuda.md, "Across hosts"): windows of other hosts' ranks are null in
  // `windows`; the rows this rank reduces from them arrive through their hosts' proxies, one per (token,
  // slot) at (b * remote_slots + slot), with (V2) the holder's index entry for the slot and the holders'
  // counts of this rank's rows. All null in a group on one host.
  std::int64_t remote_slots = 0;          // K + max(1, Sn): the slots of a token (V1: K + its shared expert)
  std::byte* remote_rows = nullptr;       // [max BS * remote_slots] rows of combine_pitch bytes
  std::uint64_t* remote_index = nullptr;  // [max BS * remote_slots] V2: the holder's tagged index entry
  std::int64_t* remote_counts = nullptr;  // [W] V2: the rows a holder on another host has of this rank
  std::int64_t* remote_failed = nullptr;  // [world] per proxy: nonzero when it reported a failure
};

// A row a source rank needs from a holder on another host, asked of the holder's host's proxy: V1 names
// the row, V2 the source's (b, slot), which the proxy looks up in the holder's index.
struct RemoteRequest {
  std::int32_t holder = -1;  // global rank of the holder; -1: none (the slot's row is not remote)
  std::int32_t source_ep = 0;
  std::int64_t b = 0, slot = 0;
  std::int64_t row = -1;  // V1: the row in the holder's combine region; V2: -1
};

// A (BS,) or (BS, K) bool mask (x_active_mask) in device memory; absent when data is null.
struct TokenMask {
  const std::uint8_t* data = nullptr;
  int two_d = 0;
  std::int64_t row_stride = 0, col_stride = 1;
};

// Rows of 16-bit values (ori_x, shared_expert_x, the const experts' tensors); absent when data is null.
struct HalfRows {
  const std::uint16_t* data = nullptr;
  std::int64_t row_stride = 0, col_stride = 1;
};

// performance_info (V2 §5.1): (W,) int64 raised to the longest wait per EP rank, in µs; absent when null.
struct PerfOut {
  std::int64_t* data = nullptr;
  std::int64_t stride = 1;
};

// The special experts of a V2 call (V2 §3.4): ids [E, E+Z) zero, [E+Z, E+Z+C) copy, [E+Z+C, E+Z+C+Q) const.
struct SpecialIds {
  std::int32_t zero = 0, copy = 0, constant = 0;
};

// The arguments of one dispatch.
struct DispatchArgs {
  const std::uint16_t* x = nullptr;
  std::int64_t x_row_stride = 0, x_col_stride = 1;
  const std::int32_t* ids = nullptr;
  std::int64_t ids_row_stride = 0, ids_col_stride = 1;
  const float* scales = nullptr;        // (E [+1], H) rows, row stride scales_row_stride, or null
  std::int64_t scales_row_stride = 0;
  const float* expert_scales = nullptr; // (BS, K), or null
  std::int64_t expert_scales_row_stride = 0, expert_scales_col_stride = 1;
  std::int64_t bs = 0, k = 0, h = 0;
  int bf16 = 1, quant = 0, expert_token_nums_type = 1, dtype_code = 0;
  std::int64_t capacity_moe = 0, capacity_shared = 0;  // the contract's most rows per destination kind
  // Outputs outside the window.
  std::int32_t* expand_idx = nullptr;          // [BS*K]
  std::int64_t* expert_token_nums = nullptr;   // [local]
  std::int32_t* ep_recv_counts = nullptr;      // [W*local*(T==2?2:1)]
  std::int32_t* tp_recv_counts = nullptr;      // [2] or null
  // V2 (version 2): active entries, special experts, Sn shared experts, triples; expand_idx is null.
  int version = 1;
  TokenMask mask;
  SpecialIds special;
  PerfOut perf;
};

// The arguments of one combine.
struct CombineArgs {
  const std::uint16_t* expand_x = nullptr;
  std::int64_t expand_x_rows = 0, expand_x_row_stride = 0, expand_x_col_stride = 1;
  const std::int32_t* ids = nullptr;
  std::int64_t ids_row_stride = 0, ids_col_stride = 1;
  const std::int32_t* expand_idx = nullptr;
  std::int64_t expand_idx_stride = 1;
  const std::int32_t* ep_send_counts = nullptr;
  std::int64_t ep_send_counts_stride = 1;
  const std::int32_t* tp_send_counts = nullptr;
  std::int64_t tp_send_counts_stride = 1;
  const float* expert_scales = nullptr;
  std::int64_t expert_scales_row_stride = 0, expert_scales_col_stride = 1;
  std::int64_t bs = 0, k = 0, h = 0;
  int bf16 = 1, comm_quant = 0, dtype_code = 0;
  bool staged_in_place = false;  // expand_x is this rank's combine buffer: no staging copy
  std::uint16_t* out = nullptr;
  std::int64_t out_row_stride = 0, out_col_stride = 1;
  // V2 (version 2): rows found by their triples, special experts, shared_expert_x, V2's TP rounding;
  // expand_idx is null.
  int version = 1;
  TokenMask mask;
  SpecialIds special;
  const std::int32_t* assist = nullptr;  // assist_info_for_combine
  std::int64_t assist_stride = 1, assist_len = 0;
  HalfRows ori_x, shared_x, alpha_1, alpha_2, const_v;
  PerfOut perf;
};

}  // namespace moedist::cuda
