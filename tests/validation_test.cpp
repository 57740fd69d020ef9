// One negative test per validation rule of the public API: validate_config (the portable rules and the
// ascend_a3 / ascend_a2 profiles), capacity(), and every local check of dispatch and combine
// (src/contract/checks.cpp). Each case triggers exactly one rule and checks the ValidationError's code,
// parameter(), value() and rule text.
//
// Dispatch and combine are collective, so every call case runs all ranks of a world: one rank gets the
// bad input and must raise the ValidationError; every other rank must raise a PeerError (peer_failed)
// that names the bad rank, the phase and the bad rank's message. Every rank passes caller output buffers
// filled with a sentinel pattern, which must be untouched after the error, and afterwards the same
// groups run a correct dispatch + combine whose results must match the reference oracle bit for bit.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <ostream>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "moedist/moedist.h"
#include "numeric/convert.h"
#include "outcome.h"
#include "rule_checks.h"
#include "test_inputs.h"
#include "test_support.h"

namespace moedist::testing {
namespace {

// ---- errors (rule_checks.h) -----------------------------------------------------------------------

using rules::bad_dtype;
using rules::bad_shape;
using rules::expect;
using rules::expect_rule_enforced;
using rules::Expected;
using rules::generous_timeout;
using rules::invalid;
using rules::on_ranks;
using rules::raised;
using rules::RankReport;
using rules::run_recovery;
using rules::SentinelBuffer;
using rules::x_and_expert_ids_rules;

// ---- worlds and inputs ------------------------------------------------------------------------------

// A group configuration (ep_rank_id / tp_rank_id are filled in per rank) and the shape of its calls.
struct World {
  GroupConfig config;
  std::int64_t bs = 3, h = 16, k = 2;
  DType dtype = DType::bf16;
  int quant_mode = 0;
  bool with_scales = false;  // smooth scales, for quant_mode 2
  bool with_expert_scales = true;

  int size() const { return config.ep_world_size * tp_domain_size(config); }
  GroupConfig rank_config(int g) const {
    GroupConfig c = config;
    c.ep_rank_id = g / tp_domain_size(config);
    c.tp_rank_id = g % tp_domain_size(config);
    return c;
  }
};

World make_world(int ep_world_size, int moe_expert_num, int shared_expert_rank_num = 0, int tp_world_size = 0) {
  World w;
  w.config.ep_world_size = ep_world_size;
  w.config.moe_expert_num = moe_expert_num;
  w.config.shared_expert_rank_num = shared_expert_rank_num;
  w.config.tp_world_size = tp_world_size;
  return w;
}

// W = 1, E = 4, BS = 3, H = 16, K = 2: A = BS * W * min(L, K) = 6 rows, L = 4 local experts.
World single_rank() { return make_world(1, 4); }

// W = 2 with one shared-expert rank (rank 0) and E = 2 experts on rank 1; BS = 2, K = 1.
World shared_ranks(int quant_mode = 0) {
  World w = make_world(2, 2, 1);
  w.bs = 2;
  w.k = 1;
  w.quant_mode = quant_mode;
  w.with_scales = quant_mode == 2;
  return w;
}

// One EP rank with a TP domain of two ranks (global ranks 0 and 1), E = 1; BS = 2, K = 1.
World tp_pair() {
  World w = make_world(1, 1, 0, 2);
  w.bs = 2;
  w.k = 1;
  return w;
}

// The smallest Atlas A3 world: W = 8, E = 16, H = 7168, BS = 1, K = 1, no expert_scales.
World ascend_a3() {
  World w = make_world(8, 16);
  w.config.profile = Profile::ascend_a3;
  w.bs = 1;
  w.h = 7168;
  w.k = 1;
  w.with_expert_scales = false;
  return w;
}

// The smallest Atlas A2 world: W = 8, E = 24, H = 256, BS = 1, K = 1.
World ascend_a2() {
  World w = make_world(8, 24);
  w.config.profile = Profile::ascend_a2;
  w.bs = 1;
  w.h = 256;
  w.k = 1;
  return w;
}

std::int64_t recovery_bs(const World& w) { return w.config.global_bs != 0 ? w.config.global_bs / w.config.ep_world_size : 2; }

// expert_ids[b, j] = (b * K + j + g) % E: K distinct ids per row (K <= E), different on every rank.
Tensor formula_ids(std::int64_t bs, std::int64_t k, int experts, int g) {
  Tensor t(DType::int32, bs, k);
  for (std::int64_t b = 0; b < bs; ++b) {
    for (std::int64_t j = 0; j < k; ++j) t.data<std::int32_t>()[b * k + j] = static_cast<std::int32_t>((b * k + j + g) % experts);
  }
  return t;
}

// Valid inputs of every rank of a world, BS rows each.
casefile::Case make_case(const World& w, std::int64_t bs, std::uint64_t seed) {
  casefile::Case c = case_of(w.config);
  c.quant_mode = w.quant_mode;
  c.dtype = w.dtype;
  std::mt19937_64 rng(seed);
  for (int g = 0; g < w.size(); ++g) {
    casefile::RankInputs in;
    in.x = half_tensor(rng, w.dtype, bs, w.h);
    in.expert_ids = formula_ids(bs, w.k, w.config.moe_expert_num, g);
    if (w.with_scales) {
      in.scales =
          fp32_tensor(rng, w.config.moe_expert_num + (w.config.shared_expert_rank_num > 0 ? 1 : 0), w.h, 0.5f, 2.0f);
    }
    if (w.with_expert_scales) in.expert_scales = fp32_tensor(rng, bs, w.k, -1.0f, 1.0f);
    c.ranks.push_back(std::move(in));
  }
  return c;
}

// A (n,) bool tensor holding the given values.
Tensor bool_vector(const std::vector<std::uint8_t>& values) {
  return bool_tensor(static_cast<std::int64_t>(values.size()), 0, values);
}

Tensor ones(std::int64_t rows, std::int64_t cols) {
  Tensor t(DType::fp32, rows, cols);
  std::fill_n(t.data<float>(), t.numel(), 1.0f);
  return t;
}

// One correct dispatch + combine of rank g with identity experts; the outputs as the oracle reports them.
casefile::RankOutputs round_trip(Group& group, const casefile::Case& c, int g) { return run_rank(group, c, g, RunOptions{}); }

// ---- one rank's dispatch and combine calls, which a rule corrupts -----------------------------------

// A rank's dispatch arguments: the case's inputs and sentinel-filled caller buffers for every output.
struct DispatchCall {
  DispatchCall(const World& w, int g, const casefile::RankInputs& in) : world(w), config(w.rank_config(g)) {
    x = in.x;
    expert_ids = in.expert_ids;
    options.quant_mode = w.quant_mode;
    if (in.scales.present()) options.scales = in.scales;
    if (in.expert_scales.present()) options.expert_scales = in.expert_scales;
    const std::int64_t bs = in.x.rows();
    const CapacityReport cap = rules::buffer_capacity(config, CapacityQuery{bs, w.k, w.h, w.dtype, w.quant_mode});
    const int T = tp_domain_size(config);
    const int local = local_expert_num(config);
    DispatchOutputs& out = options.out;
    out.expand_x = expand_x_buf.matrix(w.quant_mode == 2 ? DType::int8 : w.dtype, cap.expand_x_rows, w.h);
    out.dynamic_scales = dynamic_scales_buf.vector(DType::fp32, cap.expand_x_rows);
    if (w.with_expert_scales) out.expand_scales = expand_scales_buf.vector(DType::fp32, cap.expand_x_rows);
    out.expand_idx = expand_idx_buf.vector(DType::int32, bs * w.k);
    out.expert_token_nums = expert_token_nums_buf.vector(DType::int64, local);
    out.ep_recv_counts = ep_recv_counts_buf.vector(DType::int32, std::int64_t{config.ep_world_size} * local * (T == 2 ? 2 : 1));
    if (T == 2) out.tp_recv_counts = tp_recv_counts_buf.vector(DType::int32, 2);
  }
  DispatchCall(const DispatchCall&) = delete;
  DispatchCall& operator=(const DispatchCall&) = delete;

  TensorView own(Tensor t) {
    owned.push_back(std::move(t));
    return owned.back().view();
  }
  // Fresh valid x / expert_ids (and expert_scales) of another shape.
  void reshape(std::int64_t bs, std::int64_t h, std::int64_t k) {
    std::mt19937_64 rng(77);
    x = own(half_tensor(rng, world.dtype, bs, h));
    expert_ids = own(formula_ids(bs, k, config.moe_expert_num, 0));
    if (options.expert_scales.present()) options.expert_scales = own(fp32_tensor(rng, bs, k, -1.0f, 1.0f));
  }
  bool outputs_untouched() const {
    return expand_x_buf.untouched() && dynamic_scales_buf.untouched() && expand_scales_buf.untouched() &&
           expand_idx_buf.untouched() && expert_token_nums_buf.untouched() && ep_recv_counts_buf.untouched() &&
           tp_recv_counts_buf.untouched();
  }

  const World& world;
  GroupConfig config;
  TensorView x, expert_ids;
  DispatchOptions options;
  SentinelBuffer expand_x_buf, dynamic_scales_buf, expand_scales_buf, expand_idx_buf, expert_token_nums_buf,
      ep_recv_counts_buf, tp_recv_counts_buf;
  std::vector<Tensor> owned;
};

// A rank's combine arguments, made from its dispatch: identity experts (the dispatched rows, quant_mode
// 0), copies of expand_idx / ep_recv_counts / tp_recv_counts, and a sentinel-filled `out` buffer.
struct CombineCall {
  CombineCall(const World& w, const DispatchResult& d, const casefile::RankInputs& in) {
    const std::int64_t bs = in.x.rows();
    expand_x = own(copy_rows(d.expand_x, d.valid_rows));
    expert_ids = in.expert_ids;
    expand_idx = own(copy_rows(d.expand_idx, d.expand_idx.rows()));
    ep_send_counts = own(copy_rows(d.ep_recv_counts, d.ep_recv_counts.rows()));
    expert_scales = in.expert_scales.present() ? in.expert_scales.view() : own(ones(bs, w.k));
    if (d.tp_recv_counts.present()) options.tp_send_counts = own(copy_rows(d.tp_recv_counts, 2));
    options.out = out_buf.matrix(w.dtype, bs, w.h);
  }
  CombineCall(const CombineCall&) = delete;
  CombineCall& operator=(const CombineCall&) = delete;

  TensorView own(Tensor t) {
    owned.push_back(std::move(t));
    return owned.back().view();
  }

  TensorView expand_x, expert_ids, expand_idx, ep_send_counts, expert_scales;
  CombineOptions options;
  SentinelBuffer out_buf;
  std::vector<Tensor> owned;
};

// ---- the rule runner --------------------------------------------------------------------------------

using DispatchRule = rules::CallRule<World, DispatchCall>;
using CombineRule = rules::CallRule<World, CombineCall>;

template <class Call>
rules::CallRule<World, Call> rule(std::string name, World world, int bad_rank, std::function<void(Call&)> corrupt,
                                  Expected want) {
  return rules::CallRule<World, Call>{std::move(name), world, bad_rank, std::move(corrupt), std::move(want)};
}

class DispatchRules : public ::testing::TestWithParam<DispatchRule> {};

TEST_P(DispatchRules, BadRankRaisesPeersFailCleanlyGroupStaysUsable) {
  const DispatchRule& r = GetParam();
  const World& w = r.world;
  const casefile::Case inputs = make_case(w, w.bs, 1);
  const casefile::Case recovery = make_case(w, recovery_bs(w), 2);
  InProcessWorld runtime(w.size(), generous_timeout());
  std::vector<RankReport> reports(static_cast<std::size_t>(w.size()));
  on_ranks(w.size(), [&](int g) {
    RankReport& report = reports[static_cast<std::size_t>(g)];
    const std::unique_ptr<Group> group = runtime.join(w.rank_config(g));
    DispatchCall call(w, g, inputs.ranks[static_cast<std::size_t>(g)]);
    if (g == r.bad_rank) r.corrupt(call);
    report.outcome = capture([&] { group->dispatch(call.x, call.expert_ids, call.options); });
    report.outputs_untouched = call.outputs_untouched();
    run_recovery(*group, recovery, g, report);
  });
  expect_rule_enforced(reports, r.bad_rank, r.want, "dispatch.counts", recovery);
}

class CombineRules : public ::testing::TestWithParam<CombineRule> {};

TEST_P(CombineRules, BadRankRaisesPeersFailCleanlyGroupStaysUsable) {
  const CombineRule& r = GetParam();
  const World& w = r.world;
  const casefile::Case inputs = make_case(w, w.bs, 1);
  const casefile::Case recovery = make_case(w, recovery_bs(w), 2);
  InProcessWorld runtime(w.size(), generous_timeout());
  std::vector<RankReport> reports(static_cast<std::size_t>(w.size()));
  on_ranks(w.size(), [&](int g) {
    RankReport& report = reports[static_cast<std::size_t>(g)];
    const casefile::RankInputs& in = inputs.ranks[static_cast<std::size_t>(g)];
    const std::unique_ptr<Group> group = runtime.join(w.rank_config(g));
    DispatchOptions options;
    if (in.expert_scales.present()) options.expert_scales = in.expert_scales;
    const DispatchResult d = group->dispatch(in.x, in.expert_ids, options);
    CombineCall call(w, d, in);
    if (g == r.bad_rank) r.corrupt(call);
    report.outcome = capture([&] {
      group->combine(call.expand_x, call.expert_ids, call.expand_idx, call.ep_send_counts, call.expert_scales, call.options);
    });
    report.outputs_untouched = call.out_buf.untouched();
    run_recovery(*group, recovery, g, report);
  });
  expect_rule_enforced(reports, r.bad_rank, r.want, "combine.counts", recovery);
}

constexpr auto rule_name = rules::rule_name<World, DispatchCall>;
constexpr auto combine_rule_name = rules::rule_name<World, CombineCall>;

// ---- dispatch: the rules a single-rank world can trigger ------------------------------------------
// single_rank(): W = 1, E = 4 (L = 4), BS = 3, H = 16, K = 2, bf16, quant_mode 0, with expert_scales;
// A = 6 rows; expand_idx has 6 entries, expert_token_nums 4, ep_recv_counts 4.

DispatchRule single(std::string name, std::function<void(DispatchCall&)> corrupt, Expected want) {
  return rule<DispatchCall>(std::move(name), single_rank(), 0, std::move(corrupt), std::move(want));
}

std::vector<DispatchRule> single_rank_dispatch_rules() {
  World small_global_bs = single_rank();
  small_global_bs.config.global_bs = 2;
  World masked_global_bs = single_rank();  // BS 3 of at most 4 tokens per rank
  masked_global_bs.config.global_bs = 4;
  const std::vector<DispatchRule> v1_rules = {
      single(
          "KZero", [](DispatchCall& c) { c.expert_ids = c.own(Tensor(DType::int32, 3, 0)); },
          bad_shape("expert_ids.shape[1] (K)", "0", "must be in [1, moe_expert_num = 4]")),
      single(
          "KAboveExpertNum", [](DispatchCall& c) { c.expert_ids = c.own(Tensor(DType::int32, 3, 5)); },
          bad_shape("expert_ids.shape[1] (K)", "5", "must be in [1, moe_expert_num = 4]")),
      single(
          "IdNegative",
          [](DispatchCall& c) {
            c.expert_ids = c.own(int32_tensor(3, 2, {0, 1, -1, 2, 1, 2}));
          },
          invalid("expert_ids[1, 0]", "-1", "must be in [0, moe_expert_num = 4)")),
      single(
          "IdEqualToExpertNum",
          [](DispatchCall& c) {
            c.expert_ids = c.own(int32_tensor(3, 2, {0, 1, 2, 3, 1, 4}));
          },
          invalid("expert_ids[2, 1]", "4", "must be in [0, moe_expert_num = 4)")),
      single(
          "IdRepeatedInRow",
          [](DispatchCall& c) {
            c.expert_ids = c.own(int32_tensor(3, 2, {0, 1, 2, 2, 1, 3}));
          },
          invalid("expert_ids[1, 1]", "2", "the K ids of a row must be distinct; row 1 repeats it")),
      rule<DispatchCall>(
          "GlobalBsBelowBsTimesW", small_global_bs, 0, [](DispatchCall&) {},
          invalid("global_bs", "2", "must be >= BS * ep_world_size = 3 * 1 (BS of this rank is 3)")),
      // quant_mode and scales
      single(
          "QuantMode1", [](DispatchCall& c) { c.options.quant_mode = 1; },
          expect(ErrorCode::unsupported, "quant_mode", "1",
                 "static quantization is not supported (0 = none, 2 = dynamic int8)")),
      single(
          "QuantMode3", [](DispatchCall& c) { c.options.quant_mode = 3; },
          invalid("quant_mode", "3", "must be 0 (none) or 2 (dynamic int8)")),
      single(
          "QuantModeNegative", [](DispatchCall& c) { c.options.quant_mode = -1; },
          invalid("quant_mode", "-1", "must be 0 (none) or 2 (dynamic int8)")),
      single(
          "ScalesWithQuantMode0", [](DispatchCall& c) { c.options.scales = c.own(Tensor(DType::fp32, 4, 16)); },
          invalid("scales", "(4, 16)", "must be None with quant_mode 0")),
      single(
          "ScalesBf16",
          [](DispatchCall& c) {
            c.options.quant_mode = 2;
            c.options.scales = c.own(Tensor(DType::bf16, 4, 16));
          },
          bad_dtype("scales.dtype", "bfloat16", "must be float32")),
      single(
          "ScalesWithSharedRowButNoSharedExperts",
          [](DispatchCall& c) {
            c.options.quant_mode = 2;
            c.options.scales = c.own(Tensor(DType::fp32, 5, 16));
          },
          bad_shape("scales.shape", "(5, 16)", "must be (4, 16)")),
      single(
          "ScalesWrongHidden",
          [](DispatchCall& c) {
            c.options.quant_mode = 2;
            c.options.scales = c.own(Tensor(DType::fp32, 4, 8));
          },
          bad_shape("scales.shape", "(4, 8)", "must be (4, 16)")),
      single(
          "ScalesOneDimensional",
          [](DispatchCall& c) {
            c.options.quant_mode = 2;
            c.options.scales = c.own(Tensor(DType::fp32, 64));
          },
          bad_shape("scales.shape", "(64,)", "must be (4, 16)")),
      single(
          "ScalesNullData",
          [](DispatchCall& c) {
            c.options.quant_mode = 2;
            c.options.scales = c.own(Tensor(DType::fp32, 4, 16));
            c.options.scales.data = nullptr;
          },
          invalid("scales.data", "nullptr", "a tensor of shape (4, 16) needs data")),
      // reserved and optional inputs
      // x_active_mask (V1 contract §3.7: the A2 kernel's 1-D mask; src/contract/token_mask.h)
      single(
          "XActiveMaskInt8", [](DispatchCall& c) { c.options.x_active_mask = c.own(Tensor(DType::int8, 3)); },
          bad_dtype("x_active_mask.dtype", "int8", "must be bool")),
      single(
          "XActiveMaskWrongLength",
          [](DispatchCall& c) {
            c.options.x_active_mask = c.own(bool_vector({1, 1}));
          },
          bad_shape("x_active_mask.shape", "(2,)", "must be (BS,) = (3,)")),
      single(
          "XActiveMaskTwoDimensional",
          [](DispatchCall& c) { c.options.x_active_mask = c.own(Tensor(DType::boolean, 3, 2)); },
          bad_shape("x_active_mask.shape", "(3, 2)", "a (BS, K) mask is a V2 operator's")),
      single(
          "XActiveMaskNotAPrefix",
          [](DispatchCall& c) {
            c.options.x_active_mask = c.own(bool_vector({1, 0, 1}));
          },
          invalid("x_active_mask[2]", "true", "every true must come before every false (x_active_mask[1] is false)")),
      single(
          "XActiveMaskNullData",
          [](DispatchCall& c) {
            c.options.x_active_mask = c.own(bool_vector({1, 1, 0}));
            c.options.x_active_mask.data = nullptr;
          },
          invalid("x_active_mask.data", "nullptr", "a mask needs data")),
      rule<DispatchCall>(
          "XActiveMaskOnRankBelowGlobalBs", masked_global_bs, 0,
          [](DispatchCall& c) {
            c.options.x_active_mask = c.own(bool_vector({1, 1, 0}));
          },
          invalid("x_active_mask", "(3,)",
                  "must be None on a rank with fewer tokens than global_bs / ep_world_size = 4 (BS = 3)")),
      single(
          "OutExpandIdxAliasesXActiveMask",
          [](DispatchCall& c) {
            c.options.x_active_mask =
                vector_view(static_cast<const void*>(c.options.out.expand_idx.data), DType::boolean, 3);
          },
          invalid("out.expand_idx", "(6,)",
                  "shares memory with the input x_active_mask: outputs must not alias inputs")),
      single(
          "ExpertScalesBf16", [](DispatchCall& c) { c.options.expert_scales = c.own(Tensor(DType::bf16, 3, 2)); },
          bad_dtype("expert_scales.dtype", "bfloat16", "must be float32")),
      single(
          "ExpertScalesWrongK", [](DispatchCall& c) { c.options.expert_scales = c.own(Tensor(DType::fp32, 3, 1)); },
          bad_shape("expert_scales.shape", "(3, 1)", "must be (3, 2)")),
      single(
          "ExpertScalesWrongRows", [](DispatchCall& c) { c.options.expert_scales = c.own(Tensor(DType::fp32, 2, 2)); },
          bad_shape("expert_scales.shape", "(2, 2)", "must be (3, 2)")),
      single(
          "ExpertScalesOneDimensional",
          [](DispatchCall& c) { c.options.expert_scales = c.own(Tensor(DType::fp32, 6)); },
          bad_shape("expert_scales.shape", "(6,)", "must be (3, 2)")),
      single(
          "ExpertScalesNullData", [](DispatchCall& c) { c.options.expert_scales.data = nullptr; },
          invalid("expert_scales.data", "nullptr", "a tensor of shape (3, 2) needs data")),
      single(
          "ExpertTokenNumsType2", [](DispatchCall& c) { c.options.expert_token_nums_type = 2; },
          invalid("expert_token_nums_type", "2", "must be 0 (prefix sums) or 1 (counts)")),
      single(
          "ExpertTokenNumsTypeNegative", [](DispatchCall& c) { c.options.expert_token_nums_type = -1; },
          invalid("expert_token_nums_type", "-1", "must be 0 (prefix sums) or 1 (counts)")),
      // caller output buffers
      single(
          "OutExpandXFp16ForBf16X", [](DispatchCall& c) { c.options.out.expand_x.dtype = DType::fp16; },
          bad_dtype("out.expand_x.dtype", "float16", "must be bfloat16")),
      single(
          "OutExpandXNotInt8WithQuantMode2", [](DispatchCall& c) { c.options.quant_mode = 2; },
          bad_dtype("out.expand_x.dtype", "bfloat16", "must be int8")),
      single(
          "OutExpandXTooFewRows", [](DispatchCall& c) { c.options.out.expand_x.shape[0] = 5; },
          bad_shape("out.expand_x.shape", "(5, 16)", "must be (>= A * max(tp_world_size, 1) = 6, H = 16)")),
      single(
          "OutExpandXWrongHidden", [](DispatchCall& c) { c.options.out.expand_x.shape[1] = 15; },
          bad_shape("out.expand_x.shape", "(6, 15)", "must be (>= A * max(tp_world_size, 1) = 6, H = 16)")),
      single(
          "OutExpandXOneDimensional",
          [](DispatchCall& c) { c.options.out.expand_x = vector_view(c.options.out.expand_x.data, DType::bf16, 96); },
          bad_shape("out.expand_x.shape", "(96,)", "must be (>= A * max(tp_world_size, 1) = 6, H = 16)")),
      single(
          "OutExpandXNullData", [](DispatchCall& c) { c.options.out.expand_x.data = nullptr; },
          invalid("out.expand_x.data", "nullptr", "a tensor of shape (6, 16) needs data")),
      single(
          "OutExpandXAliasesX", [](DispatchCall& c) { c.options.out.expand_x.data = const_cast<void*>(c.x.data); },
          invalid("out.expand_x", "(6, 16)", "shares memory with the input x: outputs must not alias inputs")),
      single(
          "OutExpandIdxAliasesExpertIds",
          [](DispatchCall& c) { c.options.out.expand_idx.data = const_cast<void*>(c.expert_ids.data); },
          invalid("out.expand_idx", "(6,)", "shares memory with the input expert_ids: outputs must not alias inputs")),
      single(
          "OutDynamicScalesBf16", [](DispatchCall& c) { c.options.out.dynamic_scales.dtype = DType::bf16; },
          bad_dtype("out.dynamic_scales.dtype", "bfloat16", "must be float32")),
      single(
          "OutDynamicScalesTooShort", [](DispatchCall& c) { c.options.out.dynamic_scales.shape[0] = 5; },
          bad_shape("out.dynamic_scales.shape", "(5,)", "must be 1-D with at least 6 entries")),
      single(
          "OutDynamicScalesNullData", [](DispatchCall& c) { c.options.out.dynamic_scales.data = nullptr; },
          invalid("out.dynamic_scales.data", "nullptr", "a tensor of shape (6,) needs data")),
      single(
          "OutExpandScalesInt32", [](DispatchCall& c) { c.options.out.expand_scales.dtype = DType::int32; },
          bad_dtype("out.expand_scales.dtype", "int32", "must be float32")),
      single(
          "OutExpandScalesTooShort", [](DispatchCall& c) { c.options.out.expand_scales.shape[0] = 5; },
          bad_shape("out.expand_scales.shape", "(5,)", "must be 1-D with at least 6 entries")),
      single(
          "OutExpandScalesNullData", [](DispatchCall& c) { c.options.out.expand_scales.data = nullptr; },
          invalid("out.expand_scales.data", "nullptr", "a tensor of shape (6,) needs data")),
      single(
          "OutExpandIdxInt64", [](DispatchCall& c) { c.options.out.expand_idx.dtype = DType::int64; },
          bad_dtype("out.expand_idx.dtype", "int64", "must be int32")),
      single(
          "OutExpandIdxTooShort", [](DispatchCall& c) { c.options.out.expand_idx.shape[0] = 5; },
          bad_shape("out.expand_idx.shape", "(5,)", "must be (6,)")),
      single(
          "OutExpandIdxTooLong", [](DispatchCall& c) { c.options.out.expand_idx.shape[0] = 7; },
          bad_shape("out.expand_idx.shape", "(7,)", "must be (6,)")),
      single(
          "OutExpandIdxNullData", [](DispatchCall& c) { c.options.out.expand_idx.data = nullptr; },
          invalid("out.expand_idx.data", "nullptr", "a tensor of shape (6,) needs data")),
      single(
          "OutExpertTokenNumsInt32", [](DispatchCall& c) { c.options.out.expert_token_nums.dtype = DType::int32; },
          bad_dtype("out.expert_token_nums.dtype", "int32", "must be int64")),
      single(
          "OutExpertTokenNumsWrongLength", [](DispatchCall& c) { c.options.out.expert_token_nums.shape[0] = 3; },
          bad_shape("out.expert_token_nums.shape", "(3,)", "must be (4,)")),
      single(
          "OutExpertTokenNumsNullData", [](DispatchCall& c) { c.options.out.expert_token_nums.data = nullptr; },
          invalid("out.expert_token_nums.data", "nullptr", "a tensor of shape (4,) needs data")),
      single(
          "OutEpRecvCountsInt64", [](DispatchCall& c) { c.options.out.ep_recv_counts.dtype = DType::int64; },
          bad_dtype("out.ep_recv_counts.dtype", "int64", "must be int32")),
      single(
          "OutEpRecvCountsTooShort", [](DispatchCall& c) { c.options.out.ep_recv_counts.shape[0] = 3; },
          bad_shape("out.ep_recv_counts.shape", "(3,)", "must be 1-D with at least 4 entries")),
      single(
          "OutEpRecvCountsNullData", [](DispatchCall& c) { c.options.out.ep_recv_counts.data = nullptr; },
          invalid("out.ep_recv_counts.data", "nullptr", "a tensor of shape (4,) needs data")),
      single(
          "OutTpRecvCountsWithoutTp",
          [](DispatchCall& c) { c.options.out.tp_recv_counts = c.tp_recv_counts_buf.vector(DType::int32, 2); },
          invalid("out.tp_recv_counts", "(2,)", "is only produced with tp_world_size = 2")),
  };
  // x and expert_ids as tensors (the rules dispatch_v2 shares), then the rest.
  std::vector<DispatchRule> rules = x_and_expert_ids_rules<DispatchCall>(single);
  rules.insert(rules.end(), v1_rules.begin(), v1_rules.end());
  return rules;
}

// ---- dispatch: rules that need several ranks (shared experts, TP, the Ascend profiles) ------------

std::vector<DispatchRule> multi_rank_dispatch_rules() {
  const auto reshape = [](std::int64_t bs, std::int64_t h, std::int64_t k) {
    return [bs, h, k](DispatchCall& c) { c.reshape(bs, h, k); };
  };
  // shared_ranks(2): W = 2, S = 1, E = 2, quant_mode 2: scales need E + 1 = 3 rows.
  const auto scales_without_shared_row = [](DispatchCall& c) { c.options.scales = c.own(Tensor(DType::fp32, 2, 16)); };
  // tp_pair(): W = 1, T = 2, E = 1, BS = 2, K = 1: A = 2, expand_x >= 4 rows, ep_recv_counts >= 2 entries.
  return {
      rule<DispatchCall>("ScalesLackSharedRowOnMoeRank", shared_ranks(2), 1, scales_without_shared_row,
                         bad_shape("scales.shape", "(2, 16)", "must be (3, 16)")),
      rule<DispatchCall>("ScalesLackSharedRowOnSharedRank", shared_ranks(2), 0, scales_without_shared_row,
                         bad_shape("scales.shape", "(2, 16)", "must be (3, 16)")),
      rule<DispatchCall>(
          "TpOutExpandXBelowTwiceA", tp_pair(), 1, [](DispatchCall& c) { c.options.out.expand_x.shape[0] = 3; },
          bad_shape("out.expand_x.shape", "(3, 16)", "must be (>= A * max(tp_world_size, 1) = 4, H = 16)")),
      rule<DispatchCall>(
          "TpOutEpRecvCountsWithoutPeerHalf", tp_pair(), 1,
          [](DispatchCall& c) { c.options.out.ep_recv_counts.shape[0] = 1; },
          bad_shape("out.ep_recv_counts.shape", "(1,)", "must be 1-D with at least 2 entries")),
      rule<DispatchCall>(
          "TpOutTpRecvCountsWrongLength", tp_pair(), 1,
          [](DispatchCall& c) { c.options.out.tp_recv_counts.shape[0] = 3; },
          bad_shape("out.tp_recv_counts.shape", "(3,)", "must be (2,)")),
      rule<DispatchCall>(
          "TpOutTpRecvCountsInt64", tp_pair(), 1,
          [](DispatchCall& c) { c.options.out.tp_recv_counts.dtype = DType::int64; },
          bad_dtype("out.tp_recv_counts.dtype", "int64", "must be int32")),
      rule<DispatchCall>(
          "TpOutTpRecvCountsNullData", tp_pair(), 0,
          [](DispatchCall& c) { c.options.out.tp_recv_counts.data = nullptr; },
          invalid("out.tp_recv_counts.data", "nullptr", "a tensor of shape (2,) needs data")),
      rule<DispatchCall>("AscendA3HiddenNot7168", ascend_a3(), 3, reshape(1, 7200, 1),
                         invalid("H", "7200", "profile ascend_a3 needs H == 7168")),
      rule<DispatchCall>("AscendA3KAbove8", ascend_a3(), 3, reshape(1, 7168, 9),
                         invalid("K", "9", "profile ascend_a3 allows K <= 8")),
      rule<DispatchCall>("AscendA3BsZero", ascend_a3(), 3, reshape(0, 7168, 1),
                         invalid("BS", "0", "profile ascend_a3 allows 1 <= BS <= 512")),
      rule<DispatchCall>("AscendA3BsAbove512", ascend_a3(), 3, reshape(513, 7168, 1),
                         invalid("BS", "513", "profile ascend_a3 allows 1 <= BS <= 512")),
      rule<DispatchCall>(
          "AscendA3XActiveMask", ascend_a3(), 3,
          [](DispatchCall& c) { c.options.x_active_mask = c.own(bool_vector({1})); },
          invalid("x_active_mask", "(1,)", "profile ascend_a3 does not support it (must be None)")),
      rule<DispatchCall>(
          "AscendA3ExpertScalesPresent", ascend_a3(), 3,
          [](DispatchCall& c) { c.options.expert_scales = c.own(ones(1, 1)); },
          invalid("expert_scales", "(1, 1)", "profile ascend_a3 does not support it (must be None)")),
      rule<DispatchCall>("AscendA2HiddenNotMultipleOf32", ascend_a2(), 6, reshape(1, 48, 1),
                         invalid("H", "48", "profile ascend_a2 needs H % 32 == 0 and H <= 7168")),
      rule<DispatchCall>("AscendA2HiddenAbove7168", ascend_a2(), 6, reshape(1, 7200, 1),
                         invalid("H", "7200", "profile ascend_a2 needs H % 32 == 0 and H <= 7168")),
      rule<DispatchCall>("AscendA2KAbove16", ascend_a2(), 6, reshape(1, 256, 17),
                         invalid("K", "17", "profile ascend_a2 allows K <= 16")),
      rule<DispatchCall>("AscendA2BsZero", ascend_a2(), 6, reshape(0, 256, 1),
                         invalid("BS", "0", "profile ascend_a2 allows 1 <= BS <= 256")),
      rule<DispatchCall>("AscendA2BsAbove256", ascend_a2(), 6, reshape(257, 256, 1),
                         invalid("BS", "257", "profile ascend_a2 allows 1 <= BS <= 256")),
  };
}

INSTANTIATE_TEST_SUITE_P(SingleRank, DispatchRules, ::testing::ValuesIn(single_rank_dispatch_rules()), rule_name);
INSTANTIATE_TEST_SUITE_P(MultiRank, DispatchRules, ::testing::ValuesIn(multi_rank_dispatch_rules()), rule_name);

// ---- combine: the rules a single-rank world can trigger -------------------------------------------
// single_rank() with expert_ids[b, j] = (2b + j) % 4 = [[0, 1], [2, 3], [0, 1]]: dispatch gives 6 valid
// rows, ep_recv_counts = [2, 4, 5, 6] and expand_idx = [0, 0, 0, 0, 1, 1].

CombineRule single_combine(std::string name, std::function<void(CombineCall&)> corrupt, Expected want) {
  return rule<CombineCall>(std::move(name), single_rank(), 0, std::move(corrupt), std::move(want));
}

std::vector<CombineRule> single_rank_combine_rules() {
  World bounded_bs = single_rank();
  bounded_bs.config.global_bs = 3;
  return {
      // expand_x
      single_combine(
          "ExpandXAbsent", [](CombineCall& c) { c.expand_x = TensorView{}; },
          invalid("expand_x", "None", "is required")),
      single_combine(
          "ExpandXOneDimensional", [](CombineCall& c) { c.expand_x = vector_view(c.expand_x.data, DType::bf16, 96); },
          bad_shape("expand_x.shape", "(96,)", "must be 2-D")),
      single_combine(
          "ExpandXFloat32", [](CombineCall& c) { c.expand_x.dtype = DType::fp32; },
          bad_dtype("expand_x.dtype", "float32", "must be bfloat16 or float16")),
      single_combine(
          "ExpandXNullData", [](CombineCall& c) { c.expand_x.data = nullptr; },
          invalid("expand_x.data", "nullptr", "a tensor of shape (6, 16) needs data")),
      single_combine(
          "ExpandXNegativeRows", [](CombineCall& c) { c.expand_x.shape[0] = -1; },
          bad_shape("expand_x.shape", "(-1, 16)", "extents must be >= 0")),
      single_combine(
          "ExpandXZeroHidden", [](CombineCall& c) { c.expand_x = matrix_view(c.expand_x.data, DType::bf16, 6, 0); },
          bad_shape("expand_x.shape[1] (H)", "0", "must be >= 1")),
      single_combine(
          "ExpandXFewerRowsThanCounts", [](CombineCall& c) { c.expand_x.shape[0] = 5; },
          bad_shape("expand_x.shape", "(5, 16)", "must have at least the 6 valid rows that ep_send_counts describe")),
      // expert_ids (the checks dispatch shares)
      single_combine(
          "IdsAbsent", [](CombineCall& c) { c.expert_ids = TensorView{}; },
          invalid("expert_ids", "None", "is required")),
      single_combine(
          "IdsOneDimensional", [](CombineCall& c) { c.expert_ids = vector_view(c.expert_ids.data, DType::int32, 6); },
          bad_shape("expert_ids.shape", "(6,)", "must be 2-D")),
      single_combine(
          "IdsInt64", [](CombineCall& c) { c.expert_ids = c.own(Tensor(DType::int64, 3, 2)); },
          bad_dtype("expert_ids.dtype", "int64", "must be int32")),
      single_combine(
          "IdsNullData", [](CombineCall& c) { c.expert_ids.data = nullptr; },
          invalid("expert_ids.data", "nullptr", "a tensor of shape (3, 2) needs data")),
      single_combine(
          "KZero", [](CombineCall& c) { c.expert_ids = c.own(Tensor(DType::int32, 3, 0)); },
          bad_shape("expert_ids.shape[1] (K)", "0", "must be in [1, moe_expert_num = 4]")),
      single_combine(
          "KAboveExpertNum", [](CombineCall& c) { c.expert_ids = c.own(Tensor(DType::int32, 3, 5)); },
          bad_shape("expert_ids.shape[1] (K)", "5", "must be in [1, moe_expert_num = 4]")),
      single_combine(
          "IdOutOfRange",
          [](CombineCall& c) {
            c.expert_ids = c.own(int32_tensor(3, 2, {0, 1, 2, 4, 0, 1}));
          },
          invalid("expert_ids[1, 1]", "4", "must be in [0, moe_expert_num = 4)")),
      single_combine(
          "IdRepeatedInRow",
          [](CombineCall& c) {
            c.expert_ids = c.own(int32_tensor(3, 2, {0, 0, 2, 3, 0, 1}));
          },
          invalid("expert_ids[0, 1]", "0", "the K ids of a row must be distinct; row 0 repeats it")),
      rule<CombineCall>(
          "GlobalBsBelowBsTimesW", bounded_bs, 0, [](CombineCall& c) { c.expert_ids = c.own(formula_ids(4, 2, 4, 0)); },
          invalid("global_bs", "3", "must be >= BS * ep_world_size = 4 * 1 (BS of this rank is 4)")),
      // expand_idx
      single_combine(
          "ExpandIdxAbsent", [](CombineCall& c) { c.expand_idx = TensorView{}; },
          invalid("expand_idx", "None", "is required")),
      single_combine(
          "ExpandIdxInt64", [](CombineCall& c) { c.expand_idx.dtype = DType::int64; },
          bad_dtype("expand_idx.dtype", "int64", "must be int32")),
      single_combine(
          "ExpandIdxTooShort", [](CombineCall& c) { c.expand_idx.shape[0] = 5; },
          bad_shape("expand_idx.shape", "(5,)", "must be (6,)")),
      single_combine(
          "ExpandIdxTwoDimensionalWithFewerEntries",
          [](CombineCall& c) { c.expand_idx = matrix_view(c.expand_idx.data, DType::int32, 2, 2); },
          bad_shape("expand_idx.shape", "(2, 2)",
                    "must hold BS * K = 6 entries in row-major order: (6,) or e.g. (3, 2)")),
      single_combine(
          "ExpandIdxNullData", [](CombineCall& c) { c.expand_idx.data = nullptr; },
          invalid("expand_idx.data", "nullptr", "a tensor of shape (6,) needs data")),
      single_combine(
          "ExpandIdxNegative",
          [](CombineCall& c) {
            c.expand_idx = c.own(int32_vector({0, 0, 0, 0, -1, 1}));
          },
          invalid("expand_idx[4]", "-1", "must be >= 0 (use dispatch's expand_idx)")),
      // expert_scales
      single_combine(
          "ExpertScalesAbsent", [](CombineCall& c) { c.expert_scales = TensorView{}; },
          invalid("expert_scales", "None", "is required")),
      single_combine(
          "ExpertScalesBf16", [](CombineCall& c) { c.expert_scales = c.own(Tensor(DType::bf16, 3, 2)); },
          bad_dtype("expert_scales.dtype", "bfloat16", "must be float32")),
      single_combine(
          "ExpertScalesWrongShape", [](CombineCall& c) { c.expert_scales = c.own(Tensor(DType::fp32, 3, 1)); },
          bad_shape("expert_scales.shape", "(3, 1)", "must be (3, 2)")),
      single_combine(
          "ExpertScalesNullData", [](CombineCall& c) { c.expert_scales.data = nullptr; },
          invalid("expert_scales.data", "nullptr", "a tensor of shape (3, 2) needs data")),
      // ep_send_counts
      single_combine(
          "EpSendCountsAbsent", [](CombineCall& c) { c.ep_send_counts = TensorView{}; },
          invalid("ep_send_counts", "None", "is required")),
      single_combine(
          "EpSendCountsInt64", [](CombineCall& c) { c.ep_send_counts.dtype = DType::int64; },
          bad_dtype("ep_send_counts.dtype", "int64", "must be int32")),
      single_combine(
          "EpSendCountsTooShort", [](CombineCall& c) { c.ep_send_counts.shape[0] = 3; },
          bad_shape("ep_send_counts.shape", "(3,)", "must be 1-D with at least 4 entries")),
      single_combine(
          "EpSendCountsNullData", [](CombineCall& c) { c.ep_send_counts.data = nullptr; },
          invalid("ep_send_counts.data", "nullptr", "a tensor of shape (4,) needs data")),
      single_combine(
          "EpSendCountsDecreasing",
          [](CombineCall& c) {
            c.ep_send_counts = c.own(int32_vector({2, 4, 3, 6}));
          },
          invalid("ep_send_counts[2]", "3",
                  "must be a non-decreasing prefix sum (previous entry 4); use dispatch's ep_recv_counts")),
      single_combine(
          "EpSendCountsNegative",
          [](CombineCall& c) {
            c.ep_send_counts = c.own(int32_vector({-1, 4, 5, 6}));
          },
          invalid("ep_send_counts[0]", "-1", "must be a non-decreasing prefix sum (previous entry 0)")),
      // modes and reserved parameters
      single_combine(
          "CommQuantMode1", [](CombineCall& c) { c.options.comm_quant_mode = 1; },
          invalid("comm_quant_mode", "1", "must be 0 (none) or 2 (int8)")),
      single_combine(
          "CommQuantMode3", [](CombineCall& c) { c.options.comm_quant_mode = 3; },
          invalid("comm_quant_mode", "3", "must be 0 (none) or 2 (int8)")),
      single_combine(
          "XActiveMaskInt8", [](CombineCall& c) { c.options.x_active_mask = c.own(Tensor(DType::int8, 3)); },
          bad_dtype("x_active_mask.dtype", "int8", "must be bool")),
      single_combine(
          "XActiveMaskNotAPrefix",
          [](CombineCall& c) {
            c.options.x_active_mask = c.own(bool_vector({0, 1, 1}));
          },
          invalid("x_active_mask[1]", "true", "every true must come before every false")),
      single_combine(
          "ActivationScalePresent", [](CombineCall& c) { c.options.activation_scale = c.own(Tensor(DType::fp32, 6)); },
          invalid("activation_scale", "(6,)", "is reserved and must be None")),
      single_combine(
          "WeightScalePresent", [](CombineCall& c) { c.options.weight_scale = c.own(Tensor(DType::fp32, 4, 16)); },
          invalid("weight_scale", "(4, 16)", "is reserved and must be None")),
      single_combine(
          "GroupListPresent", [](CombineCall& c) { c.options.group_list = c.own(Tensor(DType::int64, 4)); },
          invalid("group_list", "(4,)", "is reserved and must be None")),
      single_combine(
          "SharedExpertXPresent", [](CombineCall& c) { c.options.shared_expert_x = c.own(Tensor(DType::bf16, 3, 16)); },
          invalid("shared_expert_x", "(3, 16)", "is reserved in the V1 operators and must be None")),
      single_combine(
          "OutDtypeNonZero", [](CombineCall& c) { c.options.out_dtype = 1; },
          invalid("out_dtype", "1", "is reserved and must be 0")),
      single_combine(
          "GroupListTypeNonZero", [](CombineCall& c) { c.options.group_list_type = 1; },
          invalid("group_list_type", "1", "is reserved and must be 0")),
      // expand_scales (accepted, checked, not used)
      single_combine(
          "ExpandScalesFp16", [](CombineCall& c) { c.options.expand_scales = c.own(Tensor(DType::fp16, 6)); },
          bad_dtype("expand_scales.dtype", "float16", "must be float32")),
      single_combine(
          "ExpandScalesTooShort", [](CombineCall& c) { c.options.expand_scales = c.own(Tensor(DType::fp32, 5)); },
          bad_shape("expand_scales.shape", "(5,)", "must be 1-D with at least 6 entries")),
      single_combine(
          "ExpandScalesNullData",
          [](CombineCall& c) {
            c.options.expand_scales = c.own(Tensor(DType::fp32, 6));
            c.options.expand_scales.data = nullptr;
          },
          invalid("expand_scales.data", "nullptr", "a tensor of shape (6,) needs data")),
      // the caller's out buffer
      single_combine(
          "OutFp16ForBf16ExpandX", [](CombineCall& c) { c.options.out.dtype = DType::fp16; },
          bad_dtype("out.dtype", "float16", "must be bfloat16")),
      single_combine(
          "OutTooManyRows", [](CombineCall& c) { c.options.out.shape[0] = 4; },
          bad_shape("out.shape", "(4, 16)", "must be (3, 16)")),
      single_combine(
          "OutWrongHidden", [](CombineCall& c) { c.options.out.shape[1] = 15; },
          bad_shape("out.shape", "(3, 15)", "must be (3, 16)")),
      single_combine(
          "OutNullData", [](CombineCall& c) { c.options.out.data = nullptr; },
          invalid("out.data", "nullptr", "a tensor of shape (3, 16) needs data")),
      // outputs that alias inputs (the out buffer would overwrite what combine still reads)
      single_combine(
          "OutAliasesExpandX", [](CombineCall& c) { c.options.out.data = const_cast<void*>(c.expand_x.data); },
          invalid("out", "(3, 16)", "shares memory with the input expand_x: outputs must not alias inputs")),
      single_combine(
          "OutOverlapsExpertScalesTail",
          [](CombineCall& c) {
            // expert_scales (3 x 2 fp32) moved into the last 24 bytes of a (3, 16) bf16 buffer that is
            // also `out`: a partial overlap counts, and nothing else lies in that buffer.
            Tensor shared(DType::bf16, 3, 16);
            auto* tail = reinterpret_cast<float*>(shared.data<std::uint16_t>() + 3 * 16) - 6;
            for (int i = 0; i < 6; ++i) tail[i] = c.expert_scales.at<float>(i / 2, i % 2);
            c.expert_scales = matrix_view(static_cast<const void*>(tail), DType::fp32, 3, 2);
            c.options.out = matrix_view(shared.raw(), DType::bf16, 3, 16);
            c.own(std::move(shared));
          },
          invalid("out", "(3, 16)", "shares memory with the input expert_scales: outputs must not alias inputs")),
  };
}

// ---- combine: rules that need several ranks -------------------------------------------------------
// shared_ranks(0): rank 0 is the shared-expert rank; with BS = 2 on both ranks its ep_recv_counts are
// [2 (its own rows), 4]. tp_pair(): global rank 1 (tp_rank_id 1) has ep_recv_counts [2 | 2] (own half,
// peer half), tp_recv_counts [2, 2] and 4 valid rows.

std::vector<CombineRule> multi_rank_combine_rules() {
  return {
      rule<CombineCall>(
          "SharedRankOwnRowsDifferFromBs", shared_ranks(0), 0,
          [](CombineCall& c) {
            c.ep_send_counts = c.own(int32_vector({1, 4}));
          },
          invalid("ep_send_counts[0]", "1",
                  "on a shared-expert rank it must equal this rank's BS = 2 (its own rows come first)")),
      rule<CombineCall>(
          "TpSendCountsAbsent", tp_pair(), 1, [](CombineCall& c) { c.options.tp_send_counts = TensorView{}; },
          invalid("tp_send_counts", "None", "is required")),
      rule<CombineCall>(
          "TpSendCountsInt64", tp_pair(), 1, [](CombineCall& c) { c.options.tp_send_counts.dtype = DType::int64; },
          bad_dtype("tp_send_counts.dtype", "int64", "must be int32")),
      rule<CombineCall>(
          "TpSendCountsWrongLength", tp_pair(), 1,
          [](CombineCall& c) {
            c.options.tp_send_counts = c.own(int32_vector({2, 2, 0}));
          },
          bad_shape("tp_send_counts.shape", "(3,)", "must be (2,)")),
      rule<CombineCall>(
          "TpSendCountsNullData", tp_pair(), 1, [](CombineCall& c) { c.options.tp_send_counts.data = nullptr; },
          invalid("tp_send_counts.data", "nullptr", "a tensor of shape (2,) needs data")),
      rule<CombineCall>(
          "TpSendCountsMismatchEpSendCounts", tp_pair(), 1,
          [](CombineCall& c) {
            c.options.tp_send_counts = c.own(int32_vector({1, 2}));
          },
          invalid("tp_send_counts", "[1, 2]", "must match ep_send_counts (own rows 2 at tp_rank_id 1, peer rows 2)")),
      rule<CombineCall>(
          "CommQuantMode2WithTp", tp_pair(), 1, [](CombineCall& c) { c.options.comm_quant_mode = 2; },
          invalid("comm_quant_mode", "2", "must be 0 with a TP domain (tp_world_size = 2)")),
      rule<CombineCall>(
          "TpEpSendCountsWithoutPeerHalf", tp_pair(), 1, [](CombineCall& c) { c.ep_send_counts.shape[0] = 1; },
          bad_shape("ep_send_counts.shape", "(1,)", "must be 1-D with at least 2 entries")),
      rule<CombineCall>(
          "TpEpSendCountsPeerHalfNegative", tp_pair(), 1,
          [](CombineCall& c) {
            c.ep_send_counts = c.own(int32_vector({2, -1}));
          },
          invalid("ep_send_counts[1]", "-1", "must be a non-decreasing prefix sum (previous entry 0)")),
      rule<CombineCall>(
          "TpExpandXFewerRowsThanOwnAndPeerRows", tp_pair(), 0, [](CombineCall& c) { c.expand_x.shape[0] = 3; },
          bad_shape("expand_x.shape", "(3, 16)",
                    "must have at least the 4 valid rows that ep_send_counts and tp_send_counts describe")),
      rule<CombineCall>(
          "AscendA3ExpandXHiddenNot7168", ascend_a3(), 3,
          [](CombineCall& c) { c.expand_x = c.own(Tensor(DType::bf16, c.expand_x.rows(), 7200)); },
          invalid("H", "7200", "profile ascend_a3 needs H == 7168")),
      // The A3 kernel checks expand_idx's documented 1-D shape; a (BS, K) one is refused there.
      rule<CombineCall>(
          "AscendA3ExpandIdxTwoDimensional", ascend_a3(), 3,
          [](CombineCall& c) { c.expand_idx = matrix_view(c.expand_idx.data, DType::int32, 1, 1); },
          bad_shape("expand_idx.shape", "(1, 1)", "must be (1,)")),
      rule<CombineCall>(
          "AscendA3XActiveMask", ascend_a3(), 3,
          [](CombineCall& c) { c.options.x_active_mask = c.own(bool_vector({1})); },
          invalid("x_active_mask", "(1,)", "profile ascend_a3 does not support it (must be None)")),
      rule<CombineCall>(
          "SharedRankOwnRowsDifferFromActiveTokens", shared_ranks(0), 0,
          [](CombineCall& c) {
            c.options.x_active_mask = c.own(bool_vector({1, 0}));
          },
          invalid("ep_send_counts[0]", "2",
                  "on a shared-expert rank it must equal this rank's active tokens = 1 (its own rows come first)")),
      rule<CombineCall>(
          "AscendA2KAbove16", ascend_a2(), 6, [](CombineCall& c) { c.expert_ids = c.own(formula_ids(1, 17, 24, 0)); },
          invalid("K", "17", "profile ascend_a2 allows K <= 16")),
  };
}

INSTANTIATE_TEST_SUITE_P(SingleRank, CombineRules, ::testing::ValuesIn(single_rank_combine_rules()), combine_rule_name);
INSTANTIATE_TEST_SUITE_P(MultiRank, CombineRules, ::testing::ValuesIn(multi_rank_combine_rules()), combine_rule_name);

// The harness's control: a valid call does write every buffer the sentinel checks above watch.
TEST(Harness, SentinelBuffersSeeTheWritesOfAValidCall) {
  const World w = single_rank();
  const casefile::Case c = make_case(w, w.bs, 1);
  InProcessWorld runtime(1, generous_timeout());
  const std::unique_ptr<Group> group = runtime.join(w.config);
  DispatchCall call(w, 0, c.ranks[0]);
  const DispatchResult d = group->dispatch(call.x, call.expert_ids, call.options);
  EXPECT_FALSE(call.expand_x_buf.untouched());
  EXPECT_FALSE(call.dynamic_scales_buf.untouched());
  EXPECT_FALSE(call.expand_scales_buf.untouched());
  EXPECT_FALSE(call.expand_idx_buf.untouched());
  EXPECT_FALSE(call.expert_token_nums_buf.untouched());
  EXPECT_FALSE(call.ep_recv_counts_buf.untouched());
  CombineCall combine(w, d, c.ranks[0]);
  group->combine(combine.expand_x, combine.expert_ids, combine.expand_idx, combine.ep_send_counts, combine.expert_scales,
                 combine.options);
  EXPECT_FALSE(combine.out_buf.untouched());
}

// ---- validate_config -------------------------------------------------------------------------------

struct ConfigRule {
  std::string name;
  std::function<void(GroupConfig&)> configure;  // applied to a valid W = 1, E = 4 configuration
  Expected want;
};

void PrintTo(const ConfigRule& rule, std::ostream* os) { *os << rule.name; }

ConfigRule config_rule(std::string name, std::function<void(GroupConfig&)> configure, Expected want) {
  return ConfigRule{std::move(name), std::move(configure), std::move(want)};
}

// Sets the EP geometry: W, E, S.
std::function<void(GroupConfig&)> geometry(int ep_world_size, int moe_expert_num, int shared_expert_rank_num = 0,
                                           const std::function<void(GroupConfig&)>& more = {}) {
  return [=](GroupConfig& c) {
    c.ep_world_size = ep_world_size;
    c.moe_expert_num = moe_expert_num;
    c.shared_expert_rank_num = shared_expert_rank_num;
    if (more) more(c);
  };
}

std::function<void(GroupConfig&)> a3(int ep_world_size, int moe_expert_num) {
  return geometry(ep_world_size, moe_expert_num, 0, [](GroupConfig& c) { c.profile = Profile::ascend_a3; });
}
std::function<void(GroupConfig&)> a2(int ep_world_size, int moe_expert_num, int shared_expert_rank_num = 0, int tp_world_size = 0) {
  return geometry(ep_world_size, moe_expert_num, shared_expert_rank_num, [tp_world_size](GroupConfig& c) {
    c.profile = Profile::ascend_a2;
    c.tp_world_size = tp_world_size;
  });
}

std::vector<ConfigRule> config_rules() {
  return {
      config_rule("EpWorldSizeZero", geometry(0, 4), invalid("ep_world_size", "0", "must be >= 1")),
      config_rule("EpWorldSizeNegative", geometry(-2, 4), invalid("ep_world_size", "-2", "must be >= 1")),
      config_rule("EpWorldSizeHuge", geometry(2147483647, 4),
                  invalid("ep_world_size", "2147483647", "must be <= 65536")),
      config_rule("EpRankIdNegative", geometry(2, 4, 0, [](GroupConfig& c) { c.ep_rank_id = -1; }),
                  invalid("ep_rank_id", "-1", "must be in [0, ep_world_size = 2)")),
      config_rule("EpRankIdEqualToW", geometry(2, 4, 0, [](GroupConfig& c) { c.ep_rank_id = 2; }),
                  invalid("ep_rank_id", "2", "must be in [0, ep_world_size = 2)")),
      config_rule(
          "TpWorldSize3", [](GroupConfig& c) { c.tp_world_size = 3; },
          invalid("tp_world_size", "3", "must be 0, 1 (no TP domain) or 2")),
      config_rule(
          "TpWorldSizeNegative", [](GroupConfig& c) { c.tp_world_size = -1; },
          invalid("tp_world_size", "-1", "must be 0, 1 (no TP domain) or 2")),
      config_rule(
          "TpRankIdWithoutTpDomain", [](GroupConfig& c) { c.tp_rank_id = 1; },
          invalid("tp_rank_id", "1", "must be 0 without a TP domain (tp_world_size = 0)")),
      config_rule(
          "TpRankIdWithTpWorldSize1",
          [](GroupConfig& c) {
            c.tp_world_size = 1;
            c.tp_rank_id = 1;
          },
          invalid("tp_rank_id", "1", "must be 0 without a TP domain (tp_world_size = 1)")),
      config_rule(
          "TpRankId2WithTpWorldSize2",
          [](GroupConfig& c) {
            c.moe_expert_num = 1;
            c.tp_world_size = 2;
            c.tp_rank_id = 2;
          },
          invalid("tp_rank_id", "2", "must be 0 or 1 with tp_world_size = 2")),
      config_rule(
          "TpRankIdNegativeWithTpWorldSize2",
          [](GroupConfig& c) {
            c.moe_expert_num = 1;
            c.tp_world_size = 2;
            c.tp_rank_id = -1;
          },
          invalid("tp_rank_id", "-1", "must be 0 or 1 with tp_world_size = 2")),
      config_rule(
          "ExpertShardType1", [](GroupConfig& c) { c.expert_shard_type = 1; },
          invalid("expert_shard_type", "1", "must be 0 (shared-expert ranks placed before MoE ranks)")),
      config_rule(
          "SharedExpertNum2WithoutSharedRanks", [](GroupConfig& c) { c.shared_expert_num = 2; },
          invalid("shared_expert_num", "2", "must be 0 exactly when shared_expert_rank_num is 0 (it is 0)")),
      config_rule("SharedExpertNum5", geometry(8, 4, 4, [](GroupConfig& c) { c.shared_expert_num = 5; }),
                  invalid("shared_expert_num", "5", "must be in [0, 4] (1 in the V1 operators)")),
      config_rule(
          "SharedExpertNumNegative", [](GroupConfig& c) { c.shared_expert_num = -1; },
          invalid("shared_expert_num", "-1", "must be in [0, 4] (1 in the V1 operators)")),
      config_rule("SharedExpertNum0WithSharedRanks", geometry(4, 2, 2, [](GroupConfig& c) { c.shared_expert_num = 0; }),
                  invalid("shared_expert_num", "0", "must be 0 exactly when shared_expert_rank_num is 0 (it is 2)")),
      config_rule(
          "SharedExpertNumNotDividingSharedRanks", geometry(5, 2, 3, [](GroupConfig& c) { c.shared_expert_num = 2; }),
          invalid("shared_expert_num", "2",
                  "must divide shared_expert_rank_num = 3 (each shared expert on S / shared_expert_num ranks)")),
      config_rule("SharedExpertRankNumEqualToW", geometry(2, 4, 2),
                  invalid("shared_expert_rank_num", "2", "must be in [0, ep_world_size = 2)")),
      config_rule("SharedExpertRankNumAboveW", geometry(2, 4, 3),
                  invalid("shared_expert_rank_num", "3", "must be in [0, ep_world_size = 2)")),
      config_rule("SharedExpertRankNumNegative", geometry(2, 4, -1),
                  invalid("shared_expert_rank_num", "-1", "must be in [0, ep_world_size = 2)")),
      config_rule("MoeExpertNumZero", geometry(1, 0), invalid("moe_expert_num", "0", "must be >= 1")),
      config_rule("MoeExpertNumHuge", geometry(1, 2097152), invalid("moe_expert_num", "2097152", "must be <= 1048576")),
      config_rule("MoeExpertNumNegative", geometry(1, -4), invalid("moe_expert_num", "-4", "must be >= 1")),
      config_rule("MoeExpertNumNotMultipleOfMoeRanks", geometry(3, 4),
                  invalid("moe_expert_num", "4", "must be a multiple of ep_world_size - shared_expert_rank_num = 3")),
      config_rule("MoeExpertNumNotMultipleOfMoeRanksWithSharedRanks", geometry(4, 3, 2),
                  invalid("moe_expert_num", "3", "must be a multiple of ep_world_size - shared_expert_rank_num = 2")),
      config_rule("TpDomainWithTwoExpertsPerRank", geometry(2, 4, 0, [](GroupConfig& c) { c.tp_world_size = 2; }),
                  invalid("moe_expert_num", "4",
                          "a TP domain needs one expert per MoE rank, but moe_expert_num / (ep_world_size - "
                          "shared_expert_rank_num) = 2")),
      config_rule("GlobalBsNegative", geometry(2, 4, 0, [](GroupConfig& c) { c.global_bs = -4; }),
                  invalid("global_bs", "-4", "must be >= 0")),
      config_rule("GlobalBsNotMultipleOfW", geometry(3, 3, 0, [](GroupConfig& c) { c.global_bs = 4; }),
                  invalid("global_bs", "4", "must be 0 or a multiple of ep_world_size = 3")),
      // ascend_a3
      config_rule("AscendA3W1", a3(1, 4),
                  invalid("ep_world_size", "1", "profile ascend_a3 allows 2 to 768 (V2 operators)")),
      config_rule("AscendA3W776", a3(776, 776),
                  invalid("ep_world_size", "776", "profile ascend_a3 allows 2 to 768 (V2 operators)")),
      config_rule("AscendA3ExpertNumAbove1024", a3(8, 1032),
                  invalid("moe_expert_num", "1032", "profile ascend_a3 allows at most 1024")),
      // ascend_a2
      config_rule("AscendA2WNotMultipleOf8", a2(12, 12),
                  invalid("ep_world_size", "12", "profile ascend_a2 needs a multiple of 8 that is at most 256")),
      config_rule("AscendA2WAbove256", a2(264, 264),
                  invalid("ep_world_size", "264", "profile ascend_a2 needs a multiple of 8 that is at most 256")),
      config_rule("AscendA2SharedExpertRanks", a2(8, 7, 1),
                  invalid("shared_expert_rank_num", "1", "profile ascend_a2 has no shared-expert ranks (must be 0)")),
      config_rule("AscendA2TpDomain", a2(8, 8, 0, 2),
                  invalid("tp_world_size", "2", "profile ascend_a2 has no TP domain")),
      config_rule("AscendA2ExpertNumAbove512", a2(24, 528),
                  invalid("moe_expert_num", "528", "profile ascend_a2 allows at most 512")),
      config_rule("AscendA2MoreThan24ExpertsPerRank", a2(8, 200),
                  invalid("moe_expert_num", "200", "profile ascend_a2 allows at most 24 experts per rank")),
  };
}

class ConfigRules : public ::testing::TestWithParam<ConfigRule> {};

TEST_P(ConfigRules, ValidateConfigAndCapacityRaise) {
  GroupConfig config = single_rank().config;
  GetParam().configure(config);
  EXPECT_TRUE(raised(capture([&] { validate_config(config); }), GetParam().want)) << "validate_config";
  EXPECT_TRUE(raised(capture([&] { capacity(config, CapacityQuery{1, 1, 16, DType::bf16, 0}); }), GetParam().want)) << "capacity";
}

std::string config_rule_name(const ::testing::TestParamInfo<ConfigRule>& info) { return info.param.name; }

INSTANTIATE_TEST_SUITE_P(All, ConfigRules, ::testing::ValuesIn(config_rules()), config_rule_name);

// Rules only the V1 operators have (check_v1_config): the configuration is valid, a V2 capacity
// question is answered, a V1 one raises.
std::vector<ConfigRule> v1_config_rules() {
  return {
      config_rule(
          "SharedExpertNum0", [](GroupConfig& c) { c.shared_expert_num = 0; },
          invalid("shared_expert_num", "0", "must be 1 in the V1 operators (0 to 4 in the V2 ones)")),
      config_rule("SharedExpertNum2", geometry(6, 4, 2, [](GroupConfig& c) { c.shared_expert_num = 2; }),
                  invalid("shared_expert_num", "2", "must be 1 in the V1 operators (0 to 4 in the V2 ones)")),
      config_rule(
          "WNotMultipleOfSharedExpertRankNum", geometry(5, 3, 2),
          invalid("shared_expert_rank_num", "2", "ep_world_size = 5 must be a multiple of it in the V1 operators")),
      config_rule("AscendA3W4", a3(4, 4),
                  invalid("ep_world_size", "4",
                          "profile ascend_a3 allows 8, 16, 32, 64, 128, 144, 256 or 288 in the V1 operators")),
      config_rule("AscendA3W12", a3(12, 12),
                  invalid("ep_world_size", "12",
                          "profile ascend_a3 allows 8, 16, 32, 64, 128, 144, 256 or 288 in the V1 operators")),
      config_rule("AscendA3W512", a3(512, 512),
                  invalid("ep_world_size", "512",
                          "profile ascend_a3 allows 8, 16, 32, 64, 128, 144, 256 or 288 in the V1 operators")),
      config_rule("AscendA3ExpertNumAbove512", a3(8, 520),
                  invalid("moe_expert_num", "520", "profile ascend_a3 allows at most 512 in the V1 operators")),
  };
}

class V1ConfigRules : public ::testing::TestWithParam<ConfigRule> {};

TEST_P(V1ConfigRules, OnlyTheV1OperatorsRaise) {
  GroupConfig config = single_rank().config;
  GetParam().configure(config);
  EXPECT_EQ(capture([&] { validate_config(config); }).kind, Outcome::Kind::none) << "validate_config";
  const std::int64_t h = config.profile == Profile::ascend_a3 ? 7168 : 16;
  EXPECT_EQ(capture([&] {
              capacity(config, CapacityQuery{1, 1, h, DType::bf16, 0, 2});
            }).kind,
            Outcome::Kind::none)
      << "capacity, V2";
  EXPECT_TRUE(raised(capture([&] {
                       capacity(config, CapacityQuery{1, 1, h, DType::bf16, 0, 1});
                     }),
                     GetParam().want))
      << "capacity, V1";
}

INSTANTIATE_TEST_SUITE_P(All, V1ConfigRules, ::testing::ValuesIn(v1_config_rules()), config_rule_name);

// The boundaries of the rules above are accepted.
TEST(ConfigRules, ConfigurationsAtTheLimitsAreAccepted) {
  std::vector<std::pair<std::string, std::function<void(GroupConfig&)>>> accepted = {
      {"one rank", geometry(1, 1)},
      {"S = W - 1", geometry(2, 1, 1, [](GroupConfig& c) { c.ep_rank_id = 1; })},
      {"S = W / 2", geometry(4, 2, 2, [](GroupConfig& c) { c.ep_rank_id = 3; })},
      {"TP with one expert per MoE rank and shared ranks",
       geometry(4, 2, 2,
                [](GroupConfig& c) {
                  c.tp_world_size = 2;
                  c.tp_rank_id = 1;
                })},
      {"tp_world_size 1", [](GroupConfig& c) { c.tp_world_size = 1; }},
      {"global_bs = W", geometry(3, 3, 0, [](GroupConfig& c) { c.global_bs = 3; })},
      {"ascend_a3 W = 144, E = 144", a3(144, 144)},
      {"ascend_a3 W = 288, E = 288", a3(288, 288)},
      {"ascend_a3 E = 512", a3(8, 512)},
      {"ascend_a2 W = 256, E = 512", a2(256, 512)},
      {"ascend_a2 24 experts per rank", a2(8, 192)},
  };
  for (int w : {8, 16, 32, 64, 128, 144, 256, 288}) accepted.emplace_back("ascend_a3 W = " + std::to_string(w), a3(w, w));
  for (const auto& [name, configure] : accepted) {
    GroupConfig config = single_rank().config;
    configure(config);
    const Outcome o = capture([&] { validate_config(config); });
    EXPECT_EQ(o.kind, Outcome::Kind::none) << name << ": " << describe(o);
  }
}

// join() validates before it claims the rank: after a rejected join the rank can still join.
TEST(ConfigRules, JoinValidatesBeforeClaimingTheRank) {
  InProcessWorld runtime(1, generous_timeout());
  GroupConfig bad = single_rank().config;
  bad.expert_shard_type = 1;
  EXPECT_TRUE(raised(capture([&] { runtime.join(bad); }),
                     invalid("expert_shard_type", "1", "must be 0 (shared-expert ranks placed before MoE ranks)")));
  const World w = single_rank();
  const std::unique_ptr<Group> group = runtime.join(w.config);
  const casefile::Case c = make_case(w, 3, 5);
  std::vector<casefile::RankOutputs> got;
  got.push_back(round_trip(*group, c, 0));
  EXPECT_EQ(compare_with_oracle(c, got, oracle::run(to_oracle_case(c))), "");
}

// ---- capacity() ------------------------------------------------------------------------------------

struct CapacityRule {
  std::string name;
  GroupConfig config;
  CapacityQuery query;
  Expected want;
};

void PrintTo(const CapacityRule& rule, std::ostream* os) { *os << rule.name; }

std::vector<CapacityRule> capacity_rules() {
  const GroupConfig base = single_rank().config;  // W = 1, E = 4
  GroupConfig bounded = make_world(2, 2).config;
  bounded.global_bs = 4;
  const auto query = [](std::int64_t bs, std::int64_t k, std::int64_t h, DType dtype, int quant_mode) {
    return CapacityQuery{bs, k, h, dtype, quant_mode};
  };
  return {
      {"BsNegative", base, query(-1, 2, 16, DType::bf16, 0), invalid("bs", "-1", "must be >= 0")},
      {"KZero", base, query(3, 0, 16, DType::bf16, 0), invalid("k", "0", "must be in [1, moe_expert_num = 4]")},
      {"KAboveExpertNum", base, query(3, 5, 16, DType::bf16, 0), invalid("k", "5", "must be in [1, moe_expert_num = 4]")},
      {"HZero", base, query(3, 2, 0, DType::bf16, 0), invalid("h", "0", "must be >= 1")},
      {"XDtypeFloat32", base, query(3, 2, 16, DType::fp32, 0), invalid("x_dtype", "float32", "must be bfloat16 or float16")},
      {"XDtypeInt8", base, query(3, 2, 16, DType::int8, 0), invalid("x_dtype", "int8", "must be bfloat16 or float16")},
      {"QuantMode1", base, query(3, 2, 16, DType::bf16, 1),
       expect(ErrorCode::unsupported, "quant_mode", "1", "static quantization is not supported (0 = none, 2 = dynamic int8)")},
      {"QuantMode3", base, query(3, 2, 16, DType::fp16, 3), invalid("quant_mode", "3", "must be 0 (none) or 2 (dynamic int8)")},
      {"BsTimesWAboveGlobalBs", bounded, query(3, 1, 16, DType::bf16, 0),
       invalid("bs", "3", "bs * ep_world_size must be <= global_bs = 4")},
  };
}

class CapacityRules : public ::testing::TestWithParam<CapacityRule> {};

TEST_P(CapacityRules, Raise) {
  EXPECT_TRUE(raised(capture([&] { capacity(GetParam().config, GetParam().query); }), GetParam().want));
}

std::string capacity_rule_name(const ::testing::TestParamInfo<CapacityRule>& info) { return info.param.name; }

INSTANTIATE_TEST_SUITE_P(All, CapacityRules, ::testing::ValuesIn(capacity_rules()), capacity_rule_name);

// The capacities the rule cases above rely on (contract §3.3, §3.4.1, §3.5).
TEST(CapacityRules, CapacityOfTheWorldsUsedHere) {
  EXPECT_EQ(capacity(single_rank().config, CapacityQuery{3, 2, 16, DType::bf16, 0}).A, 6);  // BS*W*min(L=4, K=2)
  EXPECT_EQ(capacity(single_rank().config, CapacityQuery{3, 2, 16, DType::bf16, 0}).expand_x_rows, 6);
  const World pair = tp_pair();
  const CapacityReport tp = capacity(pair.rank_config(1), CapacityQuery{2, 1, 16, DType::bf16, 0});
  EXPECT_EQ(tp.A, 2);
  EXPECT_EQ(tp.expand_x_rows, 4);  // A * T
  const World shared = shared_ranks();
  EXPECT_EQ(capacity(shared.rank_config(0), CapacityQuery{2, 1, 16, DType::bf16, 0}).A, 4);  // global_bs / S = 2*2/1
  EXPECT_EQ(capacity(shared.rank_config(1), CapacityQuery{2, 1, 16, DType::bf16, 0}).A, 4);  // global_bs * min(L=2, K=1)
}

}  // namespace
}  // namespace moedist::testing
