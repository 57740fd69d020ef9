#include "contract/routing_plan.h"

#include <algorithm>

#include "contract/shared_split.h"

namespace moedist::contract {

void SendPlan::build(const Topology& topo, const TensorView& expert_ids, int source_ep, std::int64_t active) {
  const std::int64_t k = expert_ids.cols();
  counts.assign(static_cast<std::size_t>(topo.count_record_len()), 0);
  expand_idx.assign(static_cast<std::size_t>(expert_ids.rows() * k), 0);
  seen_.assign(static_cast<std::size_t>(topo.E), 0);
  for (std::int64_t b = 0; b < active; ++b) {
    for (std::int64_t j = 0; j < k; ++j) {
      const std::int32_t e = expert_ids.at<std::int32_t>(b, j);
      expand_idx[static_cast<std::size_t>(b * k + j)] = seen_[static_cast<std::size_t>(e)]++;
    }
  }
  // Expert e is local expert e % L of rank S + e / L, so its count sits at (S + e / L) * L + e % L = S * L + e.
  std::copy(seen_.begin(), seen_.end(), counts.begin() + topo.S * topo.L);
  if (!topo.is_shared(source_ep)) {
    for (int s = 0; s < topo.S; ++s) {
      counts[static_cast<std::size_t>(s * topo.L)] =
          static_cast<std::int32_t>(shared_range_count(source_ep, s, active, topo.S));
    }
  }
}

}  // namespace moedist::contract
