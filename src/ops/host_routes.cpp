#include "ops/host_routes.h"

#include <algorithm>

#include "common/format.h"

namespace moedist {

void HostRoutes::build(const contract::Topology& topo, const std::vector<int>& host_of) {
  const int n = topo.world_size();
  host_of_ = host_of;
  hosts_ = 1 + *std::max_element(host_of_.begin(), host_of_.end());
  for (int ep = 0; topo.T == 2 && ep < topo.W; ++ep) {
    const int a = topo.global_rank(ep, 0), b = topo.global_rank(ep, 1);
    if (host_of_[static_cast<std::size_t>(a)] != host_of_[static_cast<std::size_t>(b)]) {
      throw Error(ErrorCode::config_mismatch,
                  concat("TP peers rank ", a, " and rank ", b, " (ep_rank_id ", ep, ") are on different hosts (", host_of_[static_cast<std::size_t>(a)],
                         " and ", host_of_[static_cast<std::size_t>(b)], "): a TP pair must share a host; place global ranks 2i "
                         "and 2i+1 on one node (with MOEDIST_RANKS_PER_NODE, use an even value)"));
    }
  }
  // members[host * T + lane]: the host's ranks of a TP lane, ascending.
  std::vector<std::vector<int>> members(static_cast<std::size_t>(hosts_ * topo.T));
  for (int r = 0; r < n; ++r) members[static_cast<std::size_t>(host_of_[static_cast<std::size_t>(r)] * topo.T + r % topo.T)].push_back(r);
  proxy_.assign(static_cast<std::size_t>(n * hosts_), -1);
  carried_for_.assign(static_cast<std::size_t>(n), {});
  for (int r = 0; r < n; ++r) {
    const int lane = r % topo.T;
    const int home = host_of_[static_cast<std::size_t>(r)];
    const auto& own = members[static_cast<std::size_t>(home * topo.T + lane)];
    const auto position = std::find(own.begin(), own.end(), r) - own.begin();
    for (int h = 0; h < hosts_; ++h) {
      const auto& there = members[static_cast<std::size_t>(h * topo.T + lane)];
      if (h == home || there.empty()) continue;
      const int p = there[static_cast<std::size_t>(position) % there.size()];
      proxy_[static_cast<std::size_t>(r * hosts_ + h)] = p;
      carried_for_[static_cast<std::size_t>(p)].push_back(r);
    }
  }
}

}  // namespace moedist
