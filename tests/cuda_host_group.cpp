#include "cuda_host_group.h"

#include <algorithm>
#include <cstring>
#include <numeric>

#include "contract/checks.h"
#include "contract/v2_routing.h"
#include "cuda/call_args.h"
#include "cuda/row_math.h"
#include "cuda/status_errors.h"
#include "cuda/window_layout.h"
#include "moedist/error.h"
#include "test_support.h"

namespace moedist::cuda::testing {

namespace mt = moedist::testing;

std::int64_t case_max_bs(const casefile::Case& c) {
  std::int64_t most = 0;
  for (const auto& r : c.ranks) most = std::max(most, r.x.rows());
  return c.global_bs != 0 ? c.global_bs / c.ep_world_size : most;
}

WindowOffsets case_window_offsets(const casefile::Case& c) {
  return window_offsets(contract::Topology(mt::rank_config(c, 0)), case_max_bs(c), c.ranks[0].expert_ids.cols(), c.ranks[0].x.cols());
}

void init_host_rank(HostRank& e, const casefile::Case& c, int r, const WindowOffsets& off, std::byte* const* bases, std::int64_t timeout_ns) {
  e.config = mt::rank_config(c, r);
  const contract::Topology topo(e.config);
  const std::int64_t entries = std::max<std::int64_t>(case_max_bs(c) * c.ranks[0].expert_ids.cols(), 1);
  for (auto* v : {&e.keys_in, &e.keys_out, &e.vals_in, &e.vals_out, &e.ids, &e.expand_idx, &e.out_expand_idx}) v->assign(static_cast<std::size_t>(entries), 0);
  e.expert_counts.assign(static_cast<std::size_t>(topo.E), 0);
  e.record.assign(static_cast<std::size_t>(topo.count_record_len()), 0);
  e.recv_counts.assign(static_cast<std::size_t>(topo.ep_recv_counts_len(topo.ep_rank)), 0);
  e.out_ep_recv_counts = e.recv_counts;
  e.tp_counts.assign(2, 0);
  e.out_tp_recv_counts.assign(2, 0);
  e.block_start.assign(static_cast<std::size_t>(topo.count_record_len()), -1);
  e.tp_shift.assign(static_cast<std::size_t>(topo.W), 0);
  e.shared_start.assign(static_cast<std::size_t>(std::max(topo.S, 1)), -1);
  e.call_shape.assign(3, 0);
  e.out_token_nums.assign(static_cast<std::size_t>(topo.local_experts(topo.ep_rank)), 0);
  const std::int64_t max_bs = std::max<std::int64_t>(case_max_bs(c), 1), k = c.ranks[0].expert_ids.cols();
  e.token_slot.assign(static_cast<std::size_t>(max_bs), -1);
  e.source_bs.assign(static_cast<std::size_t>(topo.W), 0);
  e.found_rows.assign(static_cast<std::size_t>(max_bs * topo.K_slots(k)), -1);
  e.const_logits.assign(static_cast<std::size_t>(max_bs * k * 2), 0.0f);
  e.performance_info.assign(static_cast<std::size_t>(topo.W), 0);
  DeviceGroup& g = e.g;
  g.W = topo.W, g.S = topo.S, g.E = topo.E, g.L = topo.L, g.T = topo.T, g.ep_rank = topo.ep_rank, g.tp_rank = topo.tp_rank;
  g.world = static_cast<int>(c.ranks.size()), g.me = r, g.local_experts = topo.local_experts(topo.ep_rank), g.global_bs = topo.global_bs;
  g.timeout_ns = timeout_ns;
  g.off = off;
  g.windows = bases;
  g.status = &e.status;
  g.sort_keys_in = e.keys_in.data(), g.sort_keys_out = e.keys_out.data(), g.sort_vals_in = e.vals_in.data(), g.sort_vals_out = e.vals_out.data();
  g.dispatch_ids = e.ids.data(), g.dispatch_expand_idx = e.expand_idx.data(), g.expert_counts = e.expert_counts.data();
  g.record = e.record.data(), g.block_start = e.block_start.data(), g.tp_shift = e.tp_shift.data(), g.shared_start = e.shared_start.data();
  g.recv_counts = e.recv_counts.data(), g.tp_counts = e.tp_counts.data(), g.call_shape = e.call_shape.data();
  g.Sn = topo.Sn, g.R = topo.R;
  g.token_slot = e.token_slot.data(), g.source_bs = e.source_bs.data(), g.found_rows = e.found_rows.data();
  g.const_logits = e.const_logits.data();
}

namespace {

TensorView view_of(const Tensor& t) { return t.present() ? t.view() : TensorView{}; }

// The V2 options of rank r's dispatch (performance_info into e).
DispatchV2Options dispatch_v2_options(const casefile::Case& c, const casefile::RankInputs& in, HostRank& e) {
  DispatchV2Options o;
  o.quant_mode = c.quant_mode;
  o.expert_token_nums_type = c.expert_token_nums_type;
  o.scales = view_of(in.scales);
  o.expert_scales = view_of(in.expert_scales);
  o.x_active_mask = view_of(in.x_active_mask);
  o.zero_expert_num = c.zero_expert_num;
  o.copy_expert_num = c.copy_expert_num;
  o.const_expert_num = c.const_expert_num;
  o.comm_alg = c.comm_alg;
  o.performance_info =
      vector_view(e.performance_info.data(), DType::int64, static_cast<std::int64_t>(e.performance_info.size()));
  return o;
}

}  // namespace

DispatchArgs rank_dispatch_args(const casefile::Case& c, int r, HostRank& e) {
  const casefile::RankInputs& in = c.ranks[static_cast<std::size_t>(r)];
  if (c.op == 2) {
    const DispatchV2Options o = dispatch_v2_options(c, in, e);
    contract::EntryMask mask;
    contract::SpecialExperts experts;
    e.shape = contract::check_dispatch_v2(e.config, in.x.view(), in.expert_ids.view(), o, &mask, &experts,
                                          contract::Values::on_device);
    DispatchArgs a = dispatch_args_v2(contract::Topology(e.config), in.x.view(), in.expert_ids.view(), o, e.shape);
    a.expert_token_nums = e.out_token_nums.data();
    a.ep_recv_counts = e.out_ep_recv_counts.data();
    a.tp_recv_counts = e.g.T == 2 ? e.out_tp_recv_counts.data() : nullptr;
    return a;
  }
  DispatchOptions o;
  o.quant_mode = c.quant_mode;
  o.expert_token_nums_type = c.expert_token_nums_type;
  if (in.scales.present()) o.scales = in.scales.view();
  if (in.expert_scales.present()) o.expert_scales = in.expert_scales.view();
  e.shape = contract::check_dispatch(e.config, in.x.view(), in.expert_ids.view(), o, contract::Values::on_device);
  DispatchArgs a = dispatch_args(contract::Topology(e.config), in.x.view(), in.expert_ids.view(), o, e.shape);
  a.expand_idx = e.out_expand_idx.data();
  a.expert_token_nums = e.out_token_nums.data();
  a.ep_recv_counts = e.out_ep_recv_counts.data();
  a.tp_recv_counts = e.g.T == 2 ? e.out_tp_recv_counts.data() : nullptr;
  return a;
}

casefile::RankOutputs dispatch_outputs(const casefile::Case& c, int r, const HostRank& e) {
  const casefile::RankInputs& in = c.ranks[static_cast<std::size_t>(r)];
  const std::int64_t valid = e.status.valid_rows, bs = in.x.rows(), k = in.expert_ids.cols(), h = in.x.cols();
  const std::byte* base = e.g.windows[r];
  const WindowOffsets& off = e.g.off;
  const bool quant = c.quant_mode == 2;
  casefile::RankOutputs o;
  o.expand_x = mt::copy_rows(matrix_view(base + off.expand_x, quant ? DType::int8 : c.dtype, valid, h), valid);
  if (quant) o.dynamic_scales = mt::copy_rows(vector_view(base + off.dynamic_scales, DType::fp32, valid), valid);
  if (in.expert_scales.present()) o.expand_scales = mt::copy_rows(vector_view(base + off.expand_scales, DType::fp32, valid), valid);
  const auto vec = [](const auto& v, DType t) { return mt::copy_rows(vector_view(v.data(), t, static_cast<std::int64_t>(v.size())), static_cast<std::int64_t>(v.size())); };
  if (c.op == 2) {
    const std::int64_t triples = 3 * e.status.own_rows;
    o.assist_info_for_combine = mt::copy_rows(vector_view(base + off.assist, DType::int32, triples), triples);
  } else {
    o.expand_idx = mt::copy_rows(vector_view(e.out_expand_idx.data(), DType::int32, bs * k), bs * k);
  }
  o.expert_token_nums = vec(e.out_token_nums, DType::int64);
  o.ep_recv_counts = vec(e.out_ep_recv_counts, DType::int32);
  if (e.g.T == 2) o.tp_recv_counts = vec(e.out_tp_recv_counts, DType::int32);
  return o;
}

CombineArgs rank_combine_args(const casefile::Case& c, int r, HostRank& e, const casefile::RankOutputs& o,
                              bool in_window, const std::vector<std::int64_t>& order) {
  const casefile::RankInputs& in = c.ranks[static_cast<std::size_t>(r)];
  const std::int64_t valid = e.status.valid_rows, bs = in.x.rows(), k = in.expert_ids.cols(), h = in.x.cols();
  const bool quant = c.quant_mode == 2;
  Tensor& y = e.expert_out;
  if (in.combine_x.present()) {
    y = mt::copy_rows(in.combine_x.view(), in.combine_x.rows());
  } else {
    y = Tensor(c.dtype, std::max<std::int64_t>(valid, 1), h);
    for (std::int64_t row = 0; row < valid; ++row) {
      for (std::int64_t i = 0; i < h; ++i) {
        y.data<std::uint16_t>()[row * h + i] =
            quant ? dequantize(c.dtype == DType::bf16, o.expand_x.data<std::int8_t>()[row * h + i], o.dynamic_scales.data<float>()[row])
                  : o.expand_x.data<std::uint16_t>()[row * h + i];
      }
    }
  }
  e.ones = Tensor(DType::fp32, bs, k);
  std::fill_n(e.ones.data<float>(), bs * k, 1.0f);
  const TensorView tp_counts = e.g.T == 2 ? vector_view(e.out_tp_recv_counts.data(), DType::int32, 2) : TensorView{};
  const TensorView ep_counts = vector_view(e.out_ep_recv_counts.data(), DType::int32, static_cast<std::int64_t>(e.out_ep_recv_counts.size()));
  CombineArgs a;
  if (c.op == 2) {
    // The own rows in `order`, each with its triple; the TP peer's rows after them as dispatched.
    const auto* triples = o.assist_info_for_combine.data<std::int32_t>();
    e.assist_in.assign(triples, triples + o.assist_info_for_combine.numel());
    if (!order.empty()) {
      const Tensor dispatched = mt::copy_rows(y.view(), y.rows());
      for (std::size_t i = 0; i < order.size(); ++i) {
        const auto from = static_cast<std::size_t>(order[i]);
        std::copy_n(triples + 3 * from, 3, e.assist_in.begin() + static_cast<std::ptrdiff_t>(3 * i));
        std::copy_n(dispatched.data<std::uint16_t>() + from * static_cast<std::size_t>(h), h,
                    y.data<std::uint16_t>() + i * static_cast<std::size_t>(h));
      }
    }
    CombineV2Options co;
    co.comm_quant_mode = c.comm_quant_mode;
    co.tp_send_counts = tp_counts;
    co.x_active_mask = view_of(in.x_active_mask);
    co.zero_expert_num = c.zero_expert_num;
    co.copy_expert_num = c.copy_expert_num;
    co.const_expert_num = c.const_expert_num;
    co.comm_alg = c.comm_alg;
    co.ori_x = view_of(in.ori_x);
    co.shared_expert_x = view_of(in.shared_expert_x);
    co.const_expert_alpha_1 = view_of(in.const_expert_alpha_1);
    co.const_expert_alpha_2 = view_of(in.const_expert_alpha_2);
    co.const_expert_v = view_of(in.const_expert_v);
    co.performance_info =
        vector_view(e.performance_info.data(), DType::int64, static_cast<std::int64_t>(e.performance_info.size()));
    const TensorView x_view = matrix_view(y.data<std::uint16_t>(), c.dtype, valid, h);
    const TensorView assist =
        vector_view(e.assist_in.data(), DType::int32, static_cast<std::int64_t>(e.assist_in.size()));
    contract::CombineCounts counts;
    contract::EntryMask mask;
    contract::SpecialExperts experts;
    const contract::CallShape shape =
        contract::check_combine_v2(e.config, x_view, in.expert_ids.view(), assist, ep_counts, view_of(in.expert_scales),
                                   co, &counts, &mask, &experts, contract::Values::on_device);
    a = combine_args_v2(x_view, in.expert_ids.view(), assist, ep_counts, view_of(in.expert_scales), co, shape);
  } else {
    CombineOptions co;
    co.comm_quant_mode = c.comm_quant_mode;
    co.tp_send_counts = tp_counts;
    const TensorView weights = in.expert_scales.present() ? in.expert_scales.view() : e.ones.view();
    const TensorView x_view = matrix_view(y.data<std::uint16_t>(), c.dtype, valid, h);
    a = combine_args(x_view, in.expert_ids.view(), o.expand_idx.view(), ep_counts, weights, co, e.shape);
  }
  if (in_window && e.g.T == 1 && c.comm_quant_mode == 0) {  // the experts write into the combine buffer
    std::byte* rows = e.g.windows[r] + e.g.off.combine_rows;
    for (std::int64_t row = 0; row < valid; ++row) {
      std::memcpy(rows + row * static_cast<std::int64_t>(e.g.off.combine_pitch), y.data<std::uint16_t>() + row * h, static_cast<std::size_t>(h) * 2);
    }
    a.expand_x = reinterpret_cast<const std::uint16_t*>(rows);
    a.expand_x_row_stride = static_cast<std::int64_t>(e.g.off.combine_pitch / 2);
    a.staged_in_place = true;
  }
  e.combine_out.assign(static_cast<std::size_t>(std::max<std::int64_t>(bs * h, 1)), 0);
  a.out = e.combine_out.data();
  a.out_row_stride = h;
  a.out_col_stride = 1;
  return a;
}

Tensor combine_output(const casefile::Case& c, int r, const HostRank& e) {
  const std::int64_t bs = c.ranks[static_cast<std::size_t>(r)].x.rows(), h = c.ranks[0].x.cols();
  return mt::copy_rows(matrix_view(e.combine_out.data(), c.dtype, bs, h), bs);
}

std::vector<std::int64_t> random_row_order(const casefile::Case& c, const casefile::RankOutputs& o,
                                           std::mt19937_64& rng) {
  if (c.op != 2 || c.tp_world_size == 2) return {};
  std::vector<std::int64_t> order(static_cast<std::size_t>(o.assist_info_for_combine.numel() / 3));
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng);
  return order;
}

namespace {

void fill_half(std::mt19937_64& rng, Tensor& t, float spread) {
  std::normal_distribution<float> normal(0.0f, spread);
  for (std::int64_t i = 0; i < t.numel(); ++i) t.data<std::uint16_t>()[i] = mt::to_half_bits(t.dtype(), normal(rng));
}

Tensor fresh_like(std::mt19937_64& rng, const Tensor& t, float spread) {
  if (!t.present()) return Tensor();
  Tensor n(t.dtype(), t.rows(), t.cols());
  fill_half(rng, n, spread);
  return n;
}

}  // namespace

casefile::Case next_call_v2(const casefile::Case& c, std::mt19937_64& rng) {
  const int ids = c.moe_expert_num + c.zero_expert_num + c.copy_expert_num + c.const_expert_num;
  casefile::Case n = mt::next_call(c, rng, ids);  // K may exceed moe_expert_num: the special experts' ids follow
  n.op = 2;
  n.zero_expert_num = c.zero_expert_num;
  n.copy_expert_num = c.copy_expert_num;
  n.const_expert_num = c.const_expert_num;
  n.comm_alg = c.comm_alg;
  for (std::size_t g = 0; g < c.ranks.size(); ++g) {
    const casefile::RankInputs& old = c.ranks[g];
    casefile::RankInputs& in = n.ranks[g];
    const std::int64_t bs = in.x.rows(), k = in.expert_ids.cols();
    std::int32_t* id = in.expert_ids.data<std::int32_t>();
    if (old.x_active_mask.ndim() == 1) {  // a new prefix; the inactive rows' ids must not be read
      const auto active = static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(bs + 1));
      in.x_active_mask = Tensor(DType::boolean, bs);
      for (std::int64_t b = 0; b < bs; ++b) in.x_active_mask.data<std::uint8_t>()[b] = b < active ? 1 : 0;
      for (std::int64_t i = active * k; i < bs * k; ++i) id[i] = rng() % 2 == 0 ? -7 : ids + 3;
    } else if (old.x_active_mask.ndim() == 2) {
      in.x_active_mask = Tensor(DType::boolean, bs, k);
      for (std::int64_t i = 0; i < bs * k; ++i) {
        const bool on = rng() % 4 != 0;
        in.x_active_mask.data<std::uint8_t>()[i] = on ? 1 : 0;
        if (!on) id[i] = rng() % 2 == 0 ? -7 : ids + 3;
      }
    }
    in.ori_x = fresh_like(rng, old.ori_x, 1.0f);
    in.shared_expert_x = fresh_like(rng, old.shared_expert_x, 1.0f);
    in.const_expert_alpha_1 = fresh_like(rng, old.const_expert_alpha_1, 0.2f);
    in.const_expert_alpha_2 = fresh_like(rng, old.const_expert_alpha_2, 0.2f);
    in.const_expert_v = fresh_like(rng, old.const_expert_v, 1.0f);
  }
  return n;
}

bool uses_const_experts(const casefile::Case& c) { return c.op == 2 && c.const_expert_num > 0; }

std::string status_error_text(const Status& st, int me, std::int64_t call_k) {
  try {
    throw_status_error(st, me, call_k);
  } catch (const Error& e) {
    return std::string(error_code_name(e.code())) + ": " + e.what();
  }
  return "";
}

}  // namespace moedist::cuda::testing
