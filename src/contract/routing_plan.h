// The routing plan (contract §3.2-§3.4): what a rank sends where, and where every block lands.
// Pure: inputs are the rank's expert_ids and the send-count records of its EP group.
#pragma once

#include <cstdint>
#include <vector>

#include "contract/blocks.h"
#include "contract/layout.h"
#include "moedist/tensor.h"

namespace moedist::contract {

// What one rank sends, from its own expert_ids alone.
struct SendPlan {
  // counts[d * L + l]: rows for EP rank d's local expert l. A shared-expert rank d uses entry l = 0
  // for the tokens of this (MoE) rank it receives under the V1 split.
  std::vector<std::int32_t> counts;
  // expand_idx[b * K + k]: the occurrence number of expert_ids[b, k] among this rank's earlier
  // routing entries (§3.2), i.e. the entry's slot inside its (expert, source rank) block; 0 for the
  // entries of inactive tokens (b >= active), which are not sent (the NPU leaves them unwritten).
  std::vector<std::int32_t> expand_idx;

  // Routes the first `active` tokens of expert_ids (x_active_mask; all of them without one), whose
  // ids must already be validated (in [0, E)). Reuses the vectors' storage.
  void build(const Topology& topo, const TensorView& expert_ids, int source_ep, std::int64_t active);

 private:
  std::vector<std::int32_t> seen_;  // per expert, scratch
};

// ep_recv_counts of EP rank `dest` (its own half, W * local_experts(dest) entries): the inclusive prefix
// sum over its blocks, (local expert, source rank) order on a MoE rank (§3.3); on a shared-expert rank
// the split of its own rows for sources r < S and the rows of sources r >= S (§3.4.1).
// records(r) returns source rank r's SendPlan::counts; dest_bs is the destination's own active tokens
// (its BS without x_active_mask), which a shared-expert rank keeps as its own rows. Returns the
// rows in all; `out` is int64 (or int32 once the total is known to fit: see contract/blocks.h).
template <class Records, class Out>
std::int64_t receive_prefix_sums(const Topology& topo, const Records& records, int dest, std::int64_t dest_bs,
                                 Out* out) {
  // contract/blocks.h, shared with the GPU
  return receive_prefix_sums(topo.W, topo.S, topo.L, records, dest, dest_bs, out);
}

}  // namespace moedist::contract
