// Ranks on several hosts (virtual hosts of the in-process runtime): rows bound for another host cross
// once per token to a proxy there, which fans them out; combine asks the proxies for the expert rows.
// Here: the proxy routes, the bytes saved, and that nothing a peer sends is trusted. Results against the
// oracle on virtual hosts: property_test's VirtualHosts suites.
#include <gtest/gtest.h>

#include <cstddef>
#include <cstring>
#include <random>

#include "moedist/inproc.h"
#include "ops/host_messages.h"
#include "ops/host_routes.h"
#include "outcome.h"
#include "test_support.h"
#include "transport/inproc/inproc_transport.h"

namespace moedist::testing {
namespace {

// Proxies: every sender has exactly one proxy on each other host, in its TP lane, and the proxies'
// lists of whom they carry for are the inverse of that map.
TEST(HostRoutes, OneProxyPerRemoteHostInTheSendersLane) {
  for (const auto& [w, t, per_host] : std::vector<std::tuple<int, int, int>>{{8, 1, 2}, {8, 1, 3}, {4, 2, 2}, {6, 2, 4}, {16, 1, 5}}) {
    GroupConfig cfg;
    cfg.ep_world_size = w;
    cfg.moe_expert_num = w;
    cfg.tp_world_size = t;
    const contract::Topology topo(cfg);
    std::vector<int> host_of(static_cast<std::size_t>(topo.world_size()));
    for (int r = 0; r < topo.world_size(); ++r) host_of[static_cast<std::size_t>(r)] = r / per_host;
    HostRoutes routes;
    routes.build(topo, host_of);
    std::vector<std::vector<int>> carried(host_of.size());
    for (int r = 0; r < topo.world_size(); ++r) {
      for (int h = 0; h < routes.hosts(); ++h) {
        const int p = routes.proxy(r, h);
        if (h == host_of[static_cast<std::size_t>(r)]) {
          EXPECT_EQ(p, -1);
          continue;
        }
        ASSERT_GE(p, 0) << "rank " << r << " host " << h;
        EXPECT_EQ(routes.host_of(p), h);
        EXPECT_EQ(p % topo.T, r % topo.T) << "proxy in another TP lane";
        carried[static_cast<std::size_t>(p)].push_back(r);
      }
    }
    for (int p = 0; p < topo.world_size(); ++p) EXPECT_EQ(routes.carried_for(p), carried[static_cast<std::size_t>(p)]) << "rank " << p;
  }
}

TEST(HostRoutes, TpPairSplitAcrossHostsIsRefused) {
  GroupConfig cfg;
  cfg.ep_world_size = 3;
  cfg.moe_expert_num = 3;
  cfg.tp_world_size = 2;
  const contract::Topology topo(cfg);
  HostRoutes routes;
  const Outcome o = capture([&] { routes.build(topo, std::vector<int>{0, 0, 0, 1, 1, 1}); });
  EXPECT_EQ(o.code, ErrorCode::config_mismatch);
  EXPECT_NE(o.what.find("TP peers rank 2 and rank 3"), std::string::npos) << o.what;
}

// Bytes between hosts: a token bound for several experts on one remote host crosses once.
TEST(VirtualHosts, TokensCrossEachHostOnce) {
  casefile::Case c;
  std::mt19937_64 rng(5);
  CaseLimits lim;
  lim.max_k = 8;
  c.ep_world_size = 8;
  c.moe_expert_num = 16;
  // Draw until K is large and there are no smooth scales (with them, each expert's int8 row differs).
  do {
    random_inputs(c, rng, lim, 6);
  } while (c.ranks[0].expert_ids.cols() < 6 || c.ranks[0].scales.numel() != 0);
  const int world = c.ep_world_size;
  InProcessWorld runtime(world, RuntimeOptions{{std::chrono::milliseconds(60000)}, std::chrono::microseconds(-1), 4});
  std::vector<RankTraffic> traffic(static_cast<std::size_t>(world));
  run_ranks(world, [&](int g) {
    std::unique_ptr<Group> group = runtime.join(rank_config(c, g));
    run_rank(*group, c, g, RunOptions{}, &traffic[static_cast<std::size_t>(g)]);
  });
  std::int64_t node_aware = 0, flat = 0;
  for (const RankTraffic& t : traffic) {
    node_aware += t.after_dispatch.dispatch_bytes_between_hosts;
    flat += t.after_dispatch.dispatch_bytes_between_hosts_flat;
    EXPECT_GT(t.after_combine.combine_bytes_between_hosts_flat, 0);
  }
  EXPECT_GT(flat, 0);
  EXPECT_LT(node_aware, flat) << describe(c);
}

// A transport whose exchange corrupts the first non-empty message this rank sends in one phase.
class CorruptingTransport final : public Transport {
 public:
  CorruptingTransport(std::unique_ptr<Transport> inner, std::string phase, std::function<void(std::vector<std::byte>&)> corrupt)
      : inner_(std::move(inner)), phase_(std::move(phase)), corrupt_(std::move(corrupt)) {}
  int rank() const noexcept override { return inner_->rank(); }
  int size() const noexcept override { return inner_->size(); }
  void allgather(const void* in, std::size_t bytes, void* out, std::string_view phase) override { inner_->allgather(in, bytes, out, phase); }
  void resize_window(std::size_t bytes, std::string_view phase) override { inner_->resize_window(bytes, phase); }
  std::size_t window_size(int r) const noexcept override { return inner_->window_size(r); }
  std::byte* window(int r) noexcept override { return inner_->window(r); }
  int host_count() const noexcept override { return inner_->host_count(); }
  int host_of(int r) const noexcept override { return inner_->host_of(r); }
  void exchange(std::span<const Outgoing> out, std::span<const int> from, std::span<std::vector<std::byte>> in,
                std::string_view phase) override {
    std::vector<Outgoing> copy(out.begin(), out.end());
    if (phase == phase_) {
      for (Outgoing& m : copy) {
        if (m.bytes == 0) continue;
        bad_.assign(m.data, m.data + m.bytes);
        corrupt_(bad_);
        m.data = bad_.data();
        m.bytes = bad_.size();
        break;
      }
    }
    inner_->exchange(copy, from, in, phase);
  }

 private:
  std::unique_ptr<Transport> inner_;
  std::string phase_;
  std::function<void(std::vector<std::byte>&)> corrupt_;
  std::vector<std::byte> bad_;
};

// Rank 0 corrupts what it sends in `phase`; no rank may crash or hang, the rank that received the bad
// message raises a protocol error naming rank 0, and in dispatch (whose rows land in other ranks'
// outputs) every rank fails. In combine only the ranks whose output the message feeds fail.
void expect_rejected(const std::string& phase, const std::function<void(std::vector<std::byte>&)>& corrupt, const std::string& expected) {
  const bool all_fail = phase.rfind("dispatch", 0) == 0;
  std::mt19937_64 rng(11);
  casefile::Case c;
  c.ep_world_size = 4;
  c.moe_expert_num = 8;
  c.shared_expert_rank_num = 0;
  CaseLimits lim;
  lim.allow_tp = false;
  lim.max_k = 4;
  random_inputs(c, rng, lim, 4);
  while (c.ranks[0].expert_ids.cols() != 3) random_inputs(c, rng, lim, 4);
  // Rank 0 sends every token to experts 4 and 5 (EP rank 2, host 1) and 0 (its own host); identity experts.
  for (casefile::RankInputs& in : c.ranks) in.combine_x = Tensor();
  for (std::int64_t b = 0; b < c.ranks[0].expert_ids.rows(); ++b) {
    c.ranks[0].expert_ids.data<std::int32_t>()[b * 3 + 0] = 4;
    c.ranks[0].expert_ids.data<std::int32_t>()[b * 3 + 1] = 5;
    c.ranks[0].expert_ids.data<std::int32_t>()[b * 3 + 2] = 0;
  }
  auto hub = std::make_shared<inproc::InProcHub>(4, std::chrono::milliseconds(20000), std::chrono::microseconds(-1), 2);
  std::vector<Outcome> outcomes(4);
  run_ranks(4, [&](int g) {
    std::unique_ptr<Transport> t = std::make_unique<inproc::InProcTransport>(hub, g);
    if (g == 0) t = std::make_unique<CorruptingTransport>(std::move(t), phase, corrupt);
    Group group(rank_config(c, g), std::move(t));
    outcomes[static_cast<std::size_t>(g)] = capture([&] { run_rank(group, c, g, RunOptions{}); });
  });
  bool named = false;
  for (int g = 0; g < 4; ++g) {
    const Outcome& o = outcomes[static_cast<std::size_t>(g)];
    if (all_fail) {
      EXPECT_NE(o.kind, Outcome::Kind::none) << "rank " << g << " accepted a corrupted message in " << phase;
    }
    if (o.code == ErrorCode::protocol && o.peer == 0) {
      named = true;
      EXPECT_NE(o.what.find(expected), std::string::npos) << o.what;
    }
  }
  EXPECT_TRUE(named) << "no rank blamed rank 0 for its message in " << phase;
}

// The first dispatch entry's first target (host_messages.h).
constexpr std::size_t kFirstTarget = sizeof(RemoteEntry);

std::int32_t read_i32(const std::vector<std::byte>& m, std::size_t at) {
  std::int32_t v;
  std::memcpy(&v, m.data() + at, 4);
  return v;
}
void write_i32(std::vector<std::byte>& m, std::size_t at, std::int32_t v) { std::memcpy(m.data() + at, &v, 4); }

TEST(HostMessages, DispatchEntryCutShort) {
  expect_rejected("dispatch.hosts", [](auto& m) { m.resize(m.size() - 1); }, "cut short");
}
TEST(HostMessages, DispatchSlotOutOfRange) {
  expect_rejected(
      "dispatch.hosts", [](auto& m) { write_i32(m, kFirstTarget + offsetof(RemoteTarget, slot), 1 << 20); },
      "outside its");
}
TEST(HostMessages, DispatchExpertOnAnotherHost) {
  // Rank 0's entries go to host 1 (EP ranks 2, 3 hold experts 4-7); name expert 0, which lives on host 0.
  expect_rejected(
      "dispatch.hosts", [](auto& m) { write_i32(m, kFirstTarget + offsetof(RemoteTarget, code), 0); },
      "not on this host");
}
TEST(HostMessages, DispatchSlotSentTwice) {
  expect_rejected("dispatch.hosts", [](auto& m) {
    // The second target of the first entry repeats the first one.
    constexpr std::size_t second = kFirstTarget + sizeof(RemoteTarget);
    write_i32(m, second + offsetof(RemoteTarget, code), read_i32(m, kFirstTarget + offsetof(RemoteTarget, code)));
    write_i32(m, second + offsetof(RemoteTarget, slot), read_i32(m, kFirstTarget + offsetof(RemoteTarget, slot)));
  }, "twice");
}
TEST(HostMessages, DispatchRowsMissing) {
  expect_rejected("dispatch.hosts", [](auto& m) { m.clear(); }, "filled 0 of the");
}
TEST(HostMessages, CombineRequestOutOfRange) {
  expect_rejected("combine.requests", [](auto& m) { write_i32(m, 4, -5); }, "outside its");
}
TEST(HostMessages, CombineRequestTorn) {
  expect_rejected("combine.requests", [](auto& m) { m.resize(m.size() - 2); }, "not a whole number of rows");
}
TEST(HostMessages, CombineAnswerTruncated) {
  expect_rejected("combine.hosts", [](auto& m) { m.resize(m.size() - 4); }, "answered");
}

}  // namespace
}  // namespace moedist::testing
