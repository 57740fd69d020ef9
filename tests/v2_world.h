// The V2 operators' test worlds: a configuration with the shape of its calls, deterministic inputs of
// every rank as a casefile::Case (op 2, which run_rank and the V2 oracle take), and one rank's
// dispatch_v2 / combine_v2 arguments with sentinel-filled caller buffers, which the rule tests corrupt.
#pragma once

#include <algorithm>
#include <cstdint>
#include <deque>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "contract/layout.h"
#include "moedist/moedist.h"
#include "rule_checks.h"
#include "test_inputs.h"
#include "test_support.h"

namespace moedist::testing::v2 {

enum class MaskKind : std::uint8_t { none, tokens, entries };

// A group configuration (ep_rank_id / tp_rank_id are filled in per rank) and its V2 calls' shape.
struct World {
  GroupConfig config;
  std::int64_t bs = 3, h = 16, k = 2;
  std::vector<std::int64_t> rank_bs;  // BS per global rank when not empty (uneven BS needs global_bs)
  DType dtype = DType::bf16;
  int quant_mode = 0;
  int comm_quant_mode = 0;
  bool with_scales = false;  // smooth scales (Sn + E, H), with quant_mode 2
  bool with_expert_scales = true;
  int zero = 0, copy = 0, constant = 0;
  MaskKind mask = MaskKind::none;
  std::string comm_alg;

  int size() const { return config.ep_world_size * tp_domain_size(config); }
  int id_limit() const { return config.moe_expert_num + zero + copy + constant; }
  std::int64_t bs_of(int g) const { return rank_bs.empty() ? bs : rank_bs[static_cast<std::size_t>(g)]; }
  GroupConfig rank_config(int g) const {
    GroupConfig c = config;
    c.ep_rank_id = g / tp_domain_size(config);
    c.tp_rank_id = g % tp_domain_size(config);
    return c;
  }
};

// W EP ranks, E MoE experts, S shared-expert ranks holding Sn shared experts (Sn = 1 without S: none),
// tp_world_size T.
inline World world(int W, int E, int S = 0, int Sn = 1, int T = 0) {
  World w;
  w.config.ep_world_size = W;
  w.config.moe_expert_num = E;
  w.config.shared_expert_rank_num = S;
  w.config.shared_expert_num = Sn;
  w.config.tp_world_size = T;
  return w;
}

// The same world with calls of BS tokens, H wide, of K routing entries each.
inline World with_shape(World w, std::int64_t bs, std::int64_t h, std::int64_t k) {
  w.bs = bs;
  w.h = h;
  w.k = k;
  return w;
}

inline World with_profile(World w, Profile profile) {
  w.config.profile = profile;
  return w;
}

// One TP pair per EP rank: W = 2, T = 2 (global ranks 2g and 2g + 1 are EP rank g), E = 2 (L = 1);
// BS = 2, K = 1.
inline World tp_pairs() { return with_shape(world(2, 2, 0, 1, 2), 2, 16, 1); }

// Every rank's inputs. expert_ids[b, j] = (b * K + j + g) % (E + Z + C + Q): K distinct ids per row
// (K <= E + Z + C + Q), special experts among them. A (BS,) mask switches the last token off, a (BS, K)
// mask entry (b, j) where (b + 2j + g) % 3 == 0; the ids they switch off become ones no operator may
// read (negative, past every expert, repeated).
inline casefile::Case make_case(const World& w, std::uint64_t seed) {
  casefile::Case c = case_of(w.config);
  c.op = 2;
  c.quant_mode = w.quant_mode;
  c.comm_quant_mode = w.comm_quant_mode;
  c.dtype = w.dtype;
  c.zero_expert_num = w.zero;
  c.copy_expert_num = w.copy;
  c.const_expert_num = w.constant;
  c.comm_alg = w.comm_alg;
  const int limit = w.id_limit();
  const int sn = contract::v2_shared_expert_num(w.config);
  std::mt19937_64 rng(seed);
  for (int g = 0; g < w.size(); ++g) {
    const std::int64_t bs = w.bs_of(g), k = w.k;
    casefile::RankInputs in;
    in.x = half_tensor(rng, w.dtype, bs, w.h);
    in.expert_ids = Tensor(DType::int32, bs, k);
    std::int32_t* ids = in.expert_ids.data<std::int32_t>();
    for (std::int64_t i = 0; i < bs * k; ++i) ids[i] = static_cast<std::int32_t>((i + g) % limit);
    if (w.mask == MaskKind::tokens) {
      in.x_active_mask = Tensor(DType::boolean, bs);
      for (std::int64_t b = 0; b < bs; ++b) in.x_active_mask.data<std::uint8_t>()[b] = b + 1 < bs ? 1 : 0;
      for (std::int64_t j = 0; bs > 0 && j < k; ++j) ids[(bs - 1) * k + j] = j == 0 ? -7 : limit + 3;
    } else if (w.mask == MaskKind::entries) {
      in.x_active_mask = Tensor(DType::boolean, bs, k);
      for (std::int64_t b = 0; b < bs; ++b) {
        for (std::int64_t j = 0; j < k; ++j) {
          const bool on = (b + 2 * j + g) % 3 != 0;
          in.x_active_mask.data<std::uint8_t>()[b * k + j] = on ? 1 : 0;
          if (!on) ids[b * k + j] = j % 2 == 0 ? limit + 3 : ids[b * k];
        }
      }
    }
    if (w.with_scales) in.scales = fp32_tensor(rng, sn + w.config.moe_expert_num, w.h, 0.5f, 2.0f);
    if (w.with_expert_scales) in.expert_scales = fp32_tensor(rng, bs, k, -1.0f, 1.0f);
    if (w.copy + w.constant > 0) in.ori_x = half_tensor(rng, w.dtype, bs, w.h);
    if (w.constant > 0) {
      in.const_expert_alpha_1 = half_tensor(rng, w.dtype, w.constant, w.h, 0.2f);
      in.const_expert_alpha_2 = half_tensor(rng, w.dtype, w.constant, w.h, 0.2f);
      in.const_expert_v = half_tensor(rng, w.dtype, w.constant, w.h);
    }
    c.ranks.push_back(std::move(in));
  }
  return c;
}

// A round that must work: caller buffers, so that assist_info_for_combine has torch_npu's 128 * A
// entries (the ascend_a3 combine insists on them).
inline RunOptions round_options() {
  RunOptions o;
  o.caller_outputs = true;
  return o;
}

// Tensors a call owns besides its inputs (replacements a rule makes); stable addresses.
class Owned {
 public:
  TensorView own(Tensor t) {
    tensors_.push_back(std::move(t));
    return tensors_.back().view();
  }
  MutableTensorView own_mutable(Tensor t) {
    tensors_.push_back(std::move(t));
    return tensors_.back().mutable_view();
  }

 private:
  std::deque<Tensor> tensors_;
};

// A rank's dispatch_v2 arguments: the case's inputs and sentinel-filled caller buffers for every
// output and for performance_info.
struct DispatchCall : Owned {
  DispatchCall(const World& w, int g, const casefile::RankInputs& in) : world(w), config(w.rank_config(g)) {
    x = in.x;
    expert_ids = in.expert_ids;
    options.quant_mode = w.quant_mode;
    options.zero_expert_num = w.zero;
    options.copy_expert_num = w.copy;
    options.const_expert_num = w.constant;
    options.comm_alg = w.comm_alg;
    if (in.scales.present()) options.scales = in.scales;
    if (in.expert_scales.present()) options.expert_scales = in.expert_scales;
    if (in.x_active_mask.present()) options.x_active_mask = in.x_active_mask;
    const std::int64_t bs = in.x.rows();
    const CapacityReport cap = rules::buffer_capacity(config, CapacityQuery{bs, w.k, w.h, w.dtype, w.quant_mode, 2});
    const int T = tp_domain_size(config);
    const int local = local_expert_num(config);
    DispatchV2Outputs& out = options.out;
    out.expand_x = expand_x_buf.matrix(w.quant_mode == 2 ? DType::int8 : w.dtype, cap.expand_x_rows, w.h);
    out.dynamic_scales = dynamic_scales_buf.vector(DType::fp32, cap.expand_x_rows);
    if (w.with_expert_scales) out.expand_scales = expand_scales_buf.vector(DType::fp32, cap.expand_x_rows);
    out.assist_info_for_combine = assist_buf.vector(DType::int32, std::max(bs * w.k, cap.A * 128));
    out.expert_token_nums = expert_token_nums_buf.vector(DType::int64, local);
    out.ep_recv_counts =
        ep_recv_counts_buf.vector(DType::int32, std::int64_t{config.ep_world_size} * local * (T == 2 ? 2 : 1));
    if (T == 2) out.tp_recv_counts = tp_recv_counts_buf.vector(DType::int32, 2);
    options.performance_info = performance_info_buf.vector(DType::int64, config.ep_world_size);
    capacity_a = cap.A;
  }
  DispatchCall(const DispatchCall&) = delete;
  DispatchCall& operator=(const DispatchCall&) = delete;

  // Fresh valid x / expert_ids (and expert_scales) of another shape, without a mask.
  void reshape(std::int64_t bs, std::int64_t h, std::int64_t k) {
    std::mt19937_64 rng(77);
    x = own(half_tensor(rng, world.dtype, bs, h));
    Tensor ids(DType::int32, bs, k);
    for (std::int64_t i = 0; i < bs * k; ++i) ids.data<std::int32_t>()[i] = static_cast<std::int32_t>(i % k);
    expert_ids = own(std::move(ids));
    if (options.expert_scales.present()) options.expert_scales = own(fp32_tensor(rng, bs, k, -1.0f, 1.0f));
    options.x_active_mask = TensorView{};
  }
  bool outputs_untouched() const {
    return expand_x_buf.untouched() && dynamic_scales_buf.untouched() && expand_scales_buf.untouched() &&
           assist_buf.untouched() && expert_token_nums_buf.untouched() && ep_recv_counts_buf.untouched() &&
           tp_recv_counts_buf.untouched() && performance_info_buf.untouched();
  }

  const World& world;
  GroupConfig config;
  TensorView x, expert_ids;
  DispatchV2Options options;
  std::int64_t capacity_a = 0;
  rules::SentinelBuffer expand_x_buf, dynamic_scales_buf, expand_scales_buf, assist_buf, expert_token_nums_buf,
      ep_recv_counts_buf, tp_recv_counts_buf, performance_info_buf;
};

// The expert rows a rank's combine reads back: identity experts (the dispatched rows), as a copy.
inline Tensor identity_rows(const DispatchResult& d) { return copy_rows(d.expand_x, d.valid_rows); }

// This rank's own EP rows: the last entry of ep_recv_counts' own half.
inline std::int64_t own_rows(const DispatchResult& d, const GroupConfig& config) {
  return d.ep_recv_counts.at<std::int32_t>(config.ep_world_size * local_expert_num(config) - 1);
}

// A rank's combine_v2 arguments, made from its dispatch (quant_mode 0, identity experts): copies of
// expand_x and of the triples (in torch_npu's length, 128 * A), which tests may change in place, of
// ep_recv_counts and tp_recv_counts, the case's combine inputs, and sentinel-filled `out` and
// performance_info.
struct CombineCall : Owned {
  CombineCall(const World& w, const GroupConfig& config, const DispatchResult& d, const casefile::RankInputs& in)
      : rows(identity_rows(d)),
        triples(DType::int32, std::max({d.assist_info_for_combine.rows(), d.A * 128, std::int64_t{1}})),
        own_rows(v2::own_rows(d, config)) {
    const std::int64_t bs = in.x.rows();
    expand_x = rows.view();
    expert_ids = in.expert_ids;
    for (std::int64_t i = 0; i < 3 * own_rows; ++i)
      triples.data<std::int32_t>()[i] = d.assist_info_for_combine.at<std::int32_t>(i);
    assist = triples.view();
    ep_send_counts = own(copy_rows(d.ep_recv_counts, d.ep_recv_counts.rows()));
    if (in.expert_scales.present()) expert_scales = in.expert_scales;
    if (d.tp_recv_counts.present()) options.tp_send_counts = own(copy_rows(d.tp_recv_counts, 2));
    if (in.x_active_mask.present()) options.x_active_mask = in.x_active_mask;
    options.ori_x = in.ori_x;
    options.const_expert_alpha_1 = in.const_expert_alpha_1;
    options.const_expert_alpha_2 = in.const_expert_alpha_2;
    options.const_expert_v = in.const_expert_v;
    options.zero_expert_num = w.zero;
    options.copy_expert_num = w.copy;
    options.const_expert_num = w.constant;
    options.comm_alg = w.comm_alg;
    options.comm_quant_mode = w.comm_quant_mode;
    options.out = out_buf.matrix(w.dtype, bs, w.h);
    options.performance_info = performance_info_buf.vector(DType::int64, config.ep_world_size);
  }
  CombineCall(const CombineCall&) = delete;
  CombineCall& operator=(const CombineCall&) = delete;

  bool outputs_untouched() const { return out_buf.untouched() && performance_info_buf.untouched(); }
  TensorView run(Group& group) const {
    return group.combine_v2(expand_x, expert_ids, assist, ep_send_counts, expert_scales, options);
  }
  // Own row i's triple (source EP rank, token, k), and its expert row.
  std::int32_t* triple(std::int64_t i) { return triples.data<std::int32_t>() + 3 * i; }
  std::uint16_t* row(std::int64_t i) { return rows.data<std::uint16_t>() + i * rows.cols(); }

  Tensor rows, triples;
  std::int64_t own_rows = 0;
  TensorView expand_x, expert_ids, assist, ep_send_counts, expert_scales;
  CombineV2Options options;
  rules::SentinelBuffer out_buf, performance_info_buf;
};

}  // namespace moedist::testing::v2
