#include "test_support.h"

#include <dirent.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <optional>
#include <sstream>
#include <stdexcept>

#include "moedist/moedist.h"
#include "numeric/convert.h"

namespace moedist::testing {

using numeric::Half;

std::uint16_t to_half_bits(DType dtype, float value) {
  return dtype == DType::bf16 ? numeric::f32_to_bf16_rne(value) : numeric::f32_to_fp16_rne(value);
}

namespace {

Half half_of(DType d) { return d == DType::bf16 ? Half::bf16 : Half::fp16; }

int pick(std::mt19937_64& rng, int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); }
bool chance(std::mt19937_64& rng, double p) { return std::bernoulli_distribution(p)(rng); }

void fill_half(std::mt19937_64& rng, Tensor& t, float spread) {
  std::normal_distribution<float> normal(0.0f, spread);
  auto* p = t.data<std::uint16_t>();
  for (std::int64_t i = 0; i < t.numel(); ++i) p[i] = to_half_bits(t.dtype(), normal(rng));
}

}  // namespace

Tensor random_ids(std::mt19937_64& rng, std::int64_t bs, std::int64_t k, int experts) {
  if (k > experts) throw std::invalid_argument("random_ids: k distinct ids need k <= experts");
  Tensor t(DType::int32, bs, k);
  std::vector<std::int32_t> ids(static_cast<std::size_t>(experts));
  for (std::int64_t b = 0; b < bs; ++b) {
    for (int e = 0; e < experts; ++e) ids[static_cast<std::size_t>(e)] = e;
    std::shuffle(ids.begin(), ids.end(), rng);
    std::copy_n(ids.begin(), k, t.data<std::int32_t>() + b * k);
  }
  return t;
}

Tensor int32_tensor(std::int64_t rows, std::int64_t cols, const std::vector<std::int32_t>& values) {
  Tensor t(DType::int32, rows, cols);
  std::copy(values.begin(), values.end(), t.data<std::int32_t>());
  return t;
}

Tensor int32_vector(const std::vector<std::int32_t>& values) {
  Tensor t(DType::int32, static_cast<std::int64_t>(values.size()));
  std::copy(values.begin(), values.end(), t.data<std::int32_t>());
  return t;
}

namespace {

// x_active_mask on every rank the rules allow (not on one with fewer tokens than global_bs / W): a
// random number of active tokens, trues first. The inactive rows' expert ids become ones no dispatch
// may read (out of range, repeated), since the operators must not look at them.
void add_token_masks(casefile::Case& c, std::mt19937_64& rng) {
  for (casefile::RankInputs& in : c.ranks) {
    const std::int64_t bs = in.x.rows();
    if (c.global_bs != 0 && c.global_bs > bs * c.ep_world_size) continue;
    const std::int64_t active = pick(rng, 0, static_cast<int>(bs));
    in.x_active_mask = Tensor(DType::boolean, bs);
    for (std::int64_t b = 0; b < bs; ++b) in.x_active_mask.data<std::uint8_t>()[b] = b < active ? 1 : 0;
    for (std::int64_t i = active * in.expert_ids.cols(); i < in.expert_ids.numel(); ++i)
      in.expert_ids.data<std::int32_t>()[i] = chance(rng, 0.5) ? -7 : c.moe_expert_num;
  }
}

// Smooth-scales rows before the MoE experts' (V1 §2.3, V2 §2.2): the shared experts'.
int smooth_rows_for_shared(const casefile::Case& c) {
  if (c.op != 2) return c.shared_expert_rank_num > 0 ? 1 : 0;
  return c.shared_expert_rank_num == 0 && c.shared_expert_num == 1 ? 0 : c.shared_expert_num;
}

// V2 masks on the ranks the rules allow: a (BS,) prefix or a random (BS, K) mask. The ids the mask
// switches off become ones no operator may read (out of range, repeated).
void add_v2_masks(casefile::Case& c, std::mt19937_64& rng) {
  const int garbage = c.moe_expert_num + c.zero_expert_num + c.copy_expert_num + c.const_expert_num + 3;
  for (casefile::RankInputs& in : c.ranks) {
    const std::int64_t bs = in.x.rows(), k = in.expert_ids.cols();
    if (c.global_bs != 0 && c.global_bs > bs * c.ep_world_size) continue;
    std::int32_t* ids = in.expert_ids.data<std::int32_t>();
    if (chance(rng, 0.5)) {
      const std::int64_t active = pick(rng, 0, static_cast<int>(bs));
      in.x_active_mask = Tensor(DType::boolean, bs);
      for (std::int64_t b = 0; b < bs; ++b) in.x_active_mask.data<std::uint8_t>()[b] = b < active ? 1 : 0;
      for (std::int64_t i = active * k; i < bs * k; ++i) ids[i] = chance(rng, 0.5) ? -7 : garbage;
    } else {
      in.x_active_mask = Tensor(DType::boolean, bs, k);
      const double on = chance(rng, 0.3) ? 0.2 : 0.75;
      for (std::int64_t i = 0; i < bs * k; ++i) {
        const bool active = chance(rng, on);
        in.x_active_mask.data<std::uint8_t>()[i] = active ? 1 : 0;
        if (!active) ids[i] = chance(rng, 0.5) ? -7 : garbage;
      }
    }
  }
}

// V2 combine inputs: ori_x (required with copy or const experts), the const experts' gates and
// vectors, and sometimes shared_expert_x (only without shared-expert ranks).
void add_v2_combine_inputs(casefile::Case& c, std::mt19937_64& rng) {
  const bool with_ori = c.copy_expert_num + c.const_expert_num > 0 || chance(rng, 0.2);
  const bool with_shared_x = c.shared_expert_rank_num == 0 && chance(rng, 0.3);
  for (casefile::RankInputs& in : c.ranks) {
    const std::int64_t bs = in.x.rows(), h = in.x.cols();
    if (with_ori) {
      in.ori_x = Tensor(c.dtype, bs, h);
      fill_half(rng, in.ori_x, 1.0f);
    }
    if (with_shared_x) {
      in.shared_expert_x = Tensor(c.dtype, bs, h);
      fill_half(rng, in.shared_expert_x, 1.0f);
    }
    if (c.const_expert_num > 0) {
      for (Tensor* t : {&in.const_expert_alpha_1, &in.const_expert_alpha_2, &in.const_expert_v}) {
        *t = Tensor(c.dtype, c.const_expert_num, h);
        fill_half(rng, *t, t == &in.const_expert_v ? 1.0f : 0.2f);
      }
    }
  }
}

}  // namespace

bool v1_compatible(const casefile::Case& c) {
  return c.shared_expert_num == 1 && (c.shared_expert_rank_num == 0 || c.ep_world_size % c.shared_expert_rank_num == 0);
}

casefile::Case random_case(std::mt19937_64& rng, const CaseLimits& lim) {
  casefile::Case c;
  c.op = lim.v2 > 0 && chance(rng, lim.v2) ? 2 : 1;  // no draw without V2: the V1 seeds keep their cases
  int W = pick(rng, 1, lim.max_ep_world_size);
  bool tp = lim.allow_tp && chance(rng, 0.25);
  if (lim.world_size > 0) {
    tp = tp && lim.world_size % 2 == 0;
    W = tp ? lim.world_size / 2 : lim.world_size;
  }
  std::vector<int> shared_choices{0};
  for (int s = 1; s < W; ++s) {
    if (W % s == 0 || c.op == 2) shared_choices.push_back(s);  // V2 has no W % S rule
  }
  c.ep_world_size = W;
  c.shared_expert_rank_num = chance(rng, 0.35) ? shared_choices[static_cast<std::size_t>(pick(rng, 0, static_cast<int>(shared_choices.size()) - 1))] : 0;
  if (c.op == 2) {  // V2: Sn shared experts of S / Sn ranks each, Sn a divisor of S up to 4; 0 or 1 without S
    std::vector<int> sn_choices;
    for (int sn = 1; sn <= 4; ++sn) {
      if (c.shared_expert_rank_num == 0 ? sn == 1 : c.shared_expert_rank_num % sn == 0) sn_choices.push_back(sn);
    }
    if (c.shared_expert_rank_num == 0) sn_choices.push_back(0);
    c.shared_expert_num = sn_choices[static_cast<std::size_t>(pick(rng, 0, static_cast<int>(sn_choices.size()) - 1))];
  }
  const int moe_ranks = W - c.shared_expert_rank_num;
  c.tp_world_size = tp ? 2 : pick(rng, 0, 1);
  const int L = c.tp_world_size == 2 ? 1 : pick(rng, 1, 4);
  c.moe_expert_num = moe_ranks * L;
  const bool uneven = chance(rng, 0.4);
  const std::int64_t max_bs = pick(rng, uneven ? 1 : 0, static_cast<int>(lim.max_bs));
  c.global_bs = uneven ? max_bs * W * (chance(rng, 0.3) ? 2 : 1) : (chance(rng, 0.5) ? 0 : max_bs * W);
  random_inputs(c, rng, lim, max_bs);
  return c;
}

void random_inputs(casefile::Case& c, std::mt19937_64& rng, const CaseLimits& lim, std::int64_t bs_for_global_bs_zero) {
  const int W = c.ep_world_size;
  c.ranks.clear();
  c.dtype = chance(rng, 0.5) ? DType::bf16 : DType::fp16;
  c.quant_mode = chance(rng, 0.5) ? 2 : 0;
  c.expert_token_nums_type = pick(rng, 0, 1);
  c.comm_quant_mode = c.tp_world_size != 2 && chance(rng, 0.3) ? 2 : 0;
  c.zero_expert_num = c.copy_expert_num = c.const_expert_num = 0;
  c.comm_alg.clear();
  if (c.op == 2) {
    const bool special = chance(rng, 0.5);
    c.zero_expert_num = special ? pick(rng, 0, 2) : 0;
    c.copy_expert_num = special ? pick(rng, 0, 2) : 0;
    c.const_expert_num = special ? pick(rng, 0, 2) : 0;
    static const char* const kAlgs[] = {"", "fullmesh_v1", "fullmesh_v2", "fullmesh", "hierarchy", "0"};
    c.comm_alg = kAlgs[pick(rng, 0, 5)];
  }
  const int ids = c.moe_expert_num + c.zero_expert_num + c.copy_expert_num + c.const_expert_num;
  const int K = pick(rng, 1, std::min(ids, lim.max_k));
  const std::int64_t H = pick(rng, 1, static_cast<int>(lim.max_h));
  const bool with_scales = c.quant_mode == 2 && chance(rng, 0.6);
  const bool with_expert_scales = chance(rng, 0.7);
  const int T = std::max(c.tp_world_size, 1);
  const std::int64_t max_bs = c.global_bs != 0 ? c.global_bs / W : bs_for_global_bs_zero;
  for (int g = 0; g < W * T; ++g) {
    casefile::RankInputs in;
    const std::int64_t bs = c.global_bs != 0 ? pick(rng, 0, static_cast<int>(max_bs)) : max_bs;
    in.x = Tensor(c.dtype, bs, H);
    fill_half(rng, in.x, chance(rng, 0.2) ? 100.0f : 1.0f);
    if (bs > 0 && chance(rng, 0.15)) {  // an all-zero row: q = 0, scale 0
      std::fill_n(in.x.data<std::uint16_t>() + pick(rng, 0, static_cast<int>(bs) - 1) * H, H, std::uint16_t{0});
    }
    in.expert_ids = random_ids(rng, bs, K, ids);
    if (with_scales) {
      in.scales = Tensor(DType::fp32, c.moe_expert_num + smooth_rows_for_shared(c), H);
      std::uniform_real_distribution<float> u(0.25f, 4.0f);
      for (std::int64_t i = 0; i < in.scales.numel(); ++i) in.scales.data<float>()[i] = u(rng);
    }
    if (with_expert_scales) {
      in.expert_scales = Tensor(DType::fp32, bs, K);
      std::uniform_real_distribution<float> u(-1.0f, 1.0f);
      for (std::int64_t i = 0; i < in.expert_scales.numel(); ++i) in.expert_scales.data<float>()[i] = u(rng);
    }
    c.ranks.push_back(std::move(in));
  }
  if (c.op == 2) {
    if (lim.token_masks && chance(rng, 0.5)) add_v2_masks(c, rng);
    add_v2_combine_inputs(c, rng);
  } else if (lim.token_masks && chance(rng, 0.4)) {
    add_token_masks(c, rng);
  }
  if (chance(rng, 0.5)) {  // explicit expert outputs, sized by the valid rows of each rank
    const Expected layout = expected_outputs(c);
    for (int g = 0; g < W * T; ++g) {
      casefile::RankInputs& in = c.ranks[static_cast<std::size_t>(g)];
      const std::int64_t rows = c.op == 2 ? layout.v2[static_cast<std::size_t>(g)].valid_rows
                                          : layout.v1[static_cast<std::size_t>(g)].valid_rows;
      in.combine_x = Tensor(c.dtype, rows, H);
      fill_half(rng, in.combine_x, 2.0f);
    }
  }
}

std::string describe(const casefile::Case& c) {
  std::ostringstream os;
  const casefile::RankInputs& r0 = c.ranks.front();
  os << "W=" << c.ep_world_size << " T=" << c.tp_world_size << " E=" << c.moe_expert_num
     << " S=" << c.shared_expert_rank_num << " K=" << r0.expert_ids.cols() << " H=" << r0.x.cols()
     << " global_bs=" << c.global_bs << " quant=" << c.quant_mode << " comm_quant=" << c.comm_quant_mode
     << " dtype=" << dtype_name(c.dtype) << " etn_type=" << c.expert_token_nums_type
     << " scales=" << r0.scales.present() << " expert_scales=" << r0.expert_scales.present()
     << " combine_x=" << r0.combine_x.present() << " mask=" << r0.x_active_mask.present();
  if (c.op == 2) {
    os << " op=v2 Sn=" << c.shared_expert_num << " Z=" << c.zero_expert_num << " C=" << c.copy_expert_num
       << " Q=" << c.const_expert_num << " comm_alg='" << c.comm_alg << "' mask_2d=" << (r0.x_active_mask.ndim() == 2)
       << " ori_x=" << r0.ori_x.present() << " shared_expert_x=" << r0.shared_expert_x.present();
  }
  os << " BS=[";
  for (std::size_t g = 0; g < c.ranks.size(); ++g) os << (g ? "," : "") << c.ranks[g].x.rows();
  os << "]";
  return os.str();
}

casefile::Case uniform_case(std::mt19937_64& rng, int world_size, std::int64_t max_h, std::int64_t bs) {
  CaseLimits limits;
  limits.world_size = world_size;
  limits.allow_tp = false;
  limits.max_h = max_h;
  limits.max_bs = bs;
  casefile::Case c = random_case(rng, limits);
  c.global_bs = 0;
  random_inputs(c, rng, limits, bs);
  return c;
}

casefile::Case next_call(const casefile::Case& c, std::mt19937_64& rng, int id_count) {
  casefile::Case n;
  n.ep_world_size = c.ep_world_size;
  n.tp_world_size = c.tp_world_size;
  n.moe_expert_num = c.moe_expert_num;
  n.shared_expert_rank_num = c.shared_expert_rank_num;
  n.shared_expert_num = c.shared_expert_num;
  n.global_bs = c.global_bs;
  n.quant_mode = c.quant_mode;
  n.expert_token_nums_type = c.expert_token_nums_type;
  n.comm_quant_mode = c.comm_quant_mode;
  n.dtype = c.dtype;
  std::uniform_real_distribution<float> value(-3.0f, 3.0f);
  for (const auto& r : c.ranks) {
    casefile::RankInputs in;
    in.x = Tensor(c.dtype, r.x.rows(), r.x.cols());
    for (std::int64_t i = 0; i < in.x.numel(); ++i) in.x.data<std::uint16_t>()[i] = to_half_bits(c.dtype, value(rng));
    in.expert_ids =
        random_ids(rng, r.expert_ids.rows(), r.expert_ids.cols(), id_count > 0 ? id_count : c.moe_expert_num);
    if (r.scales.present()) in.scales = copy_rows(r.scales.view(), r.scales.rows());
    if (r.expert_scales.present()) {
      in.expert_scales = Tensor(DType::fp32, r.expert_scales.rows(), r.expert_scales.cols());
      for (std::int64_t i = 0; i < in.expert_scales.numel(); ++i) in.expert_scales.data<float>()[i] = value(rng);
    }
    n.ranks.push_back(std::move(in));
  }
  return n;
}

oracle::Case to_oracle_case(const casefile::Case& c) {
  oracle::Case o;
  o.ep_world_size = c.ep_world_size;
  o.tp_world_size = c.tp_world_size;
  o.moe_expert_num = c.moe_expert_num;
  o.shared_expert_rank_num = c.shared_expert_rank_num;
  o.global_bs = c.global_bs;
  o.quant_mode = c.quant_mode;
  o.expert_token_nums_type = c.expert_token_nums_type;
  o.comm_quant_mode = c.comm_quant_mode;
  o.dtype = half_of(c.dtype);
  o.h = c.ranks.front().x.cols();
  o.k = c.ranks.front().expert_ids.cols();
  for (const casefile::RankInputs& in : c.ranks) {
    oracle::RankInput r;
    r.bs = in.x.rows();
    r.x.assign(in.x.data<std::uint16_t>(), in.x.data<std::uint16_t>() + in.x.numel());
    r.expert_ids.assign(in.expert_ids.data<std::int32_t>(), in.expert_ids.data<std::int32_t>() + in.expert_ids.numel());
    if (in.scales.present()) r.scales.assign(in.scales.data<float>(), in.scales.data<float>() + in.scales.numel());
    if (in.expert_scales.present())
      r.expert_scales.assign(in.expert_scales.data<float>(), in.expert_scales.data<float>() + in.expert_scales.numel());
    if (in.x_active_mask.present())
      r.x_active_mask.assign(in.x_active_mask.data<std::uint8_t>(),
                             in.x_active_mask.data<std::uint8_t>() + in.x_active_mask.numel());
    r.has_combine_x = in.combine_x.present();
    if (r.has_combine_x)
      r.combine_x.assign(in.combine_x.data<std::uint16_t>(), in.combine_x.data<std::uint16_t>() + in.combine_x.numel());
    o.ranks.push_back(std::move(r));
  }
  return o;
}

namespace {

template <class T>
std::vector<T> values_of(const Tensor& t) {
  if (!t.present()) return {};
  return std::vector<T>(t.data<T>(), t.data<T>() + t.numel());
}

}  // namespace

oracle::v2::Case to_oracle_v2_case(const casefile::Case& c) {
  oracle::v2::Case o;
  o.ep_world_size = c.ep_world_size;
  o.tp_world_size = c.tp_world_size;
  o.moe_expert_num = c.moe_expert_num;
  o.shared_expert_rank_num = c.shared_expert_rank_num;
  o.shared_expert_num = c.shared_expert_num;
  o.zero_expert_num = c.zero_expert_num;
  o.copy_expert_num = c.copy_expert_num;
  o.const_expert_num = c.const_expert_num;
  o.global_bs = c.global_bs;
  o.quant_mode = c.quant_mode;
  o.expert_token_nums_type = c.expert_token_nums_type;
  o.comm_quant_mode = c.comm_quant_mode;
  o.dtype = half_of(c.dtype);
  o.h = c.ranks.front().x.cols();
  o.k = c.ranks.front().expert_ids.cols();
  for (const casefile::RankInputs& in : c.ranks) {
    oracle::v2::RankInput r;
    r.bs = in.x.rows();
    r.x = values_of<std::uint16_t>(in.x);
    r.expert_ids = values_of<std::int32_t>(in.expert_ids);
    r.scales = values_of<float>(in.scales);
    r.expert_scales = values_of<float>(in.expert_scales);
    r.x_active_mask = values_of<std::uint8_t>(in.x_active_mask);
    r.mask_2d = in.x_active_mask.ndim() == 2;
    r.ori_x = values_of<std::uint16_t>(in.ori_x);
    r.shared_expert_x = values_of<std::uint16_t>(in.shared_expert_x);
    r.const_expert_alpha_1 = values_of<std::uint16_t>(in.const_expert_alpha_1);
    r.const_expert_alpha_2 = values_of<std::uint16_t>(in.const_expert_alpha_2);
    r.const_expert_v = values_of<std::uint16_t>(in.const_expert_v);
    r.has_combine_x = in.combine_x.present();
    r.combine_x = values_of<std::uint16_t>(in.combine_x);
    o.ranks.push_back(std::move(r));
  }
  return o;
}

Expected expected_outputs(const casefile::Case& c) {
  Expected e;
  e.op = c.op;
  if (c.op == 2)
    e.v2 = oracle::v2::run(to_oracle_v2_case(c));
  else
    e.v1 = oracle::run(to_oracle_case(c));
  return e;
}

namespace {

// A copy of a contiguous tensor placed in a larger buffer so that the view has the given strides.
struct Strided {
  std::vector<std::byte> storage;
  TensorView view;
};

Strided make_strided(const Tensor& t, std::int64_t row_pad, std::int64_t col_stride) {
  Strided s;
  const std::size_t elem = dtype_size(t.dtype());
  const std::int64_t rows = t.rows(), cols = t.cols();
  const std::int64_t row_stride = cols * col_stride + row_pad;
  s.storage.assign(static_cast<std::size_t>(std::max<std::int64_t>(rows * row_stride, 1)) * elem, std::byte{0x5a});
  for (std::int64_t r = 0; r < rows; ++r) {
    for (std::int64_t col = 0; col < cols; ++col) {
      std::memcpy(s.storage.data() + static_cast<std::size_t>(r * row_stride + col * col_stride) * elem,
                  static_cast<const std::byte*>(t.raw()) + static_cast<std::size_t>(r * cols + col) * elem, elem);
    }
  }
  s.view = matrix_view(s.storage.data(), t.dtype(), rows, cols, row_stride, col_stride);
  return s;
}

}  // namespace

// Copies the first `rows` rows (or entries) of a view into a new contiguous tensor.
Tensor copy_rows(const TensorView& v, std::int64_t rows) {
  const std::size_t elem = dtype_size(v.dtype);
  Tensor t = v.ndim == 2 ? Tensor(v.dtype, rows, v.cols()) : Tensor(v.dtype, rows);
  for (std::int64_t r = 0; r < rows; ++r) {
    for (std::int64_t col = 0; col < v.cols(); ++col) {
      std::memcpy(static_cast<std::byte*>(t.raw()) + static_cast<std::size_t>(r * v.cols() + col) * elem,
                  static_cast<const std::byte*>(v.data) + static_cast<std::size_t>(v.offset(r, col)) * elem, elem);
    }
  }
  return t;
}

GroupConfig rank_config(const casefile::Case& c, int g) {
  const int T = std::max(c.tp_world_size, 1);
  GroupConfig cfg;
  cfg.ep_world_size = c.ep_world_size;
  cfg.ep_rank_id = g / T;
  cfg.tp_world_size = c.tp_world_size;
  cfg.tp_rank_id = g % T;
  cfg.moe_expert_num = c.moe_expert_num;
  cfg.shared_expert_rank_num = c.shared_expert_rank_num;
  cfg.shared_expert_num = c.shared_expert_num;
  cfg.global_bs = c.global_bs;
  return cfg;
}

namespace {

// The experts' outputs for combine: the case's, or identity experts (the dispatched row, dequantized);
// strided when the run says so, or written into Group::combine_buffer() (T <= 1).
struct ExpertOutputs {
  ExpertOutputs(Group& group, const casefile::Case& c, const casefile::RankInputs& in, const DispatchResult& d,
                const RunOptions& opt) {
    const std::int64_t h = in.x.cols();
    view = d.expand_x;  // quant_mode 0 identity: feed dispatch's own view back
    if (in.combine_x.present()) {
      given = make_strided(in.combine_x, opt.strided_inputs ? 1 : 0, opt.strided_inputs ? 2 : 1);
      view = given.view;
    } else if (c.quant_mode == 2) {
      identity = Tensor(c.dtype, d.valid_rows, h);
      for (std::int64_t r = 0; r < d.valid_rows; ++r) {
        const float scale = d.dynamic_scales.at<float>(r);
        for (std::int64_t col = 0; col < h; ++col) {
          const float v = static_cast<float>(d.expand_x.at<std::int8_t>(r, col)) * scale;
          identity.data<std::uint16_t>()[r * h + col] = numeric::f32_to_half_rne(half_of(c.dtype), v);
        }
      }
      view = identity.view();
      if (opt.strided_inputs) {
        given = make_strided(identity, 3, 2);
        view = given.view;
      }
    }
    if (opt.outputs_in_window && std::max(c.tp_world_size, 1) == 1 && !opt.strided_inputs) {
      const MutableTensorView buffer = group.combine_buffer(c.dtype);
      if (!buffer.present() || buffer.rows() < d.valid_rows)
        throw std::runtime_error("combine_buffer() is missing or too small");
      Tensor rows = copy_rows(view, d.valid_rows);
      for (std::int64_t r = 0; r < d.valid_rows; ++r) {
        std::memcpy(buffer.ptr<std::uint16_t>(r, 0), rows.data<std::uint16_t>() + r * h,
                    static_cast<std::size_t>(h) * 2);
      }
      view = buffer;
    }
  }
  Tensor identity;
  Strided given;
  TensorView view;
};

// A bool mask as a view: (BS,) every other byte of a buffer, or (BS, K) with padded rows, when strided.
struct MaskView {
  MaskView(const Tensor& mask, bool strided) {
    if (!mask.present()) return;
    storage = make_strided(mask, strided ? 3 : 0, strided ? 2 : 1);
    view = storage.view;
    if (mask.ndim() == 1)
      view = vector_view(storage.storage.data(), DType::boolean, mask.rows(), storage.view.strides[0]);
  }
  Strided storage;
  TensorView view;
};

// x, expert_ids and smooth scales as both versions' runs pass them: x with padded rows (every other
// column when strided), ids and scales with padded rows when strided.
struct DispatchInputs {
  DispatchInputs(const casefile::RankInputs& in, const RunOptions& opt)
      : x(make_strided(in.x, 3, opt.strided_inputs ? 2 : 1)),
        ids(make_strided(in.expert_ids, opt.strided_inputs ? 1 : 0, 1)) {
    if (in.scales.present()) scales = make_strided(in.scales, opt.strided_inputs ? 5 : 0, opt.strided_inputs ? 2 : 1);
  }
  Strided x, ids, scales;  // scales: absent when the case has none
};

// The caller-provided dispatch output buffers both versions take, of the sizes torch_npu allocates.
struct CallerDispatchOutputs {
  CallerDispatchOutputs(Group& group, const casefile::Case& c, std::int64_t bs, std::int64_t k, std::int64_t h,
                        int version)
      : cap(capacity(group.config(), CapacityQuery{bs, k, h, c.dtype, c.quant_mode, version})),
        expand_x(c.quant_mode == 2 ? DType::int8 : c.dtype, cap.max_receive_rows, h),
        dynamic_scales(DType::fp32, cap.max_receive_rows),
        expand_scales(DType::fp32, cap.max_receive_rows),
        expert_token_nums(DType::int64, group.local_expert_num()),
        ep_recv_counts(DType::int32, static_cast<std::int64_t>(c.ep_world_size) * group.local_expert_num() *
                                         (c.tp_world_size == 2 ? 2 : 1)) {
    if (c.tp_world_size == 2) tp_recv_counts = Tensor(DType::int32, 2);
  }
  // Points `out` (DispatchOutputs or DispatchV2Outputs) at the buffers; expand_scales only with router weights.
  template <class Outputs>
  void attach(Outputs& out, const casefile::RankInputs& in) {
    out.expand_x = expand_x.mutable_view();
    out.dynamic_scales = dynamic_scales.mutable_view();
    if (in.expert_scales.present()) out.expand_scales = expand_scales.mutable_view();
    out.expert_token_nums = expert_token_nums.mutable_view();
    out.ep_recv_counts = ep_recv_counts.mutable_view();
    if (tp_recv_counts.present()) out.tp_recv_counts = tp_recv_counts.mutable_view();
  }
  CapacityReport cap;
  Tensor expand_x, dynamic_scales, expand_scales, expert_token_nums, ep_recv_counts, tp_recv_counts;
};

// The dispatch outputs both versions return, copied out of the group's buffers (valid rows only).
casefile::RankOutputs copy_dispatch_outputs(const casefile::Case& c, const casefile::RankInputs& in,
                                            const DispatchResult& d) {
  casefile::RankOutputs o;
  o.expand_x = copy_rows(d.expand_x, d.valid_rows);
  if (c.quant_mode == 2) o.dynamic_scales = copy_rows(d.dynamic_scales, d.valid_rows);
  if (in.expert_scales.present()) o.expand_scales = copy_rows(d.expand_scales, d.valid_rows);
  o.expert_token_nums = copy_rows(d.expert_token_nums, d.expert_token_nums.rows());
  o.ep_recv_counts = copy_rows(d.ep_recv_counts, d.ep_recv_counts.rows());
  if (c.tp_world_size == 2) o.tp_recv_counts = copy_rows(d.tp_recv_counts, 2);
  return o;
}

// A caller's combine output buffer, garbage first: combine must write every row, zeros for inactive tokens.
Tensor garbage_combine_out(const casefile::Case& c, std::int64_t bs, std::int64_t h) {
  Tensor combined(c.dtype, bs, h);
  std::fill_n(combined.data<std::uint16_t>(), combined.numel(), std::uint16_t{0x5a5a});
  return combined;
}

// A V2 rank: dispatch_v2 then combine_v2, with the same choices of strides and buffers as run_rank.
casefile::RankOutputs run_rank_v2(Group& group, const casefile::Case& c, int g, const RunOptions& opt,
                                  RankTraffic* traffic) {
  const int T = std::max(c.tp_world_size, 1);
  const casefile::RankInputs& in = c.ranks[static_cast<std::size_t>(g)];
  const std::int64_t bs = in.x.rows(), h = in.x.cols(), k = in.expert_ids.cols();
  const DispatchInputs inputs(in, opt);
  Strided weights;
  const MaskView mask(in.x_active_mask, opt.strided_inputs);
  DispatchV2Options dopt;
  dopt.quant_mode = c.quant_mode;
  dopt.expert_token_nums_type = c.expert_token_nums_type;
  dopt.zero_expert_num = c.zero_expert_num;
  dopt.copy_expert_num = c.copy_expert_num;
  dopt.const_expert_num = c.const_expert_num;
  dopt.comm_alg = c.comm_alg;
  dopt.x_active_mask = mask.view;
  dopt.scales = inputs.scales.view;
  if (in.expert_scales.present()) {
    weights = make_strided(in.expert_scales, opt.strided_inputs ? 2 : 0, 1);
    dopt.expert_scales = weights.view;
  }
  // performance_info on every rank of every run: its values are timings, only its shape is checked.
  Tensor perf(DType::int64, c.ep_world_size);
  dopt.performance_info = perf.mutable_view();
  std::optional<CallerDispatchOutputs> outs;
  Tensor out_assist;
  if (opt.caller_outputs) {
    outs.emplace(group, c, bs, k, h, 2);
    outs->attach(dopt.out, in);
    out_assist = Tensor(DType::int32, std::max(bs * k, outs->cap.A * 128));  // torch_npu's length
    dopt.out.assist_info_for_combine = out_assist.mutable_view();
  }
  const DispatchResult d = group.dispatch_v2(inputs.x.view, inputs.ids.view, dopt);
  if (traffic != nullptr) traffic->after_dispatch = group.traffic();

  casefile::RankOutputs o = copy_dispatch_outputs(c, in, d);
  const std::int64_t own_rows = d.ep_recv_counts.at<std::int32_t>(c.ep_world_size * group.local_expert_num() - 1);
  o.assist_info_for_combine = copy_rows(d.assist_info_for_combine, 3 * own_rows);

  ExpertOutputs experts(group, c, in, d, opt);
  CombineV2Options copt;
  copt.comm_quant_mode = c.comm_quant_mode;
  copt.x_active_mask = mask.view;
  copt.zero_expert_num = c.zero_expert_num;
  copt.copy_expert_num = c.copy_expert_num;
  copt.const_expert_num = c.const_expert_num;
  copt.comm_alg = c.comm_alg;
  copt.performance_info = perf.mutable_view();
  if (T == 2) copt.tp_send_counts = d.tp_recv_counts;
  std::vector<Strided> extras;
  extras.reserve(5);
  const auto view_of = [&](const Tensor& t) {
    if (!t.present()) return TensorView{};
    extras.push_back(make_strided(t, opt.strided_inputs ? 2 : 0, opt.strided_inputs ? 2 : 1));
    return extras.back().view;
  };
  copt.ori_x = view_of(in.ori_x);
  copt.shared_expert_x = view_of(in.shared_expert_x);
  copt.const_expert_alpha_1 = view_of(in.const_expert_alpha_1);
  copt.const_expert_alpha_2 = view_of(in.const_expert_alpha_2);
  copt.const_expert_v = view_of(in.const_expert_v);
  Tensor combined;
  if (opt.caller_outputs) {
    combined = garbage_combine_out(c, bs, h);
    copt.out = combined.mutable_view();
  }
  const TensorView y = group.combine_v2(experts.view, inputs.ids.view, d.assist_info_for_combine, d.ep_recv_counts,
                                        in.expert_scales.present() ? weights.view : TensorView{}, copt);
  if (traffic != nullptr) traffic->after_combine = group.traffic();
  o.combine_out = copy_rows(y, bs);
  return o;
}

}  // namespace

casefile::RankOutputs run_rank(Group& group, const casefile::Case& c, int g, const RunOptions& opt, RankTraffic* traffic) {
  if (c.op == 2) return run_rank_v2(group, c, g, opt, traffic);
  const int T = std::max(c.tp_world_size, 1);
  const casefile::RankInputs& in = c.ranks[static_cast<std::size_t>(g)];
  const std::int64_t bs = in.x.rows(), h = in.x.cols(), k = in.expert_ids.cols();
  const DispatchInputs inputs(in, opt);
  Tensor ones(DType::fp32, bs, k);
  std::fill_n(ones.data<float>(), bs * k, 1.0f);
  Strided weights = make_strided(in.expert_scales.present() ? in.expert_scales : ones, opt.strided_inputs ? 2 : 0, 1);

  DispatchOptions dopt;
  dopt.quant_mode = c.quant_mode;
  dopt.expert_token_nums_type = c.expert_token_nums_type;
  dopt.scales = inputs.scales.view;
  if (in.expert_scales.present()) dopt.expert_scales = weights.view;
  // The mask, every other byte of a buffer when strided.
  std::vector<std::uint8_t> mask_storage;
  TensorView mask;
  if (in.x_active_mask.present()) {
    const std::int64_t step = opt.strided_inputs ? 2 : 1;
    mask_storage.assign(static_cast<std::size_t>(std::max<std::int64_t>(bs * step, 1)), 0xa5);
    for (std::int64_t b = 0; b < bs; ++b)
      mask_storage[static_cast<std::size_t>(b * step)] = in.x_active_mask.data<std::uint8_t>()[b];
    mask = vector_view(mask_storage.data(), DType::boolean, bs, step);
    dopt.x_active_mask = mask;
  }
  std::optional<CallerDispatchOutputs> outs;
  Tensor out_idx;
  Strided strided_out_x;
  if (opt.caller_outputs) {
    outs.emplace(group, c, bs, k, h, 1);
    outs->attach(dopt.out, in);
    if (opt.strided_inputs) {  // a non-contiguous output buffer: padded rows, every other column
      const Tensor& out_x = outs->expand_x;
      strided_out_x = make_strided(out_x, 7, 2);
      dopt.out.expand_x = matrix_view(static_cast<void*>(strided_out_x.storage.data()), out_x.dtype(), out_x.rows(), h,
                                      strided_out_x.view.strides[0], 2);
    }
    out_idx = Tensor(DType::int32, bs * k);
    dopt.out.expand_idx = out_idx.mutable_view();
  }
  const DispatchResult d = group.dispatch(inputs.x.view, inputs.ids.view, dopt);
  if (traffic != nullptr) traffic->after_dispatch = group.traffic();

  casefile::RankOutputs o = copy_dispatch_outputs(c, in, d);
  o.expand_idx = copy_rows(d.expand_idx, d.expand_idx.rows());

  ExpertOutputs experts(group, c, in, d, opt);
  const TensorView expert_out = experts.view;
  CombineOptions copt;
  copt.comm_quant_mode = c.comm_quant_mode;
  copt.x_active_mask = mask;
  if (T == 2) copt.tp_send_counts = d.tp_recv_counts;
  Tensor combined;
  if (opt.caller_outputs) {
    combined = garbage_combine_out(c, bs, h);
    copt.out = combined.mutable_view();
  }
  // expand_idx as (BS, K), as programs pass dispatch's reshaped copy (any BS * K elements are accepted).
  Tensor idx_2d;
  TensorView expand_idx = d.expand_idx;
  if (opt.strided_inputs) {
    idx_2d = copy_rows(d.expand_idx, d.expand_idx.rows());
    expand_idx = matrix_view(idx_2d.raw(), DType::int32, bs, k);
  }
  const TensorView y = group.combine(expert_out, inputs.ids.view, expand_idx, d.ep_recv_counts, weights.view, copt);
  if (traffic != nullptr) traffic->after_combine = group.traffic();
  o.combine_out = copy_rows(y, bs);
  return o;
}

std::vector<casefile::RankOutputs> run_runtime(const casefile::Case& c, const RunOptions& opt) {
  const int world = c.ep_world_size * std::max(c.tp_world_size, 1);
  std::vector<casefile::RankOutputs> outputs(static_cast<std::size_t>(world));
  RuntimeOptions runtime_options{{std::chrono::milliseconds(60000)}};
  runtime_options.ranks_per_host = opt.ranks_per_host;
  InProcessWorld runtime(world, runtime_options);
  run_ranks(world, [&](int g) {
    std::unique_ptr<Group> group =
        runtime.join(rank_config(c, g), opt.group_options ? opt.group_options(g) : GroupOptions{});
    outputs[static_cast<std::size_t>(g)] = run_rank(*group, c, g, opt);
  });
  return outputs;
}

namespace {

template <class T>
std::string compare_values(const char* what, int g, const T* got, std::int64_t got_n, const std::vector<T>& want) {
  if (got_n != static_cast<std::int64_t>(want.size())) {
    return "rank " + std::to_string(g) + " " + what + ": " + std::to_string(got_n) + " values, oracle has " +
           std::to_string(want.size());
  }
  for (std::size_t i = 0; i < want.size(); ++i) {
    if (std::memcmp(&got[i], &want[i], sizeof(T)) != 0) {
      std::ostringstream os;
      os << "rank " << g << " " << what << "[" << i << "]: got " << +got[i] << ", oracle " << +want[i];
      return os.str();
    }
  }
  return "";
}

template <class T>
std::string compare_tensor(const char* what, int g, const Tensor& got, const std::vector<T>& want) {
  return compare_values(what, g, got.present() ? got.data<T>() : nullptr, got.numel(), want);
}

}  // namespace

std::string compare_rank_with_oracle(const casefile::Case& c, int r, const casefile::RankOutputs& o, const oracle::RankOutput& w) {
  std::string diff;
  if (o.expand_x.rows() != w.valid_rows)
    return "rank " + std::to_string(r) + " valid rows: got " + std::to_string(o.expand_x.rows()) + ", oracle " + std::to_string(w.valid_rows);
  if (c.quant_mode == 2) {
    if (!(diff = compare_tensor("expand_x(int8)", r, o.expand_x, w.expand_x_int8)).empty()) return diff;
    if (!(diff = compare_tensor("dynamic_scales", r, o.dynamic_scales, w.dynamic_scales)).empty()) return diff;
  } else if (!(diff = compare_tensor("expand_x", r, o.expand_x, w.expand_x)).empty()) {
    return diff;
  }
  if (c.ranks[static_cast<std::size_t>(r)].expert_scales.present() &&
      !(diff = compare_tensor("expand_scales", r, o.expand_scales, w.expand_scales)).empty())
    return diff;
  if (!(diff = compare_tensor("expand_idx", r, o.expand_idx, w.expand_idx)).empty()) return diff;
  if (!(diff = compare_tensor("expert_token_nums", r, o.expert_token_nums, w.expert_token_nums)).empty()) return diff;
  if (!(diff = compare_tensor("ep_recv_counts", r, o.ep_recv_counts, w.ep_recv_counts)).empty()) return diff;
  if (c.tp_world_size == 2 && !(diff = compare_tensor("tp_recv_counts", r, o.tp_recv_counts, w.tp_recv_counts)).empty()) return diff;
  return compare_tensor("combine_out", r, o.combine_out, w.combine_out);
}

std::string compare_with_oracle(const casefile::Case& c, const std::vector<casefile::RankOutputs>& got,
                                const std::vector<oracle::RankOutput>& want) {
  for (std::size_t g = 0; g < want.size(); ++g) {
    std::string diff = compare_rank_with_oracle(c, static_cast<int>(g), got[g], want[g]);
    if (!diff.empty()) return diff;
  }
  return "";
}

namespace {

std::string compare_rank_with_oracle_v2(const casefile::Case& c, int r, const casefile::RankOutputs& o,
                                        const oracle::v2::RankOutput& w) {
  std::string diff;
  if (o.expand_x.rows() != w.valid_rows)
    return "rank " + std::to_string(r) + " valid rows: got " + std::to_string(o.expand_x.rows()) + ", oracle " +
           std::to_string(w.valid_rows);
  if (c.quant_mode == 2) {
    if (!(diff = compare_tensor("expand_x(int8)", r, o.expand_x, w.expand_x_int8)).empty()) return diff;
    if (!(diff = compare_tensor("dynamic_scales", r, o.dynamic_scales, w.dynamic_scales)).empty()) return diff;
  } else if (!(diff = compare_tensor("expand_x", r, o.expand_x, w.expand_x)).empty()) {
    return diff;
  }
  if (c.ranks[static_cast<std::size_t>(r)].expert_scales.present() &&
      !(diff = compare_tensor("expand_scales", r, o.expand_scales, w.expand_scales)).empty())
    return diff;
  if (!(diff = compare_tensor("assist_info_for_combine", r, o.assist_info_for_combine, w.assist_info)).empty())
    return diff;
  if (!(diff = compare_tensor("expert_token_nums", r, o.expert_token_nums, w.expert_token_nums)).empty()) return diff;
  if (!(diff = compare_tensor("ep_recv_counts", r, o.ep_recv_counts, w.ep_recv_counts)).empty()) return diff;
  if (c.tp_world_size == 2 && !(diff = compare_tensor("tp_recv_counts", r, o.tp_recv_counts, w.tp_recv_counts)).empty())
    return diff;
  return compare_tensor("combine_out", r, o.combine_out, w.combine_out);
}

}  // namespace

std::string compare_rank(const casefile::Case& c, int g, const casefile::RankOutputs& got, const Expected& want) {
  if (want.op == 2) return compare_rank_with_oracle_v2(c, g, got, want.v2[static_cast<std::size_t>(g)]);
  return compare_rank_with_oracle(c, g, got, want.v1[static_cast<std::size_t>(g)]);
}

std::string oracle_diff(const casefile::Case& c, const std::vector<casefile::RankOutputs>& got) {
  const Expected want = expected_outputs(c);
  for (std::size_t g = 0; g < got.size(); ++g) {
    std::string diff = compare_rank(c, static_cast<int>(g), got[g], want);
    if (!diff.empty()) return diff;
  }
  return "";
}

}  // namespace moedist::testing

// ----- processes over shared memory -----
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>

namespace moedist::testing {
namespace {

constexpr std::size_t kSlotBytes = 16u << 20;  // results of one rank

struct Writer {
  std::byte* p;
  std::byte* end;
  void put(const void* data, std::size_t n) {
    if (p + n > end) throw std::runtime_error("test result slot overflow");
    std::memcpy(p, data, n);
    p += n;
  }
};

struct Reader {
  const std::byte* p;
  void get(void* data, std::size_t n) {
    std::memcpy(data, p, n);
    p += n;
  }
};

void put_tensor(Writer& w, const Tensor& t) {
  const std::int64_t head[4] = {t.present() ? 1 : 0, static_cast<std::int64_t>(t.dtype()), t.ndim(), t.rows()};
  const std::int64_t cols = t.cols();
  w.put(head, sizeof(head));
  w.put(&cols, sizeof(cols));
  if (t.present()) w.put(t.raw(), t.nbytes());
}

Tensor get_tensor(Reader& r) {
  std::int64_t head[4], cols;
  r.get(head, sizeof(head));
  r.get(&cols, sizeof(cols));
  if (head[0] == 0) return Tensor();
  Tensor t = head[2] == 2 ? Tensor(static_cast<DType>(head[1]), head[3], cols) : Tensor(static_cast<DType>(head[1]), head[3]);
  r.get(t.raw(), t.nbytes());
  return t;
}

std::string unique_job() {
  static std::atomic<int> counter{0};
  return "t" + std::to_string(::getpid()) + "-" + std::to_string(counter++) + "-" +
         std::to_string(std::chrono::steady_clock::now().time_since_epoch().count() % 1000000007);
}

}  // namespace

ProcessRun run_processes(const casefile::Case& c, const RunOptions& opt, const ShmOptions& shm,
                         const std::function<void(int, ShmOptions&)>& customize) {
  const int world = c.ep_world_size * std::max(c.tp_world_size, 1);
  const std::size_t total = kSlotBytes * static_cast<std::size_t>(world);
  void* area = ::mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (area == MAP_FAILED) throw std::runtime_error("mmap of the result area failed");
  auto* slots = static_cast<std::byte*>(area);
  const std::string job = unique_job();
  const auto start = std::chrono::steady_clock::now();
  std::vector<pid_t> pids(static_cast<std::size_t>(world), -1);
  for (int g = 0; g < world; ++g) {
    const pid_t pid = ::fork();
    if (pid < 0) throw std::runtime_error("fork failed");
    if (pid == 0) {
      std::byte* slot = slots + static_cast<std::size_t>(g) * kSlotBytes;
      int code = 0;
      try {
        ShmOptions options = shm;
        if (customize) customize(g, options);
        std::unique_ptr<Group> group = join_shm(rank_config(c, g), job, options);
        const casefile::RankOutputs o = run_rank(*group, c, g, opt);
        const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        Writer w{slot + 1024, slot + kSlotBytes};
        w.put(&secs, sizeof(secs));
        for (const Tensor* t :
             {&o.expand_x, &o.dynamic_scales, &o.expand_scales, &o.expand_idx, &o.assist_info_for_combine,
              &o.expert_token_nums, &o.ep_recv_counts, &o.tp_recv_counts, &o.combine_out}) {
          put_tensor(w, *t);
        }
      } catch (const std::exception& e) {
        const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        std::memcpy(slot + 1024, &secs, sizeof(secs));
        const std::string msg = std::string(e.what()).substr(0, 1000);
        std::memcpy(slot, msg.c_str(), msg.size() + 1);
        code = 3;
      }
      ::_exit(code);
    }
    pids[static_cast<std::size_t>(g)] = pid;
  }
  ProcessRun run;
  run.outputs.resize(static_cast<std::size_t>(world));
  run.errors.resize(static_cast<std::size_t>(world));
  run.wait_status.resize(static_cast<std::size_t>(world));
  run.seconds.resize(static_cast<std::size_t>(world));
  for (int g = 0; g < world; ++g) {
    int status = 0;
    ::waitpid(pids[static_cast<std::size_t>(g)], &status, 0);
    run.wait_status[static_cast<std::size_t>(g)] = status;
    const std::byte* slot = slots + static_cast<std::size_t>(g) * kSlotBytes;
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
      Reader r{slot + 1024};
      r.get(&run.seconds[static_cast<std::size_t>(g)], sizeof(double));
      casefile::RankOutputs& o = run.outputs[static_cast<std::size_t>(g)];
      for (Tensor* t : {&o.expand_x, &o.dynamic_scales, &o.expand_scales, &o.expand_idx, &o.assist_info_for_combine,
                        &o.expert_token_nums, &o.ep_recv_counts, &o.tp_recv_counts, &o.combine_out}) {
        *t = get_tensor(r);
      }
    } else if (WIFEXITED(status) && WEXITSTATUS(status) == 3) {
      std::memcpy(&run.seconds[static_cast<std::size_t>(g)], slot + 1024, sizeof(double));
      run.errors[static_cast<std::size_t>(g)] = reinterpret_cast<const char*>(slot);
    } else {
      run.errors[static_cast<std::size_t>(g)] =
          WIFSIGNALED(status) ? "killed by signal " + std::to_string(WTERMSIG(status)) : "exit status " + std::to_string(WEXITSTATUS(status));
    }
  }
  ::munmap(area, total);
  return run;
}

std::vector<std::string> moedist_shm_entries() {
  std::vector<std::string> found;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator("/dev/shm", ec)) {
    const std::string name = entry.path().filename().string();
    if (name.find("moedist") != std::string::npos) found.push_back(name);
  }
  return found;
}

int proc_entries(const char* dir) {
  int n = 0;
  DIR* d = ::opendir(dir);
  if (d == nullptr) return -1;
  while (const dirent* e = ::readdir(d)) {
    if (e->d_name[0] != '.') ++n;
  }
  ::closedir(d);
  return n;
}

}  // namespace moedist::testing
