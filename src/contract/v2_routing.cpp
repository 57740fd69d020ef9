#include "contract/v2_routing.h"

#include <algorithm>

namespace moedist::contract {

void SendPlanV2::build(const Topology& topo, const TensorView& expert_ids, const EntryMask& mask,
                       const SpecialExperts& experts, int source_ep) {
  const std::int64_t bs = expert_ids.rows(), k = expert_ids.cols();
  counts.assign(static_cast<std::size_t>(topo.count_record_len()), 0);
  slot.assign(static_cast<std::size_t>(bs * k), -1);
  token_slot.assign(static_cast<std::size_t>(bs), -1);
  seen_.assign(static_cast<std::size_t>(topo.E), 0);
  active_tokens = 0;
  for (std::int64_t b = 0; b < bs; ++b) {
    if (!mask.token_on(b)) continue;
    token_slot[static_cast<std::size_t>(b)] = static_cast<std::int32_t>(active_tokens++);
    for (std::int64_t j = 0; j < k; ++j) {
      if (!mask.entry_on(b, j)) continue;
      const std::int32_t e = expert_ids.at<std::int32_t>(b, j);
      if (e >= experts.E) continue;  // a special expert: evaluated by combine, never sent (V2 §3.4)
      slot[static_cast<std::size_t>(b * k + j)] = seen_[static_cast<std::size_t>(e)]++;
    }
  }
  // Expert e is local expert e % L of rank S + e / L, so its count sits at (S + e / L) * L + e % L = S * L + e.
  std::copy(seen_.begin(), seen_.end(), counts.begin() + topo.S * topo.L);
  for (int j = 0; j < topo.Sn; ++j)
    counts[static_cast<std::size_t>(topo.v2_shared_target(source_ep, j) * topo.L)] =
        static_cast<std::int32_t>(active_tokens);
}

}  // namespace moedist::contract
