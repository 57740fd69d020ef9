// What the V1 and V2 reference oracles compute the same way: the row geometry of a case, the payload of a
// dispatched row (V1 §2.2, §2.4; unchanged in V2 §2.2), how a rank's dispatch outputs are assembled from
// its own EP rows and its TP peer's (V1 §3.5, V2 §3.8), identity experts, and comm_quant_mode 2's round
// trip (V1 §4.5, V2 §2.6). One copy, so the two oracles cannot drift apart where the contract does not.
// Internal to the oracles; like them it shares nothing with the fast path beyond src/numeric/convert.h.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "numeric/convert.h"

namespace moedist::oracle::common {

// ---------------------------------------------------------------------------------------------
// Geometry of a case (oracle::Case or oracle::v2::Case)

template <class Case>
int tp_domain_size(const Case& c) {
  return std::max(c.tp_world_size, 1);
}

template <class Case>
int global_rank(const Case& c, int ep_rank, int tp_rank) {
  return ep_rank * tp_domain_size(c) + tp_rank;
}

// Experts per MoE rank, L = E / (W - S).
template <class Case>
int moe_local_expert_num(const Case& c) {
  return c.moe_expert_num / (c.ep_world_size - c.shared_expert_rank_num);
}

// ---------------------------------------------------------------------------------------------
// Dispatch

// A dispatched row's data as the receiving rank gets it.
struct RowPayload {
  std::vector<std::uint16_t> x;  // quant_mode 0: bit copy of the source row
  std::vector<std::int8_t> q;    // quant_mode 2
  float dynamic_scale = 0.0f;    // quant_mode 2
};

// The payload of the h values at `source` (x's dtype bits): a bit copy for quant_mode 0; for quant_mode 2
// the dynamic int8 quantization on the sender, after multiplying by the smooth row `smooth` (nullptr:
// no smooth scales).
RowPayload make_payload(numeric::Half dtype, int quant_mode, const std::uint16_t* source, const float* smooth,
                        std::int64_t h);

// Fills the outputs a rank's dispatch has in both versions: its own EP group's rows, then (TP) the
// peer's own EP rows; their payloads and expand_scales; the counts per source and TP half; and
// expert_token_nums (prefix sums or counts per local expert). `own` and `peer` are the rank's and its
// TP peer's EpRankDispatch (rows with .payload and .expand_scale, ep_recv_counts, rows_per_local_expert);
// `peer` is nullptr without TP.
template <class Case, class EpRankDispatch, class RankOutput>
void fill_dispatch_outputs(const Case& c, const EpRankDispatch& own, const EpRankDispatch* peer, int tp_rank,
                           bool any_expert_scales, RankOutput& out) {
  using DeliveredRow = typename decltype(own.rows)::value_type;
  std::vector<const DeliveredRow*> rows;
  for (const DeliveredRow& row : own.rows) rows.push_back(&row);
  if (peer != nullptr) {
    for (const DeliveredRow& row : peer->rows) rows.push_back(&row);
  }
  out.valid_rows = static_cast<std::int64_t>(rows.size());
  for (const DeliveredRow* row : rows) {
    if (c.quant_mode == 0) {
      out.expand_x.insert(out.expand_x.end(), row->payload.x.begin(), row->payload.x.end());
    } else {
      out.expand_x_int8.insert(out.expand_x_int8.end(), row->payload.q.begin(), row->payload.q.end());
      out.dynamic_scales.push_back(row->payload.dynamic_scale);
    }
    if (any_expert_scales) out.expand_scales.push_back(row->expand_scale);
  }

  out.ep_recv_counts = own.ep_recv_counts;
  if (peer != nullptr) {
    out.ep_recv_counts.insert(out.ep_recv_counts.end(), peer->ep_recv_counts.begin(), peer->ep_recv_counts.end());
    out.tp_recv_counts.assign(2, 0);
    out.tp_recv_counts[tp_rank] = static_cast<std::int32_t>(own.rows.size());
    out.tp_recv_counts[1 - tp_rank] = static_cast<std::int32_t>(peer->rows.size());
  }

  std::int64_t cumulative = 0;
  for (std::size_t l = 0; l < own.rows_per_local_expert.size(); ++l) {
    const std::int64_t count = own.rows_per_local_expert[l] + (peer != nullptr ? peer->rows_per_local_expert[l] : 0);
    cumulative += count;
    out.expert_token_nums.push_back(c.expert_token_nums_type == 0 ? cumulative : count);
  }
}

// ---------------------------------------------------------------------------------------------
// Combine arithmetic

// An identity expert's output for a rank's dispatched rows, valid_rows * h in x's dtype: the rows
// themselves (quant_mode 0), or their dequantized values (quant_mode 2).
std::vector<std::uint16_t> identity_expert_output(numeric::Half dtype, int quant_mode,
                                                  const std::vector<std::uint16_t>& expand_x,
                                                  const std::vector<std::int8_t>& expand_x_int8,
                                                  const std::vector<float>& dynamic_scales, std::int64_t valid_rows,
                                                  std::int64_t h);

// The expert outputs Y of every global rank, valid_rows * h in x's dtype: the rank's combine_x where it
// gave one (its size checked with the oracle's `require`), else the identity expert's.
template <class Case, class RankOutput, class Require>
std::vector<std::vector<std::uint16_t>> expert_outputs(const Case& c, const std::vector<RankOutput>& outputs,
                                                       Require require) {
  const std::int64_t h = c.h;
  std::vector<std::vector<std::uint16_t>> expert_out(c.ranks.size());
  for (std::size_t g = 0; g < c.ranks.size(); ++g) {
    const RankOutput& out = outputs[g];
    if (c.ranks[g].has_combine_x) {
      require(static_cast<std::int64_t>(c.ranks[g].combine_x.size()) == out.valid_rows * h,
              "combine_x must hold valid_rows * h values");
      expert_out[g] = c.ranks[g].combine_x;
    } else {
      expert_out[g] = identity_expert_output(c.dtype, c.quant_mode, out.expand_x, out.expand_x_int8, out.dynamic_scales,
                                             out.valid_rows, h);
    }
  }
  return expert_out;
}

// comm_quant_mode 2: quantize an expert-output row in groups of 8 on the sender and dequantize it on the
// receiver, in place. The last group is shorter when h is not a multiple of 8.
void comm_quant_round_trip(numeric::Half dtype, std::uint16_t* row, std::int64_t h);

}  // namespace moedist::oracle::common
