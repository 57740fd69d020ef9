// One negative test per validation rule of the V2 operators (Group::dispatch_v2 / combine_v2;
// src/contract/checks.cpp check_dispatch_v2, check_combine_v2, check_v2_routing, check_special_experts,
// check_comm_alg, check_performance_info; src/contract/token_mask.cpp check_entry_mask), the V2 limits of
// the ascend_a3 and ascend_a2 profiles (V2 §7), and the rules only the V1 operators keep. As in
// validation_test (whose assertions rule_checks.h shares): every rank of a world calls, one rank gets
// the bad input and must raise the ValidationError (code, parameter, value, rule text), every other
// rank a PeerError naming it, no caller buffer (performance_info included) is written, and afterwards
// a correct V2 round on the same groups matches the V2 oracle bit for bit.
//
// Then the boundaries these rules leave open, each accepted and compared with the oracle: ids of masked
// entries and inactive tokens are never read, K = E + Z + C + Q, a mask on the largest rank of an
// uneven world, every comm_alg name, the ascend_a3 V2 limits themselves.
#include <gtest/gtest.h>

#include <climits>
#include <cstdint>
#include <functional>
#include <memory>
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

using rules::bad_dtype;
using rules::bad_shape;
using rules::expect;
using rules::Expected;
using rules::invalid;
using rules::raised;
using rules::x_and_expert_ids_rules;

using DispatchRule = rules::CallRule<World, DispatchCall>;
using CombineRule = rules::CallRule<World, CombineCall>;

// ---- the worlds -------------------------------------------------------------------------------------

// W = 2, E = 4 (L = 2), no shared experts; BS = 3, H = 16, K = 2, bf16, expert_scales. expert_ids
// rank 0: [[0, 1], [2, 3], [0, 1]], rank 1: [[1, 2], [3, 0], [1, 2]]. V2 A = BS * W * min(L, K) = 12;
// rank 1 receives 5 rows (ep_recv_counts [1, 3, 4, 5]), rank 0 7 ([2, 3, 5, 7]).
World basic() { return world(2, 4); }

// basic() with one zero, one copy and one const expert: ids in [0, 7), rank 1's [[1, 2], [3, 4], [5, 6]].
World special() {
  World w = basic();
  w.zero = w.copy = w.constant = 1;
  return w;
}

// W = 4: two shared-expert ranks holding Sn = 2 shared experts (R = 1: every rank sends every token to
// both), E = 2 on two MoE ranks; K = 2, quant_mode 2 with smooth scales of Sn + E = 4 rows (combine's
// rules take quant_mode 0, whose identity experts' rows are the dispatched ones).
World shared(int quant_mode = 2) {
  World w = world(4, 2, 2, 2);
  w.quant_mode = quant_mode;
  w.with_scales = quant_mode == 2;
  return w;
}

// tp_pairs(): A = 4, expand_x 8 rows; global rank 1 (EP 0, TP 1) holds 2 own and 2 peer rows
// (ep_recv_counts [1, 2, 1, 2]).
World tp() { return tp_pairs(); }

// The smallest ascend_a3 V2 world: W = 2, E = 4, H = 1024, BS = 2, K = 2. A = 8.
World ascend_a3() { return with_profile(with_shape(world(2, 4), 2, 1024, 2), Profile::ascend_a3); }

// The smallest ascend_a2 world: W = 8, E = 8, H = 32, BS = 1, K = 1.
World ascend_a2() { return with_profile(with_shape(world(8, 8), 1, 32, 1), Profile::ascend_a2); }

World with_global_bs(World w, std::int64_t global_bs) {
  w.config.global_bs = global_bs;
  return w;
}

World with_experts_per_rank(World w, int local) {
  w.config.moe_expert_num = local * (w.config.ep_world_size - w.config.shared_expert_rank_num);
  return w;
}

World with_experts(World w, int zero, int copy, int constant) {
  w.zero = zero;
  w.copy = copy;
  w.constant = constant;
  return w;
}

// ---- the rule runners -------------------------------------------------------------------------------

// Runs a rule on every rank of its world: `call(group, g, in, bad)` makes rank g's call, from its
// inputs, with the rule's corruption where `bad`, and reports what it raised and whether its caller
// buffers stayed untouched. Then a correct round on the same groups.
using RankCall = std::function<std::pair<Outcome, bool>(Group& group, int g, const casefile::RankInputs& in, bool bad)>;

void enforce(const World& w, int bad_rank, const Expected& want, const char* phase, const RankCall& call) {
  const casefile::Case inputs = make_case(w, 1);
  const casefile::Case recovery = make_case(w, 2);
  InProcessWorld runtime(w.size(), rules::generous_timeout());
  std::vector<rules::RankReport> reports(static_cast<std::size_t>(w.size()));
  rules::on_ranks(w.size(), [&](int g) {
    rules::RankReport& report = reports[static_cast<std::size_t>(g)];
    const std::unique_ptr<Group> group = runtime.join(w.rank_config(g));
    std::tie(report.outcome, report.outputs_untouched) =
        call(*group, g, inputs.ranks[static_cast<std::size_t>(g)], g == bad_rank);
    rules::run_recovery(*group, recovery, g, report, round_options());
  });
  rules::expect_rule_enforced(reports, bad_rank, want, phase, recovery);
}

class DispatchV2Rules : public ::testing::TestWithParam<DispatchRule> {};

TEST_P(DispatchV2Rules, BadRankRaisesPeersFailNothingIsWrittenGroupStaysUsable) {
  const DispatchRule& r = GetParam();
  enforce(r.world, r.bad_rank, r.want, "dispatch.counts",
          [&](Group& group, int g, const casefile::RankInputs& in, bool bad) {
            DispatchCall call(r.world, g, in);
            if (bad) r.corrupt(call);
            const Outcome o = capture([&] { group.dispatch_v2(call.x, call.expert_ids, call.options); });
            return std::pair{o, call.outputs_untouched()};
          });
}

class CombineV2Rules : public ::testing::TestWithParam<CombineRule> {};

TEST_P(CombineV2Rules, BadRankRaisesPeersFailNothingIsWrittenGroupStaysUsable) {
  const CombineRule& r = GetParam();
  enforce(r.world, r.bad_rank, r.want, "combine.counts",
          [&](Group& group, int g, const casefile::RankInputs& in, bool bad) {
            DispatchCall dispatch(r.world, g, in);
            const DispatchResult d = group.dispatch_v2(dispatch.x, dispatch.expert_ids, dispatch.options);
            CombineCall call(r.world, dispatch.config, d, in);
            if (bad) r.corrupt(call);
            const Outcome o = capture([&] { call.run(group); });
            return std::pair{o, call.outputs_untouched()};
          });
}

template <class Call>
rules::CallRule<World, Call> rule(std::string name, World w, int bad_rank, std::function<void(Call&)> corrupt,
                                  Expected want) {
  return rules::CallRule<World, Call>{std::move(name), std::move(w), bad_rank, std::move(corrupt), std::move(want)};
}
// A rule of rank 1 of basic().
DispatchRule on_basic(std::string name, std::function<void(DispatchCall&)> corrupt, Expected want) {
  return rule<DispatchCall>(std::move(name), basic(), 1, std::move(corrupt), std::move(want));
}
CombineRule combine_on_basic(std::string name, std::function<void(CombineCall&)> corrupt, Expected want) {
  return rule<CombineCall>(std::move(name), basic(), 1, std::move(corrupt), std::move(want));
}

std::function<void(DispatchCall&)> reshape(std::int64_t bs, std::int64_t h, std::int64_t k) {
  return [bs, h, k](DispatchCall& c) { c.reshape(bs, h, k); };
}

void* writable(const void* p) { return const_cast<void*>(p); }

const char* const kCommAlgRule =
    "must be one of \"\", \"0\", \"fullmesh\", \"fullmesh_v1\", \"fullmesh_v2\", \"hierarchy\"";

// ---- dispatch_v2: x, expert_ids, special experts, quant_mode, scales, expert_scales --------------

std::vector<DispatchRule> input_rules() {
  const std::vector<DispatchRule> v2_rules = {
      on_basic(
          "KZero", [](DispatchCall& c) { c.expert_ids = c.own(Tensor(DType::int32, 3, 0)); },
          bad_shape("expert_ids.shape[1] (K)", "0",
                    "must be in [1, moe_expert_num + zero, copy and const experts = 4]")),
      on_basic(
          "KAboveExpertNum", [](DispatchCall& c) { c.expert_ids = c.own(Tensor(DType::int32, 3, 5)); },
          bad_shape("expert_ids.shape[1] (K)", "5",
                    "must be in [1, moe_expert_num + zero, copy and const experts = 4]")),
      rule<DispatchCall>(
          "KAboveAllExperts", special(), 1, [](DispatchCall& c) { c.expert_ids = c.own(Tensor(DType::int32, 3, 8)); },
          bad_shape("expert_ids.shape[1] (K)", "8",
                    "must be in [1, moe_expert_num + zero, copy and const experts = 7]")),
      on_basic(
          "IdNegative",
          [](DispatchCall& c) {
            c.expert_ids = c.own(int32_tensor(3, 2, {1, 2, -1, 0, 1, 2}));
          },
          invalid("expert_ids[1, 0]", "-1", "must be in [0, moe_expert_num = 4)")),
      on_basic(
          "IdEqualToExpertNum",
          [](DispatchCall& c) {
            c.expert_ids = c.own(int32_tensor(3, 2, {1, 2, 3, 0, 1, 4}));
          },
          invalid("expert_ids[2, 1]", "4", "must be in [0, moe_expert_num = 4)")),
      // With special experts an id past all of them (which the kernel drops silently) and a negative one
      // (which it would send nowhere) are refused too.
      rule<DispatchCall>(
          "IdPastAllExperts", special(), 1,
          [](DispatchCall& c) {
            c.expert_ids = c.own(int32_tensor(3, 2, {1, 2, 3, 4, 5, 7}));
          },
          invalid("expert_ids[2, 1]", "7", "must be in [0, moe_expert_num + zero, copy and const experts = 7)")),
      rule<DispatchCall>(
          "IdNegativeWithSpecialExperts", special(), 1,
          [](DispatchCall& c) {
            c.expert_ids = c.own(int32_tensor(3, 2, {1, -3, 3, 4, 5, 6}));
          },
          invalid("expert_ids[0, 1]", "-3", "must be in [0, moe_expert_num + zero, copy and const experts = 7)")),
      on_basic(
          "IdRepeatedInRow",
          [](DispatchCall& c) {
            c.expert_ids = c.own(int32_tensor(3, 2, {1, 2, 3, 3, 1, 2}));
          },
          invalid("expert_ids[1, 1]", "3", "the ids a row routes must be distinct; row 1 repeats it")),
      rule<DispatchCall>(
          "SpecialIdRepeatedInRow", special(), 1,
          [](DispatchCall& c) {
            c.expert_ids = c.own(int32_tensor(3, 2, {1, 2, 4, 4, 5, 6}));
          },
          invalid("expert_ids[1, 1]", "4", "the ids a row routes must be distinct; row 1 repeats it")),
      rule<DispatchCall>("GlobalBsBelowBsTimesW", with_global_bs(basic(), 6), 1, reshape(4, 16, 2),
                         invalid("global_bs", "6", "must be >= BS * ep_world_size = 4 * 2 (BS of this rank is 4)")),
      on_basic(
          "ZeroExpertNumNegative", [](DispatchCall& c) { c.options.zero_expert_num = -1; },
          invalid("zero_expert_num", "-1", "must be >= 0")),
      on_basic(
          "CopyExpertNumNegative", [](DispatchCall& c) { c.options.copy_expert_num = -2; },
          invalid("copy_expert_num", "-2", "must be >= 0")),
      on_basic(
          "ConstExpertNumNegative", [](DispatchCall& c) { c.options.const_expert_num = INT_MIN; },
          invalid("const_expert_num", "-2147483648", "must be >= 0")),
      on_basic(
          "SpecialExpertsPastInt32", [](DispatchCall& c) { c.options.const_expert_num = INT_MAX; },
          invalid("const_expert_num", "2147483647",
                  "moe_expert_num + zero_expert_num + copy_expert_num + const_expert_num = 2147483651 must be "
                  "<= 2147483647")),
      on_basic(
          "QuantMode1", [](DispatchCall& c) { c.options.quant_mode = 1; },
          expect(ErrorCode::unsupported, "quant_mode", "1",
                 "static quantization is not supported (0 = none, 2 = dynamic int8)")),
      on_basic(
          "QuantMode3", [](DispatchCall& c) { c.options.quant_mode = 3; },
          invalid("quant_mode", "3", "must be 0 (none) or 2 (dynamic int8)")),
      on_basic(
          "QuantModeNegative", [](DispatchCall& c) { c.options.quant_mode = -1; },
          invalid("quant_mode", "-1", "must be 0 (none) or 2 (dynamic int8)")),
      on_basic(
          "ScalesWithQuantMode0", [](DispatchCall& c) { c.options.scales = c.own(Tensor(DType::fp32, 4, 16)); },
          invalid("scales", "(4, 16)", "must be None with quant_mode 0")),
      on_basic(
          "ScalesBf16",
          [](DispatchCall& c) {
            c.options.quant_mode = 2;
            c.options.scales = c.own(Tensor(DType::bf16, 4, 16));
          },
          bad_dtype("scales.dtype", "bfloat16", "must be float32")),
      on_basic(
          "ScalesWithASharedRowButNoSharedExperts",
          [](DispatchCall& c) {
            c.options.quant_mode = 2;
            c.options.scales = c.own(Tensor(DType::fp32, 5, 16));
          },
          bad_shape("scales.shape", "(5, 16)", "must be (4, 16)")),
      on_basic(
          "ScalesNullData",
          [](DispatchCall& c) {
            c.options.quant_mode = 2;
            c.options.scales = c.own(Tensor(DType::fp32, 4, 16));
            c.options.scales.data = nullptr;
          },
          invalid("scales.data", "nullptr", "a tensor of shape (4, 16) needs data")),
      // Sn + E rows: V1's one shared row is not enough for two shared experts, on either kind of rank.
      rule<DispatchCall>(
          "ScalesWithoutSharedExpertRowsOnMoeRank", shared(), 3,
          [](DispatchCall& c) { c.options.scales = c.own(Tensor(DType::fp32, 2, 16)); },
          bad_shape("scales.shape", "(2, 16)", "must be (4, 16)")),
      rule<DispatchCall>(
          "ScalesWithOneSharedRowOnSharedRank", shared(), 0,
          [](DispatchCall& c) { c.options.scales = c.own(Tensor(DType::fp32, 3, 16)); },
          bad_shape("scales.shape", "(3, 16)", "must be (4, 16)")),
      on_basic(
          "ExpertScalesInt32", [](DispatchCall& c) { c.options.expert_scales.dtype = DType::int32; },
          bad_dtype("expert_scales.dtype", "int32", "must be float32")),
      on_basic(
          "ExpertScalesWrongK", [](DispatchCall& c) { c.options.expert_scales.shape[1] = 1; },
          bad_shape("expert_scales.shape", "(3, 1)", "must be (3, 2)")),
      on_basic(
          "ExpertScalesNullData", [](DispatchCall& c) { c.options.expert_scales.data = nullptr; },
          invalid("expert_scales.data", "nullptr", "a tensor of shape (3, 2) needs data")),
      on_basic(
          "ExpertTokenNumsType2", [](DispatchCall& c) { c.options.expert_token_nums_type = 2; },
          invalid("expert_token_nums_type", "2", "must be 0 (prefix sums) or 1 (counts)")),
  };
  // x and expert_ids as tensors (the rules V1 dispatch shares), then the rest.
  std::vector<DispatchRule> rules = x_and_expert_ids_rules<DispatchCall>(on_basic);
  rules.insert(rules.end(), v2_rules.begin(), v2_rules.end());
  return rules;
}

// ---- dispatch_v2: elastic_info, performance_info, comm_alg -----------------------------------------

std::vector<DispatchRule> auxiliary_rules() {
  return {
      on_basic(
          "ElasticInfoPresent", [](DispatchCall& c) { c.options.elastic_info = c.own(Tensor(DType::int32, 8)); },
          expect(ErrorCode::unsupported, "elastic_info", "(8,)", "elastic scaling is not supported: must be None")),
      on_basic(
          "PerformanceInfoInt32", [](DispatchCall& c) { c.options.performance_info.dtype = DType::int32; },
          bad_dtype("performance_info.dtype", "int32", "must be int64")),
      on_basic(
          "PerformanceInfoLongerThanW", [](DispatchCall& c) { c.options.performance_info.shape[0] = 3; },
          bad_shape("performance_info.shape", "(3,)", "must be (2,)")),
      on_basic(
          "PerformanceInfoTwoDimensional",
          [](DispatchCall& c) {
            c.options.performance_info = matrix_view(c.options.performance_info.data, DType::int64, 2, 1);
          },
          bad_shape("performance_info.shape", "(2, 1)", "must be (2,)")),
      on_basic(
          "PerformanceInfoNullData", [](DispatchCall& c) { c.options.performance_info.data = nullptr; },
          invalid("performance_info.data", "nullptr", "a tensor of shape (2,) needs data")),
      on_basic(
          "CommAlgUnknown", [](DispatchCall& c) { c.options.comm_alg = "fullmesh_v3"; },
          invalid("comm_alg", "\"fullmesh_v3\"", kCommAlgRule)),
      on_basic(
          "CommAlgOtherCase", [](DispatchCall& c) { c.options.comm_alg = "FullMesh"; },
          invalid("comm_alg", "\"FullMesh\"", kCommAlgRule)),
      on_basic(
          "CommAlgTrailingSpace", [](DispatchCall& c) { c.options.comm_alg = "hierarchy "; },
          invalid("comm_alg", "\"hierarchy \"", kCommAlgRule)),
  };
}

// ---- dispatch_v2: x_active_mask (check_entry_mask) -------------------------------------------------

std::vector<DispatchRule> mask_rules() {
  const auto mask = [](std::int64_t rows, std::int64_t cols, const std::vector<std::uint8_t>& values) {
    return [=](DispatchCall& c) { c.options.x_active_mask = c.own(bool_tensor(rows, cols, values)); };
  };
  const std::string small_rank =
      "must be None on a rank with fewer tokens than global_bs / ep_world_size = 4 (BS = 3): with different BS per "
      "rank every token must be active";
  return {
      on_basic(
          "MaskInt8",
          [](DispatchCall& c) {
            c.options.x_active_mask = c.own(bool_tensor(3, 0, {1, 1, 1}));
            c.options.x_active_mask.dtype = DType::int8;
          },
          bad_dtype("x_active_mask.dtype", "int8", "must be bool")),
      on_basic("MaskLongerThanBs", mask(4, 0, {1, 1, 1, 1}),
               bad_shape("x_active_mask.shape", "(4,)", "must be (BS,) = (3,) or (BS, K) = (3, 2)")),
      on_basic("MaskWiderThanK", mask(3, 3, {1, 1, 1, 1, 1, 1, 1, 1, 1}),
               bad_shape("x_active_mask.shape", "(3, 3)", "must be (BS,) = (3,) or (BS, K) = (3, 2)")),
      on_basic("MaskTransposed", mask(2, 3, {1, 1, 1, 1, 1, 1}),
               bad_shape("x_active_mask.shape", "(2, 3)", "must be (BS,) = (3,) or (BS, K) = (3, 2)")),
      on_basic(
          "MaskNullData",
          [](DispatchCall& c) {
            c.options.x_active_mask = c.own(bool_tensor(3, 2, {1, 1, 1, 1, 1, 1}));
            c.options.x_active_mask.data = nullptr;
          },
          invalid("x_active_mask.data", "nullptr", "a mask needs data")),
      on_basic(
          "MaskNotAPrefix", mask(3, 0, {1, 0, 1}),
          invalid(
              "x_active_mask[2]", "true",
              "every true must come before every false (x_active_mask[1] is false): active tokens are a prefix of x")),
      // global_bs = 8: up to 4 tokens per rank, and both ranks have 3.
      rule<DispatchCall>("TokenMaskOnRankBelowGlobalBsOverW", with_global_bs(basic(), 8), 1, mask(3, 0, {1, 1, 1}),
                         invalid("x_active_mask", "(3,)", small_rank)),
      rule<DispatchCall>("EntryMaskOnRankBelowGlobalBsOverW", with_global_bs(basic(), 8), 0,
                         mask(3, 2, {1, 1, 1, 1, 1, 1}), invalid("x_active_mask", "(3, 2)", small_rank)),
      rule<DispatchCall>("AscendA2EntryMask", ascend_a2(), 6, mask(1, 1, {1}),
                         invalid("x_active_mask", "(1, 1)", "profile ascend_a2 takes only a (BS,) mask")),
  };
}

// ---- dispatch_v2: caller output buffers ------------------------------------------------------------
// basic(): A = 12 rows of H = 16; assist_info_for_combine at least 3 * A = 36 entries (the buffer has
// torch_npu's 128 * A = 1536); L = 2 local experts, ep_recv_counts W * L = 4.

std::vector<DispatchRule> output_rules() {
  return {
      on_basic(
          "OutExpandXInt8WithQuantMode0", [](DispatchCall& c) { c.options.out.expand_x.dtype = DType::int8; },
          bad_dtype("out.expand_x.dtype", "int8", "must be bfloat16")),
      on_basic(
          "OutExpandXFp16ForBf16X", [](DispatchCall& c) { c.options.out.expand_x.dtype = DType::fp16; },
          bad_dtype("out.expand_x.dtype", "float16", "must be bfloat16")),
      on_basic(
          "OutExpandXBf16WithQuantMode2", [](DispatchCall& c) { c.options.quant_mode = 2; },
          bad_dtype("out.expand_x.dtype", "bfloat16", "must be int8")),
      on_basic(
          "OutExpandXBelowA", [](DispatchCall& c) { c.options.out.expand_x.shape[0] = 11; },
          bad_shape("out.expand_x.shape", "(11, 16)", "must be (>= A * max(tp_world_size, 1) = 12, H = 16)")),
      on_basic(
          "OutExpandXWrongHidden", [](DispatchCall& c) { c.options.out.expand_x.shape[1] = 8; },
          bad_shape("out.expand_x.shape", "(12, 8)", "must be (>= A * max(tp_world_size, 1) = 12, H = 16)")),
      on_basic(
          "OutExpandXNullData", [](DispatchCall& c) { c.options.out.expand_x.data = nullptr; },
          invalid("out.expand_x.data", "nullptr", "a tensor of shape (12, 16) needs data")),
      on_basic(
          "OutDynamicScalesFp16", [](DispatchCall& c) { c.options.out.dynamic_scales.dtype = DType::fp16; },
          bad_dtype("out.dynamic_scales.dtype", "float16", "must be float32")),
      on_basic(
          "OutDynamicScalesBelowA", [](DispatchCall& c) { c.options.out.dynamic_scales.shape[0] = 11; },
          bad_shape("out.dynamic_scales.shape", "(11,)", "must be 1-D with at least 12 entries")),
      on_basic(
          "OutDynamicScalesNullData", [](DispatchCall& c) { c.options.out.dynamic_scales.data = nullptr; },
          invalid("out.dynamic_scales.data", "nullptr", "a tensor of shape (12,) needs data")),
      on_basic(
          "OutExpandScalesBelowA", [](DispatchCall& c) { c.options.out.expand_scales.shape[0] = 2; },
          bad_shape("out.expand_scales.shape", "(2,)", "must be 1-D with at least 12 entries")),
      on_basic(
          "OutAssistInt64", [](DispatchCall& c) { c.options.out.assist_info_for_combine.dtype = DType::int64; },
          bad_dtype("out.assist_info_for_combine.dtype", "int64", "must be int32")),
      on_basic(
          "OutAssistBelowThreeA", [](DispatchCall& c) { c.options.out.assist_info_for_combine.shape[0] = 35; },
          bad_shape("out.assist_info_for_combine.shape", "(35,)", "must be 1-D with at least 36 entries")),
      on_basic(
          "OutAssistTwoDimensional",
          [](DispatchCall& c) {
            c.options.out.assist_info_for_combine =
                matrix_view(c.options.out.assist_info_for_combine.data, DType::int32, 12, 3);
          },
          bad_shape("out.assist_info_for_combine.shape", "(12, 3)", "must be 1-D with at least 36 entries")),
      on_basic(
          "OutAssistNullData", [](DispatchCall& c) { c.options.out.assist_info_for_combine.data = nullptr; },
          invalid("out.assist_info_for_combine.data", "nullptr", "a tensor of shape (1536,) needs data")),
      on_basic(
          "OutExpertTokenNumsInt32", [](DispatchCall& c) { c.options.out.expert_token_nums.dtype = DType::int32; },
          bad_dtype("out.expert_token_nums.dtype", "int32", "must be int64")),
      on_basic(
          "OutExpertTokenNumsWrongLength", [](DispatchCall& c) { c.options.out.expert_token_nums.shape[0] = 3; },
          bad_shape("out.expert_token_nums.shape", "(3,)", "must be (2,)")),
      on_basic(
          "OutExpertTokenNumsNullData", [](DispatchCall& c) { c.options.out.expert_token_nums.data = nullptr; },
          invalid("out.expert_token_nums.data", "nullptr", "a tensor of shape (2,) needs data")),
      on_basic(
          "OutEpRecvCountsInt64", [](DispatchCall& c) { c.options.out.ep_recv_counts.dtype = DType::int64; },
          bad_dtype("out.ep_recv_counts.dtype", "int64", "must be int32")),
      on_basic(
          "OutEpRecvCountsTooShort", [](DispatchCall& c) { c.options.out.ep_recv_counts.shape[0] = 3; },
          bad_shape("out.ep_recv_counts.shape", "(3,)", "must be 1-D with at least 4 entries")),
      on_basic(
          "OutEpRecvCountsNullData", [](DispatchCall& c) { c.options.out.ep_recv_counts.data = nullptr; },
          invalid("out.ep_recv_counts.data", "nullptr", "a tensor of shape (4,) needs data")),
      on_basic(
          "OutTpRecvCountsWithoutTp",
          [](DispatchCall& c) { c.options.out.tp_recv_counts = c.tp_recv_counts_buf.vector(DType::int32, 2); },
          invalid("out.tp_recv_counts", "(2,)", "is only produced with tp_world_size = 2")),
      // Outputs may not alias inputs (performance_info is an output too).
      on_basic(
          "OutExpandXAliasesX",
          [](DispatchCall& c) { c.options.out.expand_x = matrix_view(writable(c.x.data), DType::bf16, 12, 16); },
          invalid("out.expand_x", "(12, 16)", "shares memory with the input x: outputs must not alias inputs")),
      on_basic(
          "OutExpertTokenNumsAliasesExpertScales",
          [](DispatchCall& c) {
            c.options.out.expert_token_nums = vector_view(writable(c.options.expert_scales.data), DType::int64, 2);
          },
          invalid("out.expert_token_nums", "(2,)", "shares memory with the input expert_scales")),
      on_basic(
          "PerformanceInfoAliasesExpertIds",
          [](DispatchCall& c) {
            c.options.performance_info = vector_view(writable(c.expert_ids.data), DType::int64, 2);
          },
          invalid("performance_info", "(2,)", "shares memory with the input expert_ids")),
      // tp(): A = 4, so expand_x needs 2 * A = 8 rows and ep_recv_counts both halves, 4 entries.
      rule<DispatchCall>(
          "TpOutExpandXBelowTwiceA", tp(), 1, [](DispatchCall& c) { c.options.out.expand_x.shape[0] = 7; },
          bad_shape("out.expand_x.shape", "(7, 16)", "must be (>= A * max(tp_world_size, 1) = 8, H = 16)")),
      rule<DispatchCall>(
          "TpOutEpRecvCountsWithoutPeerHalf", tp(), 3,
          [](DispatchCall& c) { c.options.out.ep_recv_counts.shape[0] = 2; },
          bad_shape("out.ep_recv_counts.shape", "(2,)", "must be 1-D with at least 4 entries")),
      rule<DispatchCall>(
          "TpOutTpRecvCountsWrongLength", tp(), 1, [](DispatchCall& c) { c.options.out.tp_recv_counts.shape[0] = 1; },
          bad_shape("out.tp_recv_counts.shape", "(1,)", "must be (2,)")),
      rule<DispatchCall>(
          "TpOutTpRecvCountsInt64", tp(), 2, [](DispatchCall& c) { c.options.out.tp_recv_counts.dtype = DType::int64; },
          bad_dtype("out.tp_recv_counts.dtype", "int64", "must be int32")),
      rule<DispatchCall>(
          "TpOutTpRecvCountsNullData", tp(), 0, [](DispatchCall& c) { c.options.out.tp_recv_counts.data = nullptr; },
          invalid("out.tp_recv_counts.data", "nullptr", "a tensor of shape (2,) needs data")),
  };
}

// ---- dispatch_v2: the profiles' V2 limits (V2 §7) --------------------------------------------------

std::vector<DispatchRule> profile_rules() {
  const auto special_experts = [](int zero, int copy, int constant) {
    return [=](DispatchCall& c) {
      c.options.zero_expert_num = zero;
      c.options.copy_expert_num = copy;
      c.options.const_expert_num = constant;
    };
  };
  const std::string a3_h = "profile ascend_a3 allows 1024 <= H <= 8192 in the V2 operators";
  return {
      rule<DispatchCall>("AscendA3HiddenBelow1024", ascend_a3(), 1, reshape(2, 1023, 2), invalid("H", "1023", a3_h)),
      rule<DispatchCall>("AscendA3HiddenAbove8192", ascend_a3(), 1, reshape(2, 8193, 2), invalid("H", "8193", a3_h)),
      // K = 17 is within E + Z + C + Q = 4 + 13 but above the profile's 16.
      rule<DispatchCall>(
          "AscendA3KAbove16", ascend_a3(), 1,
          [](DispatchCall& c) {
            c.options.zero_expert_num = 13;
            c.expert_ids = c.own(Tensor(DType::int32, 2, 17));
            c.options.expert_scales = TensorView{};
          },
          invalid("K", "17", "profile ascend_a3 allows K <= 16")),
      rule<DispatchCall>("AscendA3BsZero", ascend_a3(), 1, reshape(0, 1024, 2),
                         invalid("BS", "0", "profile ascend_a3 allows 1 <= BS <= 512")),
      rule<DispatchCall>("AscendA3BsAbove512", ascend_a3(), 1, reshape(513, 1024, 2),
                         invalid("BS", "513", "profile ascend_a3 allows 1 <= BS <= 512")),
      // comm_alg under the profiles (V2 §5.3): the platform's names, and A3's fullmesh_v2 / hierarchy limits.
      rule<DispatchCall>(
          "AscendA3CommAlgOfA2", ascend_a3(), 1, [](DispatchCall& c) { c.options.comm_alg = "fullmesh"; },
          invalid("comm_alg", "\"fullmesh\"",
                  "profile ascend_a3 takes \"\", \"fullmesh_v1\", \"fullmesh_v2\" or \"hierarchy\"")),
      rule<DispatchCall>(
          "AscendA3FullmeshV2WithSpecialExperts", ascend_a3(), 1,
          [](DispatchCall& c) {
            c.options.comm_alg = "fullmesh_v2";
            c.options.zero_expert_num = 1;
          },
          invalid("comm_alg", "\"fullmesh_v2\"",
                  "fullmesh_v2 takes no zero, copy or const experts (profile ascend_a3)")),
      rule<DispatchCall>(
          "AscendA3FullmeshV2KAbove12", ascend_a3(), 1,
          [](DispatchCall& c) {
            c.options.comm_alg = "fullmesh_v2";
            c.options.zero_expert_num = 9;  // K = 13 needs ids beyond E = 4; no special expert is allowed
          },
          invalid("comm_alg", "\"fullmesh_v2\"",
                  "fullmesh_v2 takes no zero, copy or const experts (profile ascend_a3)")),
      rule<DispatchCall>(
          "AscendA3HierarchyWithoutExpertScales", ascend_a3(), 1,
          [](DispatchCall& c) {
            c.options.comm_alg = "hierarchy";
            c.options.expert_scales = TensorView{};
          },
          invalid("comm_alg", "\"hierarchy\"", "hierarchy needs expert_scales (profile ascend_a3)")),
      rule<DispatchCall>(
          "AscendA2CommAlgOfA3", ascend_a2(), 2, [](DispatchCall& c) { c.options.comm_alg = "fullmesh_v2"; },
          invalid("comm_alg", "\"fullmesh_v2\"", "profile ascend_a2 takes \"\", \"0\", \"fullmesh\" or \"hierarchy\"")),
      rule<DispatchCall>("AscendA2ZeroExperts", ascend_a2(), 5, special_experts(1, 0, 0),
                         invalid("zero_expert_num", "1", "profile ascend_a2 has no special experts (must be 0)")),
      rule<DispatchCall>("AscendA2CopyExperts", ascend_a2(), 5, special_experts(0, 2, 0),
                         invalid("copy_expert_num", "2", "profile ascend_a2 has no special experts (must be 0)")),
      rule<DispatchCall>("AscendA2ConstExperts", ascend_a2(), 5, special_experts(0, 0, 3),
                         invalid("const_expert_num", "3", "profile ascend_a2 has no special experts (must be 0)")),
      rule<DispatchCall>("AscendA2HiddenNotMultipleOf32", ascend_a2(), 2, reshape(1, 48, 1),
                         invalid("H", "48", "profile ascend_a2 needs H % 32 == 0 and H <= 7168")),
      rule<DispatchCall>("AscendA2BsZero", ascend_a2(), 2, reshape(0, 32, 1),
                         invalid("BS", "0", "profile ascend_a2 allows 1 <= BS <= 256")),
      rule<DispatchCall>("AscendA2BsAbove256", ascend_a2(), 2, reshape(257, 32, 1),
                         invalid("BS", "257", "profile ascend_a2 allows 1 <= BS <= 256")),
      // 17 experts per rank (E = 136 of at most 24 * W): K = 17 is within E, above the profile's 16.
      rule<DispatchCall>("AscendA2KAbove16", with_experts_per_rank(ascend_a2(), 17), 7, reshape(1, 32, 17),
                         invalid("K", "17", "profile ascend_a2 allows K <= 16")),
  };
}

std::string dispatch_rule_name(const ::testing::TestParamInfo<DispatchRule>& info) { return info.param.name; }
std::string combine_rule_name(const ::testing::TestParamInfo<CombineRule>& info) { return info.param.name; }

INSTANTIATE_TEST_SUITE_P(Inputs, DispatchV2Rules, ::testing::ValuesIn(input_rules()), dispatch_rule_name);
INSTANTIATE_TEST_SUITE_P(Auxiliary, DispatchV2Rules, ::testing::ValuesIn(auxiliary_rules()), dispatch_rule_name);
INSTANTIATE_TEST_SUITE_P(Mask, DispatchV2Rules, ::testing::ValuesIn(mask_rules()), dispatch_rule_name);
INSTANTIATE_TEST_SUITE_P(Outputs, DispatchV2Rules, ::testing::ValuesIn(output_rules()), dispatch_rule_name);
INSTANTIATE_TEST_SUITE_P(Profiles, DispatchV2Rules, ::testing::ValuesIn(profile_rules()), dispatch_rule_name);

// ---- combine_v2: expand_x, routing, expert_scales, ep_send_counts, assist_info_for_combine ---------
// basic(), rank 1: 5 own rows, ep_send_counts [1, 3, 4, 5], at most A = 12; the triples 15 entries of a
// buffer of 128 * A = 1536.

std::vector<CombineRule> combine_input_rules() {
  return {
      combine_on_basic(
          "ExpandXAbsent", [](CombineCall& c) { c.expand_x = TensorView{}; },
          invalid("expand_x", "None", "is required")),
      combine_on_basic(
          "ExpandXOneDimensional", [](CombineCall& c) { c.expand_x = vector_view(c.expand_x.data, DType::bf16, 80); },
          bad_shape("expand_x.shape", "(80,)", "must be 2-D")),
      combine_on_basic(
          "ExpandXFloat32", [](CombineCall& c) { c.expand_x.dtype = DType::fp32; },
          bad_dtype("expand_x.dtype", "float32", "must be bfloat16 or float16")),
      combine_on_basic(
          "ExpandXNullData", [](CombineCall& c) { c.expand_x.data = nullptr; },
          invalid("expand_x.data", "nullptr", "a tensor of shape (5, 16) needs data")),
      combine_on_basic(
          "ExpandXZeroHidden", [](CombineCall& c) { c.expand_x = matrix_view(c.expand_x.data, DType::bf16, 5, 0); },
          bad_shape("expand_x.shape[1] (H)", "0", "must be >= 1")),
      combine_on_basic(
          "ExpandXFewerRowsThanEpSendCounts", [](CombineCall& c) { c.expand_x.shape[0] = 4; },
          bad_shape("expand_x.shape", "(4, 16)", "must have at least the 5 valid rows that ep_send_counts describe")),
      combine_on_basic(
          "ZeroExpertNumNegative", [](CombineCall& c) { c.options.zero_expert_num = -1; },
          invalid("zero_expert_num", "-1", "must be >= 0")),
      combine_on_basic(
          "IdsAbsent", [](CombineCall& c) { c.expert_ids = TensorView{}; },
          invalid("expert_ids", "None", "is required")),
      combine_on_basic(
          "IdsInt64", [](CombineCall& c) { c.expert_ids = c.own(Tensor(DType::int64, 3, 2)); },
          bad_dtype("expert_ids.dtype", "int64", "must be int32")),
      combine_on_basic(
          "KAboveExpertNum", [](CombineCall& c) { c.expert_ids = c.own(Tensor(DType::int32, 3, 5)); },
          bad_shape("expert_ids.shape[1] (K)", "5",
                    "must be in [1, moe_expert_num + zero, copy and const experts = 4]")),
      combine_on_basic(
          "IdNegative",
          [](CombineCall& c) {
            c.expert_ids = c.own(int32_tensor(3, 2, {1, 2, -1, 0, 1, 2}));
          },
          invalid("expert_ids[1, 0]", "-1", "must be in [0, moe_expert_num = 4)")),
      combine_on_basic(
          "IdRepeatedInRow",
          [](CombineCall& c) {
            c.expert_ids = c.own(int32_tensor(3, 2, {1, 2, 3, 0, 2, 2}));
          },
          invalid("expert_ids[2, 1]", "2", "the ids a row routes must be distinct; row 2 repeats it")),
      // Fewer special experts than dispatch had: the id of dispatch's const expert falls outside them.
      rule<CombineCall>(
          "FewerSpecialExpertsThanDispatch", special(), 1, [](CombineCall& c) { c.options.const_expert_num = 0; },
          invalid("expert_ids[2, 1]", "6", "must be in [0, moe_expert_num + zero, copy and const experts = 6)")),
      combine_on_basic(
          "MaskNotAPrefix",
          [](CombineCall& c) {
            c.options.x_active_mask = c.own(bool_tensor(3, 0, {0, 1, 1}));
          },
          invalid(
              "x_active_mask[1]", "true",
              "every true must come before every false (x_active_mask[0] is false): active tokens are a prefix of x")),
      combine_on_basic(
          "MaskWrongShape",
          [](CombineCall& c) {
            c.options.x_active_mask = c.own(bool_tensor(3, 1, {1, 1, 1}));
          },
          bad_shape("x_active_mask.shape", "(3, 1)", "must be (BS,) = (3,) or (BS, K) = (3, 2)")),
      combine_on_basic(
          "ExpertScalesInt32", [](CombineCall& c) { c.expert_scales.dtype = DType::int32; },
          bad_dtype("expert_scales.dtype", "int32", "must be float32")),
      combine_on_basic(
          "ExpertScalesWrongShape", [](CombineCall& c) { c.expert_scales.shape[0] = 2; },
          bad_shape("expert_scales.shape", "(2, 2)", "must be (3, 2)")),
      combine_on_basic(
          "ExpertScalesNullData", [](CombineCall& c) { c.expert_scales.data = nullptr; },
          invalid("expert_scales.data", "nullptr", "a tensor of shape (3, 2) needs data")),
      combine_on_basic(
          "EpSendCountsAbsent", [](CombineCall& c) { c.ep_send_counts = TensorView{}; },
          invalid("ep_send_counts", "None", "is required")),
      combine_on_basic(
          "EpSendCountsInt64", [](CombineCall& c) { c.ep_send_counts.dtype = DType::int64; },
          bad_dtype("ep_send_counts.dtype", "int64", "must be int32")),
      combine_on_basic(
          "EpSendCountsTooShort", [](CombineCall& c) { c.ep_send_counts.shape[0] = 3; },
          bad_shape("ep_send_counts.shape", "(3,)", "must be 1-D with at least 4 entries")),
      combine_on_basic(
          "EpSendCountsNullData", [](CombineCall& c) { c.ep_send_counts.data = nullptr; },
          invalid("ep_send_counts.data", "nullptr", "a tensor of shape (4,) needs data")),
      combine_on_basic(
          "EpSendCountsOwnRowsNegative",
          [](CombineCall& c) {
            c.ep_send_counts = c.own(int32_vector({1, 3, 4, -1}));
          },
          invalid("ep_send_counts[3]", "-1",
                  "must be in [0, 12], the rows this rank can receive; use dispatch's ep_recv_counts")),
      combine_on_basic(
          "EpSendCountsOwnRowsAboveA",
          [](CombineCall& c) {
            c.ep_send_counts = c.own(int32_vector({1, 3, 4, 13}));
          },
          invalid("ep_send_counts[3]", "13",
                  "must be in [0, 12], the rows this rank can receive; use dispatch's ep_recv_counts")),
      combine_on_basic(
          "CommQuantMode1", [](CombineCall& c) { c.options.comm_quant_mode = 1; },
          invalid("comm_quant_mode", "1", "must be 0 (none) or 2 (int8)")),
      combine_on_basic(
          "CommQuantModeNegative", [](CombineCall& c) { c.options.comm_quant_mode = -2; },
          invalid("comm_quant_mode", "-2", "must be 0 (none) or 2 (int8)")),
      combine_on_basic(
          "AssistAbsent", [](CombineCall& c) { c.assist = TensorView{}; },
          invalid("assist_info_for_combine", "None", "is required")),
      combine_on_basic(
          "AssistInt64", [](CombineCall& c) { c.assist.dtype = DType::int64; },
          bad_dtype("assist_info_for_combine.dtype", "int64", "must be int32")),
      combine_on_basic(
          "AssistBelowThreePerRow", [](CombineCall& c) { c.assist.shape[0] = 14; },
          bad_shape("assist_info_for_combine.shape", "(14,)", "must be 1-D with at least 15 entries")),
      combine_on_basic(
          "AssistTwoDimensional", [](CombineCall& c) { c.assist = matrix_view(c.assist.data, DType::int32, 5, 3); },
          bad_shape("assist_info_for_combine.shape", "(5, 3)", "must be 1-D with at least 15 entries")),
      combine_on_basic(
          "AssistNullData", [](CombineCall& c) { c.assist.data = nullptr; },
          invalid("assist_info_for_combine.data", "nullptr", "a tensor of shape (1536,) needs data")),
  };
}

// ---- combine_v2: shared_expert_x, ori_x, the const experts' tensors, auxiliary inputs, out ---------

std::vector<CombineRule> combine_option_rules() {
  const auto half = [](std::int64_t rows, std::int64_t cols, DType dtype = DType::bf16) {
    return Tensor(dtype, rows, cols);
  };
  return {
      combine_on_basic(
          "SharedExpertXWrongRows", [=](CombineCall& c) { c.options.shared_expert_x = c.own(half(2, 16)); },
          bad_shape("shared_expert_x.shape", "(2, 16)", "must be (3, 16)")),
      combine_on_basic(
          "SharedExpertXFp16", [=](CombineCall& c) { c.options.shared_expert_x = c.own(half(3, 16, DType::fp16)); },
          bad_dtype("shared_expert_x.dtype", "float16", "must be bfloat16")),
      combine_on_basic(
          "SharedExpertXNullData",
          [=](CombineCall& c) {
            c.options.shared_expert_x = c.own(half(3, 16));
            c.options.shared_expert_x.data = nullptr;
          },
          invalid("shared_expert_x.data", "nullptr", "a tensor of shape (3, 16) needs data")),
      // shared_expert_x only with S = 0 (V2 §4.5), on a MoE rank and on a shared-expert rank.
      rule<CombineCall>(
          "SharedExpertXWithSharedExpertRanksOnMoeRank", shared(0), 3,
          [=](CombineCall& c) { c.options.shared_expert_x = c.own(half(3, 16)); },
          invalid(
              "shared_expert_x", "(3, 16)",
              "must be None with shared_expert_rank_num = 2 (the kernel adds it only without shared-expert ranks)")),
      rule<CombineCall>(
          "SharedExpertXWithSharedExpertRanksOnSharedRank", shared(0), 1,
          [=](CombineCall& c) { c.options.shared_expert_x = c.own(half(3, 16)); },
          invalid("shared_expert_x", "(3, 16)", "must be None with shared_expert_rank_num = 2")),
      // ori_x: required with copy or const experts; checked whenever it is given.
      rule<CombineCall>(
          "OriXAbsentWithCopyExperts", with_experts(basic(), 0, 1, 0), 1,
          [](CombineCall& c) { c.options.ori_x = TensorView{}; },
          invalid("ori_x", "None", "is required with copy or const experts (copy_expert_num + const_expert_num > 0)")),
      rule<CombineCall>(
          "OriXAbsentWithConstExperts", with_experts(basic(), 0, 0, 2), 1,
          [](CombineCall& c) { c.options.ori_x = TensorView{}; },
          invalid("ori_x", "None", "is required with copy or const experts (copy_expert_num + const_expert_num > 0)")),
      rule<CombineCall>(
          "OriXWrongHidden", special(), 1, [=](CombineCall& c) { c.options.ori_x = c.own(half(3, 8)); },
          bad_shape("ori_x.shape", "(3, 8)", "must be (3, 16)")),
      rule<CombineCall>(
          "OriXFp16", special(), 1, [](CombineCall& c) { c.options.ori_x.dtype = DType::fp16; },
          bad_dtype("ori_x.dtype", "float16", "must be bfloat16")),
      rule<CombineCall>(
          "OriXNullData", special(), 1, [](CombineCall& c) { c.options.ori_x.data = nullptr; },
          invalid("ori_x.data", "nullptr", "a tensor of shape (3, 16) needs data")),
      combine_on_basic(
          "OriXWrongRowsWithoutCopyOrConstExperts", [=](CombineCall& c) { c.options.ori_x = c.own(half(4, 16)); },
          bad_shape("ori_x.shape", "(4, 16)", "must be (3, 16)")),
      // The const experts' (Q, H) tensors: none without const experts, all three with them.
      combine_on_basic(
          "ConstAlpha1WithoutConstExperts",
          [=](CombineCall& c) { c.options.const_expert_alpha_1 = c.own(half(1, 16)); },
          invalid("const_expert_alpha_1", "(1, 16)", "must be None without const experts (const_expert_num = 0)")),
      combine_on_basic(
          "ConstAlpha2WithoutConstExperts",
          [=](CombineCall& c) { c.options.const_expert_alpha_2 = c.own(half(1, 16)); },
          invalid("const_expert_alpha_2", "(1, 16)", "must be None without const experts (const_expert_num = 0)")),
      combine_on_basic(
          "ConstVWithoutConstExperts", [=](CombineCall& c) { c.options.const_expert_v = c.own(half(2, 16)); },
          invalid("const_expert_v", "(2, 16)", "must be None without const experts (const_expert_num = 0)")),
      rule<CombineCall>(
          "ConstAlpha1Absent", special(), 1, [](CombineCall& c) { c.options.const_expert_alpha_1 = TensorView{}; },
          invalid("const_expert_alpha_1", "None", "is required with const experts")),
      rule<CombineCall>(
          "ConstAlpha2Absent", special(), 1, [](CombineCall& c) { c.options.const_expert_alpha_2 = TensorView{}; },
          invalid("const_expert_alpha_2", "None", "is required with const experts")),
      rule<CombineCall>(
          "ConstVAbsent", special(), 1, [](CombineCall& c) { c.options.const_expert_v = TensorView{}; },
          invalid("const_expert_v", "None", "is required with const experts")),
      rule<CombineCall>(
          "ConstAlpha1WrongHidden", special(), 1,
          [=](CombineCall& c) { c.options.const_expert_alpha_1 = c.own(half(1, 8)); },
          bad_shape("const_expert_alpha_1.shape", "(1, 8)", "must be (1, 16)")),
      rule<CombineCall>(
          "ConstAlpha2Fp16", special(), 1, [](CombineCall& c) { c.options.const_expert_alpha_2.dtype = DType::fp16; },
          bad_dtype("const_expert_alpha_2.dtype", "float16", "must be bfloat16")),
      rule<CombineCall>(
          "ConstVOneRowPerConstExpert", special(), 1,
          [=](CombineCall& c) { c.options.const_expert_v = c.own(half(2, 16)); },
          bad_shape("const_expert_v.shape", "(2, 16)", "must be (1, 16)")),
      rule<CombineCall>(
          "ConstVNullData", special(), 1, [](CombineCall& c) { c.options.const_expert_v.data = nullptr; },
          invalid("const_expert_v.data", "nullptr", "a tensor of shape (1, 16) needs data")),
      combine_on_basic(
          "ElasticInfoPresent", [](CombineCall& c) { c.options.elastic_info = c.own(Tensor(DType::int32, 8)); },
          expect(ErrorCode::unsupported, "elastic_info", "(8,)", "elastic scaling is not supported: must be None")),
      combine_on_basic(
          "PerformanceInfoInt32", [](CombineCall& c) { c.options.performance_info.dtype = DType::int32; },
          bad_dtype("performance_info.dtype", "int32", "must be int64")),
      combine_on_basic(
          "PerformanceInfoShorterThanW", [](CombineCall& c) { c.options.performance_info.shape[0] = 1; },
          bad_shape("performance_info.shape", "(1,)", "must be (2,)")),
      combine_on_basic(
          "PerformanceInfoNullData", [](CombineCall& c) { c.options.performance_info.data = nullptr; },
          invalid("performance_info.data", "nullptr", "a tensor of shape (2,) needs data")),
      combine_on_basic(
          "CommAlgUnknown", [](CombineCall& c) { c.options.comm_alg = "ring"; },
          invalid("comm_alg", "\"ring\"", kCommAlgRule)),
      combine_on_basic(
          "ExpandScalesFp16",
          [](CombineCall& c) {
            c.options.expand_scales = c.own(Tensor(DType::fp32, 5));
            c.options.expand_scales.dtype = DType::fp16;
          },
          bad_dtype("expand_scales.dtype", "float16", "must be float32")),
      combine_on_basic(
          "ExpandScalesBelowValidRows", [](CombineCall& c) { c.options.expand_scales = c.own(Tensor(DType::fp32, 4)); },
          bad_shape("expand_scales.shape", "(4,)", "must be 1-D with at least 5 entries")),
      combine_on_basic(
          "ExpandScalesNullData",
          [](CombineCall& c) {
            c.options.expand_scales = c.own(Tensor(DType::fp32, 5));
            c.options.expand_scales.data = nullptr;
          },
          invalid("expand_scales.data", "nullptr", "a tensor of shape (5,) needs data")),
      combine_on_basic(
          "OutFp16", [](CombineCall& c) { c.options.out.dtype = DType::fp16; },
          bad_dtype("out.dtype", "float16", "must be bfloat16")),
      combine_on_basic(
          "OutWrongRows", [](CombineCall& c) { c.options.out.shape[0] = 2; },
          bad_shape("out.shape", "(2, 16)", "must be (3, 16)")),
      combine_on_basic(
          "OutNullData", [](CombineCall& c) { c.options.out.data = nullptr; },
          invalid("out.data", "nullptr", "a tensor of shape (3, 16) needs data")),
      combine_on_basic(
          "OutAliasesExpandX",
          [](CombineCall& c) { c.options.out = matrix_view(writable(c.expand_x.data), DType::bf16, 3, 16); },
          invalid("out", "(3, 16)", "shares memory with the input expand_x: outputs must not alias inputs")),
      rule<CombineCall>(
          "OutAliasesOriX", special(), 1,
          [](CombineCall& c) { c.options.out = matrix_view(writable(c.options.ori_x.data), DType::bf16, 3, 16); },
          invalid("out", "(3, 16)", "shares memory with the input ori_x")),
      combine_on_basic(
          "PerformanceInfoAliasesAssist",
          [](CombineCall& c) { c.options.performance_info = vector_view(writable(c.assist.data), DType::int64, 2); },
          invalid("performance_info", "(2,)", "shares memory with the input assist_info_for_combine")),
  };
}

// ---- combine_v2: TP and the profiles ---------------------------------------------------------------
// tp(), global rank 1 (EP 0, TP 1): 2 own and 2 peer rows, ep_recv_counts [1, 2, 1, 2], tp_recv_counts
// [2, 2], at most A = 4 rows per half. ascend_a3(): A = 8, so assist_info_for_combine needs 128 * A = 1024.

std::vector<CombineRule> combine_tp_and_profile_rules() {
  const auto tp_rule = [](std::string name, std::function<void(CombineCall&)> corrupt, Expected want) {
    return rule<CombineCall>(std::move(name), tp(), 1, std::move(corrupt), std::move(want));
  };
  return {
      tp_rule(
          "TpSendCountsAbsent", [](CombineCall& c) { c.options.tp_send_counts = TensorView{}; },
          invalid("tp_send_counts", "None", "is required")),
      tp_rule(
          "TpSendCountsInt64", [](CombineCall& c) { c.options.tp_send_counts.dtype = DType::int64; },
          bad_dtype("tp_send_counts.dtype", "int64", "must be int32")),
      tp_rule(
          "TpSendCountsWrongLength",
          [](CombineCall& c) {
            c.options.tp_send_counts = c.own(int32_vector({2, 2, 0}));
          },
          bad_shape("tp_send_counts.shape", "(3,)", "must be (2,)")),
      tp_rule(
          "TpSendCountsNullData", [](CombineCall& c) { c.options.tp_send_counts.data = nullptr; },
          invalid("tp_send_counts.data", "nullptr", "a tensor of shape (2,) needs data")),
      tp_rule(
          "TpSendCountsDisagreeWithEpSendCounts",
          [](CombineCall& c) {
            c.options.tp_send_counts = c.own(int32_vector({1, 2}));
          },
          invalid("tp_send_counts", "[1, 2]", "must match ep_send_counts (own rows 2 at tp_rank_id 1, peer rows 2)")),
      tp_rule(
          "CommQuantMode2WithTp", [](CombineCall& c) { c.options.comm_quant_mode = 2; },
          invalid("comm_quant_mode", "2", "must be 0 with a TP domain (tp_world_size = 2)")),
      tp_rule(
          "EpSendCountsWithoutPeerHalf", [](CombineCall& c) { c.ep_send_counts.shape[0] = 2; },
          bad_shape("ep_send_counts.shape", "(2,)", "must be 1-D with at least 4 entries")),
      tp_rule(
          "EpSendCountsPeerRowsAboveA",
          [](CombineCall& c) {
            c.ep_send_counts = c.own(int32_vector({1, 2, 1, 5}));
          },
          invalid("ep_send_counts[3]", "5", "must be in [0, 4], the rows this rank can receive")),
      tp_rule(
          "ExpandXFewerRowsThanOwnAndPeerRows", [](CombineCall& c) { c.expand_x.shape[0] = 3; },
          bad_shape("expand_x.shape", "(3, 16)",
                    "must have at least the 4 valid rows that ep_send_counts and tp_send_counts describe")),
      rule<CombineCall>(
          "AscendA3ExpertScalesAbsent", ascend_a3(), 1, [](CombineCall& c) { c.expert_scales = TensorView{}; },
          invalid("expert_scales", "None", "is required")),
      rule<CombineCall>(
          "AscendA3AssistBelow128A", ascend_a3(), 1, [](CombineCall& c) { c.assist.shape[0] = 1023; },
          bad_shape("assist_info_for_combine.shape", "(1023,)", "must be 1-D with at least 1024 entries")),
      rule<CombineCall>(
          "AscendA3ExpandXHiddenBelow1024", ascend_a3(), 0,
          [](CombineCall& c) { c.expand_x = c.own(Tensor(DType::bf16, c.expand_x.rows(), 1000)); },
          invalid("H", "1000", "profile ascend_a3 allows 1024 <= H <= 8192 in the V2 operators")),
      rule<CombineCall>(
          "AscendA2EntryMask", ascend_a2(), 3,
          [](CombineCall& c) { c.options.x_active_mask = c.own(bool_tensor(1, 1, {1})); },
          invalid("x_active_mask", "(1, 1)", "profile ascend_a2 takes only a (BS,) mask")),
      rule<CombineCall>(
          "AscendA2CopyExperts", ascend_a2(), 4, [](CombineCall& c) { c.options.copy_expert_num = 1; },
          invalid("copy_expert_num", "1", "profile ascend_a2 has no special experts (must be 0)")),
  };
}

INSTANTIATE_TEST_SUITE_P(Inputs, CombineV2Rules, ::testing::ValuesIn(combine_input_rules()), combine_rule_name);
INSTANTIATE_TEST_SUITE_P(Options, CombineV2Rules, ::testing::ValuesIn(combine_option_rules()), combine_rule_name);
INSTANTIATE_TEST_SUITE_P(TpAndProfiles, CombineV2Rules, ::testing::ValuesIn(combine_tp_and_profile_rules()),
                         combine_rule_name);

// ---- the numbers the rules above rely on -----------------------------------------------------------

TEST(V2Worlds, CapacitiesAndCountsUsedHere) {
  const auto a = [](const World& w, int g) {
    return capacity(w.rank_config(g), CapacityQuery{w.bs, w.k, w.h, w.dtype, w.quant_mode, 2});
  };
  EXPECT_EQ(a(basic(), 1).A, 12);
  EXPECT_EQ(a(basic(), 1).expand_x_rows, 12);
  EXPECT_EQ(a(tp(), 1).A, 4);
  EXPECT_EQ(a(tp(), 1).expand_x_rows, 8);
  EXPECT_EQ(a(ascend_a3(), 1).A, 8);
  EXPECT_EQ(a(shared(), 0).A, 12);  // maxBS * ceil(W / R) = 3 * 4
  // The rows each rank of basic() and tp() receives.
  for (const World& w : {basic(), tp()}) {
    const casefile::Case c = make_case(w, 1);
    InProcessWorld runtime(w.size(), rules::generous_timeout());
    std::vector<std::vector<std::int32_t>> counts(static_cast<std::size_t>(w.size()));
    run_ranks(w.size(), [&](int g) {
      const std::unique_ptr<Group> group = runtime.join(w.rank_config(g));
      DispatchCall call(w, g, c.ranks[static_cast<std::size_t>(g)]);
      const DispatchResult d = group->dispatch_v2(call.x, call.expert_ids, call.options);
      for (std::int64_t i = 0; i < d.ep_recv_counts.rows(); ++i)
        counts[static_cast<std::size_t>(g)].push_back(d.ep_recv_counts.at<std::int32_t>(i));
    });
    if (w.config.tp_world_size == 2) {
      EXPECT_EQ(counts[1], (std::vector<std::int32_t>{1, 2, 1, 2}));
    } else {
      EXPECT_EQ(counts[0], (std::vector<std::int32_t>{2, 3, 5, 7}));
      EXPECT_EQ(counts[1], (std::vector<std::int32_t>{1, 3, 4, 5}));
    }
  }
}

// The harness's control: a valid call writes every buffer whose sentinels the rules above watch.
TEST(V2Worlds, SentinelBuffersSeeTheWritesOfAValidCall) {
  const World w = world(1, 4);
  const casefile::Case c = make_case(w, 1);
  InProcessWorld runtime(1, rules::generous_timeout());
  const std::unique_ptr<Group> group = runtime.join(w.rank_config(0));
  DispatchCall call(w, 0, c.ranks[0]);
  const DispatchResult d = group->dispatch_v2(call.x, call.expert_ids, call.options);
  for (const rules::SentinelBuffer* b :
       {&call.expand_x_buf, &call.dynamic_scales_buf, &call.expand_scales_buf, &call.assist_buf,
        &call.expert_token_nums_buf, &call.ep_recv_counts_buf, &call.performance_info_buf}) {
    EXPECT_FALSE(b->untouched());
  }
  CombineCall combine(w, call.config, d, c.ranks[0]);
  combine.run(*group);
  EXPECT_FALSE(combine.out_buf.untouched());
  EXPECT_FALSE(combine.performance_info_buf.untouched());
}

// ---- the rules only the V1 operators keep ----------------------------------------------------------

struct V1OnlyRule {
  std::string name;
  World world;
  Expected want;
};

void PrintTo(const V1OnlyRule& r, std::ostream* os) { *os << r.name; }

std::vector<V1OnlyRule> v1_only_rules() {
  World a3 = ascend_a3();
  a3.config.moe_expert_num = 2;
  return {
      {"TwoSharedExperts", world(4, 2, 2, 2),
       invalid("shared_expert_num", "2", "must be 1 in the V1 operators (0 to 4 in the V2 ones)")},
      {"NoSharedExpertNum", world(2, 2, 0, 0),
       invalid("shared_expert_num", "0", "must be 1 in the V1 operators (0 to 4 in the V2 ones)")},
      {"WNotAMultipleOfS", world(5, 3, 2, 1),
       invalid("shared_expert_rank_num", "2", "ep_world_size = 5 must be a multiple of it in the V1 operators")},
      {"AscendA3W2", a3,
       invalid("ep_world_size", "2",
               "profile ascend_a3 allows 8, 16, 32, 64, 128, 144, 256 or 288 in the V1 operators")},
  };
}

class V1OnlyRules : public ::testing::TestWithParam<V1OnlyRule> {};

// Every rank's V1 dispatch and combine raise the rule (each its own: every rank breaks it); the V2 pair
// on the same groups works and matches the oracle.
TEST_P(V1OnlyRules, V1CallsRaiseOnEveryRankV2CallsWork) {
  const V1OnlyRule& r = GetParam();
  const World& w = r.world;
  const casefile::Case c = make_case(w, 3);
  InProcessWorld runtime(w.size(), rules::generous_timeout());
  std::vector<Outcome> v1_dispatch(static_cast<std::size_t>(w.size())), v1_combine(v1_dispatch.size());
  std::vector<casefile::RankOutputs> outputs(v1_dispatch.size());
  run_ranks(w.size(), [&](int g) {
    const auto i = static_cast<std::size_t>(g);
    const casefile::RankInputs& in = c.ranks[i];
    const std::unique_ptr<Group> group = runtime.join(w.rank_config(g));
    v1_dispatch[i] = capture([&] { group->dispatch(in.x, in.expert_ids); });
    v1_combine[i] = capture([&] { group->combine(in.x, in.expert_ids, TensorView{}, TensorView{}, in.expert_scales); });
    outputs[i] = run_rank(*group, c, g, round_options());
  });
  for (std::size_t g = 0; g < outputs.size(); ++g) {
    EXPECT_TRUE(raised(v1_dispatch[g], r.want)) << "V1 dispatch, rank " << g;
    EXPECT_TRUE(raised(v1_combine[g], r.want)) << "V1 combine, rank " << g;
  }
  EXPECT_EQ(oracle_diff(c, outputs), "");
}

std::string v1_only_rule_name(const ::testing::TestParamInfo<V1OnlyRule>& info) { return info.param.name; }

INSTANTIATE_TEST_SUITE_P(All, V1OnlyRules, ::testing::ValuesIn(v1_only_rules()), v1_only_rule_name);

// ---- accepted boundaries ---------------------------------------------------------------------------

// Every rank's V2 round on the in-process runtime, compared with the V2 oracle.
void expect_accepted(const casefile::Case& c, const World& w, const RunOptions& run = round_options()) {
  InProcessWorld runtime(w.size(), rules::generous_timeout());
  std::vector<casefile::RankOutputs> outputs(static_cast<std::size_t>(w.size()));
  std::vector<Outcome> outcomes(outputs.size());
  run_ranks(w.size(), [&](int g) {
    const auto i = static_cast<std::size_t>(g);
    const std::unique_ptr<Group> group = runtime.join(w.rank_config(g));
    outcomes[i] = capture([&] { outputs[i] = run_rank(*group, c, g, run); });
  });
  for (std::size_t g = 0; g < outcomes.size(); ++g) {
    ASSERT_EQ(outcomes[g].kind, Outcome::Kind::none) << "rank " << g << ": " << describe(outcomes[g]);
  }
  EXPECT_EQ(oracle_diff(c, outputs), "") << describe(c);
}

void expect_accepted(const World& w) { expect_accepted(make_case(w, 5), w); }

// make_case puts garbage (negative, past every expert, repeated) where masks switch entries off.
TEST(V2Accepted, IdsOfInactiveTokensAreNeverRead) {
  World w = special();
  w.mask = MaskKind::tokens;
  expect_accepted(w);
  w.zero = w.copy = w.constant = 0;
  expect_accepted(w);
}

TEST(V2Accepted, IdsOfMaskedEntriesAreNeverRead) {
  World w = special();
  w.mask = MaskKind::entries;
  w.k = 3;
  expect_accepted(w);
  World s = shared();
  s.mask = MaskKind::entries;
  expect_accepted(s);
}

// All-false masks: no token takes part, nothing is sent, combine writes zero rows.
TEST(V2Accepted, AllFalseMasks) {
  for (const std::int64_t cols : {0, 2}) {
    World w = special();
    casefile::Case c = make_case(w, 6);
    for (casefile::RankInputs& in : c.ranks) {
      in.x_active_mask =
          bool_tensor(3, cols, std::vector<std::uint8_t>(static_cast<std::size_t>(cols == 0 ? 3 : 6), 0));
      std::fill_n(in.expert_ids.data<std::int32_t>(), in.expert_ids.numel(), -1);
    }
    expect_accepted(c, w);
  }
}

// K may reach E + Z + C + Q (V2 §3.4): every id once per row.
TEST(V2Accepted, KEqualsAllExperts) {
  World w = special();
  w.k = 7;
  expect_accepted(w);
  w.mask = MaskKind::entries;
  expect_accepted(w);
}

// With uneven BS the largest rank may pass a mask (V2 §3.9: the rule is local); the smaller one may not
// (TokenMaskOnRankBelowGlobalBsOverW above).
TEST(V2Accepted, LargestRankOfAnUnevenWorldMayPassAMask) {
  World w = with_global_bs(basic(), 8);
  w.rank_bs = {4, 3};
  for (const std::int64_t cols : {0, 2}) {
    casefile::Case c = make_case(w, 7);
    c.ranks[0].x_active_mask =
        cols == 0 ? bool_tensor(4, 0, {1, 1, 0, 0}) : bool_tensor(4, 2, {1, 0, 0, 1, 0, 0, 1, 1});
    expect_accepted(c, w);
  }
}

TEST(V2Accepted, EveryCommAlgName) {
  for (const char* alg : {"", "0", "fullmesh", "fullmesh_v1", "fullmesh_v2", "hierarchy"}) {
    World w = basic();
    w.comm_alg = alg;
    SCOPED_TRACE(alg);
    expect_accepted(w);
  }
}

// The ascend_a3 V2 limits themselves, and what the V2 operators there allow that V1's do not: masks,
// W = 2, K up to 16 (with expert_scales, which combine needs).
TEST(V2Accepted, AscendA3Limits) {
  const auto a3 = [](std::int64_t bs, std::int64_t h, std::int64_t k, int E, MaskKind mask) {
    World w = ascend_a3();
    w.bs = bs;
    w.h = h;
    w.k = k;
    w.config.moe_expert_num = E;
    w.mask = mask;
    return w;
  };
  expect_accepted(a3(1, 1024, 1, 4, MaskKind::none));
  expect_accepted(a3(1, 8192, 2, 4, MaskKind::none));
  expect_accepted(a3(2, 1024, 16, 16, MaskKind::entries));
  expect_accepted(a3(512, 1024, 1, 2, MaskKind::tokens));
}

// Without caller buffers combine takes dispatch's own outputs back, also under ascend_a3, whose combine
// insists on torch_npu's 128 * A entries of assist_info_for_combine.
TEST(V2Accepted, AscendA3CombineTakesDispatchsOwnOutputs) {
  const World w = ascend_a3();
  expect_accepted(make_case(w, 8), w, RunOptions{});
}

TEST(V2Accepted, AscendA2TokenMask) {
  World w = ascend_a2();
  w.bs = 2;
  w.mask = MaskKind::tokens;
  expect_accepted(w);
}

}  // namespace
}  // namespace moedist::testing::v2
