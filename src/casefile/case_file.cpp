#include "casefile/case_file.h"

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <map>
#include <string_view>
#include <utility>

#include "casefile/safetensors.h"
#include "moedist/config.h"
#include "moedist/error.h"
#include "moedist/group.h"
#include "moedist/launch.h"
#include "moedist/shm.h"
#include "numeric/convert.h"
#include "process/rank_processes.h"

namespace moedist::casefile {
namespace {

// A sanity bound on W * max(T, 1): replay starts one thread per rank, and no deployment of the
// operators comes near this many ranks (the largest Ascend A3 EP domain is 288, times a TP of 2).
constexpr std::int64_t kMaxRanks = 4096;

constexpr std::string_view kOutputsFormat = "moedist-replay-outputs";
constexpr std::string_view kOutputsVersion = "1";

[[noreturn]] void fail(const std::string& where, const std::string& what) {
  throw Error(ErrorCode::case_file, where + ": " + what);
}

std::string tensor_name(int rank, std::string_view field) {
  return "rank" + std::to_string(rank) + "." + std::string(field);
}

std::string dtype_text(DType dtype) { return std::string(safetensors_dtype_name(dtype)); }

std::string shape_text(const Tensor& t) {
  if (!t.present()) return "(absent)";
  std::vector<std::int64_t> shape{t.rows()};
  if (t.ndim() == 2) shape.push_back(t.cols());
  return shape_to_string(shape);
}

// "rank12.expert_ids" -> (12, "expert_ids"). The rank is canonical decimal (no sign, no leading zero),
// so that one rank has exactly one spelling.
bool parse_tensor_name(std::string_view name, int* rank, std::string_view* field) {
  constexpr std::string_view kPrefix = "rank";
  if (name.substr(0, kPrefix.size()) != kPrefix) return false;
  name.remove_prefix(kPrefix.size());
  const std::size_t dot = name.find('.');
  if (dot == std::string_view::npos || dot == 0 || dot > 9) return false;
  const std::string_view digits = name.substr(0, dot);
  if (digits.size() > 1 && digits.front() == '0') return false;
  int value = 0;
  for (const char ch : digits) {
    if (ch < '0' || ch > '9') return false;
    value = value * 10 + (ch - '0');
  }
  *rank = value;
  *field = name.substr(dot + 1);
  return true;
}

// What a missing metadata key message says every case file, and every V2 one, needs.
constexpr const char* kCaseKeys =
    "a case file needs ep_world_size, tp_world_size, moe_expert_num, shared_expert_rank_num, shared_expert_num, "
    "global_bs, quant_mode, expert_token_nums_type, comm_quant_mode, dtype";
constexpr const char* kV2CaseKeys =
    "a V2 case file (op \"v2\") also needs zero_expert_num, copy_expert_num, const_expert_num and comm_alg";
// The metadata keys only V2 cases have (a V1 file that holds one is refused rather than half-read).
constexpr const char* kV2MetadataKeys[] = {"zero_expert_num", "copy_expert_num", "const_expert_num", "comm_alg"};

// A required metadata value; `needs` says which keys the file needs.
const std::string& metadata_value(const std::string& where, const std::map<std::string, std::string>& metadata,
                                  const char* key, const char* needs) {
  const auto it = metadata.find(key);
  if (it == metadata.end()) fail(where, std::string("missing metadata key '") + key + "' (" + needs + ")");
  return it->second;
}

// A metadata integer: the whole string must be a decimal integer within [min, max].
std::int64_t parse_metadata_int(const std::string& where, const std::map<std::string, std::string>& metadata,
                                const char* key, std::int64_t min, std::int64_t max, const char* needs = kCaseKeys) {
  const std::string& text = metadata_value(where, metadata, key, needs);
  std::int64_t value = 0;
  const char* first = text.data();
  const char* last = text.data() + text.size();
  const auto [end, ec] = std::from_chars(first, last, value);
  if (text.empty() || ec == std::errc::invalid_argument || end != last) {
    fail(where, std::string("metadata '") + key + "' is '" + text + "', not a decimal integer");
  }
  if (ec == std::errc::result_out_of_range || value < min || value > max) {
    fail(where, std::string("metadata '") + key + "' is " + text + ", outside [" + std::to_string(min) + ", " +
                    std::to_string(max) + "]");
  }
  return value;
}

int rank_count(const Case& c) { return c.ep_world_size * std::max(c.tp_world_size, 1); }

// Ranges every case must satisfy to be read, written or run. The MoE rules themselves (E a multiple of
// W - S, T in {0, 2}, ...) are left to the library, which names them precisely.
void check_scalars(const std::string& where, const Case& c) {
  const auto check = [&](const char* key, std::int64_t value, std::int64_t min, std::int64_t max) {
    if (value < min || value > max) {
      fail(where, std::string(key) + " is " + std::to_string(value) + ", outside [" + std::to_string(min) + ", " +
                      std::to_string(max) + "]");
    }
  };
  constexpr std::int64_t kIntMax = std::numeric_limits<int>::max();
  check("ep_world_size", c.ep_world_size, 1, kMaxRanks);
  check("tp_world_size", c.tp_world_size, 0, kMaxRanks);
  const std::int64_t ranks = std::int64_t{c.ep_world_size} * std::max(c.tp_world_size, 1);
  if (ranks > kMaxRanks) {
    fail(where, "ep_world_size " + std::to_string(c.ep_world_size) + " x max(tp_world_size, 1) " +
                    std::to_string(std::max(c.tp_world_size, 1)) + " = " + std::to_string(ranks) +
                    " ranks, more than the " + std::to_string(kMaxRanks) + " a case may hold");
  }
  check("moe_expert_num", c.moe_expert_num, 0, kIntMax);
  check("shared_expert_rank_num", c.shared_expert_rank_num, 0, kIntMax);
  check("shared_expert_num", c.shared_expert_num, 0, kIntMax);
  check("global_bs", c.global_bs, 0, std::numeric_limits<std::int64_t>::max());
  check("quant_mode", c.quant_mode, 0, kIntMax);
  check("expert_token_nums_type", c.expert_token_nums_type, 0, kIntMax);
  check("comm_quant_mode", c.comm_quant_mode, 0, kIntMax);
  if (c.dtype != DType::bf16 && c.dtype != DType::fp16) {
    fail(where, "dtype must be bfloat16 or float16, got " + dtype_text(c.dtype));
  }
  check("op", c.op, 1, 2);
  check("zero_expert_num", c.zero_expert_num, 0, kIntMax);
  check("copy_expert_num", c.copy_expert_num, 0, kIntMax);
  check("const_expert_num", c.const_expert_num, 0, kIntMax);
  if (c.op == 1) {  // the special experts and comm_alg are V2 inputs: a V1 case has none
    for (const auto& [key, value] : {std::pair<const char*, int>{"zero_expert_num", c.zero_expert_num},
                                     {"copy_expert_num", c.copy_expert_num},
                                     {"const_expert_num", c.const_expert_num}}) {
      if (value != 0) {
        fail(where, std::string(key) + " is " + std::to_string(value) +
                        ", but the case is op v1 (special experts are V2 inputs: op must be \"v2\")");
      }
    }
    if (!c.comm_alg.empty()) {
      fail(where,
           "comm_alg is '" + c.comm_alg + "', but the case is op v1 (comm_alg is a V2 input: op must be \"v2\")");
    }
  }
}

// The V2 combine inputs of one rank, each optional: (rows, H) tensors in the case dtype.
struct V2Input {
  std::string_view field;
  Tensor RankInputs::*tensor;
  bool per_token;  // (BS, H); else (const_expert_num, H)
};
constexpr V2Input kV2Inputs[] = {{"ori_x", &RankInputs::ori_x, true},
                                 {"shared_expert_x", &RankInputs::shared_expert_x, true},
                                 {"const_expert_alpha_1", &RankInputs::const_expert_alpha_1, false},
                                 {"const_expert_alpha_2", &RankInputs::const_expert_alpha_2, false},
                                 {"const_expert_v", &RankInputs::const_expert_v, false}};

// A V1 case has none of them; a V2 case's are (BS, H) or (Q, H) in the case dtype. Whether the
// operator needs one (ori_x with copy or const experts, ...) is its rule, checked when the case runs.
template <class Bad>
void check_v2_inputs(const Case& c, const RankInputs& in, std::int64_t bs, std::int64_t h, const Bad& bad) {
  for (const V2Input& input : kV2Inputs) {
    const Tensor& t = in.*input.tensor;
    if (!t.present()) continue;
    if (c.op != 2) {
      bad(input.field, "is a V2 input, but the case is op v1 (metadata 'op' absent or \"v1\"; \"v2\" for a V2 case)");
    }
    if (t.dtype() != c.dtype) {
      bad(input.field, "dtype " + dtype_text(t.dtype()) + " differs from the case dtype " + dtype_text(c.dtype));
    }
    const std::int64_t rows = input.per_token ? bs : c.const_expert_num;
    if (t.ndim() != 2 || t.rows() != rows || t.cols() != h) {
      bad(input.field, "shape " + shape_text(t) + " must be " +
                           (input.per_token ? "(BS, H) = (" : "(const_expert_num, H) = (") + std::to_string(rows) +
                           ", " + std::to_string(h) + ")");
    }
  }
}

// The structural rules of a case: every rank has x and expert_ids, dtypes and ranks are right, and
// the extents that must agree across tensors and ranks do.
void check_case(const std::string& where, const Case& c) {
  check_scalars(where, c);
  const int n = rank_count(c);
  if (static_cast<std::int64_t>(c.ranks.size()) != n) {
    fail(where, "the case has " + std::to_string(c.ranks.size()) + " ranks but ep_world_size x max(tp_world_size, 1) = " +
                    std::to_string(n));
  }
  std::int64_t h = -1;
  std::int64_t k = -1;
  for (int g = 0; g < n; ++g) {
    const RankInputs& in = c.ranks[static_cast<std::size_t>(g)];
    const auto bad = [&](std::string_view field, const std::string& rule) {
      fail(where, "tensor '" + tensor_name(g, field) + "': " + rule);
    };
    if (!in.x.present()) {
      fail(where, "missing tensor '" + tensor_name(g, "x") + "' (every rank 0.." + std::to_string(n - 1) +
                      " needs x and expert_ids)");
    }
    if (!in.expert_ids.present()) {
      fail(where, "missing tensor '" + tensor_name(g, "expert_ids") + "' (every rank 0.." + std::to_string(n - 1) +
                      " needs x and expert_ids)");
    }
    if (in.x.ndim() != 2) bad("x", "must be 2-D (BS, H), got shape " + shape_text(in.x));
    if (in.x.dtype() != c.dtype) {
      bad("x", "dtype " + dtype_text(in.x.dtype()) + " differs from the case dtype " + dtype_text(c.dtype));
    }
    if (h < 0) h = in.x.cols();
    if (in.x.cols() != h) {
      bad("x", "has H = " + std::to_string(in.x.cols()) + " but rank0.x has H = " + std::to_string(h) +
                   " (H must be the same on every rank)");
    }
    const std::int64_t bs = in.x.rows();

    if (in.expert_ids.ndim() != 2) bad("expert_ids", "must be 2-D (BS, K), got shape " + shape_text(in.expert_ids));
    if (in.expert_ids.dtype() != DType::int32) {
      bad("expert_ids", "dtype must be I32, got " + dtype_text(in.expert_ids.dtype()));
    }
    if (in.expert_ids.rows() != bs) {
      bad("expert_ids", "has " + std::to_string(in.expert_ids.rows()) + " rows but x has BS = " + std::to_string(bs));
    }
    if (k < 0) k = in.expert_ids.cols();
    if (in.expert_ids.cols() != k) {
      bad("expert_ids", "has K = " + std::to_string(in.expert_ids.cols()) + " but rank0.expert_ids has K = " +
                            std::to_string(k) + " (K must be the same on every rank)");
    }

    if (in.scales.present()) {
      if (in.scales.ndim() != 2) bad("scales", "must be 2-D (E[+1], H), got shape " + shape_text(in.scales));
      if (in.scales.dtype() != DType::fp32) bad("scales", "dtype must be F32, got " + dtype_text(in.scales.dtype()));
    }
    if (in.expert_scales.present()) {
      if (in.expert_scales.dtype() != DType::fp32) {
        bad("expert_scales", "dtype must be F32, got " + dtype_text(in.expert_scales.dtype()));
      }
      if (in.expert_scales.ndim() != 2 || in.expert_scales.rows() != bs || in.expert_scales.cols() != k) {
        bad("expert_scales", "shape " + shape_text(in.expert_scales) + " must equal expert_ids' shape " +
                                 shape_text(in.expert_ids));
      }
    }
    // Its values (trues first, for a (BS,) mask) are the operator's rule, checked when the case runs.
    if (in.x_active_mask.present()) {
      const Tensor& mask = in.x_active_mask;
      if (mask.dtype() != DType::boolean) bad("x_active_mask", "dtype must be BOOL, got " + dtype_text(mask.dtype()));
      const bool one_d = mask.ndim() == 1 && mask.rows() == bs;
      const bool two_d = mask.ndim() == 2 && mask.rows() == bs && mask.cols() == k;
      const std::string bs_shape = "(BS,) = (" + std::to_string(bs) + ",)";
      const std::string bsk_shape = "(BS, K) = (" + std::to_string(bs) + ", " + std::to_string(k) + ")";
      if (c.op == 2 && !one_d && !two_d) {
        bad("x_active_mask", "shape " + shape_text(mask) + " must be " + bs_shape + " or " + bsk_shape);
      }
      if (c.op == 1 && !one_d) {
        bad("x_active_mask", "shape " + shape_text(mask) + " must be " + bs_shape +
                                 (mask.ndim() == 2 ? " in a V1 case (a " + bsk_shape +
                                                         " mask is a V2 input: metadata 'op' must be \"v2\")"
                                                   : std::string()));
      }
    }
    check_v2_inputs(c, in, bs, h, bad);
    if (in.combine_x.present()) {
      if (in.combine_x.ndim() != 2) bad("combine_x", "must be 2-D (rows, H), got shape " + shape_text(in.combine_x));
      if (in.combine_x.dtype() != c.dtype) {
        bad("combine_x", "dtype " + dtype_text(in.combine_x.dtype()) + " differs from x's dtype " +
                             dtype_text(c.dtype));
      }
      if (in.combine_x.cols() != h) {
        bad("combine_x", "has " + std::to_string(in.combine_x.cols()) + " columns but H = " + std::to_string(h));
      }
    }
  }
}

Tensor* input_field(RankInputs& in, std::string_view field) {
  if (field == "x") return &in.x;
  if (field == "expert_ids") return &in.expert_ids;
  if (field == "scales") return &in.scales;
  if (field == "expert_scales") return &in.expert_scales;
  if (field == "x_active_mask") return &in.x_active_mask;
  if (field == "combine_x") return &in.combine_x;
  for (const V2Input& input : kV2Inputs) {
    if (field == input.field) return &(in.*input.tensor);
  }
  return nullptr;
}

Tensor* output_field(RankOutputs& out, std::string_view field) {
  if (field == "expand_x") return &out.expand_x;
  if (field == "dynamic_scales") return &out.dynamic_scales;
  if (field == "expand_scales") return &out.expand_scales;
  if (field == "expand_idx") return &out.expand_idx;
  if (field == "assist_info_for_combine") return &out.assist_info_for_combine;
  if (field == "expert_token_nums") return &out.expert_token_nums;
  if (field == "ep_recv_counts") return &out.ep_recv_counts;
  if (field == "tp_recv_counts") return &out.tp_recv_counts;
  if (field == "combine_out") return &out.combine_out;
  return nullptr;
}

// The first `rows` rows of a (possibly strided) 1-D or 2-D view, as an owning contiguous tensor.
Tensor copy_prefix(const TensorView& view, std::int64_t rows) {
  if (!view.present()) return Tensor();
  if (rows < 0 || rows > view.rows()) {
    throw Error(ErrorCode::internal, "replay: asked for " + std::to_string(rows) + " rows of an output with " +
                                         std::to_string(view.rows()));
  }
  const std::size_t element = dtype_size(view.dtype);
  const auto* base = static_cast<const unsigned char*>(view.data);
  if (view.ndim == 1) {
    Tensor copy(view.dtype, rows);
    auto* dst = static_cast<unsigned char*>(copy.raw());
    for (std::int64_t i = 0; i < rows; ++i) {
      std::memcpy(dst + static_cast<std::size_t>(i) * element, base + view.offset(i) * static_cast<std::int64_t>(element),
                  element);
    }
    return copy;
  }
  const std::int64_t cols = view.cols();
  Tensor copy(view.dtype, rows, cols);
  auto* dst = static_cast<unsigned char*>(copy.raw());
  for (std::int64_t i = 0; i < rows; ++i) {
    for (std::int64_t j = 0; j < cols; ++j) {
      std::memcpy(dst + static_cast<std::size_t>(i * cols + j) * element,
                  base + view.offset(i, j) * static_cast<std::int64_t>(element), element);
    }
  }
  return copy;
}

numeric::Half half_of(DType dtype) { return dtype == DType::bf16 ? numeric::Half::bf16 : numeric::Half::fp16; }

// Identity experts under quant_mode 2: each valid row back in x's dtype, out[h] = rne(fl32(q[h] * scale)).
// Rows past the valid ones stay zero; combine never reads them.
Tensor dequantize_rows(const DispatchResult& d, DType dtype) {
  if (d.expand_x.dtype != DType::int8) {
    throw Error(ErrorCode::internal, "replay: quant_mode 2 dispatch returned expand_x of dtype " +
                                         dtype_text(d.expand_x.dtype) + ", expected I8");
  }
  const std::int64_t h = d.expand_x.cols();
  Tensor rows(dtype, d.expand_x.rows(), h);
  auto* out = rows.data<std::uint16_t>();
  const numeric::Half half = half_of(dtype);
  for (std::int64_t r = 0; r < d.valid_rows; ++r) {
    const float scale = d.dynamic_scales.at<float>(r);
    for (std::int64_t j = 0; j < h; ++j) {
      const float value = static_cast<float>(d.expand_x.at<std::int8_t>(r, j)) * scale;
      out[r * h + j] = numeric::f32_to_half_rne(half, value);
    }
  }
  return rows;
}

// "rank g (ep_rank e, tp_rank t)": how a failure names its rank, which library messages do not carry.
std::string rank_label(int g, int tp_world_size) {
  const int tp = std::max(tp_world_size, 1);
  return "rank " + std::to_string(g) + " (ep_rank " + std::to_string(g / tp) + ", tp_rank " + std::to_string(g % tp) +
         ")";
}

// Rethrows the error that explains a failed run best, given each rank's error (null where the rank did
// not fail): the first rank's own error (a validation error, say) rather than the peer_failed /
// peer_lost / timeout errors it caused on the other ranks, its message prefixed with the rank's label.
// Returns when no rank failed.
void rethrow_root_cause(const std::vector<std::exception_ptr>& errors, int tp_world_size) {
  const int chosen = process::root_cause(errors);
  if (chosen < 0) return;
  try {
    std::rethrow_exception(errors[static_cast<std::size_t>(chosen)]);
  } catch (const Error& e) {
    throw Error(e.code(), rank_label(chosen, tp_world_size) + ": " + e.what());
  }
}

// A rank between dispatch and combine: what its combine needs.
struct DispatchedRank {
  DispatchResult result;
  Tensor expert_rows;  // owns the expert outputs combine reads, unless they are dispatch's expand_x
  TensorView expert_out;
};

// The case's dispatch operator (dispatch or dispatch_v2) with rank g's inputs; absent tensors stay absent.
DispatchResult call_dispatch(Group& group, const Case& c, const RankInputs& in) {
  if (c.op == 2) {
    DispatchV2Options options;
    options.scales = in.scales;
    options.x_active_mask = in.x_active_mask;
    options.expert_scales = in.expert_scales;
    options.quant_mode = c.quant_mode;
    options.expert_token_nums_type = c.expert_token_nums_type;
    options.zero_expert_num = c.zero_expert_num;
    options.copy_expert_num = c.copy_expert_num;
    options.const_expert_num = c.const_expert_num;
    options.comm_alg = c.comm_alg;
    return group.dispatch_v2(in.x, in.expert_ids, options);
  }
  DispatchOptions options;
  options.scales = in.scales;
  options.expert_scales = in.expert_scales;
  options.x_active_mask = in.x_active_mask;
  options.quant_mode = c.quant_mode;
  options.expert_token_nums_type = c.expert_token_nums_type;
  return group.dispatch(in.x, in.expert_ids, options);
}

// Dispatch for rank g; its dispatch outputs, cut to the valid rows, go to `out`. Also prepares the
// expert outputs: combine_x, or the identity experts.
DispatchedRank dispatch_rank(Group& group, const Case& c, int g, RankOutputs& out) {
  const RankInputs& in = c.ranks[static_cast<std::size_t>(g)];
  DispatchedRank dispatched;
  DispatchResult& d = dispatched.result;
  d = call_dispatch(group, c, in);

  out.expand_x = copy_prefix(d.expand_x, d.valid_rows);
  if (c.quant_mode == 2) out.dynamic_scales = copy_prefix(d.dynamic_scales, d.valid_rows);
  if (in.expert_scales.present()) out.expand_scales = copy_prefix(d.expand_scales, d.valid_rows);
  if (c.op == 2) {
    // The written triples: one per row this rank received in its EP domain, whose count is the last of
    // its own ep_recv_counts (a TP peer's rows, after them, have none; V2 §3.6).
    const std::int64_t own_rows =
        d.ep_recv_counts.at<std::int32_t>(std::int64_t{c.ep_world_size} * group.local_expert_num() - 1);
    out.assist_info_for_combine = copy_prefix(d.assist_info_for_combine, 3 * own_rows);
  } else {
    out.expand_idx = copy_prefix(d.expand_idx, d.expand_idx.rows());
  }
  out.expert_token_nums = copy_prefix(d.expert_token_nums, d.expert_token_nums.rows());
  out.ep_recv_counts = copy_prefix(d.ep_recv_counts, d.ep_recv_counts.rows());
  out.tp_recv_counts = copy_prefix(d.tp_recv_counts, d.tp_recv_counts.rows());

  if (in.combine_x.present()) {
    if (in.combine_x.rows() != d.valid_rows) {
      throw Error(ErrorCode::case_file, "tensor '" + tensor_name(g, "combine_x") + "' has " +
                                            std::to_string(in.combine_x.rows()) + " rows but dispatch produced " +
                                            std::to_string(d.valid_rows) +
                                            " valid rows on this rank (combine_x holds one row per valid row)");
    }
    // Same row count as dispatch's expand_x, so combine sees the shape it would on the device.
    dispatched.expert_rows = Tensor(c.dtype, d.expand_x.rows(), d.expand_x.cols());
    if (in.combine_x.nbytes() != 0) {
      std::memcpy(dispatched.expert_rows.raw(), in.combine_x.raw(), in.combine_x.nbytes());
    }
    dispatched.expert_out = dispatched.expert_rows;
  } else if (c.quant_mode == 2) {
    dispatched.expert_rows = dequantize_rows(d, c.dtype);
    dispatched.expert_out = dispatched.expert_rows;
  } else {
    dispatched.expert_out = d.expand_x;
  }
  return dispatched;
}

// combine_v2 for rank g: weights absent (1.0) where the case has no expert_scales.
TensorView call_combine_v2(Group& group, const Case& c, const RankInputs& in, const DispatchedRank& dispatched) {
  const DispatchResult& d = dispatched.result;
  CombineV2Options options;
  if (c.tp_world_size == 2) options.tp_send_counts = d.tp_recv_counts;
  options.x_active_mask = in.x_active_mask;
  options.shared_expert_x = in.shared_expert_x;
  options.ori_x = in.ori_x;
  options.const_expert_alpha_1 = in.const_expert_alpha_1;
  options.const_expert_alpha_2 = in.const_expert_alpha_2;
  options.const_expert_v = in.const_expert_v;
  options.zero_expert_num = c.zero_expert_num;
  options.copy_expert_num = c.copy_expert_num;
  options.const_expert_num = c.const_expert_num;
  options.comm_quant_mode = c.comm_quant_mode;
  options.comm_alg = c.comm_alg;
  return group.combine_v2(dispatched.expert_out, in.expert_ids, d.assist_info_for_combine, d.ep_recv_counts,
                          in.expert_scales, options);
}

// Combine for rank g (weights 1.0 where the case has no expert_scales); its output goes to `out`.
void combine_rank(Group& group, const Case& c, int g, const DispatchedRank& dispatched, RankOutputs& out) {
  const RankInputs& in = c.ranks[static_cast<std::size_t>(g)];
  if (c.op == 2) {
    const TensorView combined = call_combine_v2(group, c, in, dispatched);
    out.combine_out = copy_prefix(combined, combined.rows());
    return;
  }
  const DispatchResult& d = dispatched.result;
  Tensor unit_weights;
  TensorView weights = in.expert_scales;
  if (!in.expert_scales.present()) {
    unit_weights = Tensor(DType::fp32, in.expert_ids.rows(), in.expert_ids.cols());
    std::fill_n(unit_weights.data<float>(), unit_weights.numel(), 1.0f);
    weights = unit_weights;
  }
  CombineOptions combine_options;
  if (c.tp_world_size == 2) combine_options.tp_send_counts = d.tp_recv_counts;
  if (in.x_active_mask.present()) combine_options.x_active_mask = in.x_active_mask;
  combine_options.comm_quant_mode = c.comm_quant_mode;
  const TensorView combined =
      group.combine(dispatched.expert_out, in.expert_ids, d.expand_idx, d.ep_recv_counts, weights, combine_options);
  out.combine_out = copy_prefix(combined, combined.rows());
}

// The tensors of one rank's outputs, added to a replay output file.
void add_rank_outputs(SafetensorsWriter& writer, int g, const RankOutputs& out) {
  // Required outputs go through add() unconditionally, which rejects an absent tensor.
  writer.add(tensor_name(g, "expand_x"), out.expand_x);
  if (out.dynamic_scales.present()) writer.add(tensor_name(g, "dynamic_scales"), out.dynamic_scales);
  if (out.expand_scales.present()) writer.add(tensor_name(g, "expand_scales"), out.expand_scales);
  // expand_idx (V1) or assist_info_for_combine (V2): read_output_file requires exactly one.
  if (out.expand_idx.present()) writer.add(tensor_name(g, "expand_idx"), out.expand_idx);
  if (out.assist_info_for_combine.present()) {
    writer.add(tensor_name(g, "assist_info_for_combine"), out.assist_info_for_combine);
  }
  writer.add(tensor_name(g, "expert_token_nums"), out.expert_token_nums);
  writer.add(tensor_name(g, "ep_recv_counts"), out.ep_recv_counts);
  if (out.tp_recv_counts.present()) writer.add(tensor_name(g, "tp_recv_counts"), out.tp_recv_counts);
  writer.add(tensor_name(g, "combine_out"), out.combine_out);
}

SafetensorsWriter output_file_writer() {
  SafetensorsWriter writer;
  writer.set_metadata("format", std::string(kOutputsFormat));
  writer.set_metadata("version", std::string(kOutputsVersion));
  return writer;
}

// Reads a replay output file that holds the outputs of ranks [first, first + count): checks its format,
// reads every rank{g}.* tensor and checks each rank's tensors. `holds` says which ranks, for messages.
std::vector<RankOutputs> read_output_file(const std::string& path, int first, int count, const std::string& holds) {
  const SafetensorsReader reader(path);
  const std::string where = "file '" + path + "'";
  const auto& metadata = reader.metadata();
  const auto format = metadata.find("format");
  if (format == metadata.end() || format->second != kOutputsFormat) {
    fail(where, "not a replay output file (metadata 'format' must be \"" + std::string(kOutputsFormat) + "\")");
  }
  const auto version = metadata.find("version");
  if (version == metadata.end() || version->second != kOutputsVersion) {
    fail(where, "unsupported replay output version '" + (version == metadata.end() ? "" : version->second) +
                    "' (this build reads version " + std::string(kOutputsVersion) + ")");
  }

  std::vector<RankOutputs> outputs(static_cast<std::size_t>(count));
  for (const SafetensorsEntry& entry : reader.entries()) {
    int g = 0;
    std::string_view field;
    Tensor* slot = nullptr;
    if (parse_tensor_name(entry.name, &g, &field)) {
      if (g < first || g >= first + count) {
        fail(where, "tensor '" + entry.name + "' names rank " + std::to_string(g) + " but " + holds);
      }
      slot = output_field(outputs[static_cast<std::size_t>(g - first)], field);
    }
    if (slot == nullptr) fail(where, "unknown tensor '" + entry.name + "' in a replay output file");
    *slot = reader.read_tensor(entry);
  }

  for (int g = first; g < first + count; ++g) {
    const RankOutputs& out = outputs[static_cast<std::size_t>(g - first)];
    const auto require = [&](const Tensor& t, std::string_view field, int ndim, std::initializer_list<DType> dtypes) {
      if (!t.present()) fail(where, "missing tensor '" + tensor_name(g, field) + "'");
      if (t.ndim() != ndim) {
        fail(where, "tensor '" + tensor_name(g, field) + "' must be " + std::to_string(ndim) + "-D, got shape " +
                        shape_text(t));
      }
      if (std::find(dtypes.begin(), dtypes.end(), t.dtype()) == dtypes.end()) {
        fail(where, "tensor '" + tensor_name(g, field) + "' has unexpected dtype " + dtype_text(t.dtype()));
      }
    };
    require(out.expand_x, "expand_x", 2, {DType::int8, DType::bf16, DType::fp16});
    // V1 outputs hold expand_idx, V2 ones the written assist_info_for_combine triples instead.
    if (out.expand_idx.present() == out.assist_info_for_combine.present()) {
      fail(where, "rank " + std::to_string(g) + " must have exactly one of tensors '" + tensor_name(g, "expand_idx") +
                      "' (V1) and '" + tensor_name(g, "assist_info_for_combine") + "' (V2), " +
                      (out.expand_idx.present() ? "got both" : "got neither"));
    }
    if (out.expand_idx.present()) require(out.expand_idx, "expand_idx", 1, {DType::int32});
    if (out.assist_info_for_combine.present()) {
      require(out.assist_info_for_combine, "assist_info_for_combine", 1, {DType::int32});
      if (out.assist_info_for_combine.rows() % 3 != 0) {
        fail(where, "tensor '" + tensor_name(g, "assist_info_for_combine") + "' has " +
                        std::to_string(out.assist_info_for_combine.rows()) +
                        " entries, not a multiple of 3 (one (rank, token, k) triple per row)");
      }
    }
    require(out.expert_token_nums, "expert_token_nums", 1, {DType::int64});
    require(out.ep_recv_counts, "ep_recv_counts", 1, {DType::int32});
    require(out.combine_out, "combine_out", 2, {DType::bf16, DType::fp16});
    if (out.tp_recv_counts.present()) require(out.tp_recv_counts, "tp_recv_counts", 1, {DType::int32});
    for (const auto& [tensor, field] : {std::pair<const Tensor*, std::string_view>{&out.dynamic_scales, "dynamic_scales"},
                                        {&out.expand_scales, "expand_scales"}}) {
      if (!tensor->present()) continue;
      require(*tensor, field, 1, {DType::fp32});
      if (tensor->rows() != out.expand_x.rows()) {
        fail(where, "tensor '" + tensor_name(g, field) + "' has " + std::to_string(tensor->rows()) +
                        " entries but expand_x has " + std::to_string(out.expand_x.rows()) + " valid rows");
      }
    }
    if (out.combine_out.cols() != out.expand_x.cols()) {
      fail(where, "tensor '" + tensor_name(g, "combine_out") + "' has H = " + std::to_string(out.combine_out.cols()) +
                      " but expand_x has H = " + std::to_string(out.expand_x.cols()));
    }
  }
  return outputs;
}

}  // namespace

Case read_case(const std::string& path) {
  const SafetensorsReader reader(path);
  const std::string where = "file '" + path + "'";
  const auto& metadata = reader.metadata();
  constexpr std::int64_t kIntMax = std::numeric_limits<int>::max();

  Case c;
  c.ep_world_size = static_cast<int>(parse_metadata_int(where, metadata, "ep_world_size", 1, kMaxRanks));
  c.tp_world_size = static_cast<int>(parse_metadata_int(where, metadata, "tp_world_size", 0, kMaxRanks));
  c.moe_expert_num = static_cast<int>(parse_metadata_int(where, metadata, "moe_expert_num", 0, kIntMax));
  c.shared_expert_rank_num =
      static_cast<int>(parse_metadata_int(where, metadata, "shared_expert_rank_num", 0, kIntMax));
  c.shared_expert_num = static_cast<int>(parse_metadata_int(where, metadata, "shared_expert_num", 0, kIntMax));
  c.global_bs =
      parse_metadata_int(where, metadata, "global_bs", 0, std::numeric_limits<std::int64_t>::max());
  c.quant_mode = static_cast<int>(parse_metadata_int(where, metadata, "quant_mode", 0, kIntMax));
  c.expert_token_nums_type =
      static_cast<int>(parse_metadata_int(where, metadata, "expert_token_nums_type", 0, kIntMax));
  c.comm_quant_mode = static_cast<int>(parse_metadata_int(where, metadata, "comm_quant_mode", 0, kIntMax));
  const auto dtype = metadata.find("dtype");
  if (dtype == metadata.end()) fail(where, "missing metadata key 'dtype' (\"bfloat16\" or \"float16\")");
  if (dtype->second == "bfloat16") {
    c.dtype = DType::bf16;
  } else if (dtype->second == "float16") {
    c.dtype = DType::fp16;
  } else {
    fail(where, "metadata 'dtype' is '" + dtype->second + "', expected \"bfloat16\" or \"float16\"");
  }
  const auto op = metadata.find("op");
  if (op != metadata.end() && op->second != "v1" && op->second != "v2") {
    fail(where, "metadata 'op' is '" + op->second +
                    "', expected \"v1\" (npu_moe_distribute_dispatch / combine; "
                    "also what an absent 'op' means) or \"v2\" (their _v2 pair)");
  }
  c.op = op != metadata.end() && op->second == "v2" ? 2 : 1;
  if (c.op == 2) {
    c.zero_expert_num =
        static_cast<int>(parse_metadata_int(where, metadata, "zero_expert_num", 0, kIntMax, kV2CaseKeys));
    c.copy_expert_num =
        static_cast<int>(parse_metadata_int(where, metadata, "copy_expert_num", 0, kIntMax, kV2CaseKeys));
    c.const_expert_num =
        static_cast<int>(parse_metadata_int(where, metadata, "const_expert_num", 0, kIntMax, kV2CaseKeys));
    c.comm_alg = metadata_value(where, metadata, "comm_alg", kV2CaseKeys);
  } else {
    for (const char* key : kV2MetadataKeys) {
      if (metadata.count(key) != 0) {
        fail(where, std::string("metadata '") + key + "' is a V2 key, but the case is op v1 (metadata 'op' " +
                        (op == metadata.end() ? "absent" : "\"v1\"") + "; \"v2\" for a V2 case)");
      }
    }
  }
  check_scalars(where, c);

  const int n = rank_count(c);
  c.ranks.resize(static_cast<std::size_t>(n));
  for (const SafetensorsEntry& entry : reader.entries()) {
    int g = 0;
    std::string_view field;
    Tensor* slot = nullptr;
    if (parse_tensor_name(entry.name, &g, &field)) {
      if (g >= n) {
        fail(where, "tensor '" + entry.name + "' names rank " + std::to_string(g) + " but the case has " +
                        std::to_string(n) + " ranks (ep_world_size " + std::to_string(c.ep_world_size) +
                        " x max(tp_world_size, 1) " + std::to_string(std::max(c.tp_world_size, 1)) + ")");
      }
      slot = input_field(c.ranks[static_cast<std::size_t>(g)], field);
    }
    if (slot == nullptr) {
      fail(where, "unknown tensor '" + entry.name +
                      "' (a case holds rank{g}.x, .expert_ids, .scales, .expert_scales, .x_active_mask and "
                      ".combine_x, and in V2 .ori_x, .shared_expert_x, .const_expert_alpha_1, .const_expert_alpha_2 "
                      "and .const_expert_v)");
    }
    *slot = reader.read_tensor(entry);
  }
  check_case(where, c);
  return c;
}

void write_case(const std::string& path, const Case& c) {
  check_case("case for '" + path + "'", c);
  SafetensorsWriter writer;
  writer.set_metadata("ep_world_size", std::to_string(c.ep_world_size));
  writer.set_metadata("tp_world_size", std::to_string(c.tp_world_size));
  writer.set_metadata("moe_expert_num", std::to_string(c.moe_expert_num));
  writer.set_metadata("shared_expert_rank_num", std::to_string(c.shared_expert_rank_num));
  writer.set_metadata("shared_expert_num", std::to_string(c.shared_expert_num));
  writer.set_metadata("global_bs", std::to_string(c.global_bs));
  writer.set_metadata("quant_mode", std::to_string(c.quant_mode));
  writer.set_metadata("expert_token_nums_type", std::to_string(c.expert_token_nums_type));
  writer.set_metadata("comm_quant_mode", std::to_string(c.comm_quant_mode));
  writer.set_metadata("dtype", c.dtype == DType::bf16 ? "bfloat16" : "float16");
  if (c.op == 2) {  // a V1 case has no 'op' key, as before V2 existed
    writer.set_metadata("op", "v2");
    writer.set_metadata("zero_expert_num", std::to_string(c.zero_expert_num));
    writer.set_metadata("copy_expert_num", std::to_string(c.copy_expert_num));
    writer.set_metadata("const_expert_num", std::to_string(c.const_expert_num));
    writer.set_metadata("comm_alg", c.comm_alg);
  }
  for (std::size_t g = 0; g < c.ranks.size(); ++g) {
    const RankInputs& in = c.ranks[g];
    const int rank = static_cast<int>(g);
    writer.add(tensor_name(rank, "x"), in.x);
    writer.add(tensor_name(rank, "expert_ids"), in.expert_ids);
    if (in.scales.present()) writer.add(tensor_name(rank, "scales"), in.scales);
    if (in.expert_scales.present()) writer.add(tensor_name(rank, "expert_scales"), in.expert_scales);
    if (in.x_active_mask.present()) writer.add(tensor_name(rank, "x_active_mask"), in.x_active_mask);
    if (in.combine_x.present()) writer.add(tensor_name(rank, "combine_x"), in.combine_x);
    for (const V2Input& input : kV2Inputs) {
      if ((in.*input.tensor).present()) writer.add(tensor_name(rank, input.field), in.*input.tensor);
    }
  }
  writer.write(path);
}

GroupConfig group_config(const Case& c, int g) {
  const int tp = std::max(c.tp_world_size, 1);
  GroupConfig config;
  config.ep_world_size = c.ep_world_size;
  config.ep_rank_id = g / tp;
  config.moe_expert_num = c.moe_expert_num;
  config.tp_world_size = c.tp_world_size;
  config.tp_rank_id = g % tp;
  config.shared_expert_rank_num = c.shared_expert_rank_num;
  config.shared_expert_num = c.shared_expert_num;
  config.global_bs = c.global_bs;
  return config;
}

RankOutputs run_case_rank(Group& group, const Case& c, int g) {
  RankOutputs out;
  const DispatchedRank dispatched = dispatch_rank(group, c, g, out);
  combine_rank(group, c, g, dispatched, out);
  return out;
}

std::vector<RankOutputs> run_case(const Case& c, const RuntimeOptions& options) {
  check_case("case", c);
  const int n = rank_count(c);
  InProcessWorld world(n, options);
  std::vector<RankOutputs> outputs(static_cast<std::size_t>(n));
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(n));

  // Every rank meets here after dispatch. A rank that failed (or whose combine_x does not fit) sets
  // `skip_combine` first, so that no rank enters combine and waits there for a peer that never comes.
  std::barrier after_dispatch(n);
  std::atomic<bool> skip_combine{false};

  const auto rank_main = [&](int g) {
    const auto index = static_cast<std::size_t>(g);
    std::unique_ptr<Group> group;
    DispatchedRank dispatched;
    try {
      group = world.join(group_config(c, g));
      dispatched = dispatch_rank(*group, c, g, outputs[index]);
    } catch (...) {
      errors[index] = std::current_exception();
      skip_combine.store(true);
      after_dispatch.arrive_and_drop();
      throw;
    }
    after_dispatch.arrive_and_wait();
    if (skip_combine.load()) return;

    try {
      combine_rank(*group, c, g, dispatched, outputs[index]);
    } catch (...) {
      errors[index] = std::current_exception();
      throw;
    }
  };

  try {
    run_ranks(n, rank_main);
  } catch (...) {
    rethrow_root_cause(errors, c.tp_world_size);
    throw;
  }
  return outputs;
}

void write_outputs(const std::string& path, const std::vector<RankOutputs>& outputs) {
  SafetensorsWriter writer = output_file_writer();
  for (std::size_t g = 0; g < outputs.size(); ++g) add_rank_outputs(writer, static_cast<int>(g), outputs[g]);
  writer.write(path);
}

std::vector<RankOutputs> read_outputs(const std::string& path, int world_size) {
  if (world_size < 1 || world_size > kMaxRanks) {
    throw Error(ErrorCode::invalid_argument, "read_outputs: world_size " + std::to_string(world_size) +
                                                 " is outside [1, " + std::to_string(kMaxRanks) + "]");
  }
  return read_output_file(path, 0, world_size, "the world has " + std::to_string(world_size) + " ranks");
}

void write_rank_outputs(const std::string& path, int g, const RankOutputs& outputs) {
  SafetensorsWriter writer = output_file_writer();
  add_rank_outputs(writer, g, outputs);
  writer.write(path);
}

RankOutputs read_rank_outputs(const std::string& path, int g) {
  if (g < 0 || g >= kMaxRanks) {
    throw Error(ErrorCode::invalid_argument, "read_rank_outputs: rank " + std::to_string(g) + " is outside [0, " +
                                                 std::to_string(kMaxRanks) + ")");
  }
  std::vector<RankOutputs> outputs =
      read_output_file(path, g, 1, "the file holds the outputs of rank " + std::to_string(g) + " only");
  return std::move(outputs.front());
}

std::vector<std::string> own_command_line(const std::vector<std::string>& extra) {
  return process::own_command_line(extra);
}

void run_rank_processes(int ranks, int tp_world_size, const WorkerCommand& worker_command,
                        const std::function<void(int g, const std::string& path)>& read_result) {
  const process::TempDir dir("moedist-ranks");
  LaunchOptions options;
  options.ranks = ranks;
  options.tp_world_size = tp_world_size;
  options.argv = worker_command(dir.path());
  const LaunchResult launched = launch(options);

  // A rank that died without a word comes first (collect_errors throws): the other ranks' errors
  // (peer_lost) follow from it.
  rethrow_root_cause(process::collect_errors(dir.path(), launched.ranks), tp_world_size);
  for (int g = 0; g < ranks; ++g) {
    const std::string result = process::result_file(dir.path(), g);
    if (!std::filesystem::exists(result)) {
      throw Error(ErrorCode::internal, rank_label(g, tp_world_size) + ": the worker exited 0 without writing '" +
                                           result + "'");
    }
    read_result(g, result);
  }
}

int run_rank_worker(const std::string& dir, const std::function<void(int g, const std::string& path)>& produce) {
  return process::run_worker(dir, produce, "moedist worker");
}

std::vector<RankOutputs> run_case_processes(const Case& c, const WorkerCommand& worker_command) {
  check_case("case", c);
  const int n = rank_count(c);
  // Configuration errors are reported here as run_case reports them, instead of by n processes at once
  // (or by the launcher, for a TP size it cannot start).
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(n));
  for (int g = 0; g < n; ++g) {
    try {
      validate_config(group_config(c, g));
    } catch (...) {
      errors[static_cast<std::size_t>(g)] = std::current_exception();
    }
  }
  rethrow_root_cause(errors, c.tp_world_size);

  std::vector<RankOutputs> outputs(static_cast<std::size_t>(n));
  run_rank_processes(n, c.tp_world_size, worker_command, [&](int g, const std::string& path) {
    outputs[static_cast<std::size_t>(g)] = read_rank_outputs(path, g);
  });
  return outputs;
}

int run_case_worker(const std::string& case_path, const std::string& dir, const ShmOptions& options) {
  return run_rank_worker(dir, [&](int g, const std::string& path) {
    const Case c = read_case(case_path);
    const std::unique_ptr<Group> group = join_shm_from_env(group_config(c, g), options);
    write_rank_outputs(path, g, run_case_rank(*group, c, g));
  });
}

}  // namespace moedist::casefile
