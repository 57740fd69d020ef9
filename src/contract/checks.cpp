#include "contract/checks.h"

#include <cstdint>
#include <initializer_list>
#include <utility>
#include <vector>

#include "common/format.h"
#include "contract/token_mask.h"
#include "contract/v2_routing.h"

namespace moedist::contract {

std::string shape_text(const Layout& v) {
  if (v.ndim == 0) return "None";
  if (v.ndim == 1) return concat("(", v.shape[0], ",)");
  return concat("(", v.shape[0], ", ", v.shape[1], ")");
}

namespace {

void require_present(const char* name, const Layout& v) {
  if (!v.present()) fail(ErrorCode::invalid_argument, name, "None", "is required");
}

void require_absent(const char* name, const Layout& v, const char* why) {
  if (v.present()) fail(ErrorCode::invalid_argument, name, shape_text(v), why);
}

template <class View>
void require_dtype(const char* name, const View& v, DType want) {
  if (v.dtype != want)
    fail(ErrorCode::invalid_dtype, concat(name, ".dtype"), std::string(dtype_name(v.dtype)),
         concat("must be ", dtype_name(want)));
}

template <class View>
void require_half(const char* name, const View& v) {
  if (v.dtype != DType::bf16 && v.dtype != DType::fp16)
    fail(ErrorCode::invalid_dtype, concat(name, ".dtype"), std::string(dtype_name(v.dtype)),
         "must be bfloat16 or float16");
}

void require_ndim(const char* name, const Layout& v, int ndim) {
  if (v.ndim != ndim) fail(ErrorCode::invalid_shape, concat(name, ".shape"), shape_text(v), concat("must be ", ndim, "-D"));
}

template <class View>
void require_data(const char* name, const View& v) {
  if (v.numel() > 0 && v.data == nullptr)
    fail(ErrorCode::invalid_argument, concat(name, ".data"), "nullptr", concat("a tensor of shape ", shape_text(v), " needs data"));
  if (v.shape[0] < 0 || (v.ndim == 2 && v.shape[1] < 0))
    fail(ErrorCode::invalid_shape, concat(name, ".shape"), shape_text(v), "extents must be >= 0");
}

void require_matrix(const char* name, const Layout& v, std::int64_t rows, std::int64_t cols) {
  if (v.ndim != 2 || v.shape[0] != rows || v.shape[1] != cols)
    fail(ErrorCode::invalid_shape, concat(name, ".shape"), shape_text(v), concat("must be (", rows, ", ", cols, ")"));
}

void require_vector_len(const char* name, const Layout& v, std::int64_t len) {
  if (v.ndim != 1 || v.shape[0] != len)
    fail(ErrorCode::invalid_shape, concat(name, ".shape"), shape_text(v), concat("must be (", len, ",)"));
}

void require_vector_min(const char* name, const Layout& v, std::int64_t len) {
  if (v.ndim != 1 || v.shape[0] < len)
    fail(ErrorCode::invalid_shape, concat(name, ".shape"), shape_text(v), concat("must be 1-D with at least ", len, " entries"));
}

// The dtype, shape and data rules of one tensor, in the order their errors are reported.
template <class View>
void require_matrix_of(const char* name, const View& v, DType dtype, std::int64_t rows, std::int64_t cols) {
  require_dtype(name, v, dtype);
  require_matrix(name, v, rows, cols);
  require_data(name, v);
}

template <class View>
void require_vector_of(const char* name, const View& v, DType dtype, std::int64_t len) {
  require_dtype(name, v, dtype);
  require_vector_len(name, v, len);
  require_data(name, v);
}

template <class View>
void require_vector_of_at_least(const char* name, const View& v, DType dtype, std::int64_t min_len) {
  require_dtype(name, v, dtype);
  require_vector_min(name, v, min_len);
  require_data(name, v);
}

// The same for an optional tensor (a caller's output buffer, an accepted extra): only when it is given.
template <class View>
void optional_vector_of(const char* name, const View& v, DType dtype, std::int64_t len) {
  if (v.present()) require_vector_of(name, v, dtype, len);
}

template <class View>
void optional_vector_of_at_least(const char* name, const View& v, DType dtype, std::int64_t min_len) {
  if (v.present()) require_vector_of_at_least(name, v, dtype, min_len);
}

// x of dispatch, expand_x of combine: (rows, H) bfloat16 or float16 with H >= 1. Returns H.
std::int64_t check_token_rows(const char* name, const TensorView& v) {
  require_present(name, v);
  require_ndim(name, v, 2);
  require_half(name, v);
  require_data(name, v);
  const std::int64_t h = v.cols();
  if (h < 1) fail(ErrorCode::invalid_shape, concat(name, ".shape[1] (H)"), concat(h), "must be >= 1");
  return h;
}

// expert_ids of dispatch has a row for each row of x; its other rules follow with the routing checks.
void require_ids_row_per_token(const TensorView& ids, std::int64_t bs) {
  require_present("expert_ids", ids);
  require_ndim("expert_ids", ids, 2);
  if (ids.rows() != bs)
    fail(ErrorCode::invalid_shape, "expert_ids.shape", shape_text(ids),
         concat("must have BS = x.shape[0] = ", bs, " rows"));
}

// expert_ids as a tensor: (BS, K) int32 with data.
void require_ids_tensor(const TensorView& ids) {
  require_present("expert_ids", ids);
  require_ndim("expert_ids", ids, 2);
  require_dtype("expert_ids", ids, DType::int32);
  require_data("expert_ids", ids);
}

// global_bs (0: every rank has the same BS) must cover the BS of all ranks; `bs_times_world` is
// BS * ep_world_size as the caller computes it.
void require_global_bs_covers(const GroupConfig& c, std::int64_t bs, std::int64_t bs_times_world) {
  if (c.global_bs != 0 && bs_times_world > c.global_bs)
    fail_value(
        "global_bs", c.global_bs,
        concat("must be >= BS * ep_world_size = ", bs, " * ", c.ep_world_size, " (BS of this rank is ", bs, ")"));
}

// quant_mode and the static scales of dispatch; `scale_rows` is the rows scales must have.
void check_quant_mode_and_scales(int quant_mode, const TensorView& scales, std::int64_t scale_rows, std::int64_t h) {
  if (quant_mode == 1)
    fail(ErrorCode::unsupported, "quant_mode", "1",
         "static quantization is not supported (0 = none, 2 = dynamic int8)");
  if (quant_mode != 0 && quant_mode != 2) fail_value("quant_mode", quant_mode, "must be 0 (none) or 2 (dynamic int8)");
  if (scales.present()) {
    if (quant_mode == 0)
      fail(ErrorCode::invalid_argument, "scales", shape_text(scales), "must be None with quant_mode 0");
    require_matrix_of("scales", scales, DType::fp32, scale_rows, h);
  }
}

void check_expert_token_nums_type(int type) {
  if (type != 0 && type != 1) fail_value("expert_token_nums_type", type, "must be 0 (prefix sums) or 1 (counts)");
}

// out.expand_x of dispatch: at least `rows` rows of H (int8 when quantized, else x's dtype).
void check_expand_x_out(const MutableTensorView& expand_x, DType dtype, std::int64_t rows, std::int64_t h) {
  if (!expand_x.present()) return;
  require_dtype("out.expand_x", expand_x, dtype);
  if (expand_x.ndim != 2 || expand_x.shape[0] < rows || expand_x.shape[1] != h)
    fail(ErrorCode::invalid_shape, "out.expand_x.shape", shape_text(expand_x),
         concat("must be (>= A * max(tp_world_size, 1) = ", rows, ", H = ", h, ")"));
  require_data("out.expand_x", expand_x);
}

// expert_token_nums: the tokens of each expert of this rank.
void check_expert_token_nums_out(const GroupConfig& c, const Topology& topo, const MutableTensorView& v) {
  optional_vector_of("out.expert_token_nums", v, DType::int64, topo.local_experts(c.ep_rank_id));
}

// tp_recv_counts: two entries, and only with a TP domain.
void check_tp_recv_counts_out(const GroupConfig& c, const MutableTensorView& v) {
  if (!v.present()) return;
  if (c.tp_world_size != 2)
    fail(ErrorCode::invalid_argument, "out.tp_recv_counts", shape_text(v), "is only produced with tp_world_size = 2");
  require_vector_of("out.tp_recv_counts", v, DType::int32, 2);
}

// expert_ids: ids in [0, E), K distinct values per row (§3.1).
// The bytes a view spans, [first, last); empty for an absent or empty view. Strides are non-negative.
struct Span {
  std::uintptr_t first = 0, last = 0;
};
Span span_of(const void* data, const Layout& v, DType dtype) {
  if (!v.present() || v.numel() == 0 || data == nullptr) return {};
  const std::int64_t last_index = (v.rows() - 1) * v.strides[0] + (v.ndim == 2 ? (v.cols() - 1) * v.strides[1] : 0);
  const auto first = reinterpret_cast<std::uintptr_t>(data);
  return {first, first + static_cast<std::uintptr_t>(last_index + 1) * dtype_size(dtype)};
}

// An output buffer may not share memory with any input: the operator would overwrite what it still
// has to read, and what a result holds would depend on the order of the writes.
void require_no_alias(const char* output, const MutableTensorView& out, std::initializer_list<std::pair<const char*, TensorView>> inputs) {
  const Span o = span_of(out.data, out, out.dtype);
  if (o.first == o.last) return;
  for (const auto& [name, in] : inputs) {
    const Span i = span_of(in.data, in, in.dtype);
    if (i.first < o.last && o.first < i.last) {
      fail(ErrorCode::invalid_argument, output, shape_text(out), concat("shares memory with the input ", name, ": outputs must not alias inputs"));
    }
  }
}

// Only the rows of active tokens are read (an inactive token's ids are never looked at, as on the NPU).
void check_expert_ids(const TensorView& ids, int E, std::int64_t active) {
  const std::int64_t k = ids.cols();
  std::vector<std::int64_t> last_row(static_cast<std::size_t>(E), -1);
  for (std::int64_t b = 0; b < active; ++b) {
    for (std::int64_t j = 0; j < k; ++j) {
      const std::int32_t e = ids.at<std::int32_t>(b, j);
      if (e < 0 || e >= E)
        fail(ErrorCode::invalid_argument, concat("expert_ids[", b, ", ", j, "]"), concat(e),
             concat("must be in [0, moe_expert_num = ", E, ")"));
      if (last_row[static_cast<std::size_t>(e)] == b)
        fail(ErrorCode::invalid_argument, concat("expert_ids[", b, ", ", j, "]"), concat(e),
             concat("the K ids of a row must be distinct; row ", b, " repeats it"));
      last_row[static_cast<std::size_t>(e)] = b;
    }
  }
}

// Shape rules shared by dispatch and combine: expert_ids (BS, K) int32 with 1 <= K <= E, and the
// per-call limits of the Ascend profiles. Returns the number of active tokens (x_active_mask).
std::int64_t check_ids_and_profile(const GroupConfig& c, const TensorView& ids, const TensorView& mask, std::int64_t h,
                                   Values values) {
  require_ids_tensor(ids);
  const std::int64_t bs = ids.rows(), k = ids.cols();
  if (k < 1 || k > c.moe_expert_num)
    fail(ErrorCode::invalid_shape, "expert_ids.shape[1] (K)", concat(k), concat("must be in [1, moe_expert_num = ", c.moe_expert_num, "]"));
  require_global_bs_covers(c, bs, bs * c.ep_world_size);
  check_profile_call_limits(c, bs, k, h);
  const std::int64_t active = check_token_mask(c, mask, bs, values);
  if (values == Values::on_host) check_expert_ids(ids, c.moe_expert_num, active);
  return active;
}

// expand_idx holds BS * K entries in row-major order. The documented shape is (BS * K,), which the A3
// kernel checks; the A2 path and torch_npu's wrapper do not, so programs pass dispatch's (BS, K)-shaped
// copy there, and any 2-D shape of BS * K elements is read the same way.
void check_expand_idx_shape(const GroupConfig& c, const TensorView& expand_idx, std::int64_t bs, std::int64_t k) {
  if (c.profile == Profile::ascend_a3 || expand_idx.ndim == 1)
    return require_vector_len("expand_idx", expand_idx, bs * k);
  std::int64_t elements = 0;  // without overflow: a shape whose product wraps must not pass as BS * K
  if (expand_idx.ndim != 2 || expand_idx.shape[0] < 0 || expand_idx.shape[1] < 0 ||
      __builtin_mul_overflow(expand_idx.shape[0], expand_idx.shape[1], &elements) || elements != bs * k)
    fail(ErrorCode::invalid_shape, "expand_idx.shape", shape_text(expand_idx),
         concat("must hold BS * K = ", bs * k, " entries in row-major order: (", bs * k, ",) or e.g. (", bs, ", ", k,
                ")"));
}

// A dispatch output buffer must not overlap any of dispatch's inputs (both versions take the same ones).
template <class Options>
void require_dispatch_output_apart(const char* name, const MutableTensorView& buffer, const TensorView& x,
                                   const TensorView& ids, const Options& o) {
  require_no_alias(name, buffer,
                   {{"x", x},
                    {"expert_ids", ids},
                    {"scales", o.scales},
                    {"expert_scales", o.expert_scales},
                    {"x_active_mask", o.x_active_mask}});
}

// expert_scales of combine, where it is required: (BS, K) float32.
void require_combine_expert_scales(const TensorView& expert_scales, std::int64_t bs, std::int64_t k) {
  require_present("expert_scales", expert_scales);
  require_matrix_of("expert_scales", expert_scales, DType::fp32, bs, k);
}

// The count inputs of combine: ep_send_counts (dispatch's ep_recv_counts, at least `full_len`
// entries), comm_quant_mode, and tp_send_counts (dispatch's tp_recv_counts) with a TP domain.
void check_combine_count_inputs(const GroupConfig& c, const Topology& topo, const TensorView& ep_send_counts,
                                int full_len, int comm_quant_mode, const TensorView& tp_send_counts) {
  require_present("ep_send_counts", ep_send_counts);
  require_vector_of_at_least("ep_send_counts", ep_send_counts, DType::int32, full_len);
  if (comm_quant_mode != 0 && comm_quant_mode != 2)
    fail_value("comm_quant_mode", comm_quant_mode, "must be 0 (none) or 2 (int8)");
  if (comm_quant_mode != 0 && c.tp_world_size == 2)
    fail_value("comm_quant_mode", comm_quant_mode, "must be 0 with a TP domain (tp_world_size = 2)");
  if (topo.T == 2) {
    require_present("tp_send_counts", tp_send_counts);
    require_vector_of("tp_send_counts", tp_send_counts, DType::int32, 2);
  }
}

// expand_x holds at least the `needed` rows that the counts describe.
void require_rows_of_counts(const Topology& topo, const TensorView& expand_x, std::int64_t needed) {
  if (expand_x.rows() < needed)
    fail(ErrorCode::invalid_shape, "expand_x.shape", shape_text(expand_x),
         concat("must have at least the ", needed, " valid rows that ep_send_counts",
                topo.T == 2 ? " and tp_send_counts" : "", " describe"));
}

// With a TP domain, tp_send_counts names the same own and peer rows as ep_send_counts.
void require_tp_send_counts_match(const GroupConfig& c, const TensorView& tp_send_counts, const CombineCounts& counts) {
  const std::int32_t self = tp_send_counts.at<std::int32_t>(c.tp_rank_id);
  const std::int32_t peer = tp_send_counts.at<std::int32_t>(1 - c.tp_rank_id);
  if (self != counts.own_rows || peer != counts.peer_rows)
    fail(ErrorCode::invalid_argument, "tp_send_counts",
         concat("[", tp_send_counts.at<std::int32_t>(0), ", ", tp_send_counts.at<std::int32_t>(1), "]"),
         concat("must match ep_send_counts (own rows ", counts.own_rows, " at tp_rank_id ", c.tp_rank_id,
                ", peer rows ", counts.peer_rows, ")"));
}

// The combined result may go to the caller's buffer: (BS, H) of expand_x's dtype.
void check_combine_out(const MutableTensorView& out, DType dtype, std::int64_t bs, std::int64_t h) {
  if (out.present()) require_matrix_of("out", out, dtype, bs, h);
}

void check_reserved_combine_options(const CombineOptions& o) {
  require_absent("activation_scale", o.activation_scale, "is reserved and must be None");
  require_absent("weight_scale", o.weight_scale, "is reserved and must be None");
  require_absent("group_list", o.group_list, "is reserved and must be None");
  require_absent("shared_expert_x", o.shared_expert_x, "is reserved in the V1 operators and must be None");
  if (o.out_dtype != 0) fail_value("out_dtype", o.out_dtype, "is reserved and must be 0");
  if (o.group_list_type != 0) fail_value("group_list_type", o.group_list_type, "is reserved and must be 0");
}

// expand_scales (accepted, not used) and the caller's output buffer; `needed` rows of expand_scales.
void check_combine_side_buffers(const TensorView& expand_x, const TensorView& ids, const TensorView& expand_idx,
                                const TensorView& ep_send_counts, const TensorView& expert_scales, const CombineOptions& o,
                                std::int64_t bs, std::int64_t h, std::int64_t needed) {
  optional_vector_of_at_least("expand_scales", o.expand_scales, DType::fp32, needed);
  check_combine_out(o.out, expand_x.dtype, bs, h);
  if (o.out.present()) {
    require_no_alias("out", o.out,
                     {{"expand_x", expand_x},
                      {"expert_ids", ids},
                      {"expand_idx", expand_idx},
                      {"ep_send_counts", ep_send_counts},
                      {"expert_scales", expert_scales},
                      {"tp_send_counts", o.tp_send_counts},
                      {"x_active_mask", o.x_active_mask}});
  }
}

}  // namespace

void check_profile_call_limits(const GroupConfig& c, std::int64_t bs, std::int64_t k, std::int64_t h, int version) {
  if (version == 2 && c.profile == Profile::ascend_a3) {  // V2 §7.1
    if (h < 1024 || h > 8192) fail_value("H", h, "profile ascend_a3 allows 1024 <= H <= 8192 in the V2 operators");
    if (k > 16) fail_value("K", k, "profile ascend_a3 allows K <= 16");
    if (bs < 1 || bs > 512) fail_value("BS", bs, "profile ascend_a3 allows 1 <= BS <= 512");
  } else if (c.profile == Profile::ascend_a3) {
    if (h != 7168) fail_value("H", h, "profile ascend_a3 needs H == 7168");
    if (k > 8) fail_value("K", k, "profile ascend_a3 allows K <= 8");
    if (bs < 1 || bs > 512) fail_value("BS", bs, "profile ascend_a3 allows 1 <= BS <= 512");
  } else if (c.profile == Profile::ascend_a2) {
    if (h % 32 != 0 || h > 7168) fail_value("H", h, "profile ascend_a2 needs H % 32 == 0 and H <= 7168");
    if (k > 16) fail_value("K", k, "profile ascend_a2 allows K <= 16");
    if (bs < 1 || bs > 256) fail_value("BS", bs, "profile ascend_a2 allows 1 <= BS <= 256");
  }
}

CallShape check_dispatch(const GroupConfig& c, const TensorView& x, const TensorView& ids, const DispatchOptions& o,
                         Values values) {
  check_v1_config(c);
  const std::int64_t h = check_token_rows("x", x);
  const std::int64_t bs = x.rows();
  require_ids_row_per_token(ids, bs);
  const std::int64_t active = check_ids_and_profile(c, ids, o.x_active_mask, h, values);
  const std::int64_t k = ids.cols();

  check_quant_mode_and_scales(o.quant_mode, o.scales, c.moe_expert_num + (c.shared_expert_rank_num > 0 ? 1 : 0), h);
  if (o.expert_scales.present()) {
    if (c.profile == Profile::ascend_a3)
      fail(ErrorCode::invalid_argument, "expert_scales", shape_text(o.expert_scales), "profile ascend_a3 does not support it (must be None)");
    require_matrix_of("expert_scales", o.expert_scales, DType::fp32, bs, k);
  }
  check_expert_token_nums_type(o.expert_token_nums_type);

  // Caller output buffers: dtype and at least the shapes torch_npu allocates.
  const Topology topo(c);
  const std::int64_t rows = topo.capacity_a(c.ep_rank_id, bs, k) * topo.T;
  const DispatchOutputs& out = o.out;
  check_expand_x_out(out.expand_x, o.quant_mode == 2 ? DType::int8 : x.dtype, rows, h);
  optional_vector_of_at_least("out.dynamic_scales", out.dynamic_scales, DType::fp32, rows);
  optional_vector_of_at_least("out.expand_scales", out.expand_scales, DType::fp32, rows);
  optional_vector_of("out.expand_idx", out.expand_idx, DType::int32, bs * k);
  check_expert_token_nums_out(c, topo, out.expert_token_nums);
  optional_vector_of_at_least("out.ep_recv_counts", out.ep_recv_counts, DType::int32,
                              topo.ep_recv_counts_len(c.ep_rank_id));
  check_tp_recv_counts_out(c, out.tp_recv_counts);
  for (const auto& [name, buffer] : {std::pair<const char*, const MutableTensorView*>{"out.expand_x", &out.expand_x},
                                     {"out.dynamic_scales", &out.dynamic_scales}, {"out.expand_scales", &out.expand_scales},
                                     {"out.expand_idx", &out.expand_idx}, {"out.expert_token_nums", &out.expert_token_nums},
                                     {"out.ep_recv_counts", &out.ep_recv_counts}, {"out.tp_recv_counts", &out.tp_recv_counts}}) {
    require_dispatch_output_apart(name, *buffer, x, ids, o);
  }
  return CallShape{bs, k, h, active};
}

CallShape check_combine(const GroupConfig& c, const TensorView& expand_x, const TensorView& ids,
                        const TensorView& expand_idx, const TensorView& ep_send_counts,
                        const TensorView& expert_scales, const CombineOptions& o, CombineCounts* counts,
                        Values values) {
  check_v1_config(c);
  const std::int64_t h = check_token_rows("expand_x", expand_x);
  const std::int64_t active = check_ids_and_profile(c, ids, o.x_active_mask, h, values);
  const std::int64_t bs = ids.rows(), k = ids.cols();
  const bool read_values = values == Values::on_host;

  require_present("expand_idx", expand_idx);
  require_dtype("expand_idx", expand_idx, DType::int32);
  check_expand_idx_shape(c, expand_idx, bs, k);
  require_data("expand_idx", expand_idx);
  for (std::int64_t t = 0; read_values && t < active * k; ++t) {
    const std::int32_t v = expand_idx.flat<std::int32_t>(t);
    if (v < 0) fail_value(concat("expand_idx[", t, "]"), v, "must be >= 0 (use dispatch's expand_idx)");
  }

  require_combine_expert_scales(expert_scales, bs, k);

  const Topology topo(c);
  const int own_len = topo.W * topo.local_experts(c.ep_rank_id);
  const int full_len = topo.ep_recv_counts_len(c.ep_rank_id);
  check_combine_count_inputs(c, topo, ep_send_counts, full_len, o.comm_quant_mode, o.tp_send_counts);
  check_reserved_combine_options(o);
  if (!read_values) {  // the GPU checks the counts against dispatch's
    counts->own_rows = counts->peer_rows = -1;
    check_combine_side_buffers(expand_x, ids, expand_idx, ep_send_counts, expert_scales, o, bs, h, 0);
    return CallShape{bs, k, h, active};
  }
  // Each half is an inclusive prefix sum: non-negative and non-decreasing.
  for (int half = 0; half * own_len < full_len; ++half) {
    std::int32_t prev = 0;
    for (int i = half * own_len; i < (half + 1) * own_len; ++i) {
      const std::int32_t v = ep_send_counts.at<std::int32_t>(i);
      if (v < prev)
        fail_value(concat("ep_send_counts[", i, "]"), v,
                   concat("must be a non-decreasing prefix sum (previous entry ", prev, "); use dispatch's ep_recv_counts"));
      prev = v;
    }
  }
  const std::int64_t most = topo.receive_rows(c.ep_rank_id, bs, k);
  for (int i = 0; i < full_len; ++i) {
    const std::int32_t v = ep_send_counts.at<std::int32_t>(i);
    if (v > most)
      fail_value(concat("ep_send_counts[", i, "]"), v,
                 concat("exceeds the ", most, " rows this rank can receive; use dispatch's ep_recv_counts"));
  }
  counts->own_rows = ep_send_counts.at<std::int32_t>(own_len - 1);
  counts->peer_rows = topo.T == 2 ? ep_send_counts.at<std::int32_t>(full_len - 1) : 0;
  const std::int64_t needed = counts->own_rows + counts->peer_rows;
  require_rows_of_counts(topo, expand_x, needed);
  if (topo.is_shared(c.ep_rank_id) && ep_send_counts.at<std::int32_t>(topo.S - 1) != active)
    fail_value(concat("ep_send_counts[", topo.S - 1, "]"), ep_send_counts.at<std::int32_t>(topo.S - 1),
               concat("on a shared-expert rank it must equal this rank's ",
                      o.x_active_mask.present() ? "active tokens" : "BS", " = ", active, " (its own rows come first)"));

  if (topo.T == 2) require_tp_send_counts_match(c, o.tp_send_counts, *counts);

  check_combine_side_buffers(expand_x, ids, expand_idx, ep_send_counts, expert_scales, o, bs, h, needed);
  return CallShape{bs, k, h, active};
}

namespace {

// zero/copy/const_expert_num (V2 §3.4, §7.1).
SpecialExperts check_special_experts(const GroupConfig& c, int zero, int copy, int constant) {
  if (zero < 0) fail_value("zero_expert_num", zero, "must be >= 0");
  if (copy < 0) fail_value("copy_expert_num", copy, "must be >= 0");
  if (constant < 0) fail_value("const_expert_num", constant, "must be >= 0");
  SpecialExperts ex{c.moe_expert_num, zero, copy, constant};
  if (ex.id_limit() > INT32_MAX)
    fail_value("const_expert_num", constant,
               concat("moe_expert_num + zero_expert_num + copy_expert_num + const_expert_num = ", ex.id_limit(),
                      " must be <= 2147483647"));
  if (c.profile == Profile::ascend_a2 && ex.any())
    fail(ErrorCode::invalid_argument,
         zero > 0   ? "zero_expert_num"
         : copy > 0 ? "copy_expert_num"
                    : "const_expert_num",
         concat(zero > 0   ? zero
                : copy > 0 ? copy
                           : constant),
         "profile ascend_a2 has no special experts (must be 0)");
  return ex;
}

// comm_alg (V2 §5.3): the documented names, which all give the same results here. The Ascend profiles
// take their platform's names and the combinations its kernels accept: on A3, fullmesh_v2 has no mask,
// no special experts, no TP, equal BS, K <= 12 and BS <= 256, and hierarchy no TP, no shared-expert
// ranks, no (BS, K) mask and no special experts, and needs expert_scales in dispatch.
void check_comm_alg(const GroupConfig& c, std::string_view alg, std::int64_t bs, std::int64_t k, const EntryMask& mask,
                    const SpecialExperts& experts, bool dispatch_without_expert_scales) {
  const auto refuse = [&](const std::string& rule) {
    fail(ErrorCode::invalid_argument, "comm_alg", concat("\"", std::string(alg), "\""), rule);
  };
  if (c.profile == Profile::ascend_a3) {
    if (alg != "" && alg != "fullmesh_v1" && alg != "fullmesh_v2" && alg != "hierarchy")
      refuse("profile ascend_a3 takes \"\", \"fullmesh_v1\", \"fullmesh_v2\" or \"hierarchy\"");
    if (alg == "fullmesh_v2") {
      if (mask.kind != EntryMask::Kind::none) refuse("fullmesh_v2 takes no x_active_mask (profile ascend_a3)");
      if (experts.any()) refuse("fullmesh_v2 takes no zero, copy or const experts (profile ascend_a3)");
      if (c.tp_world_size == 2) refuse("fullmesh_v2 has no TP domain (profile ascend_a3)");
      if (c.global_bs != 0 && c.global_bs != sat_mul(bs, c.ep_world_size))
        refuse("fullmesh_v2 needs the same BS on every rank (global_bs 0 or BS * ep_world_size; profile ascend_a3)");
      if (k > 12) refuse(concat("fullmesh_v2 allows K <= 12, not ", k, " (profile ascend_a3)"));
      if (bs > 256) refuse(concat("fullmesh_v2 allows BS <= 256, not ", bs, " (profile ascend_a3)"));
    } else if (alg == "hierarchy") {
      if (c.tp_world_size == 2) refuse("hierarchy has no TP domain (profile ascend_a3)");
      if (c.shared_expert_rank_num != 0) refuse("hierarchy has no shared-expert ranks (profile ascend_a3)");
      if (mask.kind == EntryMask::Kind::entries) refuse("hierarchy takes no (BS, K) x_active_mask (profile ascend_a3)");
      if (experts.any()) refuse("hierarchy takes no zero, copy or const experts (profile ascend_a3)");
      if (dispatch_without_expert_scales) refuse("hierarchy needs expert_scales (profile ascend_a3)");
    }
    return;
  }
  if (c.profile == Profile::ascend_a2) {
    if (alg != "" && alg != "0" && alg != "fullmesh" && alg != "hierarchy")
      refuse("profile ascend_a2 takes \"\", \"0\", \"fullmesh\" or \"hierarchy\"");
    return;
  }
  static constexpr std::string_view kNames[] = {"", "0", "fullmesh", "fullmesh_v1", "fullmesh_v2", "hierarchy"};
  for (std::string_view name : kNames)
    if (alg == name) return;
  refuse("must be one of \"\", \"0\", \"fullmesh\", \"fullmesh_v1\", \"fullmesh_v2\", \"hierarchy\"");
}

void check_performance_info(const GroupConfig& c, const MutableTensorView& perf) {
  optional_vector_of("performance_info", perf, DType::int64, c.ep_world_size);
}

// expert_ids and the mask of a V2 call: (BS, K) int32, 1 <= K <= E + Z + C + Q; every entry that takes
// part names an expert in [0, E + Z + C + Q) (an id past the special experts, which the kernel drops
// silently, and a negative one, which it would send nowhere, are refused), distinct within its row.
// Entries that do not take part are never read (none on_device). Returns the shape, with the active tokens.
CallShape check_v2_routing(const GroupConfig& c, const TensorView& ids, const TensorView& mask_view, std::int64_t h,
                           const SpecialExperts& ex, EntryMask* mask, Values values) {
  require_ids_tensor(ids);
  const std::int64_t bs = ids.rows(), k = ids.cols();
  if (k < 1 || k > ex.id_limit())
    fail(ErrorCode::invalid_shape, "expert_ids.shape[1] (K)", concat(k),
         concat("must be in [1, moe_expert_num + zero, copy and const experts = ", ex.id_limit(), "]"));
  require_global_bs_covers(c, bs, sat_mul(bs, c.ep_world_size));
  check_profile_call_limits(c, bs, k, h, 2);
  *mask = check_entry_mask(c, mask_view, bs, k, values);
  std::int64_t active = 0;
  if (values == Values::on_device) return CallShape{bs, k, h, bs, 2};
  for (std::int64_t b = 0; b < bs; ++b) {
    if (!mask->token_on(b)) continue;
    ++active;
    for (std::int64_t j = 0; j < k; ++j) {
      if (!mask->entry_on(b, j)) continue;
      const std::int32_t e = ids.at<std::int32_t>(b, j);
      if (e < 0 || e >= ex.id_limit())
        fail(ErrorCode::invalid_argument, concat("expert_ids[", b, ", ", j, "]"), concat(e),
             ex.any() ? concat("must be in [0, moe_expert_num + zero, copy and const experts = ", ex.id_limit(), ")")
                      : concat("must be in [0, moe_expert_num = ", c.moe_expert_num, ")"));
      for (std::int64_t i = 0; i < j; ++i) {
        if (mask->entry_on(b, i) && ids.at<std::int32_t>(b, i) == e)
          fail(ErrorCode::invalid_argument, concat("expert_ids[", b, ", ", j, "]"), concat(e),
               concat("the ids a row routes must be distinct; row ", b, " repeats it"));
      }
    }
  }
  CallShape shape{bs, k, h, active, 2};
  return shape;
}

}  // namespace

CallShape check_dispatch_v2(const GroupConfig& c, const TensorView& x, const TensorView& ids,
                            const DispatchV2Options& o, EntryMask* mask, SpecialExperts* experts, Values values) {
  const std::int64_t h = check_token_rows("x", x);
  const std::int64_t bs = x.rows();
  require_ids_row_per_token(ids, bs);
  *experts = check_special_experts(c, o.zero_expert_num, o.copy_expert_num, o.const_expert_num);
  const CallShape shape = check_v2_routing(c, ids, o.x_active_mask, h, *experts, mask, values);
  const std::int64_t k = shape.k;
  const Topology topo(c);

  check_quant_mode_and_scales(o.quant_mode, o.scales, topo.Sn + c.moe_expert_num, h);
  if (o.expert_scales.present()) require_matrix_of("expert_scales", o.expert_scales, DType::fp32, bs, k);
  if (o.elastic_info.present())
    fail(ErrorCode::unsupported, "elastic_info", shape_text(o.elastic_info),
         "elastic scaling is not supported: must be None");
  check_performance_info(c, o.performance_info);
  check_comm_alg(c, o.comm_alg, bs, k, *mask, *experts, !o.expert_scales.present());
  check_expert_token_nums_type(o.expert_token_nums_type);

  const std::int64_t a = topo.capacity_a(c.ep_rank_id, bs, k, 2);
  const std::int64_t rows = sat_mul(a, static_cast<std::int64_t>(topo.T));
  const DispatchV2Outputs& out = o.out;
  check_expand_x_out(out.expand_x, o.quant_mode == 2 ? DType::int8 : x.dtype, rows, h);
  optional_vector_of_at_least("out.dynamic_scales", out.dynamic_scales, DType::fp32, rows);
  optional_vector_of_at_least("out.expand_scales", out.expand_scales, DType::fp32, rows);
  optional_vector_of_at_least("out.assist_info_for_combine", out.assist_info_for_combine, DType::int32,
                              sat_mul(a, std::int64_t{3}));
  check_expert_token_nums_out(c, topo, out.expert_token_nums);
  optional_vector_of_at_least("out.ep_recv_counts", out.ep_recv_counts, DType::int32,
                              topo.ep_recv_counts_len(c.ep_rank_id));
  check_tp_recv_counts_out(c, out.tp_recv_counts);
  for (const auto& [name, buffer] : {std::pair<const char*, const MutableTensorView*>{"out.expand_x", &out.expand_x},
                                     {"out.dynamic_scales", &out.dynamic_scales},
                                     {"out.expand_scales", &out.expand_scales},
                                     {"out.assist_info_for_combine", &out.assist_info_for_combine},
                                     {"out.expert_token_nums", &out.expert_token_nums},
                                     {"out.ep_recv_counts", &out.ep_recv_counts},
                                     {"out.tp_recv_counts", &out.tp_recv_counts},
                                     {"performance_info", &o.performance_info}}) {
    require_dispatch_output_apart(name, *buffer, x, ids, o);
  }
  return shape;
}

CallShape check_combine_v2(const GroupConfig& c, const TensorView& expand_x, const TensorView& ids,
                           const TensorView& assist, const TensorView& ep_send_counts, const TensorView& expert_scales,
                           const CombineV2Options& o, CombineCounts* counts, EntryMask* mask, SpecialExperts* experts,
                           Values values) {
  const std::int64_t h = check_token_rows("expand_x", expand_x);
  *experts = check_special_experts(c, o.zero_expert_num, o.copy_expert_num, o.const_expert_num);
  const CallShape shape = check_v2_routing(c, ids, o.x_active_mask, h, *experts, mask, values);
  const std::int64_t bs = shape.bs, k = shape.k;
  const Topology topo(c);

  if (expert_scales.present() || c.profile == Profile::ascend_a3) require_combine_expert_scales(expert_scales, bs, k);
  const int own_len = topo.W * topo.local_experts(c.ep_rank_id);
  const int full_len = topo.ep_recv_counts_len(c.ep_rank_id);
  check_combine_count_inputs(c, topo, ep_send_counts, full_len, o.comm_quant_mode, o.tp_send_counts);
  // Only the rows of each half (its last entry) are read, as by the kernels (V2 §4.1). On the device
  // the GPU compares them with dispatch's, and checks the rows and triples they imply.
  const bool read_values = values == Values::on_host;
  const std::int64_t most = topo.receive_rows(c.ep_rank_id, bs, k, 2);
  for (const int i : {own_len - 1, full_len - 1}) {
    if (!read_values) break;
    const std::int32_t v = ep_send_counts.at<std::int32_t>(i);
    if (v < 0 || v > most)
      fail_value(concat("ep_send_counts[", i, "]"), v,
                 concat("must be in [0, ", most, "], the rows this rank can receive; use dispatch's ep_recv_counts"));
  }
  counts->own_rows = read_values ? ep_send_counts.at<std::int32_t>(own_len - 1) : -1;
  counts->peer_rows = !read_values ? -1 : topo.T == 2 ? ep_send_counts.at<std::int32_t>(full_len - 1) : 0;
  const std::int64_t needed = read_values ? counts->own_rows + counts->peer_rows : 0;
  require_rows_of_counts(topo, expand_x, needed);
  if (topo.T == 2 && read_values) require_tp_send_counts_match(c, o.tp_send_counts, *counts);
  require_present("assist_info_for_combine", assist);
  require_dtype("assist_info_for_combine", assist, DType::int32);
  const std::int64_t triples = read_values ? sat_mul(counts->own_rows, std::int64_t{3}) : 0;
  if (c.profile == Profile::ascend_a3) {
    // The A3 combine tiling insists on 128 * A entries although it reads 3 per row (V2 §3.6).
    require_vector_min("assist_info_for_combine", assist,
                       sat_mul(topo.capacity_a(c.ep_rank_id, bs, k, 2), std::int64_t{128}));
  } else {
    require_vector_min("assist_info_for_combine", assist, triples);
  }
  require_data("assist_info_for_combine", assist);

  if (o.shared_expert_x.present()) {
    if (c.shared_expert_rank_num != 0)
      fail(ErrorCode::invalid_argument, "shared_expert_x", shape_text(o.shared_expert_x),
           concat("must be None with shared_expert_rank_num = ", c.shared_expert_rank_num,
                  " (the kernel adds it only without shared-expert ranks)"));
    require_matrix_of("shared_expert_x", o.shared_expert_x, expand_x.dtype, bs, h);
  }
  if (o.ori_x.present() || experts->copy + experts->constant > 0) {
    if (!o.ori_x.present())
      fail(ErrorCode::invalid_argument, "ori_x", "None",
           "is required with copy or const experts (copy_expert_num + const_expert_num > 0)");
    require_matrix_of("ori_x", o.ori_x, expand_x.dtype, bs, h);
  }
  for (const auto& [name, view] :
       {std::pair<const char*, const TensorView*>{"const_expert_alpha_1", &o.const_expert_alpha_1},
        {"const_expert_alpha_2", &o.const_expert_alpha_2},
        {"const_expert_v", &o.const_expert_v}}) {
    if (experts->constant == 0) {
      require_absent(name, *view, "must be None without const experts (const_expert_num = 0)");
      continue;
    }
    if (!view->present()) fail(ErrorCode::invalid_argument, name, "None", "is required with const experts");
    require_matrix_of(name, *view, expand_x.dtype, experts->constant, h);
  }
  if (o.elastic_info.present())
    fail(ErrorCode::unsupported, "elastic_info", shape_text(o.elastic_info),
         "elastic scaling is not supported: must be None");
  check_performance_info(c, o.performance_info);
  check_comm_alg(c, o.comm_alg, bs, k, *mask, *experts, false);
  optional_vector_of_at_least("expand_scales", o.expand_scales, DType::fp32, needed);
  for (const auto& [name, buffer] :
       {std::pair<const char*, const MutableTensorView*>{"out", &o.out}, {"performance_info", &o.performance_info}}) {
    if (name == std::string_view("out")) check_combine_out(o.out, expand_x.dtype, bs, h);
    require_no_alias(name, *buffer,
                     {{"expand_x", expand_x},
                      {"expert_ids", ids},
                      {"assist_info_for_combine", assist},
                      {"ep_send_counts", ep_send_counts},
                      {"expert_scales", expert_scales},
                      {"tp_send_counts", o.tp_send_counts},
                      {"x_active_mask", o.x_active_mask},
                      {"ori_x", o.ori_x},
                      {"shared_expert_x", o.shared_expert_x},
                      {"const_expert_alpha_1", o.const_expert_alpha_1},
                      {"const_expert_alpha_2", o.const_expert_alpha_2},
                      {"const_expert_v", o.const_expert_v}});
  }
  return shape;
}

}  // namespace moedist::contract
