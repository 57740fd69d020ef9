// Turns the status the GPU recorded into the typed error the host throws (pure C++: no CUDA needed, so
// the CPU emulation test checks the messages too).
#include "cuda/status_errors.h"

#include <algorithm>

#include "common/format.h"
#include "moedist/error.h"

namespace moedist::cuda {

namespace {

const char* phase_name(Phase p) {
  switch (p) {
    case Phase::dispatch_ids: return "dispatch.ids";
    case Phase::dispatch_counts: return "dispatch.counts";
    case Phase::dispatch_rows: return "dispatch.rows";
    case Phase::combine_args: return "combine.args";
    case Phase::combine_tp: return "combine.tp";
    case Phase::combine_rows: return "combine.rows";
    case Phase::combine_index:
      return "combine.index";
    case Phase::combine_find:
      return "combine.find";
    case Phase::none: break;
  }
  return "cuda";
}

const char* call_field_name(std::int64_t f) {
  switch (static_cast<CallField>(f)) {
    case CallField::bs: return "BS (with global_bs = 0 every rank needs the same BS)";
    case CallField::k: return "K";
    case CallField::h: return "H";
    case CallField::dtype: return "the dtype code";
    case CallField::mode: return "quant_mode";
    case CallField::expert_scales: return "expert_scales given (1) or not (0)";
  }
  return "a call field";
}

}  // namespace

void throw_status_error(const Status& st, int me, std::int64_t call_k) {
  if (st.code == 0) return;
  const auto code = static_cast<ErrorCode>(st.code);
  const auto rule = static_cast<Rule>(st.rule);
  const char* phase = phase_name(static_cast<Phase>(st.phase));
  const std::int64_t k = std::max<std::int64_t>(call_k, 1);
  switch (rule) {
    case Rule::id_range:
      fail(code, concat("expert_ids[", st.index / k, ", ", st.index % k, "]"), concat(st.value),
           concat("must be in [0, moe_expert_num = ", st.limit, ")"));
    case Rule::id_repeated:
      fail(code, concat("expert_ids[", st.index / k, ", ", st.index % k, "]"), concat(st.value),
           concat("the K ids of a row must be distinct; row ", st.index / k, " repeats it"));
    case Rule::id_range_special:
      fail(code, concat("expert_ids[", st.index / k, ", ", st.index % k, "]"), concat(st.value),
           concat("must be in [0, moe_expert_num + zero, copy and const experts = ", st.limit, ")"));
    case Rule::id_repeated_routed:
      fail(code, concat("expert_ids[", st.index / k, ", ", st.index % k, "]"), concat(st.value),
           concat("the ids a row routes must be distinct; row ", st.index / k, " repeats it"));
    case Rule::mask_not_prefix:
      fail(code, concat("x_active_mask[", st.index, "]"), "true",
           concat("every true must come before every false (x_active_mask[", st.index - 1,
                  "] is false): active tokens are a prefix of x"));
    case Rule::mask_differs:
      fail(code, concat("x_active_mask[", st.index / k, ", ", st.index % k, "]"), st.value != 0 ? "on" : "off",
           "must switch the entries on and off as the latest dispatch's x_active_mask did: combine pairs with it");
    case Rule::triple_source:
      fail(code, concat("assist_info_for_combine[", st.index, "]"), concat(st.value),
           concat("must be a source EP rank in [0, ", st.limit, ") (row ", st.index / 3,
                  "'s triple; use dispatch's assist_info_for_combine)"));
    case Rule::triple_token:
      fail(code, concat("assist_info_for_combine[", st.index, "]"), concat(st.value),
           concat("must be a token of its source EP rank, in [0, ", st.limit, ") (row ", st.index / 3,
                  "'s triple; use dispatch's assist_info_for_combine)"));
    case Rule::triple_k:
      fail(code, concat("assist_info_for_combine[", st.index, "]"), concat(st.value),
           concat("must be in [0, K = ", st.limit, ") (row ", st.index / 3,
                  "'s triple; use dispatch's assist_info_for_combine)"));
    case Rule::triple_k_shared:
      fail(code, concat("assist_info_for_combine[", st.index, "]"), concat(st.value),
           concat("must be K + the shared expert of this rank = ", st.limit, " (row ", st.index / 3,
                  "'s triple; use dispatch's assist_info_for_combine)"));
    case Rule::triple_repeated:
      fail(code, concat("assist_info_for_combine[", st.index, "]"), "a repeated triple",
           concat("row ", st.index / 3, " and row ", st.value,
                  " carry the same triple (source, token, k): use dispatch's assist_info_for_combine"));
    case Rule::assist_short:
      fail(code, "assist_info_for_combine.shape", concat("(", st.value, ",)"),
           concat("must hold the triples of the latest dispatch's own rows, ", st.limit, " entries"));
    case Rule::row_missing:
      fail(code, "assist_info_for_combine", concat("(rank ", st.peer, "'s)"),
           concat("has no row for token ", st.index, ", k ", st.value,
                  " of this rank: pass combine each rank's own dispatch outputs"));
    case Rule::rows_count_differ:
      fail(code, "assist_info_for_combine", concat("(rank ", st.peer, "'s)"),
           concat("holds ", st.value, " rows of this rank, but expert_ids and x_active_mask send it ", st.limit,
                  ": pass combine the expert_ids, x_active_mask and special-expert counts given to dispatch, and each "
                  "rank its "
                  "own dispatch outputs"));
    case Rule::other_operator:
      throw PeerError(code, st.peer, phase,
                      concat("rank ", me, " made a V", st.limit, " call but rank ", st.peer, " a V", st.value,
                             " one: every rank must call the same operators"));
    case Rule::ids_differ:
      fail(code, concat("expert_ids[", st.index / k, ", ", st.index % k, "]"), concat(st.value),
           concat("must equal the latest dispatch's expert_ids (", st.limit, "): combine pairs with it"));
    case Rule::expand_idx_differs:
      fail(code, concat("expand_idx[", st.index, "]"), concat(st.value),
           concat("must equal the latest dispatch's expand_idx (", st.limit, ")"));
    case Rule::ep_counts_differ:
      fail(code, concat("ep_send_counts[", st.index, "]"), concat(st.value),
           concat("must equal the latest dispatch's ep_recv_counts (", st.limit, ")"));
    case Rule::tp_counts_differ:
      fail(code, concat("tp_send_counts[", st.index, "]"), concat(st.value),
           concat("must equal the latest dispatch's tp_recv_counts (", st.limit, ")"));
    case Rule::expand_x_rows:
      fail(code, "expand_x.shape[0]", concat(st.value),
           concat("must be >= the latest dispatch's ", st.limit, " valid rows"));
    case Rule::peer_failed:
      throw PeerError(code, st.peer, phase, concat("rank ", me, ": rank ", st.peer, " failed in the same call (", phase, "); see its error"));
    case Rule::timeout:
      throw PeerError(code, st.peer, phase,
                      concat("rank ", me, ": rank ", st.peer, " did not arrive within ", st.limit, " ms in ", phase));
    case Rule::same_call:
      throw PeerError(code, st.peer, phase,
                      concat("rank ", me, " has ", call_field_name(st.index), " = ", st.limit, " but rank ", st.peer, " has ", st.value,
                             ": all ranks must agree on it"));
    case Rule::bad_record:
      throw PeerError(code, st.peer, phase,
                      concat("rank ", me, ": the count record of rank ", st.peer, " is inconsistent: ",
                             st.index == -1   ? "BS "
                             : st.index == -2 ? "rows to MoE experts "
                             : st.index == -3 ? "rows to shared experts "
                             : st.index == -4 ? "active tokens "
                                              : "an entry ",
                             st.index >= 0 ? concat(st.index, " = ") : std::string(), st.value, " (bound or expected ",
                             st.limit, ")"));
    case Rule::out_of_step:
      throw PeerError(code, st.peer, phase,
                      concat("rank ", me, ": rank ", st.peer, " signalled call ", st.value, " while this rank waits for call ", st.limit,
                             " in ", phase, ": the ranks are out of step (a rank skipped or repeated a call)"));
    case Rule::capacity:
      throw PeerError(code, st.peer, phase,
                      concat("rank ", me, ": rank ", st.peer, " would receive ", st.value, " rows but can hold at most ", st.limit));
    case Rule::none:
      break;
  }
  throw Error(code, concat("rank ", me, ": the GPU reported error code ", st.code, " in ", phase));
}

}  // namespace moedist::cuda
