// Which rank carries a sender's rows into another host. When ranks sit on several hosts, a sender does
// not reach the ranks of a remote host one by one: it sends each token once to one rank there (its
// proxy on that host), which copies it into every destination window on its host. Combine runs the
// same routes backwards. Pure: built from the topology and the transport's map of ranks to hosts.
#pragma once

#include <vector>

#include "contract/layout.h"

namespace moedist {

class HostRoutes {
 public:
  // host_of[r] is rank r's host (0..hosts-1). A TP pair must share a host: the TP steps address the
  // peer's window directly. Throws a config_mismatch error naming the pair otherwise.
  void build(const contract::Topology& topo, const std::vector<int>& host_of);

  int hosts() const noexcept { return hosts_; }
  bool multi_host() const noexcept { return hosts_ > 1; }
  int host_of(int rank) const noexcept { return host_of_[static_cast<std::size_t>(rank)]; }
  // The rank of `host` that carries `sender`'s rows there: of the host's ranks in the sender's TP lane,
  // the one at the sender's position among its own host's ranks of that lane, modulo their number.
  // -1 for the sender's own host.
  int proxy(int sender, int host) const noexcept {
    return proxy_[static_cast<std::size_t>(sender) * static_cast<std::size_t>(hosts_) + static_cast<std::size_t>(host)];
  }
  // The ranks (ascending) whose rows `rank` carries into its host.
  const std::vector<int>& carried_for(int rank) const noexcept { return carried_for_[static_cast<std::size_t>(rank)]; }

 private:
  int hosts_ = 1;
  std::vector<int> host_of_;
  std::vector<int> proxy_;
  std::vector<std::vector<int>> carried_for_;
};

}  // namespace moedist
