#include "cuda/call_args.h"

#include "common/format.h"

namespace moedist::cuda {

DispatchArgs dispatch_args(const contract::Topology& topo, const TensorView& x, const TensorView& expert_ids, const DispatchOptions& o,
                           const contract::CallShape& shape) {
  DispatchArgs a;
  a.x = static_cast<const std::uint16_t*>(x.data);
  a.x_row_stride = x.strides[0];
  a.x_col_stride = x.strides[1];
  a.ids = static_cast<const std::int32_t*>(expert_ids.data);
  a.ids_row_stride = expert_ids.strides[0];
  a.ids_col_stride = expert_ids.strides[1];
  if (o.scales.present()) {
    if (o.scales.strides[1] != 1)
      fail(ErrorCode::unsupported, "scales.strides[1]", concat(o.scales.strides[1]), "must be 1 on the CUDA backend");
    a.scales = static_cast<const float*>(o.scales.data);
    a.scales_row_stride = o.scales.strides[0];
  }
  if (o.expert_scales.present()) {
    a.expert_scales = static_cast<const float*>(o.expert_scales.data);
    a.expert_scales_row_stride = o.expert_scales.strides[0];
    a.expert_scales_col_stride = o.expert_scales.strides[1];
  }
  a.bs = shape.bs;
  a.k = shape.k;
  a.h = shape.h;
  a.bf16 = x.dtype == DType::bf16 ? 1 : 0;
  a.quant = o.quant_mode;
  a.expert_token_nums_type = o.expert_token_nums_type;
  a.dtype_code = static_cast<int>(x.dtype);
  a.capacity_moe = topo.receive_rows(topo.W - 1, shape.bs, shape.k);
  a.capacity_shared = topo.S > 0 ? topo.receive_rows(0, shape.bs, shape.k) : 0;
  return a;
}

CombineArgs combine_args(const TensorView& expand_x, const TensorView& expert_ids, const TensorView& expand_idx,
                         const TensorView& ep_send_counts, const TensorView& expert_scales, const CombineOptions& o,
                         const contract::CallShape& shape) {
  CombineArgs a;
  a.expand_x = static_cast<const std::uint16_t*>(expand_x.data);
  a.expand_x_rows = expand_x.rows();
  a.expand_x_row_stride = expand_x.strides[0];
  a.expand_x_col_stride = expand_x.strides[1];
  a.ids = static_cast<const std::int32_t*>(expert_ids.data);
  a.ids_row_stride = expert_ids.strides[0];
  a.ids_col_stride = expert_ids.strides[1];
  a.expand_idx = static_cast<const std::int32_t*>(expand_idx.data);
  // 1-D, or a (BS, K)-shaped one that is flat in memory (checked by CudaGroup::combine): one stride.
  a.expand_idx_stride = expand_idx.ndim == 2 ? expand_idx.strides[1] : expand_idx.strides[0];
  a.ep_send_counts = static_cast<const std::int32_t*>(ep_send_counts.data);
  a.ep_send_counts_stride = ep_send_counts.strides[0];
  if (o.tp_send_counts.present()) {
    a.tp_send_counts = static_cast<const std::int32_t*>(o.tp_send_counts.data);
    a.tp_send_counts_stride = o.tp_send_counts.strides[0];
  }
  a.expert_scales = static_cast<const float*>(expert_scales.data);
  a.expert_scales_row_stride = expert_scales.strides[0];
  a.expert_scales_col_stride = expert_scales.strides[1];
  a.bs = shape.bs;
  a.k = shape.k;
  a.h = shape.h;
  a.bf16 = expand_x.dtype == DType::bf16 ? 1 : 0;
  a.comm_quant = o.comm_quant_mode;
  a.dtype_code = static_cast<int>(expand_x.dtype);
  return a;
}

namespace {

TokenMask token_mask(const TensorView& m) {
  if (!m.present()) return {};
  return TokenMask{static_cast<const std::uint8_t*>(m.data), m.ndim == 2 ? 1 : 0, m.strides[0],
                   m.ndim == 2 ? m.strides[1] : 1};
}
HalfRows half_rows(const TensorView& t) {
  if (!t.present()) return {};
  return HalfRows{static_cast<const std::uint16_t*>(t.data), t.strides[0], t.strides[1]};
}
PerfOut perf_out(const MutableTensorView& p) {
  if (!p.present()) return {};
  return PerfOut{static_cast<std::int64_t*>(p.data), p.strides[0]};
}

}  // namespace

DispatchArgs dispatch_args_v2(const contract::Topology& topo, const TensorView& x, const TensorView& expert_ids,
                              const DispatchV2Options& o, const contract::CallShape& shape) {
  DispatchOptions common;
  common.scales = o.scales;
  common.expert_scales = o.expert_scales;
  common.quant_mode = o.quant_mode;
  common.expert_token_nums_type = o.expert_token_nums_type;
  DispatchArgs a = dispatch_args(topo, x, expert_ids, common, shape);
  a.version = 2;
  a.mask = token_mask(o.x_active_mask);
  a.special = SpecialIds{o.zero_expert_num, o.copy_expert_num, o.const_expert_num};
  a.perf = perf_out(o.performance_info);
  a.capacity_moe = topo.receive_rows(topo.W - 1, shape.bs, shape.k, 2);
  a.capacity_shared = topo.S > 0 ? topo.receive_rows(0, shape.bs, shape.k, 2) : 0;
  return a;
}

CombineArgs combine_args_v2(const TensorView& expand_x, const TensorView& expert_ids, const TensorView& assist,
                            const TensorView& ep_send_counts, const TensorView& expert_scales,
                            const CombineV2Options& o, const contract::CallShape& shape) {
  CombineOptions common;
  common.tp_send_counts = o.tp_send_counts;
  common.comm_quant_mode = o.comm_quant_mode;
  CombineArgs a = combine_args(expand_x, expert_ids, TensorView{}, ep_send_counts, expert_scales, common, shape);
  a.version = 2;
  a.mask = token_mask(o.x_active_mask);
  a.special = SpecialIds{o.zero_expert_num, o.copy_expert_num, o.const_expert_num};
  a.assist = static_cast<const std::int32_t*>(assist.data);
  a.assist_stride = assist.strides[0];
  a.assist_len = assist.rows();
  a.ori_x = half_rows(o.ori_x);
  a.shared_x = half_rows(o.shared_expert_x);
  a.alpha_1 = half_rows(o.const_expert_alpha_1);
  a.alpha_2 = half_rows(o.const_expert_alpha_2);
  a.const_v = half_rows(o.const_expert_v);
  a.perf = perf_out(o.performance_info);
  return a;
}

}  // namespace moedist::cuda
