// Runtime behaviour of groups on the in-process runtime: ranks that disagree (at join and per call),
// combine called with tensors that are not its dispatch's, timeouts, ranks with BS = 0, a long run of
// calls on one group checked against the oracle, the lifetime of group-owned result views, and the
// traffic counters.
#include <gtest/gtest.h>

#include "moedist/version.h"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <functional>
#include <latch>
#include <memory>
#include <ostream>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "moedist/moedist.h"
#include "numeric/convert.h"
#include "outcome.h"
#include "test_support.h"

namespace moedist::testing {
namespace {

using Clock = std::chrono::steady_clock;

// A generous bound for "did not hang": far above the timeouts used here, far below the test timeout.
constexpr auto kHangBound = std::chrono::seconds(5);

// ---- cases and the round trip -----------------------------------------------------------------------

struct Geometry {
  int ep_world_size = 1;
  int moe_expert_num = 1;
  int shared_expert_rank_num = 0;
  int tp_world_size = 0;
  std::int64_t global_bs = 0;

  int size() const { return ep_world_size * std::max(tp_world_size, 1); }
  GroupConfig config(int g) const {
    GroupConfig c;
    c.ep_world_size = ep_world_size;
    c.moe_expert_num = moe_expert_num;
    c.shared_expert_rank_num = shared_expert_rank_num;
    c.tp_world_size = tp_world_size;
    c.ep_rank_id = g / std::max(tp_world_size, 1);
    c.tp_rank_id = g % std::max(tp_world_size, 1);
    c.global_bs = global_bs;
    return c;
  }
};

Geometry geometry(int ep_world_size, int moe_expert_num, int shared_expert_rank_num = 0, int tp_world_size = 0,
                  std::int64_t global_bs = 0) {
  Geometry g;
  g.ep_world_size = ep_world_size;
  g.moe_expert_num = moe_expert_num;
  g.shared_expert_rank_num = shared_expert_rank_num;
  g.tp_world_size = tp_world_size;
  g.global_bs = global_bs;
  return g;
}

// How one call's inputs are drawn.
struct CallSpec {
  std::int64_t h = 16, k = 2;
  DType dtype = DType::bf16;
  int quant_mode = 0;
  int comm_quant_mode = 0;
  int expert_token_nums_type = 1;
  bool with_scales = false;
  bool with_expert_scales = true;
};

Tensor random_half(std::mt19937_64& rng, DType dtype, std::int64_t rows, std::int64_t cols) {
  Tensor t(dtype, rows, cols);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (std::int64_t i = 0; i < t.numel(); ++i) t.data<std::uint16_t>()[i] = to_half_bits(dtype, normal(rng));
  return t;
}

Tensor filled(std::int64_t rows, std::int64_t cols, float value) {
  Tensor t(DType::fp32, rows, cols);
  std::fill_n(t.data<float>(), t.numel(), value);
  return t;
}

// Random valid inputs of every rank; bs[g] rows on global rank g.
casefile::Case make_case(const Geometry& geo, const CallSpec& spec, const std::vector<std::int64_t>& bs, std::mt19937_64& rng) {
  casefile::Case c;
  c.ep_world_size = geo.ep_world_size;
  c.tp_world_size = geo.tp_world_size;
  c.moe_expert_num = geo.moe_expert_num;
  c.shared_expert_rank_num = geo.shared_expert_rank_num;
  c.global_bs = geo.global_bs;
  c.quant_mode = spec.quant_mode;
  c.comm_quant_mode = spec.comm_quant_mode;
  c.expert_token_nums_type = spec.expert_token_nums_type;
  c.dtype = spec.dtype;
  for (int g = 0; g < geo.size(); ++g) {
    const std::int64_t rows = bs[static_cast<std::size_t>(g)];
    casefile::RankInputs in;
    in.x = random_half(rng, spec.dtype, rows, spec.h);
    in.expert_ids = random_ids(rng, rows, spec.k, geo.moe_expert_num);
    if (spec.with_scales) {
      in.scales = Tensor(DType::fp32, geo.moe_expert_num + (geo.shared_expert_rank_num > 0 ? 1 : 0), spec.h);
      std::uniform_real_distribution<float> u(0.25f, 4.0f);
      for (std::int64_t i = 0; i < in.scales.numel(); ++i) in.scales.data<float>()[i] = u(rng);
    }
    if (spec.with_expert_scales) {
      in.expert_scales = Tensor(DType::fp32, rows, spec.k);
      std::uniform_real_distribution<float> u(-1.0f, 1.0f);
      for (std::int64_t i = 0; i < in.expert_scales.numel(); ++i) in.expert_scales.data<float>()[i] = u(rng);
    }
    c.ranks.push_back(std::move(in));
  }
  return c;
}

casefile::Case make_case(const Geometry& geo, const CallSpec& spec, std::int64_t bs, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  return make_case(geo, spec, std::vector<std::int64_t>(static_cast<std::size_t>(geo.size()), bs), rng);
}

using Traffic = RankTraffic;

// One dispatch + combine of rank g with the oracle's identity experts (the dispatched row; with
// quant_mode 2 the dequantized row rounded to x's dtype). Results are copied out of the views.
casefile::RankOutputs round_trip(Group& group, const casefile::Case& c, int g, Traffic* traffic = nullptr) {
  return run_rank(group, c, g, RunOptions{}, traffic);
}

std::string compare(const casefile::Case& c, const std::vector<casefile::RankOutputs>& got) {
  return compare_with_oracle(c, got, oracle::run(to_oracle_case(c)));
}

// Runs a correct round trip on every rank's group (after an error) and compares it with the oracle.
struct Recovery {
  explicit Recovery(int world_size) : outputs(static_cast<std::size_t>(world_size)), errors(static_cast<std::size_t>(world_size)) {}
  void run(Group& group, const casefile::Case& c, int g) {
    try {
      outputs[static_cast<std::size_t>(g)] = round_trip(group, c, g);
    } catch (const std::exception& e) {
      errors[static_cast<std::size_t>(g)] = e.what();
    }
  }
  std::string check(const casefile::Case& c) const {
    for (std::size_t g = 0; g < errors.size(); ++g) {
      if (!errors[g].empty()) return "rank " + std::to_string(g) + " failed: " + errors[g];
    }
    return compare(c, outputs);
  }
  std::vector<casefile::RankOutputs> outputs;
  std::vector<std::string> errors;
};

RuntimeOptions timeout_ms(int ms) { return RuntimeOptions{{std::chrono::milliseconds(ms)}}; }
RuntimeOptions generous_timeout() { return timeout_ms(20000); }

// ---- the runtime itself --------------------------------------------------------------------------------

TEST(Runtime, WorldRejectsBadSizeAndTimeout) {
  const Outcome size = capture([] { InProcessWorld world(0); });
  EXPECT_TRUE(validation_error(size, ErrorCode::invalid_argument, "world_size", "0", "must be >= 1")) << describe(size);
  const Outcome timeout = capture([] { InProcessWorld world(2, timeout_ms(0)); });
  EXPECT_TRUE(validation_error(timeout, ErrorCode::invalid_argument, "timeout (ms)", "0", "must be > 0")) << describe(timeout);
}

TEST(Join, WorldSizeMustBeEpWorldSizeTimesTp) {
  InProcessWorld world(3, generous_timeout());
  EXPECT_TRUE(validation_error(capture([&] { world.join(geometry(2, 2).config(0)); }), ErrorCode::config_mismatch,
                               "ep_world_size * max(tp_world_size, 1)", "2", "must equal the world size of this runtime, 3"));
  EXPECT_TRUE(validation_error(capture([&] { world.join(geometry(2, 2, 0, 2).config(0)); }), ErrorCode::config_mismatch,
                               "ep_world_size * max(tp_world_size, 1)", "4", "must equal the world size of this runtime, 3"));
}

// Rank 1 joins with a configuration that differs from rank 0's in one field.
struct JoinMismatch {
  std::string name;
  std::function<void(GroupConfig&)> change;
  std::string fragment;  // what both ranks' messages mention
};

void PrintTo(const JoinMismatch& m, std::ostream* os) { *os << m.name; }

class JoinMismatches : public ::testing::TestWithParam<JoinMismatch> {};

TEST_P(JoinMismatches, BothRanksRaiseConfigMismatchNamingTheOther) {
  InProcessWorld world(2, generous_timeout());
  std::vector<Outcome> outcomes(2);
  run_ranks(2, [&](int g) {
    GroupConfig config = geometry(2, 2).config(g);
    if (g == 1) GetParam().change(config);
    outcomes[static_cast<std::size_t>(g)] = capture([&] { world.join(config); });
  });
  EXPECT_TRUE(peer_error(outcomes[0], ErrorCode::config_mismatch, 1, "join", GetParam().fragment)) << "rank 0";
  EXPECT_TRUE(peer_error(outcomes[1], ErrorCode::config_mismatch, 0, "join", GetParam().fragment)) << "rank 1";
}

std::string join_mismatch_name(const ::testing::TestParamInfo<JoinMismatch>& info) { return info.param.name; }

INSTANTIATE_TEST_SUITE_P(
    Fields, JoinMismatches,
    ::testing::Values(
        // E = 4 gives L = 2 and a longer count record than E = 2: the record sizes already disagree.
        JoinMismatch{"MoeExpertNum", [](GroupConfig& c) { c.moe_expert_num = 4; }, "the ranks disagree about the group configuration"},
        JoinMismatch{"GlobalBs", [](GroupConfig& c) { c.global_bs = 4; }, "global_bs"},
        JoinMismatch{"TpWorldSize", [](GroupConfig& c) { c.tp_world_size = 1; }, "tp_world_size"}),
    join_mismatch_name);

TEST(Join, TwoThreadsClaimingOneRank) {
  InProcessWorld world(2, timeout_ms(300));
  std::vector<Outcome> outcomes(2);
  std::vector<Clock::duration> elapsed(2);
  run_ranks(2, [&](int g) {
    const auto start = Clock::now();
    outcomes[static_cast<std::size_t>(g)] = capture([&] { world.join(geometry(2, 2).config(0)); });
    elapsed[static_cast<std::size_t>(g)] = Clock::now() - start;
  });
  // One thread claims rank 0 and waits for rank 1, which never comes; the other is refused at once.
  const int refused = outcomes[0].kind == Outcome::Kind::other_error ? 0 : 1;
  const Outcome& twice = outcomes[static_cast<std::size_t>(refused)];
  EXPECT_EQ(twice.kind, Outcome::Kind::other_error) << describe(twice);
  EXPECT_EQ(twice.code, ErrorCode::config_mismatch) << describe(twice);
  EXPECT_TRUE(contains(twice.what, "global rank 0 joined twice")) << describe(twice);
  EXPECT_TRUE(peer_error(outcomes[static_cast<std::size_t>(1 - refused)], ErrorCode::timeout, 1, "join", "timed out"));
  for (const auto& e : elapsed) EXPECT_LT(e, kHangBound);
}

// ---- ranks that disagree about a call ----------------------------------------------------------------

// W = 3, E = 6, BS = 2, H = 16, K = 2; rank 2 calls dispatch with one attribute changed.
struct CallMismatch {
  std::string name;
  std::function<void(CallSpec&)> change;
  std::string fragment_on_others;  // in the messages of ranks 0 and 1, which name rank 2
  std::string fragment_on_bad;     // in rank 2's message, which names rank 0
};

void PrintTo(const CallMismatch& m, std::ostream* os) { *os << m.name; }

class DispatchCallMismatches : public ::testing::TestWithParam<CallMismatch> {};

TEST_P(DispatchCallMismatches, EveryRankRaisesConfigMismatchAndTheGroupStaysUsable) {
  const Geometry geo = geometry(3, 6);
  CallSpec odd;
  GetParam().change(odd);
  const casefile::Case normal_inputs = make_case(geo, CallSpec{}, 2, 1);
  const casefile::Case odd_inputs = make_case(geo, odd, 2, 2);
  const casefile::Case recovery = make_case(geo, CallSpec{}, 2, 3);
  InProcessWorld world(3, generous_timeout());
  std::vector<Outcome> outcomes(3);
  Recovery after(3);
  run_ranks(3, [&](int g) {
    const std::unique_ptr<Group> group = world.join(geo.config(g));
    const casefile::Case& c = g == 2 ? odd_inputs : normal_inputs;
    const casefile::RankInputs& in = c.ranks[static_cast<std::size_t>(g)];
    DispatchOptions options;
    options.quant_mode = c.quant_mode;
    if (in.expert_scales.present()) options.expert_scales = in.expert_scales;
    outcomes[static_cast<std::size_t>(g)] = capture([&] { group->dispatch(in.x, in.expert_ids, options); });
    after.run(*group, recovery, g);
  });
  EXPECT_TRUE(peer_error(outcomes[0], ErrorCode::config_mismatch, 2, "dispatch.counts", GetParam().fragment_on_others)) << "rank 0";
  EXPECT_TRUE(peer_error(outcomes[1], ErrorCode::config_mismatch, 2, "dispatch.counts", GetParam().fragment_on_others)) << "rank 1";
  EXPECT_TRUE(peer_error(outcomes[2], ErrorCode::config_mismatch, 0, "dispatch.counts", GetParam().fragment_on_bad)) << "rank 2";
  EXPECT_EQ(after.check(recovery), "");
}

std::string call_mismatch_name(const ::testing::TestParamInfo<CallMismatch>& info) { return info.param.name; }

INSTANTIATE_TEST_SUITE_P(
    Attributes, DispatchCallMismatches,
    ::testing::Values(CallMismatch{"Hidden", [](CallSpec& s) { s.h = 32; }, "has H = 16 but rank 2 has 32",
                                   "rank 2 has H = 32 but rank 0 has 16"},
                      CallMismatch{"TopK", [](CallSpec& s) { s.k = 1; }, "has K = 2 but rank 2 has 1", "rank 2 has K = 1 but rank 0 has 2"},
                      CallMismatch{"Dtype", [](CallSpec& s) { s.dtype = DType::fp16; }, "has the dtype code = 0 but rank 2 has 1",
                                   "rank 2 has the dtype code = 1 but rank 0 has 0"},
                      CallMismatch{"QuantMode", [](CallSpec& s) { s.quant_mode = 2; }, "has quant_mode = 0 but rank 2 has 2",
                                   "rank 2 has quant_mode = 2 but rank 0 has 0"},
                      CallMismatch{"ExpertScalesPresence", [](CallSpec& s) { s.with_expert_scales = false; },
                                   "has expert_scales given (1) or not (0) = 1 but rank 2 has 0",
                                   "rank 2 has expert_scales given (1) or not (0) = 0 but rank 0 has 1"}),
    call_mismatch_name);

TEST(DispatchCall, GlobalBsZeroNeedsTheSameBsOnEveryRank) {
  const Geometry geo = geometry(3, 6);
  std::mt19937_64 rng(11);
  const casefile::Case inputs = make_case(geo, CallSpec{}, {2, 3, 2}, rng);
  const casefile::Case recovery = make_case(geo, CallSpec{}, 2, 12);
  InProcessWorld world(3, generous_timeout());
  std::vector<Outcome> outcomes(3);
  Recovery after(3);
  run_ranks(3, [&](int g) {
    const std::unique_ptr<Group> group = world.join(geo.config(g));
    const casefile::RankInputs& in = inputs.ranks[static_cast<std::size_t>(g)];
    DispatchOptions options;
    options.expert_scales = in.expert_scales;
    outcomes[static_cast<std::size_t>(g)] = capture([&] { group->dispatch(in.x, in.expert_ids, options); });
    after.run(*group, recovery, g);
  });
  const std::string rule = "global_bs = 0 requires the same BS on every rank";
  EXPECT_TRUE(peer_error(outcomes[0], ErrorCode::config_mismatch, 1, "dispatch.counts", rule));
  EXPECT_TRUE(peer_error(outcomes[1], ErrorCode::config_mismatch, 0, "dispatch.counts", rule));
  EXPECT_TRUE(peer_error(outcomes[2], ErrorCode::config_mismatch, 1, "dispatch.counts", rule));
  EXPECT_TRUE(contains(outcomes[1].what, "rank 1 has BS 3 and rank 0 has BS 2")) << outcomes[1].what;
  EXPECT_EQ(after.check(recovery), "");
}

// Contract §3.11: global_bs = 0 is allowed only if ALL ranks have the same BS. With a TP domain the two
// TP peers of an EP rank must agree as well: each sizes its expand_x as T * A with A from its own BS,
// and receives its peer's rows behind its own (§3.5).
// With global_bs = 0 the BS check covers TP peers too (require_same_call compares every rank): were it
// limited to one TP lane, dispatch would succeed here and rank 0 report 4 valid rows in an expand_x of
// T * A = 2 rows, and a caller expand_x of T * A rows would be written past its end.
TEST(DispatchCall, GlobalBsZeroNeedsTheSameBsOnBothTpPeers) {
  const Geometry geo = geometry(1, 1, 0, 2);
  CallSpec spec;
  spec.h = 4;
  spec.k = 1;
  std::mt19937_64 rng(13);
  const casefile::Case inputs = make_case(geo, spec, {1, 3}, rng);
  InProcessWorld world(2, generous_timeout());
  std::vector<Outcome> outcomes(2);
  std::vector<std::string> results(2);
  run_ranks(2, [&](int g) {
    const std::unique_ptr<Group> group = world.join(geo.config(g));
    const casefile::RankInputs& in = inputs.ranks[static_cast<std::size_t>(g)];
    DispatchOptions options;
    options.expert_scales = in.expert_scales;
    outcomes[static_cast<std::size_t>(g)] = capture([&] {
      const DispatchResult d = group->dispatch(in.x, in.expert_ids, options);
      results[static_cast<std::size_t>(g)] =
          "valid_rows " + std::to_string(d.valid_rows) + " in an expand_x of " + std::to_string(d.expand_x.rows()) + " rows";
    });
  });
  const std::string rule = "global_bs = 0 requires the same BS on every rank";
  EXPECT_TRUE(peer_error(outcomes[0], ErrorCode::config_mismatch, 1, "dispatch.counts", rule)) << "rank 0: " << results[0];
  EXPECT_TRUE(peer_error(outcomes[1], ErrorCode::config_mismatch, 0, "dispatch.counts", rule)) << "rank 1: " << results[1];
}

TEST(DispatchCall, CombineWhileOthersDispatchIsAConfigMismatch) {
  const Geometry geo = geometry(3, 6);
  const casefile::Case first = make_case(geo, CallSpec{}, 2, 21);
  const casefile::Case second = make_case(geo, CallSpec{}, 2, 22);
  const casefile::Case recovery = make_case(geo, CallSpec{}, 2, 23);
  InProcessWorld world(3, generous_timeout());
  std::vector<Outcome> outcomes(3);
  Recovery after(3);
  run_ranks(3, [&](int g) {
    const std::unique_ptr<Group> group = world.join(geo.config(g));
    const casefile::RankInputs& in = first.ranks[static_cast<std::size_t>(g)];
    DispatchOptions options;
    options.expert_scales = in.expert_scales;
    const DispatchResult d = group->dispatch(in.x, in.expert_ids, options);
    const Tensor expand_x = copy_rows(d.expand_x, d.valid_rows);
    const Tensor expand_idx = copy_rows(d.expand_idx, d.expand_idx.rows());
    const Tensor counts = copy_rows(d.ep_recv_counts, d.ep_recv_counts.rows());
    group->combine(expand_x, in.expert_ids, expand_idx, counts, in.expert_scales);
    // Rank 1 combines once more while the others start the next dispatch.
    outcomes[static_cast<std::size_t>(g)] = capture([&] {
      if (g == 1) {
        group->combine(expand_x, in.expert_ids, expand_idx, counts, in.expert_scales);
      } else {
        const casefile::RankInputs& next = second.ranks[static_cast<std::size_t>(g)];
        DispatchOptions next_options;
        next_options.expert_scales = next.expert_scales;
        group->dispatch(next.x, next.expert_ids, next_options);
      }
    });
    after.run(*group, recovery, g);
  });
  const std::string rule = "every rank must call dispatch and combine in the same order";
  EXPECT_TRUE(peer_error(outcomes[0], ErrorCode::config_mismatch, 1, "dispatch.counts", rule));
  EXPECT_TRUE(peer_error(outcomes[1], ErrorCode::config_mismatch, 0, "combine.counts", rule));
  EXPECT_TRUE(peer_error(outcomes[2], ErrorCode::config_mismatch, 1, "dispatch.counts", rule));
  EXPECT_EQ(after.check(recovery), "");
}

// ---- combine with tensors that are not its dispatch's -----------------------------------------------

// Rank 1 of a world calls combine with arguments `corrupt` derived from its dispatch outputs; every
// other rank passes its own. Returns each rank's outcome; `out_untouched` tells whether each rank's
// caller `out` buffer (filled with a sentinel) survived; a correct round trip follows on the same groups.
struct CombineArgs {
  Tensor expand_x, expert_ids, expand_idx, ep_send_counts, expert_scales, tp_send_counts;
};

struct MisuseResult {
  std::vector<Outcome> outcomes;
  std::vector<char> out_untouched;  // char, not bool: ranks write their own entries concurrently
  std::string recovery;
};

MisuseResult combine_misuse(const Geometry& geo, const casefile::Case& inputs, int bad_rank,
                            const std::function<void(CombineArgs&)>& corrupt) {
  const int n = geo.size();
  CallSpec recovery_spec;
  recovery_spec.k = 1;
  const casefile::Case recovery = make_case(geo, recovery_spec, geo.global_bs != 0 ? geo.global_bs / geo.ep_world_size : 2, 99);
  InProcessWorld world(n, generous_timeout());
  MisuseResult result;
  result.outcomes.resize(static_cast<std::size_t>(n));
  result.out_untouched.assign(static_cast<std::size_t>(n), 0);
  Recovery after(n);
  run_ranks(n, [&](int g) {
    const std::unique_ptr<Group> group = world.join(geo.config(g));
    const casefile::RankInputs& in = inputs.ranks[static_cast<std::size_t>(g)];
    DispatchOptions options;
    options.expert_scales = in.expert_scales;
    const DispatchResult d = group->dispatch(in.x, in.expert_ids, options);
    CombineArgs args;
    args.expand_x = copy_rows(d.expand_x, d.valid_rows);
    args.expert_ids = copy_rows(in.expert_ids, in.expert_ids.rows());
    args.expand_idx = copy_rows(d.expand_idx, d.expand_idx.rows());
    args.ep_send_counts = copy_rows(d.ep_recv_counts, d.ep_recv_counts.rows());
    args.expert_scales = copy_rows(in.expert_scales, in.expert_scales.rows());
    if (geo.tp_world_size == 2) args.tp_send_counts = copy_rows(d.tp_recv_counts, 2);
    if (g == bad_rank) corrupt(args);
    std::vector<std::uint8_t> sentinel(static_cast<std::size_t>(args.expert_ids.rows() * args.expand_x.cols() * 2 + 64), 0xA5);
    CombineOptions combine_options;
    combine_options.out = matrix_view(sentinel.data(), args.expand_x.dtype(), args.expert_ids.rows(), args.expand_x.cols());
    if (args.tp_send_counts.present()) combine_options.tp_send_counts = args.tp_send_counts;
    result.outcomes[static_cast<std::size_t>(g)] = capture([&] {
      group->combine(args.expand_x, args.expert_ids, args.expand_idx, args.ep_send_counts, args.expert_scales, combine_options);
    });
    result.out_untouched[static_cast<std::size_t>(g)] =
        std::all_of(sentinel.begin(), sentinel.end(), [](std::uint8_t b) { return b == 0xA5; });
    after.run(*group, recovery, g);
  });
  result.recovery = after.check(recovery);
  return result;
}

// Fixed inputs of W = 2, E = 4 (experts 0, 1 on rank 0; 2, 3 on rank 1), BS = 2, K = 1.
casefile::Case two_rank_case(const Geometry& geo, const std::vector<std::vector<std::int32_t>>& ids) {
  CallSpec spec;
  spec.k = 1;
  casefile::Case c = make_case(geo, spec, 2, 31);
  for (std::size_t g = 0; g < ids.size(); ++g) c.ranks[g].expert_ids = int32_tensor(static_cast<std::int64_t>(ids[g].size()), 1, ids[g]);
  return c;
}

TEST(CombineMisuse, ExpertIdsThatRouteATokenElsewhere) {
  const Geometry geo = geometry(2, 4);
  const casefile::Case inputs = two_rank_case(geo, {{0, 3}, {0, 1}});
  // Rank 1 dispatched its token 0 to expert 0 but tells combine expert 2.
  const MisuseResult r = combine_misuse(geo, inputs, 1, [](CombineArgs& a) { a.expert_ids = int32_tensor(2, 1, {2, 1}); });
  EXPECT_TRUE(validation_error(r.outcomes[1], ErrorCode::invalid_argument, "expert_ids",
                               "(routes 0 tokens to expert 0)",
                               "rank 0 holds 1 rows of this rank for expert 0; pass combine the expert_ids and "
                               "x_active_mask given to dispatch"));
  EXPECT_TRUE(peer_error(r.outcomes[0], ErrorCode::peer_failed, 1, "combine.data", r.outcomes[1].what));
  EXPECT_TRUE(r.out_untouched[0] && r.out_untouched[1]) << "a caller out buffer was written before the error";
  EXPECT_EQ(r.recovery, "");
}

TEST(CombineMisuse, ExpandIdxOutsideItsBlock) {
  const Geometry geo = geometry(2, 4);
  const casefile::Case inputs = two_rank_case(geo, {{0, 3}, {0, 1}});
  // Rank 1 sent one row to expert 1, so slot 5 lies outside that block.
  const MisuseResult r = combine_misuse(geo, inputs, 1, [](CombineArgs& a) { a.expand_idx = int32_vector({0, 5}); });
  EXPECT_TRUE(validation_error(r.outcomes[1], ErrorCode::invalid_argument, "expand_idx[1]", "5",
                               "must be < 1, the rows this rank sent to expert 1; use dispatch's expand_idx"));
  EXPECT_TRUE(peer_error(r.outcomes[0], ErrorCode::peer_failed, 1, "combine.data", r.outcomes[1].what));
  EXPECT_TRUE(r.out_untouched[0] && r.out_untouched[1]) << "a caller out buffer was written before the error";
  EXPECT_EQ(r.recovery, "");
}

// A MoE rank that combines another BS than it dispatched, with its expert rank's row table adjusted so
// that the per-expert counts agree: the shared-expert rank still holds the old share of its tokens.
TEST(CombineMisuse, BsThatDisagreesWithTheSharedExpertRank) {
  const Geometry geo = geometry(2, 1, 1, 0, 6);  // rank 0 shared, rank 1 holds expert 0; max BS 3
  const casefile::Case inputs = two_rank_case(geo, {{0, 0}, {0, 0}});
  const MisuseResult r = combine_misuse(geo, inputs, 1, [](CombineArgs& a) {
    a.expert_ids = int32_tensor(3, 1, {0, 0, 0});
    a.expand_idx = int32_vector({0, 1, 2});
    a.expert_scales = filled(3, 1, 1.0f);
    a.ep_send_counts = int32_vector({2, 5});  // dispatch gave [2, 4]: 2 rows from rank 0, 2 from rank 1
    a.expand_x = Tensor(a.expand_x.dtype(), 5, a.expand_x.cols());
  });
  EXPECT_TRUE(validation_error(r.outcomes[1], ErrorCode::invalid_argument, "expert_ids.shape[0] (BS)", "3",
                               "shared-expert rank 0 holds 2 rows of this rank, but 3 active tokens assign it 3"));
  EXPECT_TRUE(peer_error(r.outcomes[0], ErrorCode::peer_failed, 1, "combine.data", r.outcomes[1].what));
  EXPECT_TRUE(r.out_untouched[0] && r.out_untouched[1]) << "a caller out buffer was written before the error";
  EXPECT_EQ(r.recovery, "");
}

// A row table beyond the rank's capacity cannot be a dispatch's: the rank that passed it is told which
// entry, before anything is exchanged; its peer learns that it failed.
TEST(CombineMisuse, RowTableBeyondCapacityIsRejectedWhereItWasPassed) {
  const Geometry geo = geometry(2, 2);
  const casefile::Case inputs = two_rank_case(geo, {{0, 1}, {0, 1}});
  const MisuseResult r = combine_misuse(geo, inputs, 1, [](CombineArgs& a) {
    a.ep_send_counts = int32_vector({1, 100});  // dispatch gave [1, 2]; rank 1's capacity A is 4
    a.expand_x = Tensor(a.expand_x.dtype(), 100, a.expand_x.cols());
  });
  EXPECT_TRUE(validation_error(r.outcomes[1], ErrorCode::invalid_argument, "ep_send_counts[1]", "100",
                               "exceeds the 4 rows this rank can receive; use dispatch's ep_recv_counts"));
  EXPECT_TRUE(peer_error(r.outcomes[0], ErrorCode::peer_failed, 1, "combine.counts", r.outcomes[1].what));
  EXPECT_TRUE(r.out_untouched[0] && r.out_untouched[1]) << "a caller out buffer was written before the error";
  EXPECT_EQ(r.recovery, "");
}

TEST(CombineMisuse, TpPeersThatDisagreeAboutTheirRows) {
  const Geometry geo = geometry(1, 1, 0, 2);
  const casefile::Case inputs = two_rank_case(geo, {{0, 0}, {0, 0}});
  // Rank 1 (tp_rank_id 1) holds 2 own and 2 peer rows, but claims 1 peer row, consistently in both tensors.
  const MisuseResult r = combine_misuse(geo, inputs, 1, [](CombineArgs& a) {
    a.ep_send_counts = int32_vector({2, 1});
    a.tp_send_counts = int32_vector({1, 2});
  });
  // Every rank checks every TP pair, so both report the same disagreement (found first from rank 0's side).
  const std::string rule = "rank 0 holds 2 own and 2 peer rows but its TP peer rank 1 holds 2 own and 1 peer rows: "
                           "pass each rank its own dispatch outputs";
  EXPECT_TRUE(peer_error(r.outcomes[0], ErrorCode::config_mismatch, 0, "combine.counts", rule));
  EXPECT_TRUE(peer_error(r.outcomes[1], ErrorCode::config_mismatch, 0, "combine.counts", rule));
  EXPECT_TRUE(r.out_untouched[0] && r.out_untouched[1]) << "a caller out buffer was written before the error";
  EXPECT_EQ(r.recovery, "");
}

// A peer-row count beyond the rank's capacity is rejected where it was passed.
TEST(CombineMisuse, PeerRowsBeyondCapacity) {
  const Geometry geo = geometry(1, 1, 0, 2);
  const casefile::Case inputs = two_rank_case(geo, {{0, 0}, {0, 0}});
  const MisuseResult r = combine_misuse(geo, inputs, 1, [](CombineArgs& a) {
    a.ep_send_counts = int32_vector({2, 100});  // capacity A is 2
    a.tp_send_counts = int32_vector({100, 2});
    a.expand_x = Tensor(a.expand_x.dtype(), 102, a.expand_x.cols());
  });
  EXPECT_TRUE(validation_error(r.outcomes[1], ErrorCode::invalid_argument, "ep_send_counts[1]", "100",
                               "exceeds the 2 rows this rank can receive; use dispatch's ep_recv_counts"));
  EXPECT_TRUE(peer_error(r.outcomes[0], ErrorCode::peer_failed, 1, "combine.counts", r.outcomes[1].what));
  EXPECT_TRUE(r.out_untouched[0] && r.out_untouched[1]) << "a caller out buffer was written before the error";
  EXPECT_EQ(r.recovery, "");
}

// ---- capacity overflow on a shared-expert rank ------------------------------------------------------

// W = 10, S = 5, global_bs = 30 (max BS 3): every BS is legal (<= 3), yet the V1 split rotates the
// remainders of MoE ranks 6..9 onto shared rank 0, which receives 3 + 4 = 7 rows while the contract's
// A = global_bs / S is 6 (§3.4.1; the oracle agrees on 7). moedist sizes shared ranks for the true worst
// case, so the call succeeds and matches the oracle; capacity() reports the larger row count.
TEST(DispatchCapacity, SharedRankReceivesMoreThanAWithUnevenBs) {
  const Geometry geo = geometry(10, 5, 5, 0, 30);
  CallSpec spec;
  spec.k = 1;
  spec.h = 8;
  std::mt19937_64 rng(41);
  const casefile::Case inputs = make_case(geo, spec, {3, 3, 3, 3, 3, 0, 3, 2, 3, 1}, rng);
  const auto want = oracle::run(to_oracle_case(inputs));
  EXPECT_EQ(want[0].valid_rows, 7);
  EXPECT_EQ(compare_with_oracle(inputs, run_runtime(inputs, RunOptions{}), want), "");
  const CapacityReport cap = capacity(geo.config(0), CapacityQuery{3, 1, 8, DType::bf16, 0});
  EXPECT_EQ(cap.A, 6);
  EXPECT_EQ(cap.expand_x_rows, 6);
  EXPECT_EQ(cap.max_receive_rows, 3 + 5 * 1);  // max BS + (W - S) * ceil(max BS / S)
}

// Caller buffers of torch_npu's size (A rows) are accepted, but when a call needs more rows than A the
// rank whose buffer is too small is told so before anything is written to it, after every collective
// step, so the other ranks complete and the group stays usable.
TEST(DispatchCapacity, CallerBufferOfARowsIsRefusedWhenTheCallNeedsMore) {
  const Geometry geo = geometry(10, 5, 5, 0, 30);
  CallSpec spec;
  spec.k = 1;
  spec.h = 8;
  std::mt19937_64 rng(41);
  const casefile::Case inputs = make_case(geo, spec, {3, 3, 3, 3, 3, 0, 3, 2, 3, 1}, rng);
  const casefile::Case recovery = make_case(geo, spec, 3, 42);
  InProcessWorld world(10, generous_timeout());
  std::vector<Outcome> outcomes(10);
  std::vector<char> untouched(10, 1);  // char, not bool: ranks write their own entries concurrently
  Recovery after(10);
  run_ranks(10, [&](int g) {
    const std::unique_ptr<Group> group = world.join(geo.config(g));
    const casefile::RankInputs& in = inputs.ranks[static_cast<std::size_t>(g)];
    const CapacityReport cap = capacity(geo.config(g), CapacityQuery{3, 1, 8, DType::bf16, 0});
    Tensor out_x(DType::bf16, cap.expand_x_rows, 8);
    std::fill_n(out_x.data<std::uint16_t>(), out_x.numel(), std::uint16_t{0xabcd});
    DispatchOptions options;
    options.out.expand_x = out_x.mutable_view();
    outcomes[static_cast<std::size_t>(g)] = capture([&] { group->dispatch(in.x, in.expert_ids, options); });
    if (g == 0) {
      untouched[0] = std::all_of(out_x.data<std::uint16_t>(), out_x.data<std::uint16_t>() + out_x.numel(),
                                 [](std::uint16_t v) { return v == 0xabcd; });
    }
    after.run(*group, recovery, g);
  });
  EXPECT_TRUE(validation_error(outcomes[0], ErrorCode::capacity, "out.expand_x.shape[0]", "6",
                               "this call produced 7 rows on this shared-expert rank, more than A * max(T, 1) because ranks "
                               "have different BS; size buffers with capacity().max_receive_rows"))
      << describe(outcomes[0]);
  EXPECT_TRUE(untouched[0]) << "rank 0's buffer was written before the error";
  for (int g = 1; g < 10; ++g) EXPECT_EQ(outcomes[static_cast<std::size_t>(g)].kind, Outcome::Kind::none) << "rank " << g;
  EXPECT_EQ(after.check(recovery), "");
}

// ---- timeouts ----------------------------------------------------------------------------------------

// W = 3 with a 300 ms timeout: rank 2 joins but does not call dispatch until ranks 0 and 1 gave up.
struct TimeoutRun {
  std::vector<Outcome> first, second;  // ranks 0 and 1: the dispatch that waits, then one more call
  std::vector<Clock::duration> first_elapsed, second_elapsed;
  Outcome late;  // rank 2's dispatch after the others failed
  Clock::duration late_elapsed{};
};

TimeoutRun run_with_missing_rank() {
  const Geometry geo = geometry(3, 3);
  const casefile::Case inputs = make_case(geo, CallSpec{}, 2, 51);
  InProcessWorld world(3, timeout_ms(300));
  TimeoutRun run;
  run.first.resize(2);
  run.second.resize(2);
  run.first_elapsed.resize(2);
  run.second_elapsed.resize(2);
  std::latch others_done(2);
  run_ranks(3, [&](int g) {
    const std::unique_ptr<Group> group = world.join(geo.config(g));
    const casefile::RankInputs& in = inputs.ranks[static_cast<std::size_t>(g)];
    DispatchOptions options;
    options.expert_scales = in.expert_scales;
    const auto timed = [&](Outcome* outcome, Clock::duration* elapsed) {
      const auto start = Clock::now();
      *outcome = capture([&] { group->dispatch(in.x, in.expert_ids, options); });
      *elapsed = Clock::now() - start;
    };
    if (g == 2) {
      others_done.wait();
      timed(&run.late, &run.late_elapsed);
      return;
    }
    const auto i = static_cast<std::size_t>(g);
    timed(&run.first[i], &run.first_elapsed[i]);
    timed(&run.second[i], &run.second_elapsed[i]);
    others_done.count_down();
  });
  return run;
}

TEST(Timeout, WaitingRanksNameTheMissingRankAndPhaseAndTheGroupFailsFast) {
  const TimeoutRun run = run_with_missing_rank();
  for (std::size_t g = 0; g < 2; ++g) {
    const Outcome& o = run.first[g];
    EXPECT_EQ(o.kind, Outcome::Kind::peer) << "rank " << g << ": " << describe(o);
    EXPECT_EQ(o.peer, 2) << "rank " << g << ": " << describe(o);
    EXPECT_EQ(o.phase, "dispatch.counts") << "rank " << g << ": " << describe(o);
    EXPECT_TRUE(contains(o.what, "timed out") && contains(o.what, "waiting for rank 2")) << "rank " << g << ": " << describe(o);
    EXPECT_LT(run.first_elapsed[g], kHangBound) << "rank " << g;
    // The group is now unusable: the next call raises at once instead of waiting again.
    EXPECT_TRUE(peer_error(run.second[g], ErrorCode::peer_failed, 2, "dispatch.counts", "unusable")) << "rank " << g;
    EXPECT_LT(run.second_elapsed[g], kHangBound) << "rank " << g;
  }
  EXPECT_TRUE(peer_error(run.late, ErrorCode::peer_failed, 2, "dispatch.counts", "timed out"));
  EXPECT_LT(run.late_elapsed, kHangBound);
}

// Every rank that waited for the missing rank 2 raises ErrorCode::timeout, not only the one whose
// deadline passed first: the others are woken by its failure but waited for the same rank, which
// raised nothing (peer_failed would say it had).
TEST(Timeout, EveryWaitingRankReportsTheTimeoutCode) {
  const TimeoutRun run = run_with_missing_rank();
  for (std::size_t g = 0; g < 2; ++g) {
    EXPECT_TRUE(peer_error(run.first[g], ErrorCode::timeout, 2, "dispatch.counts", "waiting for rank 2")) << "rank " << g;
  }
}

// ---- BS = 0 ---------------------------------------------------------------------------------------

TEST(ZeroBs, RankWithoutTokensStillReceivesAndCombines) {
  struct Setup {
    Geometry geo;
    std::vector<std::int64_t> bs;
  };
  const std::vector<Setup> setups = {
      {geometry(3, 6, 0, 0, 6), {2, 0, 2}},
      {geometry(4, 4, 2, 0, 8), {0, 2, 2, 0}},  // a shared-expert rank and a MoE rank without tokens
      {geometry(2, 2, 0, 2, 6), {3, 0, 0, 2}},  // TP: one rank of each TP pair without tokens
  };
  for (const Setup& s : setups) {
    std::mt19937_64 rng(61);
    const casefile::Case c = make_case(s.geo, CallSpec{}, s.bs, rng);
    InProcessWorld world(s.geo.size(), generous_timeout());
    std::vector<casefile::RankOutputs> got(static_cast<std::size_t>(s.geo.size()));
    run_ranks(s.geo.size(), [&](int g) {
      const std::unique_ptr<Group> group = world.join(s.geo.config(g));
      got[static_cast<std::size_t>(g)] = round_trip(*group, c, g);
    });
    for (int g = 0; g < s.geo.size(); ++g) {
      const casefile::RankOutputs& o = got[static_cast<std::size_t>(g)];
      if (s.bs[static_cast<std::size_t>(g)] != 0) continue;
      EXPECT_EQ(o.expand_idx.numel(), 0) << "rank " << g;
      EXPECT_EQ(o.combine_out.rows(), 0) << "rank " << g;
    }
    EXPECT_EQ(compare(c, got), "") << moedist::testing::describe(c);
    // Independent count for the first setup: every row routed to an expert of rank 1 arrives there.
    if (s.geo.shared_expert_rank_num == 0 && s.geo.tp_world_size == 0) {
      std::int64_t to_rank1 = 0;
      for (const casefile::RankInputs& in : c.ranks) {
        for (std::int64_t i = 0; i < in.expert_ids.numel(); ++i) to_rank1 += in.expert_ids.data<std::int32_t>()[i] / 2 == 1;
      }
      const Tensor& counts = got[1].ep_recv_counts;
      EXPECT_EQ(counts.data<std::int32_t>()[counts.numel() - 1], to_rank1);
      EXPECT_EQ(got[1].expand_x.rows(), to_rank1);
    }
  }
}

// ---- many calls on one group -------------------------------------------------------------------------

// A random call on a fixed group: BS per rank in [0, max_bs] (0 included), K, dtype, quant modes,
// smooth scales, expert_scales and expert_token_nums_type drawn per call.
casefile::Case random_call(std::mt19937_64& rng, const Geometry& geo, std::int64_t max_bs) {
  const auto pick = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  CallSpec spec;
  spec.h = 8;
  spec.k = pick(1, std::min(geo.moe_expert_num, 3));
  spec.dtype = pick(0, 1) == 0 ? DType::bf16 : DType::fp16;
  spec.quant_mode = pick(0, 1) * 2;
  spec.with_scales = spec.quant_mode == 2 && pick(0, 1) == 1;
  spec.with_expert_scales = pick(0, 3) != 0;
  spec.comm_quant_mode = geo.tp_world_size != 2 && pick(0, 2) == 0 ? 2 : 0;
  spec.expert_token_nums_type = pick(0, 1);
  std::vector<std::int64_t> bs(static_cast<std::size_t>(geo.size()));
  for (auto& b : bs) b = pick(0, static_cast<int>(max_bs));
  return make_case(geo, spec, bs, rng);
}

class ManyCalls : public ::testing::TestWithParam<int> {};

TEST_P(ManyCalls, ThousandCallsOnOneGroupMatchTheOracle) {
  constexpr int kCalls = 1000;
  constexpr std::int64_t kMaxBs = 4;
  const int shared = GetParam();
  const Geometry geo = geometry(4, shared == 0 ? 8 : 6, shared, 0, kMaxBs * 4);
  std::mt19937_64 rng(1000 + static_cast<std::uint64_t>(shared));
  std::vector<casefile::Case> calls;
  for (int i = 0; i < kCalls; ++i) calls.push_back(random_call(rng, geo, kMaxBs));
  std::vector<std::vector<casefile::RankOutputs>> got(kCalls);
  for (auto& outputs : got) outputs.resize(4);
  std::vector<std::string> errors(4);
  InProcessWorld world(4, generous_timeout());
  run_ranks(4, [&](int g) {
    const std::unique_ptr<Group> group = world.join(geo.config(g));
    try {
      for (std::size_t i = 0; i < calls.size(); ++i) got[i][static_cast<std::size_t>(g)] = round_trip(*group, calls[i], g);
    } catch (const std::exception& e) {
      errors[static_cast<std::size_t>(g)] = e.what();
    }
  });
  for (int g = 0; g < 4; ++g) ASSERT_EQ(errors[static_cast<std::size_t>(g)], "") << "rank " << g;
  int mismatches = 0;
  for (int i = 0; i < kCalls && mismatches < 5; ++i) {
    const std::string diff = compare(calls[static_cast<std::size_t>(i)], got[static_cast<std::size_t>(i)]);
    if (!diff.empty()) ++mismatches;
    EXPECT_EQ(diff, "") << "call " << i << ": " << moedist::testing::describe(calls[static_cast<std::size_t>(i)]);
  }
}

std::string many_calls_name(const ::testing::TestParamInfo<int>& info) {
  return info.param == 0 ? "W4E8" : "W4E6SharedRank";
}

INSTANTIATE_TEST_SUITE_P(Groups, ManyCalls, ::testing::Values(0, 1), many_calls_name);

// ---- lifetime of group-owned results -------------------------------------------------------------

// W = 2, E = 4, K = 2 with weights 0.5 / 0.5 and identity experts: combine(dispatch(x)) == x exactly.
TEST(GroupOwnedViews, DispatchViewsFeedCombineAndStayValid) {
  const Geometry geo = geometry(2, 4);
  CallSpec spec;
  spec.with_expert_scales = false;
  const casefile::Case first = make_case(geo, spec, 3, 71);
  const casefile::Case second = make_case(geo, spec, 5, 72);
  InProcessWorld world(2, generous_timeout());
  std::vector<std::string> problems(2);
  run_ranks(2, [&](int g) {
    std::string& problem = problems[static_cast<std::size_t>(g)];
    const std::unique_ptr<Group> group = world.join(geo.config(g));
    const casefile::RankInputs& in = first.ranks[static_cast<std::size_t>(g)];
    const Tensor halves = filled(3, 2, 0.5f);
    const DispatchResult d = group->dispatch(in.x, in.expert_ids);
    const Tensor rows_before = copy_rows(d.expand_x, d.valid_rows);
    // The group's own views go straight back into combine.
    const TensorView y = group->combine(d.expand_x, in.expert_ids, d.expand_idx, d.ep_recv_counts, halves);
    if (y.rows() != 3 || y.cols() != 16 || y.dtype != DType::bf16) problem += "combine output has the wrong shape; ";
    for (std::int64_t b = 0; b < 3 && problem.empty(); ++b) {
      for (std::int64_t col = 0; col < 16; ++col) {
        if (y.at<std::uint16_t>(b, col) != in.x.data<std::uint16_t>()[b * 16 + col]) {
          problem += "combine(dispatch(x)) differs from x at (" + std::to_string(b) + ", " + std::to_string(col) + "); ";
          break;
        }
      }
    }
    // Dispatch's views stay valid until the next dispatch, combine's until the next combine.
    if (std::memcmp(copy_rows(d.expand_x, d.valid_rows).raw(), rows_before.raw(), rows_before.nbytes()) != 0)
      problem += "dispatch's expand_x changed during combine; ";
    const casefile::RankInputs& next = second.ranks[static_cast<std::size_t>(g)];
    const DispatchResult d2 = group->dispatch(next.x, next.expert_ids);
    for (std::int64_t b = 0; b < 3; ++b) {
      if (std::memcmp(y.ptr<std::uint16_t>(b, 0), in.x.data<std::uint16_t>() + b * 16, 32) != 0) {
        problem += "combine's output changed during the next dispatch; ";
        break;
      }
    }
    const Tensor halves2 = filled(5, 2, 0.5f);
    const TensorView y2 = group->combine(d2.expand_x, next.expert_ids, d2.expand_idx, d2.ep_recv_counts, halves2);
    if (std::memcmp(copy_rows(y2, 5).raw(), next.x.raw(), next.x.nbytes()) != 0) problem += "second round trip differs from x; ";
  });
  EXPECT_EQ(problems[0], "");
  EXPECT_EQ(problems[1], "");
}

// ---- traffic counters --------------------------------------------------------------------------------

class TrafficCounts : public ::testing::TestWithParam<Geometry> {};

// Per rank: dispatch sends each token to its K experts plus (with shared experts) one shared-expert
// copy, its own rows included; combine reads the same rows back. Across an EP group, the rows sent and
// read add up to the rows the group's ranks received (their own EP rows).
TEST_P(TrafficCounts, MatchTheRowsImpliedByTheInputs) {
  const Geometry geo = GetParam();
  const int n = geo.size();
  const int T = std::max(geo.tp_world_size, 1);
  std::mt19937_64 rng(81);
  InProcessWorld world(n, generous_timeout());
  constexpr int kCalls = 20;
  std::vector<casefile::Case> calls;
  for (int i = 0; i < kCalls; ++i) calls.push_back(random_call(rng, geo, geo.global_bs / geo.ep_world_size));
  std::vector<std::vector<Traffic>> traffic(kCalls, std::vector<Traffic>(static_cast<std::size_t>(n)));
  std::vector<std::vector<casefile::RankOutputs>> got(kCalls);
  for (auto& outputs : got) outputs.resize(static_cast<std::size_t>(n));
  run_ranks(n, [&](int g) {
    const std::unique_ptr<Group> group = world.join(geo.config(g));
    for (int i = 0; i < kCalls; ++i) {
      got[static_cast<std::size_t>(i)][static_cast<std::size_t>(g)] =
          round_trip(*group, calls[static_cast<std::size_t>(i)], g, &traffic[static_cast<std::size_t>(i)][static_cast<std::size_t>(g)]);
    }
  });
  for (int i = 0; i < kCalls; ++i) {
    const casefile::Case& c = calls[static_cast<std::size_t>(i)];
    const std::int64_t h = c.ranks[0].x.cols();
    const bool quant = c.quant_mode == 2, comm_quant = c.comm_quant_mode == 2;
    std::vector<std::int64_t> sent_by_group(static_cast<std::size_t>(T), 0), read_by_group(static_cast<std::size_t>(T), 0),
        received_by_group(static_cast<std::size_t>(T), 0);
    for (int g = 0; g < n; ++g) {
      const casefile::RankInputs& in = c.ranks[static_cast<std::size_t>(g)];
      const Traffic& t = traffic[static_cast<std::size_t>(i)][static_cast<std::size_t>(g)];
      const casefile::RankOutputs& o = got[static_cast<std::size_t>(i)][static_cast<std::size_t>(g)];
      // One row per (token, k) entry of expert_ids, plus one shared-expert copy per token.
      const std::int64_t rows = in.expert_ids.numel() + (geo.shared_expert_rank_num > 0 ? in.x.rows() : 0);
      const std::int64_t row_bytes = h * (quant ? 1 : 2) + (quant ? 4 : 0) + (in.expert_scales.present() ? 4 : 0);
      EXPECT_EQ(t.after_dispatch.dispatch_rows_sent, rows) << "call " << i << " rank " << g;
      EXPECT_EQ(t.after_dispatch.dispatch_bytes_sent, rows * row_bytes) << "call " << i << " rank " << g;
      EXPECT_EQ(t.after_combine.combine_rows_read, rows) << "call " << i << " rank " << g;
      EXPECT_EQ(t.after_combine.combine_bytes_read, rows * (comm_quant ? h + 2 * ((h + 7) / 8) : 2 * h)) << "call " << i << " rank " << g;
      EXPECT_EQ(t.after_combine.dispatch_rows_sent, rows) << "combine must not change the dispatch counters";
      const std::size_t tp = static_cast<std::size_t>(g % T);
      sent_by_group[tp] += t.after_dispatch.dispatch_rows_sent;
      read_by_group[tp] += t.after_combine.combine_rows_read;
      received_by_group[tp] += T == 2 ? o.tp_recv_counts.data<std::int32_t>()[tp] : o.expand_x.rows();
    }
    for (int tp = 0; tp < T; ++tp) {
      EXPECT_EQ(sent_by_group[static_cast<std::size_t>(tp)], received_by_group[static_cast<std::size_t>(tp)]) << "call " << i;
      EXPECT_EQ(read_by_group[static_cast<std::size_t>(tp)], received_by_group[static_cast<std::size_t>(tp)]) << "call " << i;
    }
    EXPECT_EQ(compare(c, got[static_cast<std::size_t>(i)]), "") << "call " << i;
  }
}

std::string traffic_name(const ::testing::TestParamInfo<Geometry>& info) {
  const Geometry& g = info.param;
  return "W" + std::to_string(g.ep_world_size) + "E" + std::to_string(g.moe_expert_num) + "S" +
         std::to_string(g.shared_expert_rank_num) + "T" + std::to_string(g.tp_world_size);
}

void PrintTo(const Geometry& g, std::ostream* os) {
  *os << "W=" << g.ep_world_size << " E=" << g.moe_expert_num << " S=" << g.shared_expert_rank_num << " T=" << g.tp_world_size
      << " global_bs=" << g.global_bs;
}

INSTANTIATE_TEST_SUITE_P(Groups, TrafficCounts,
                         ::testing::Values(geometry(4, 8, 0, 0, 16), geometry(4, 6, 1, 0, 16), geometry(4, 2, 2, 0, 12),
                                           geometry(2, 2, 0, 2, 8)),
                         traffic_name);

// `moedist --version` tells whether this build has MPI support (and which MPI), in either case.
TEST(Version, SaysWhetherMpiSupportIsOn) {
  const std::string text = version_string();
#ifdef MOEDIST_HAVE_MPI
  EXPECT_NE(text.find("transports: inproc, shm, mpi; MPI support on: "), std::string::npos) << text;
#else
  EXPECT_NE(text.find("transports: inproc, shm; MPI support off: built without MPI"), std::string::npos) << text;
#endif
}

}  // namespace
}  // namespace moedist::testing
