#include "moedist_rank.h"

#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels/row_kernels.h"

namespace moedist::bench {

GroupConfig group_config(const Point& p, int rank) {
  return GroupConfig{.ep_world_size = p.W,
                     .ep_rank_id = p.ep_rank(rank),
                     .moe_expert_num = p.E,
                     .tp_world_size = p.T,
                     .tp_rank_id = p.tp_rank(rank),
                     .shared_expert_rank_num = p.S};
}

MoedistRank::MoedistRank(const Point& p, int rank, Group& group)
    : p_(p), rank_(rank), group_(group), in_(make_rank_inputs(p, rank)) {
  options_.quant_mode = p.quant_mode;
  if (p.scales()) {
    smooth_ = make_smooth_scales(p);
    options_.scales = smooth_.view();
  }
}

void MoedistRank::prime(const PointBytes& bytes) {
  dispatch();
  expert_out_ = result_.expand_x;
  if (p_.quant_mode == 2) {
    // The experts write their outputs where combine reads them, the group's window (combine_buffer()), as an
    // engine's expert kernels would; combine then reads the rows in place instead of copying them in.
    const MutableTensorView window_rows = group_.combine_buffer(p_.dtype);
    MutableTensorView rows = window_rows;
    if (!window_rows.present() || window_rows.rows() < result_.valid_rows) {
      identity_ = Tensor(p_.dtype, result_.valid_rows, p_.h);
      rows = identity_.mutable_view();
    }
    const numeric::Half half = p_.dtype == DType::fp16 ? numeric::Half::fp16 : numeric::Half::bf16;
    for (std::int64_t i = 0; i < result_.valid_rows; ++i) {
      kernels::dequantize_row(result_.expand_x.ptr<std::int8_t>(i), result_.dynamic_scales.at<float>(i), half, p_.h,
                              rows.ptr<std::uint16_t>(i));
    }
    expert_out_ = matrix_view(static_cast<const void*>(rows.data), p_.dtype, result_.valid_rows, p_.h, rows.strides[0], 1);
  }
  combine();
  const TrafficCounters& t = group_.traffic();
  const std::int64_t want_dispatch = bytes.dispatch_per_rank[static_cast<std::size_t>(rank_)];
  const std::int64_t want_combine = bytes.combine_per_rank[static_cast<std::size_t>(rank_)];
  if (t.dispatch_bytes_sent != want_dispatch || t.combine_bytes_read != want_combine) {
    throw std::runtime_error("Group::traffic() reports " + std::to_string(t.dispatch_bytes_sent) + " dispatch / " +
                             std::to_string(t.combine_bytes_read) + " combine bytes, the bench counts " +
                             std::to_string(want_dispatch) + " / " + std::to_string(want_combine));
  }
}

RankOps MoedistRank::ops() {
  return {[this] { dispatch(); }, [this] { combine(); }};
}

void MoedistRank::dispatch() { result_ = group_.dispatch(in_.x, in_.expert_ids, options_); }

void MoedistRank::combine() {
  CombineOptions options;
  options.tp_send_counts = result_.tp_recv_counts;  // absent without a TP domain
  group_.combine(expert_out_, in_.expert_ids, result_.expand_idx, result_.ep_recv_counts, in_.expert_scales, options);
}

}  // namespace moedist::bench
