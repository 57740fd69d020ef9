// combine_v2 given other rows or triples than dispatch_v2 produced (V2 §3.6, §4.1): each expert rank
// indexes its own rows by their triples (source EP rank, token, k) in assist_info_for_combine, and every
// source looks its rows up there (src/ops/combine_v2.cpp). So:
//  - a triple no dispatch could have written (source out of range, a token outside its source's BS, a k
//    out of range or not the shared expert of the rank, a triple twice) is refused by the rank that holds
//    it, with a typed invalid_argument error naming the entry, and every other rank fails with it;
//  - a row missing where its source looks for it (a triple retargeted, another dispatch's triples,
//    combine given other expert_ids or another mask than dispatch) is refused by the source, or by the
//    proxy that serves it rows from another host, naming assist_info_for_combine;
//  - rows permuted together with their triples are combined exactly as before: expand_x's row order is
//    free (V2 §4.1).
// On one host and on virtual hosts (rows between hosts through proxies); no call hangs, and the group
// stays usable: the same combine with dispatch's own arguments works afterwards, and so does a round.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "moedist/moedist.h"
#include "outcome.h"
#include "rule_checks.h"
#include "test_support.h"
#include "v2_world.h"

namespace moedist::testing::v2 {
namespace {

using rules::Expected;
using rules::invalid;

// W = 4: shared-expert ranks 0 and 1 hold Sn = 2 shared experts (R = 1: each gets every active token of
// every rank, k = K and K + 1), MoE ranks 2 and 3 hold E = 4 experts (L = 2); BS = 4, K = 3. On virtual
// hosts of two ranks the shared ranks share one host and the MoE ranks the other.
World routed_world() { return with_shape(world(4, 4, 2, 2), 4, 16, 3); }

// The same with uneven BS (global_bs = 16: at most 4 tokens per rank).
World uneven_world() {
  World w = routed_world();
  w.config.global_bs = 16;
  w.rank_bs = {4, 2, 3, 4};
  return w;
}

Tensor copy_of(const TensorView& v) { return copy_rows(v, v.rows()); }

bool same_bits(const Tensor& got, const std::vector<std::uint16_t>& want) {
  return got.numel() == static_cast<std::int64_t>(want.size()) &&
         (want.empty() || std::memcmp(got.raw(), want.data(), want.size() * 2) == 0);
}

// What one rank saw: the combine whose arguments a test changed, the same combine again with dispatch's
// own arguments (same dispatch), and a whole round after that.
struct RankResult {
  Outcome outcome;
  bool out_untouched = false;  // out and performance_info, caller buffers of the changed combine
  Tensor out;
  Outcome retry;
  Tensor retry_out;
  Outcome round;
  casefile::RankOutputs round_out;
};

// Changes rank g's combine arguments (all ranks' calls pass through it).
using Change = std::function<void(int g, CombineCall& call)>;

// Every rank dispatches `c`, then combines with its arguments as `change` leaves them.
std::vector<RankResult> run_changed_combine(const World& w, const casefile::Case& c, int ranks_per_host,
                                            const Change& change) {
  RuntimeOptions options = rules::generous_timeout();
  options.ranks_per_host = ranks_per_host;
  InProcessWorld runtime(w.size(), options);
  const casefile::Case next = make_case(w, 99);
  std::vector<RankResult> results(static_cast<std::size_t>(w.size()));
  run_ranks(w.size(), [&](int g) {
    RankResult& r = results[static_cast<std::size_t>(g)];
    const casefile::RankInputs& in = c.ranks[static_cast<std::size_t>(g)];
    const std::unique_ptr<Group> group = runtime.join(w.rank_config(g));
    DispatchCall dispatch(w, g, in);
    const DispatchResult d = group->dispatch_v2(dispatch.x, dispatch.expert_ids, dispatch.options);
    CombineCall changed(w, dispatch.config, d, in);
    change(g, changed);
    r.outcome = capture([&] { r.out = copy_of(changed.run(*group)); });
    r.out_untouched = changed.outputs_untouched();
    const CombineCall retry(w, dispatch.config, d, in);
    r.retry = capture([&] { r.retry_out = copy_of(retry.run(*group)); });
    r.round = capture([&] { r.round_out = run_rank(*group, next, g, round_options()); });
  });
  return results;
}

// A rank that refused the changed combine wrote nothing; after it every rank combined dispatch's own
// arguments correctly, and ran a round.
void expect_usable_afterwards(const World& w, const casefile::Case& c, std::vector<RankResult>& results) {
  const moedist::testing::Expected want = expected_outputs(c);
  std::vector<casefile::RankOutputs> rounds;
  for (std::size_t g = 0; g < results.size(); ++g) {
    if (results[g].outcome.kind != Outcome::Kind::none) {
      EXPECT_TRUE(results[g].out_untouched) << "rank " << g << " wrote before failing";
    }
    ASSERT_EQ(results[g].retry.kind, Outcome::Kind::none) << "rank " << g << ": " << describe(results[g].retry);
    EXPECT_TRUE(same_bits(results[g].retry_out, want.v2[g].combine_out)) << "rank " << g << ": the combine retried";
    ASSERT_EQ(results[g].round.kind, Outcome::Kind::none) << "rank " << g << ": " << describe(results[g].round);
    rounds.push_back(std::move(results[g].round_out));
  }
  EXPECT_EQ(oracle_diff(make_case(w, 99), rounds), "") << "the round after";
}

// ---- triples no dispatch could have written: refused by the rank holding them ---------------------

// A change to one rank's triples, and the error that rank must raise.
struct IndexRule {
  std::string name;
  World world;
  int holder = 0;  // the global rank whose triples change
  std::function<Expected(CombineCall&, const World&)> change;
};

void PrintTo(const IndexRule& r, std::ostream* os) { *os << r.name; }

std::string entry(std::int64_t row, int field) {
  return "assist_info_for_combine[" + std::to_string(3 * row + field) + "]";
}
std::string why(const std::string& rule, std::int64_t row) {
  return rule + " (row " + std::to_string(row) + "'s triple; use dispatch's assist_info_for_combine)";
}

// The first own row whose triple satisfies `pred`.
std::int64_t first_row(CombineCall& c, const std::function<bool(const std::int32_t*)>& pred) {
  for (std::int64_t i = 0; i < c.own_rows; ++i)
    if (pred(c.triple(i))) return i;
  ADD_FAILURE() << "no own row fits";
  return 0;
}

std::vector<IndexRule> index_rules() {
  const auto on = [](std::string name, World w, int holder,
                     std::function<Expected(CombineCall&, const World&)> change) {
    return IndexRule{std::move(name), std::move(w), holder, std::move(change)};
  };
  return {
      on("SourceEqualToW", routed_world(), 2,
         [](CombineCall& c, const World&) {
           c.triple(1)[0] = 4;
           return invalid(entry(1, 0), "4", why("must be a source EP rank in [0, 4)", 1));
         }),
      on("SourceNegative", routed_world(), 0,
         [](CombineCall& c, const World&) {
           c.triple(0)[0] = -1;
           return invalid(entry(0, 0), "-1", why("must be a source EP rank in [0, 4)", 0));
         }),
      on("TokenEqualToSourceBs", routed_world(), 3,
         [](CombineCall& c, const World&) {
           const int source = c.triple(2)[0];
           c.triple(2)[1] = 4;
           return invalid(entry(2, 1), "4",
                          why("must be a token of EP rank " + std::to_string(source) + ", in [0, 4)", 2));
         }),
      on("TokenNegative", routed_world(), 1,
         [](CombineCall& c, const World&) {
           const int source = c.triple(0)[0];
           c.triple(0)[1] = -2;
           return invalid(entry(0, 1), "-2",
                          why("must be a token of EP rank " + std::to_string(source) + ", in [0, 4)", 0));
         }),
      // EP rank 1 has 2 tokens of the 4 a rank may have: its token 2 fits this rank's index, not its BS.
      on("TokenPastASmallerSourcesBs", uneven_world(), 2,
         [](CombineCall& c, const World&) {
           const std::int64_t i = first_row(c, [](const std::int32_t* t) { return t[0] == 1; });
           c.triple(i)[1] = 2;
           return invalid(entry(i, 1), "2", why("must be a token of EP rank 1, in [0, 2)", i));
         }),
      on("KEqualToK", routed_world(), 2,
         [](CombineCall& c, const World&) {
           c.triple(0)[2] = 3;
           return invalid(entry(0, 2), "3", why("must be in [0, K = 3)", 0));
         }),
      on("KNegative", routed_world(), 3,
         [](CombineCall& c, const World&) {
           c.triple(3)[2] = -1;
           return invalid(entry(3, 2), "-1", why("must be in [0, K = 3)", 3));
         }),
      // A shared-expert rank holds K + (its shared expert) only: rank 0 K + 0 = 3, rank 1 K + 1 = 4.
      on("RoutedKOnSharedRank", routed_world(), 0,
         [](CombineCall& c, const World&) {
           c.triple(1)[2] = 0;
           return invalid(entry(1, 2), "0", why("must be K + the shared expert of this rank = 3", 1));
         }),
      on("AnotherSharedExpertsK", routed_world(), 1,
         [](CombineCall& c, const World&) {
           c.triple(0)[2] = 3;
           return invalid(entry(0, 2), "3", why("must be K + the shared expert of this rank = 4", 0));
         }),
      on("TripleTwice", routed_world(), 3,
         [](CombineCall& c, const World&) {
           std::copy_n(c.triple(0), 3, c.triple(1));
           const std::int32_t* t = c.triple(0);
           const std::string triple =
               "(" + std::to_string(t[0]) + ", " + std::to_string(t[1]) + ", " + std::to_string(t[2]) + ")";
           return invalid(entry(1, 0), std::to_string(t[0]), why("row 0 already carries the triple " + triple, 1));
         }),
      on("TripleTwiceFarApart", uneven_world(), 0,
         [](CombineCall& c, const World&) {
           const std::int64_t last = c.own_rows - 1;
           std::copy_n(c.triple(0), 3, c.triple(last));
           return invalid(entry(last, 0), std::to_string(c.triple(0)[0]), "row 0 already carries the triple");
         }),
      // With TP the index's failure is raised at the TP reduce's barrier.
      on("TpSourceEqualToW", tp_pairs(), 3,
         [](CombineCall& c, const World&) {
           c.triple(0)[0] = 2;
           return invalid(entry(0, 0), "2", why("must be a source EP rank in [0, 2)", 0));
         }),
      on("TpKEqualToK", tp_pairs(), 0,
         [](CombineCall& c, const World&) {
           c.triple(1)[2] = 1;
           return invalid(entry(1, 2), "1", why("must be in [0, K = 1)", 1));
         }),
  };
}

class IndexRules : public ::testing::TestWithParam<std::tuple<IndexRule, int>> {};

// The holder raises the typed error, every other rank fails with it in the same phase, nothing is
// written to any rank's output, and the group stays usable.
TEST_P(IndexRules, HolderRaisesEveryRankFailsGroupStaysUsable) {
  const IndexRule& r = std::get<0>(GetParam());
  const int ranks_per_host = std::get<1>(GetParam());
  const World& w = r.world;
  const casefile::Case c = make_case(w, 4);
  Expected want;
  std::vector<RankResult> results = run_changed_combine(w, c, ranks_per_host, [&](int g, CombineCall& call) {
    if (g == r.holder) want = r.change(call, w);
  });
  const std::string phase = w.config.tp_world_size == 2 ? "combine.tp" : "combine.data";
  const Outcome& bad = results[static_cast<std::size_t>(r.holder)].outcome;
  EXPECT_TRUE(rules::raised(bad, want)) << "rank " << r.holder;
  for (std::size_t g = 0; g < results.size(); ++g) {
    if (static_cast<int>(g) != r.holder) {
      EXPECT_TRUE(rules::peer_failed(results[g].outcome, r.holder, phase, bad.what)) << "rank " << g;
    }
  }
  expect_usable_afterwards(w, c, results);
}

std::string index_rule_name(const ::testing::TestParamInfo<std::tuple<IndexRule, int>>& info) {
  return std::get<0>(info.param).name + (std::get<1>(info.param) == 0 ? "_OneHost" : "_VirtualHosts");
}

INSTANTIATE_TEST_SUITE_P(All, IndexRules,
                         ::testing::Combine(::testing::ValuesIn(index_rules()), ::testing::Values(0, 2)),
                         index_rule_name);

// ---- rows missing where their source looks: refused by the source, or the proxy serving it ---------

bool names_assist(const Outcome& o) {
  if (o.kind == Outcome::Kind::validation)
    return o.code == ErrorCode::invalid_argument && o.parameter == "assist_info_for_combine" &&
           contains(o.rule, "pass combine");
  return o.kind == Outcome::Kind::peer && o.code == ErrorCode::peer_failed && o.phase == "combine.hosts" &&
         contains(o.what, "(invalid_argument): assist_info_for_combine = ");
}

// Every rank either combined or refused naming assist_info_for_combine (no timeout, no protocol error);
// `changed` (the rank whose arguments differ from dispatch's) is among those that refused; then usable.
void expect_refused_by_lookups(const World& w, const casefile::Case& c, std::vector<RankResult>& results, int changed) {
  EXPECT_NE(results[static_cast<std::size_t>(changed)].outcome.kind, Outcome::Kind::none)
      << "rank " << changed << " combined";
  for (std::size_t g = 0; g < results.size(); ++g) {
    const Outcome& o = results[g].outcome;
    EXPECT_TRUE(o.kind == Outcome::Kind::none || names_assist(o)) << "rank " << g << ": " << describe(o);
  }
  expect_usable_afterwards(w, c, results);
}

constexpr int kHostLayouts[] = {0, 2};

// One triple of MoE rank 2 is moved to a (token, k) of the same source that rank 2 does not hold: the
// source's row is missing there (and an extra one present). The source raises it when it reads rank 2's
// index itself; on another host the proxy there does, and the source fails naming the proxy.
TEST(MissingRows, ATripleMovedToAnotherTokenOfItsSource) {
  const World w = routed_world();
  const casefile::Case c = make_case(w, 5);
  for (const int per_host : kHostLayouts) {
    SCOPED_TRACE(per_host);
    int source = -1, token = -1, k = -1;
    std::vector<RankResult> results = run_changed_combine(w, c, per_host, [&](int g, CombineCall& call) {
      if (g != 2) return;
      std::int32_t* t = call.triple(0);
      source = t[0], token = t[1], k = t[2];
      const auto held = [&](std::int32_t b, std::int32_t kk) {
        for (std::int64_t i = 0; i < call.own_rows; ++i)
          if (call.triple(i)[0] == source && call.triple(i)[1] == b && call.triple(i)[2] == kk) return true;
        return false;
      };
      std::int32_t free_slot = -1;  // b * K + k of a (token, k) of the source that rank 2 does not hold
      for (std::int32_t slot = 0; slot < 4 * 3 && free_slot < 0; ++slot)
        if (!held(slot / 3, slot % 3)) free_slot = slot;
      ASSERT_GE(free_slot, 0);
      t[1] = free_slot / 3;
      t[2] = free_slot % 3;
    });
    const std::string missing = "has no row for token " + std::to_string(token) + ", k " + std::to_string(k);
    const bool same_host = per_host == 0 || source / per_host == 1;
    for (int g = 0; g < 4; ++g) {
      const Outcome& o = results[static_cast<std::size_t>(g)].outcome;
      if (g == source && same_host) {
        EXPECT_TRUE(rules::raised(o, invalid("assist_info_for_combine", "(rank 2's)", missing + " of this rank")))
            << "rank " << g;
      } else if (g == source) {
        EXPECT_TRUE(o.kind == Outcome::Kind::peer && o.code == ErrorCode::peer_failed && o.phase == "combine.hosts" &&
                    o.peer / per_host == 1 && contains(o.what, missing))
            << "rank " << g << ": " << describe(o);
      } else if (!same_host && g / per_host == 1 && o.kind != Outcome::Kind::none) {  // the proxy serving the source
        EXPECT_TRUE(rules::raised(
            o, invalid("assist_info_for_combine", "(rank 2's)", missing + " of rank " + std::to_string(source))))
            << "rank " << g;
        EXPECT_EQ(results[static_cast<std::size_t>(source)].outcome.peer, g);
      } else {
        EXPECT_EQ(o.kind, Outcome::Kind::none) << "rank " << g << ": " << describe(o);
      }
    }
    expect_usable_afterwards(w, c, results);
  }
}

// Rank 3 combines its rows with the triples of its previous dispatch (other expert ids, as many rows).
TEST(MissingRows, TriplesOfAnotherDispatch) {
  const World w = routed_world();
  const casefile::Case c = make_case(w, 6);
  casefile::Case earlier = make_case(w, 6);
  for (casefile::RankInputs& in : earlier.ranks) {  // every expert id one further: the same rows per rank, other tokens
    std::int32_t* ids = in.expert_ids.data<std::int32_t>();
    for (std::int64_t i = 0; i < in.expert_ids.numel(); ++i) ids[i] = (ids[i] + 1) % 4;
  }
  const std::vector<casefile::RankOutputs> earlier_outputs = [&] {
    std::vector<casefile::RankOutputs> o(4);
    InProcessWorld runtime(4, rules::generous_timeout());
    run_ranks(4, [&](int g) {
      o[static_cast<std::size_t>(g)] = run_rank(*runtime.join(w.rank_config(g)), earlier, g, round_options());
    });
    return o;
  }();
  const Tensor& old = earlier_outputs[3].assist_info_for_combine;
  for (const int per_host : kHostLayouts) {
    SCOPED_TRACE(per_host);
    std::vector<RankResult> results = run_changed_combine(w, c, per_host, [&](int g, CombineCall& call) {
      if (g != 3) return;
      ASSERT_EQ(old.numel(), 3 * call.own_rows) << "the earlier dispatch must give rank 3 as many rows";
      std::copy_n(old.data<std::int32_t>(), old.numel(), call.triple(0));
    });
    bool refused = false;
    for (const RankResult& r : results) refused = refused || names_assist(r.outcome);
    EXPECT_TRUE(refused) << "no rank saw that rank 3's triples are another dispatch's";
    for (std::size_t g = 0; g < results.size(); ++g) {
      const Outcome& o = results[g].outcome;
      EXPECT_TRUE(o.kind == Outcome::Kind::none || names_assist(o)) << "rank " << g << ": " << describe(o);
    }
    expect_usable_afterwards(w, c, results);
  }
}

// Combine given other expert ids than dispatch. Experts 0, 1 live on EP rank 2, experts 2, 3 on EP rank
// 3; rank 1's tokens 0 and 1 route to [1, 2, 3] and [0, 1, 2]. Rank 1 routes token 1's first entry to
// the other MoE rank (one row fewer there, one more here), or swaps token 0's first two entries between
// them (as many rows per rank, other (token, k)). (Another expert of the same rank in the same place is
// the same triple: combine cannot tell, as on the NPU.)
TEST(MissingRows, CombineGivenOtherExpertIds) {
  const World w = routed_world();
  const casefile::Case c = make_case(w, 7);
  const std::int32_t* ids = c.ranks[1].expert_ids.data<std::int32_t>();
  ASSERT_EQ(std::vector<std::int32_t>(ids, ids + 6), (std::vector<std::int32_t>{1, 2, 3, 0, 1, 2}));
  const std::vector<std::tuple<std::string, std::int64_t, std::vector<std::int32_t>>> changes = {
      {"elsewhere", 3, {3, 1, 2}}, {"swapped", 0, {2, 1, 3}}};
  for (const auto& change : changes) {
    const std::string& what = std::get<0>(change);
    const std::int64_t at = std::get<1>(change);
    const std::vector<std::int32_t>& row = std::get<2>(change);
    for (const int per_host : kHostLayouts) {
      SCOPED_TRACE(what + ", ranks_per_host " + std::to_string(per_host));
      std::vector<RankResult> results = run_changed_combine(w, c, per_host, [&](int g, CombineCall& call) {
        if (g != 1) return;
        Tensor changed = copy_of(call.expert_ids);
        std::copy(row.begin(), row.end(), changed.data<std::int32_t>() + at);
        call.expert_ids = call.own(std::move(changed));
      });
      expect_refused_by_lookups(w, c, results, 1);
    }
  }
}

// Combine given another mask than dispatch (which had none): rank 2 leaves its last token out, or one
// entry of its first token.
TEST(MissingRows, CombineGivenAnotherMask) {
  const World w = routed_world();
  const casefile::Case c = make_case(w, 8);
  const std::vector<std::pair<std::int64_t, std::vector<std::uint8_t>>> masks = {
      {0, {1, 1, 1, 0}}, {3, {1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1}}};
  for (const auto& mask : masks) {
    const std::int64_t cols = mask.first;
    const std::vector<std::uint8_t>& values = mask.second;
    for (const int per_host : kHostLayouts) {
      SCOPED_TRACE("mask columns " + std::to_string(cols) + ", ranks_per_host " + std::to_string(per_host));
      std::vector<RankResult> results = run_changed_combine(w, c, per_host, [&](int g, CombineCall& call) {
        if (g == 2) call.options.x_active_mask = call.own(bool_tensor(4, cols, values));
      });
      expect_refused_by_lookups(w, c, results, 2);
    }
  }
}

// Combine given fewer special experts than dispatch: rank 1's const expert id (6, its token 2's second
// entry) is past them; a routing rule, refused before anything is exchanged, on every rank.
TEST(OtherArguments, CombineGivenFewerSpecialExperts) {
  World w = routed_world();
  w.k = 2;
  w.zero = w.copy = w.constant = 1;
  const casefile::Case c = make_case(w, 9);
  ASSERT_EQ(c.ranks[1].expert_ids.data<std::int32_t>()[5], 6);
  for (const int per_host : kHostLayouts) {
    SCOPED_TRACE(per_host);
    std::vector<RankResult> results = run_changed_combine(
        w, c, per_host, [](int g, CombineCall& call) { call.options.const_expert_num = g == 1 ? 0 : 1; });
    const Outcome& bad = results[1].outcome;
    EXPECT_TRUE(rules::raised(
        bad, invalid("expert_ids[2, 1]", "6", "must be in [0, moe_expert_num + zero, copy and const experts = 6)")));
    for (std::size_t g = 0; g < results.size(); ++g) {
      if (g != 1) {
        EXPECT_TRUE(rules::peer_failed(results[g].outcome, 1, "combine.counts", bad.what)) << "rank " << g;
      }
    }
    expect_usable_afterwards(w, c, results);
  }
}

// ---- rows permuted with their triples: the same bits -----------------------------------------------

// A permutation of n rows, one per global rank: reversed on even ranks, shuffled on odd ones.
std::vector<std::int64_t> order_of(std::uint64_t seed, int g, std::int64_t n) {
  std::vector<std::int64_t> order(static_cast<std::size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  std::mt19937_64 rng(seed + static_cast<std::uint64_t>(g));
  if (g % 2 == 0) {
    std::reverse(order.begin(), order.end());
  } else {
    std::shuffle(order.begin(), order.end(), rng);
  }
  return order;
}

// Every rank reorders its own rows together with their triples. With T = 2 the TP reduce adds row i of a
// rank's own rows to row i of its TP peer's copy of them (V1 §4.4, V2 §3.8), which has no triples: the
// peer moves its copy (the rows after its own) alike. Combine gives what the unpermuted call and the
// oracle give.
void expect_order_free(const World& w, std::uint64_t seed) {
  const casefile::Case c = make_case(w, seed);
  const moedist::testing::Expected want = expected_outputs(c);
  const int T = tp_domain_size(w.config);
  for (const int per_host : {0, 2}) {
    SCOPED_TRACE("ranks_per_host " + std::to_string(per_host));
    std::vector<RankResult> results = run_changed_combine(w, c, per_host, [&](int g, CombineCall& call) {
      const std::int64_t own = call.own_rows, peer = call.rows.rows() - own;
      const std::vector<std::int64_t> own_order = order_of(seed, g, own);
      const std::vector<std::int64_t> peer_order = order_of(seed, T == 2 ? g ^ 1 : g, peer);
      const Tensor rows = copy_of(call.rows);
      const Tensor triples = copy_of(call.triples);
      const auto move_row = [&](std::int64_t to, std::int64_t from) {
        std::memcpy(call.row(to), rows.data<std::uint16_t>() + from * rows.cols(),
                    static_cast<std::size_t>(rows.cols()) * 2);
      };
      for (std::int64_t i = 0; i < own; ++i) {
        move_row(i, own_order[static_cast<std::size_t>(i)]);
        std::copy_n(triples.data<std::int32_t>() + 3 * own_order[static_cast<std::size_t>(i)], 3, call.triple(i));
      }
      for (std::int64_t i = 0; i < peer; ++i) move_row(own + i, own + peer_order[static_cast<std::size_t>(i)]);
    });
    for (std::size_t g = 0; g < results.size(); ++g) {
      ASSERT_EQ(results[g].outcome.kind, Outcome::Kind::none) << "rank " << g << ": " << describe(results[g].outcome);
      EXPECT_TRUE(same_bits(results[g].out, want.v2[g].combine_out)) << "rank " << g << ": " << describe(c);
    }
    expect_usable_afterwards(w, c, results);
  }
}

TEST(RowOrder, SharedSpecialExpertsAndAMask) {
  World w = routed_world();
  w.zero = w.copy = w.constant = 1;
  w.mask = MaskKind::entries;
  expect_order_free(w, 11);
}

TEST(RowOrder, UnevenBsWithCommQuant) {
  World w = uneven_world();
  w.comm_quant_mode = 2;
  w.dtype = DType::fp16;
  expect_order_free(w, 12);
}

TEST(RowOrder, TpPairs) {
  World w = tp_pairs();
  w.bs = 4;
  expect_order_free(w, 13);
}

}  // namespace
}  // namespace moedist::testing::v2
