// Tests of the V2 reference oracle (src/oracle/oracle_v2.h) against ascend-v2-semantics.md: the worked
// example of V2 §3.10 with the document's hand-computed values, hand-computed combine sums in the
// documented fp32 order, and metamorphic relations (V1 agreement where V1 and V2 coincide, masks
// against truncation and against zero experts, shared-expert placement) over small random cases.
#include "oracle/oracle_v2.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "numeric/convert.h"
#include "oracle/oracle.h"
#include "test_inputs.h"

namespace {

using moedist::numeric::Half;
using moedist::testing::exact_bf16_row;
using moedist::testing::exact_fp16_row;
namespace v2 = moedist::oracle::v2;
namespace v1 = moedist::oracle;

template <typename T>
std::vector<T> row_of(const std::vector<T>& flat, std::int64_t row, std::int64_t h) {
  return std::vector<T>(flat.begin() + row * h, flat.begin() + (row + 1) * h);
}

// The triples of assist_info, one tuple per own row.
std::vector<std::tuple<int, int, int>> triples_of(const v2::RankOutput& out) {
  std::vector<std::tuple<int, int, int>> triples;
  for (std::size_t i = 0; i + 2 < out.assist_info.size(); i += 3)
    triples.emplace_back(out.assist_info[i], out.assist_info[i + 1], out.assist_info[i + 2]);
  return triples;
}

v2::Case make_case(int w, int t, int e, int s, int sn, std::int64_t h, std::int64_t k) {
  v2::Case c;
  c.ep_world_size = w;
  c.tp_world_size = t;
  c.moe_expert_num = e;
  c.shared_expert_rank_num = s;
  c.shared_expert_num = sn;
  c.h = h;
  c.k = k;
  c.ranks.resize(static_cast<std::size_t>(w * std::max(t, 1)));
  return c;
}

v2::RankInput make_rank(std::int64_t bs, std::vector<std::uint16_t> x, std::vector<std::int32_t> ids) {
  v2::RankInput rank;
  rank.bs = bs;
  rank.x = std::move(x);
  rank.expert_ids = std::move(ids);
  return rank;
}

// ---------------------------------------------------------------------------------------------
// 1. The worked example of V2 §3.10. Expected values are the document's.

// x[r][b] = {16r + 4b + 1, 16r + 4b + 2}: distinct small integers, exact in bf16.
std::vector<float> example_row(int r, int b) {
  return {static_cast<float>(16 * r + 4 * b + 1), static_cast<float>(16 * r + 4 * b + 2)};
}

// W=4, S=2, Sn=2 (R=1), E=4 (L=2), Z=1 (id 4), C=1 (id 5), K=2, BS=2, 2-D masks; ori_x = x / 2.
v2::Case worked_example_case() {
  v2::Case c = make_case(4, 0, 4, 2, 2, 2, 2);
  c.zero_expert_num = 1;
  c.copy_expert_num = 1;
  const std::vector<std::vector<std::int32_t>> ids = {{0, 4, 2, 5}, {1, 3, 4, 5}, {3, 0, 1, 2}, {5, 4, 0, 1}};
  const std::vector<std::vector<std::uint8_t>> masks = {{1, 1, 1, 1}, {1, 0, 1, 1}, {0, 0, 1, 1}, {1, 1, 1, 1}};
  for (int r = 0; r < 4; ++r) {
    std::vector<float> x, ori;
    for (int b = 0; b < 2; ++b) {
      for (const float v : example_row(r, b)) {
        x.push_back(v);
        ori.push_back(v / 2);
      }
    }
    c.ranks[r] = make_rank(2, exact_bf16_row(x), ids[r]);
    c.ranks[r].x_active_mask = masks[r];
    c.ranks[r].mask_2d = true;
    c.ranks[r].ori_x = exact_bf16_row(ori);
  }
  return c;
}

using Triples = std::vector<std::tuple<int, int, int>>;

TEST(OracleV2WorkedExample, MoeRank2) {
  const std::vector<v2::RankOutput> out = v2::run(worked_example_case());
  ASSERT_EQ(out.size(), 4u);
  const v2::RankOutput& rank2 = out[2];
  const Triples expected = {{0, 0, 0}, {3, 1, 0}, {1, 0, 0}, {2, 1, 0}, {3, 1, 1}};
  EXPECT_EQ(triples_of(rank2), expected);
  EXPECT_EQ(rank2.valid_rows, 5);
  EXPECT_EQ(rank2.own_rows, 5);
  EXPECT_EQ(rank2.assist_info.size(), 15u);
  EXPECT_EQ(rank2.ep_recv_counts, (std::vector<std::int32_t>{1, 1, 1, 2, 2, 3, 4, 5}));
  EXPECT_EQ(rank2.expert_token_nums, (std::vector<std::int64_t>{2, 3}));
  ASSERT_EQ(rank2.expand_x.size(), 5u * 2);
  for (std::size_t i = 0; i < expected.size(); ++i) {
    const auto [r, b, k] = expected[i];
    EXPECT_EQ(row_of(rank2.expand_x, static_cast<std::int64_t>(i), 2), exact_bf16_row(example_row(r, b)))
        << "row " << i;
  }
  EXPECT_TRUE(rank2.tp_recv_counts.empty());
  EXPECT_TRUE(rank2.expand_scales.empty());
}

TEST(OracleV2WorkedExample, MoeRank3) {
  const std::vector<v2::RankOutput> out = v2::run(worked_example_case());
  const v2::RankOutput& rank3 = out[3];
  EXPECT_EQ(triples_of(rank3), (Triples{{0, 1, 0}, {2, 1, 1}}));
  EXPECT_EQ(rank3.ep_recv_counts, (std::vector<std::int32_t>{1, 1, 2, 2, 2, 2, 2, 2}));
  EXPECT_EQ(rank3.expert_token_nums, (std::vector<std::int64_t>{2, 0}));
  EXPECT_EQ(rank3.expand_x, exact_bf16_row({5, 6, 37, 38}));
}

TEST(OracleV2WorkedExample, SharedRanks) {
  const std::vector<v2::RankOutput> out = v2::run(worked_example_case());
  // Rows r0 b0,b1 | r1 b0,b1 | r2 b1 | r3 b0,b1 on both shared ranks; k-field K + j, j = s / R = s.
  const std::vector<std::pair<int, int>> sources = {{0, 0}, {0, 1}, {1, 0}, {1, 1}, {2, 1}, {3, 0}, {3, 1}};
  for (int s = 0; s < 2; ++s) {
    SCOPED_TRACE("shared rank " + std::to_string(s));
    const v2::RankOutput& shared = out[s];
    Triples expected;
    for (const auto& [r, b] : sources) expected.emplace_back(r, b, 2 + s);
    EXPECT_EQ(triples_of(shared), expected);
    EXPECT_EQ(shared.ep_recv_counts, (std::vector<std::int32_t>{2, 4, 5, 7}));
    EXPECT_EQ(shared.expert_token_nums, (std::vector<std::int64_t>{7}));
    ASSERT_EQ(shared.valid_rows, 7);
    for (std::size_t i = 0; i < sources.size(); ++i) {
      EXPECT_EQ(row_of(shared.expand_x, static_cast<std::int64_t>(i), 2),
                exact_bf16_row(example_row(sources[i].first, sources[i].second)));
    }
  }
}

TEST(OracleV2WorkedExample, ExpertTokenNumsType0) {
  v2::Case c = worked_example_case();
  c.expert_token_nums_type = 0;
  const std::vector<v2::RankOutput> out = v2::run(c);
  EXPECT_EQ(out[2].expert_token_nums, (std::vector<std::int64_t>{2, 5}));
  EXPECT_EQ(out[3].expert_token_nums, (std::vector<std::int64_t>{2, 2}));
  EXPECT_EQ(out[0].expert_token_nums, (std::vector<std::int64_t>{7}));
}

TEST(OracleV2WorkedExample, SmoothRowsSharedJAndMoeSnPlusE) {
  // Smooth row i is the constant 2^i, so a row quantized with row i has scale fl32(1/fl32(127/(amax*2^i)))
  // with amax = the row's larger element; the int8 values are the same for every i (exact scaling).
  v2::Case c = worked_example_case();
  c.quant_mode = 2;
  for (v2::RankInput& rank : c.ranks) {
    for (int row = 0; row < 6; ++row) rank.scales.insert(rank.scales.end(), 2, std::ldexp(1.0f, row));
  }
  const std::vector<v2::RankOutput> out = v2::run(c);
  auto expected_scale = [](int r, int b, int smooth_row) {
    const float amax = example_row(r, b)[1] * std::ldexp(1.0f, smooth_row);
    const float ds = 127.0f / amax;
    return 1.0f / ds;
  };
  // Doc: "smooth rows 0 / 1; MoE expert e uses row 2+e".
  for (int s = 0; s < 2; ++s) {
    const Triples triples = triples_of(out[s]);
    ASSERT_EQ(out[s].dynamic_scales.size(), triples.size());
    for (std::size_t i = 0; i < triples.size(); ++i) {
      const auto [r, b, k] = triples[i];
      EXPECT_EQ(out[s].dynamic_scales[i], expected_scale(r, b, s)) << "shared rank " << s << " row " << i;
    }
  }
  const std::vector<int> rank2_experts = {0, 0, 1, 1, 1};
  const std::vector<int> rank3_experts = {2, 2};
  for (const auto& [d, experts] : {std::pair{2, rank2_experts}, std::pair{3, rank3_experts}}) {
    const Triples triples = triples_of(out[d]);
    ASSERT_EQ(out[d].dynamic_scales.size(), experts.size());
    for (std::size_t i = 0; i < experts.size(); ++i) {
      const auto [r, b, k] = triples[i];
      EXPECT_EQ(out[d].dynamic_scales[i], expected_scale(r, b, 2 + experts[i])) << "rank " << d << " row " << i;
    }
  }
}

TEST(OracleV2WorkedExample, CombineWithIdentityExperts) {
  // Per token, as multiples of x (ori_x = x/2; two shared experts add x each; zero adds nothing):
  // r0 b0: e0 + zero -> 1 + 2 = 3.    r0 b1: e2 + copy -> 1 + 0.5 + 2 = 3.5.
  // r1 b0: e1 + masked -> 3.          r1 b1: zero + copy -> 0.5 + 2 = 2.5.
  // r2 b0: inactive (zero row).       r2 b1: e1 + e2 -> 4.
  // r3 b0: copy + zero -> 2.5.        r3 b1: e0 + e1 -> 4.
  const std::vector<v2::RankOutput> out = v2::run(worked_example_case());
  const std::vector<std::vector<float>> multiple = {{3, 3.5f}, {3, 2.5f}, {0, 4}, {2.5f, 4}};
  for (int r = 0; r < 4; ++r) {
    std::vector<float> expected;
    for (int b = 0; b < 2; ++b) {
      for (const float v : example_row(r, b)) expected.push_back(v * multiple[r][b]);
    }
    EXPECT_EQ(out[r].combine_out, exact_bf16_row(expected)) << "rank " << r;
  }
  EXPECT_EQ(out[2].token_active, (std::vector<std::uint8_t>{0, 1}));
  EXPECT_EQ(out[3].token_active, (std::vector<std::uint8_t>{1, 1}));
}

// ---------------------------------------------------------------------------------------------
// Random cases for the metamorphic tests.

struct Shape {
  int w = 2, t = 0, s = 0, sn = 0, l = 1, z = 0, copy = 0, konst = 0;
  int max_bs = 4;
  bool allow_shared_expert_x = false;
};

std::vector<std::uint16_t> random_halves(std::mt19937_64& rng, Half dtype, std::int64_t n, float stddev) {
  std::normal_distribution<float> normal(0.0f, stddev);
  std::vector<std::uint16_t> bits;
  for (std::int64_t i = 0; i < n; ++i) bits.push_back(moedist::numeric::f32_to_half_rne(dtype, normal(rng)));
  return bits;
}

int uniform(std::mt19937_64& rng, int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); }
bool coin(std::mt19937_64& rng) { return uniform(rng, 0, 1) == 1; }

// Random inputs for the shape: dtype, modes, H, K, BS per rank, ids (distinct per token), weights,
// smooth scales, special-expert inputs. No masks; identity experts.
v2::Case random_case(std::mt19937_64& rng, const Shape& shape) {
  const int e = shape.l * (shape.w - shape.s);
  const int ids_total = e + shape.z + shape.copy + shape.konst;
  const int h = uniform(rng, 1, 20);
  const int k = uniform(rng, 1, std::min(ids_total, 4));
  v2::Case c = make_case(shape.w, shape.t, e, shape.s, shape.sn, h, k);
  c.zero_expert_num = shape.z;
  c.copy_expert_num = shape.copy;
  c.const_expert_num = shape.konst;
  c.dtype = coin(rng) ? Half::bf16 : Half::fp16;
  c.quant_mode = coin(rng) ? 2 : 0;
  c.comm_quant_mode = shape.t != 2 && coin(rng) ? 2 : 0;
  c.expert_token_nums_type = uniform(rng, 0, 1);
  const bool smooth = c.quant_mode == 2 && coin(rng);
  const bool weights = coin(rng);
  const bool same_bs = coin(rng);
  const int common_bs = uniform(rng, 0, shape.max_bs);
  const int sn = shape.s == 0 ? 0 : shape.sn;
  std::uniform_real_distribution<float> weight(-1.0f, 1.0f);
  std::uniform_real_distribution<float> smooth_value(0.5f, 2.0f);
  for (v2::RankInput& rank : c.ranks) {
    rank.bs = same_bs ? common_bs : uniform(rng, 0, shape.max_bs);
    rank.x = random_halves(rng, c.dtype, rank.bs * c.h, 4.0f);
    std::vector<std::int32_t> all(static_cast<std::size_t>(ids_total));
    std::iota(all.begin(), all.end(), 0);
    for (std::int64_t b = 0; b < rank.bs; ++b) {
      std::shuffle(all.begin(), all.end(), rng);
      rank.expert_ids.insert(rank.expert_ids.end(), all.begin(), all.begin() + c.k);
    }
    if (weights) {
      for (std::int64_t i = 0; i < rank.bs * c.k; ++i) rank.expert_scales.push_back(weight(rng));
    }
    if (smooth) {
      for (std::int64_t i = 0; i < (sn + e) * c.h; ++i) rank.scales.push_back(smooth_value(rng));
    }
    if (shape.copy + shape.konst > 0) rank.ori_x = random_halves(rng, c.dtype, rank.bs * c.h, 4.0f);
    if (shape.konst > 0) {
      rank.const_expert_alpha_1 = random_halves(rng, c.dtype, shape.konst * c.h, 0.5f);
      rank.const_expert_alpha_2 = random_halves(rng, c.dtype, shape.konst * c.h, 0.5f);
      rank.const_expert_v = random_halves(rng, c.dtype, shape.konst * c.h, 4.0f);
    }
    if (shape.allow_shared_expert_x && shape.s == 0 && coin(rng)) {
      rank.shared_expert_x = random_halves(rng, c.dtype, rank.bs * c.h, 4.0f);
    }
  }
  return c;
}

// A random legal shape with V2 features: shared experts with Sn in [1, 4], special experts, TP.
Shape random_v2_shape(std::mt19937_64& rng) {
  Shape shape;
  shape.w = uniform(rng, 1, 6);
  shape.t = shape.w >= 2 ? uniform(rng, 0, 2) : uniform(rng, 0, 1);
  shape.s = uniform(rng, 0, shape.w - 1);
  if (shape.s == 0) {
    shape.sn = uniform(rng, 0, 1);
  } else {
    std::vector<int> divisors;
    for (int sn = 1; sn <= std::min(shape.s, 4); ++sn) {
      if (shape.s % sn == 0) divisors.push_back(sn);
    }
    shape.sn = divisors[uniform(rng, 0, static_cast<int>(divisors.size()) - 1)];
  }
  shape.l = shape.t == 2 ? 1 : uniform(rng, 1, 3);
  shape.z = uniform(rng, 0, 2);
  shape.copy = uniform(rng, 0, 2);
  shape.konst = uniform(rng, 0, 2);
  shape.allow_shared_expert_x = true;
  return shape;
}

std::string describe(const v2::Case& c) {
  std::ostringstream s;
  s << "W=" << c.ep_world_size << " T=" << c.tp_world_size << " E=" << c.moe_expert_num
    << " S=" << c.shared_expert_rank_num << " Sn=" << c.shared_expert_num << " Z=" << c.zero_expert_num
    << " C=" << c.copy_expert_num << " Q=" << c.const_expert_num << " H=" << c.h << " K=" << c.k
    << " quant=" << c.quant_mode << " comm_quant=" << c.comm_quant_mode
    << " dtype=" << (c.dtype == Half::bf16 ? "bf16" : "fp16");
  return s.str();
}

// Random expert outputs (combine_x) for every rank of `c`, sized by a run of `sizing`, which must
// dispatch the same number of rows.
void give_random_expert_outputs(v2::Case& c, const v2::Case& sizing, std::mt19937_64& rng) {
  const std::vector<v2::RankOutput> out = v2::run(sizing);
  for (std::size_t g = 0; g < c.ranks.size(); ++g) {
    c.ranks[g].has_combine_x = true;
    c.ranks[g].combine_x = random_halves(rng, c.dtype, out[g].valid_rows * c.h, 4.0f);
  }
}

void expect_same_dispatch(const v2::RankOutput& a, const v2::RankOutput& b) {
  EXPECT_EQ(a.valid_rows, b.valid_rows);
  EXPECT_EQ(a.own_rows, b.own_rows);
  EXPECT_EQ(a.expand_x, b.expand_x);
  EXPECT_EQ(a.expand_x_int8, b.expand_x_int8);
  EXPECT_EQ(a.dynamic_scales, b.dynamic_scales);
  EXPECT_EQ(a.expand_scales, b.expand_scales);
  EXPECT_EQ(a.assist_info, b.assist_info);
  EXPECT_EQ(a.expert_token_nums, b.expert_token_nums);
  EXPECT_EQ(a.ep_recv_counts, b.ep_recv_counts);
  EXPECT_EQ(a.tp_recv_counts, b.tp_recv_counts);
}

// ---------------------------------------------------------------------------------------------
// 2a. Where V1 and V2 coincide (no 2-D mask, no special experts, Sn <= 1; V1's shared split differs, so
// shared ranks' rows are not compared), the two oracles agree bit for bit, and V1's expand_idx is the
// position of V2's triple inside its (l, r) block.

v1::Case to_v1(const v2::Case& c) {
  v1::Case out;
  out.ep_world_size = c.ep_world_size;
  out.tp_world_size = c.tp_world_size;
  out.moe_expert_num = c.moe_expert_num;
  out.shared_expert_rank_num = c.shared_expert_rank_num;
  out.global_bs = c.global_bs;
  out.quant_mode = c.quant_mode;
  out.expert_token_nums_type = c.expert_token_nums_type;
  out.comm_quant_mode = c.comm_quant_mode;
  out.dtype = c.dtype;
  out.h = c.h;
  out.k = c.k;
  for (const v2::RankInput& rank : c.ranks) {
    v1::RankInput r;
    r.bs = rank.bs;
    r.x = rank.x;
    r.expert_ids = rank.expert_ids;
    r.scales = rank.scales;
    r.expert_scales = rank.expert_scales;
    r.x_active_mask = rank.x_active_mask;
    r.has_combine_x = rank.has_combine_x;
    r.combine_x = rank.combine_x;
    out.ranks.push_back(r);
  }
  return out;
}

TEST(OracleV2AgreesWithV1, WhereTheContractsCoincide) {
  std::mt19937_64 rng(0x5eed0001);
  for (int iteration = 0; iteration < 300; ++iteration) {
    Shape shape;
    shape.w = uniform(rng, 1, 5);
    shape.t = shape.w >= 2 ? uniform(rng, 0, 2) : uniform(rng, 0, 1);
    shape.s = uniform(rng, 0, shape.w - 1);
    shape.sn = shape.s == 0 ? uniform(rng, 0, 1) : 1;
    shape.l = shape.t == 2 ? 1 : uniform(rng, 1, 3);
    v2::Case c = random_case(rng, shape);
    // A 1-D prefix mask means the same in both (V1 §3.7, V2 §3.2); inactive tokens get garbage ids.
    if (coin(rng)) {
      for (v2::RankInput& rank : c.ranks) {
        const int n = uniform(rng, 0, static_cast<int>(rank.bs));
        rank.x_active_mask.assign(static_cast<std::size_t>(rank.bs), 0);
        std::fill(rank.x_active_mask.begin(), rank.x_active_mask.begin() + n, 1);
        for (std::int64_t i = n * c.k; i < rank.bs * c.k; ++i) rank.expert_ids[i] = -7;
      }
    }
    // Expert outputs other than identity only where both oracles have the same rows everywhere, and not
    // with a bf16 TP reduce, whose ties V1 rounds away from zero and V2 to even (identity experts never tie).
    const bool bf16_tp = c.tp_world_size == 2 && c.dtype == Half::bf16;
    if (shape.s == 0 && !bf16_tp && coin(rng)) give_random_expert_outputs(c, c, rng);
    SCOPED_TRACE(describe(c));

    const std::vector<v2::RankOutput> out2 = v2::run(c);
    const std::vector<v1::RankOutput> out1 = v1::run(to_v1(c));
    ASSERT_EQ(out1.size(), out2.size());
    const int tp_size = std::max(c.tp_world_size, 1);
    const int l = shape.l;
    for (std::size_t g = 0; g < out2.size(); ++g) {
      const int ep = static_cast<int>(g) / tp_size;
      EXPECT_EQ(out2[g].combine_out, out1[g].combine_out) << "rank " << g;
      if (ep < c.shared_expert_rank_num) continue;
      EXPECT_EQ(out2[g].valid_rows, out1[g].valid_rows) << "rank " << g;
      EXPECT_EQ(out2[g].expand_x, out1[g].expand_x) << "rank " << g;
      EXPECT_EQ(out2[g].expand_x_int8, out1[g].expand_x_int8) << "rank " << g;
      EXPECT_EQ(out2[g].dynamic_scales, out1[g].dynamic_scales) << "rank " << g;
      EXPECT_EQ(out2[g].expand_scales, out1[g].expand_scales) << "rank " << g;
      EXPECT_EQ(out2[g].ep_recv_counts, out1[g].ep_recv_counts) << "rank " << g;
      EXPECT_EQ(out2[g].expert_token_nums, out1[g].expert_token_nums) << "rank " << g;
      EXPECT_EQ(out2[g].tp_recv_counts, out1[g].tp_recv_counts) << "rank " << g;

      // Triple i = (r, b, k) sits in block (l, r) of expert e = ids[r][b, k]; its offset there is V1's expand_idx.
      const int tp = static_cast<int>(g) % tp_size;
      const Triples triples = triples_of(out2[g]);
      ASSERT_EQ(static_cast<std::int64_t>(triples.size()), out2[g].own_rows);
      for (std::size_t i = 0; i < triples.size(); ++i) {
        const auto [r, b, k] = triples[i];
        const int src = r * tp_size + tp;
        ASSERT_LT(k, c.k);
        const int expert = c.ranks[src].expert_ids[b * c.k + k];
        ASSERT_EQ(c.shared_expert_rank_num + expert / l, ep) << "triple " << i << " is on the wrong rank";
        const int block = (expert % l) * c.ep_world_size + r;
        const std::int32_t start = block == 0 ? 0 : out2[g].ep_recv_counts[block - 1];
        EXPECT_GE(static_cast<std::int32_t>(i), start);
        EXPECT_LT(static_cast<std::int32_t>(i), out2[g].ep_recv_counts[block]);
        EXPECT_EQ(out1[src].expand_idx[b * c.k + k], static_cast<std::int32_t>(i) - start) << "triple " << i;
      }
    }
    if (HasFailure()) return;
  }
}

// ---------------------------------------------------------------------------------------------
// 2b. A 1-D mask with n trues gives the outputs of the call on the first n tokens alone, and zero
// combine rows after them.

TEST(OracleV2Masks, OneDimensionalMaskEqualsTheFirstNTokensAlone) {
  std::mt19937_64 rng(0x5eed0002);
  for (int iteration = 0; iteration < 200; ++iteration) {
    v2::Case masked = random_case(rng, random_v2_shape(rng));
    v2::Case prefix = masked;
    std::vector<std::int64_t> n(masked.ranks.size());
    for (std::size_t g = 0; g < masked.ranks.size(); ++g) {
      v2::RankInput& m = masked.ranks[g];
      v2::RankInput& p = prefix.ranks[g];
      n[g] = uniform(rng, 0, static_cast<int>(m.bs));
      m.x_active_mask.assign(static_cast<std::size_t>(m.bs), 0);
      std::fill(m.x_active_mask.begin(), m.x_active_mask.begin() + n[g], 1);
      for (std::int64_t i = n[g] * masked.k; i < m.bs * masked.k; ++i) m.expert_ids[i] = (i % 2) ? -3 : 1 << 30;
      p.bs = n[g];
      p.x.resize(static_cast<std::size_t>(n[g] * masked.h));
      p.expert_ids.resize(static_cast<std::size_t>(n[g] * masked.k));
      if (!p.expert_scales.empty()) p.expert_scales.resize(static_cast<std::size_t>(n[g] * masked.k));
      if (!p.ori_x.empty()) p.ori_x.resize(static_cast<std::size_t>(n[g] * masked.h));
      if (!p.shared_expert_x.empty()) p.shared_expert_x.resize(static_cast<std::size_t>(n[g] * masked.h));
    }
    if (coin(rng)) {
      give_random_expert_outputs(prefix, prefix, rng);
      for (std::size_t g = 0; g < masked.ranks.size(); ++g) {
        masked.ranks[g].has_combine_x = true;
        masked.ranks[g].combine_x = prefix.ranks[g].combine_x;
      }
    }
    SCOPED_TRACE(describe(masked));

    const std::vector<v2::RankOutput> a = v2::run(masked);
    const std::vector<v2::RankOutput> b = v2::run(prefix);
    for (std::size_t g = 0; g < a.size(); ++g) {
      SCOPED_TRACE("rank " + std::to_string(g));
      expect_same_dispatch(a[g], b[g]);
      const std::int64_t bs = masked.ranks[g].bs;
      std::vector<std::uint8_t> active(static_cast<std::size_t>(bs), 0);
      std::fill(active.begin(), active.begin() + n[g], 1);
      EXPECT_EQ(a[g].token_active, active);
      std::vector<std::uint16_t> expected = b[g].combine_out;
      expected.resize(static_cast<std::size_t>(bs * masked.h), 0);
      EXPECT_EQ(a[g].combine_out, expected);
    }
    if (HasFailure()) return;
  }
}

// ---------------------------------------------------------------------------------------------
// 2c. Masking an entry in a 2-D mask is the same as routing it to a zero expert, as long as every
// token keeps a true entry (a token with none would become inactive instead).

TEST(OracleV2Masks, TwoDimensionalMaskEqualsZeroExperts) {
  std::mt19937_64 rng(0x5eed0003);
  for (int iteration = 0; iteration < 200; ++iteration) {
    Shape shape = random_v2_shape(rng);
    shape.z = std::max(shape.z, 1);
    v2::Case masked = random_case(rng, shape);
    v2::Case zeroed = masked;
    for (std::size_t g = 0; g < masked.ranks.size(); ++g) {
      v2::RankInput& m = masked.ranks[g];
      m.mask_2d = true;
      m.x_active_mask.assign(static_cast<std::size_t>(m.bs * masked.k), 0);
      for (std::int64_t b = 0; b < m.bs; ++b) {
        for (std::int64_t k = 0; k < masked.k; ++k) m.x_active_mask[b * masked.k + k] = coin(rng) ? 1 : 0;
        m.x_active_mask[b * masked.k + uniform(rng, 0, static_cast<int>(masked.k) - 1)] = 1;
        for (std::int64_t k = 0; k < masked.k; ++k) {
          if (m.x_active_mask[b * masked.k + k] != 0) continue;
          zeroed.ranks[g].expert_ids[b * masked.k + k] = masked.moe_expert_num;  // the first zero expert
          m.expert_ids[b * masked.k + k] = -1;                                   // never read
        }
      }
    }
    if (coin(rng)) {
      give_random_expert_outputs(zeroed, zeroed, rng);
      for (std::size_t g = 0; g < masked.ranks.size(); ++g) {
        masked.ranks[g].has_combine_x = true;
        masked.ranks[g].combine_x = zeroed.ranks[g].combine_x;
      }
    }
    SCOPED_TRACE(describe(masked));

    const std::vector<v2::RankOutput> a = v2::run(masked);
    const std::vector<v2::RankOutput> b = v2::run(zeroed);
    for (std::size_t g = 0; g < a.size(); ++g) {
      SCOPED_TRACE("rank " + std::to_string(g));
      expect_same_dispatch(a[g], b[g]);
      EXPECT_EQ(a[g].token_active, b[g].token_active);
      EXPECT_EQ(a[g].combine_out, b[g].combine_out);
    }
    if (HasFailure()) return;
  }
}

TEST(OracleV2Masks, AllFalseRowMakesTheTokenInactiveButSpecialOnlyRowsStayActive) {
  // W = 2, S = 1 (shared rank 0), Sn = 1, E = 1 (rank 1), Z = 1 (id 1), K = 2, H = 1.
  // Rank 1: token 0 all-false; token 1 only the zero expert (true) -> still goes to the shared expert.
  v2::Case c = make_case(2, 0, 1, 1, 1, 1, 2);
  c.zero_expert_num = 1;
  c.ranks[0] = make_rank(0, {}, {});
  c.ranks[0].mask_2d = true;
  c.ranks[1] = make_rank(2, exact_bf16_row({3, 5}), {0, 1, 1, 0});
  c.ranks[1].x_active_mask = {0, 0, 1, 0};
  c.ranks[1].mask_2d = true;
  const std::vector<v2::RankOutput> out = v2::run(c);
  EXPECT_EQ(out[1].valid_rows, 0);
  EXPECT_EQ(out[1].ep_recv_counts, (std::vector<std::int32_t>{0, 0}));
  EXPECT_EQ(triples_of(out[0]), (Triples{{1, 1, 2}}));
  EXPECT_EQ(out[0].ep_recv_counts, (std::vector<std::int32_t>{0, 1}));
  EXPECT_EQ(out[1].token_active, (std::vector<std::uint8_t>{0, 1}));
  EXPECT_EQ(out[1].combine_out, exact_bf16_row({0, 5}));  // token 1: zero expert + the shared expert's x
}

TEST(OracleV2Masks, OneDimensionalMaskCountsItsTrues) {
  // V2 §3.2 / §6: the kernel reads only n = popcount(mask) and takes tokens [0, n), wherever the trues
  // sit. (moedist's validation refuses such masks; this pins the oracle's reading of §6.)
  v2::Case c = make_case(1, 0, 1, 0, 0, 1, 1);
  c.ranks[0] = make_rank(3, exact_bf16_row({2, 3, 4}), {0, 0, 0});
  c.ranks[0].x_active_mask = {0, 1, 0};
  const std::vector<v2::RankOutput> out = v2::run(c);
  EXPECT_EQ(triples_of(out[0]), (Triples{{0, 0, 0}}));
  EXPECT_EQ(out[0].token_active, (std::vector<std::uint8_t>{1, 0, 0}));
  EXPECT_EQ(out[0].combine_out, exact_bf16_row({2, 0, 0}));
}

// ---------------------------------------------------------------------------------------------
// 2d-2e, 2g. Hand-computed combine sums in the documented fp32 order (V2 §4.3).

TEST(OracleV2Combine, CopyExpertsAtTheirKInTheFp32Order) {
  // W = 1, E = 1, Z = 1 (id 1), C = 2 (ids 2, 3), K = 4, H = 2, one token, identity expert (Y = x).
  // ids [copy 2, routed 0, zero 1, copy 3], weights [1, 1, 0.5, -1]; x = [1, 3], ori_x = [2^24, 0.5].
  // h0: 2^24 -> + 1 = 2^24 + 1 -> 2^24 (tie to even) -> (zero) -> - 2^24 = 0. Routed first would give 1.
  // h1: 0.5 -> + 3 = 3.5 -> - 0.5 = 3.
  v2::Case c = make_case(1, 0, 1, 0, 1, 2, 4);
  c.zero_expert_num = 1;
  c.copy_expert_num = 2;
  c.ranks[0] = make_rank(1, exact_bf16_row({1, 3}), {2, 0, 1, 3});
  c.ranks[0].expert_scales = {1.0f, 1.0f, 0.5f, -1.0f};
  c.ranks[0].ori_x = exact_bf16_row({0x1p24f, 0.5f});
  const std::vector<v2::RankOutput> out = v2::run(c);
  EXPECT_EQ(out[0].valid_rows, 1);  // only the routed entry is sent
  EXPECT_EQ(triples_of(out[0]), (Triples{{0, 0, 1}}));
  EXPECT_EQ(out[0].combine_out, exact_bf16_row({0.0f, 3.0f}));
}

TEST(OracleV2Combine, CopyExpertWeightsOriXNotX) {
  // fp16, W = 2, E = 2, C = 1 (id 2), K = 2: token ids [2, 1] weights [0.25, 2]; x = [8], ori_x = [-4].
  // -4 * 0.25 + 8 * 2 = 15.
  v2::Case c = make_case(2, 0, 2, 0, 0, 1, 2);
  c.dtype = Half::fp16;
  c.copy_expert_num = 1;
  c.ranks[0] = make_rank(1, exact_fp16_row({8}), {2, 1});
  c.ranks[0].expert_scales = {0.25f, 2.0f};
  c.ranks[0].ori_x = exact_fp16_row({-4});
  c.ranks[1] = make_rank(0, {}, {});
  c.ranks[1].ori_x = {};
  const std::vector<v2::RankOutput> out = v2::run(c);
  EXPECT_EQ(out[0].combine_out, exact_fp16_row({15}));
  EXPECT_EQ(out[1].valid_rows, 1);
  EXPECT_EQ(out[0].valid_rows, 0);
}

TEST(OracleV2Combine, ConstExpertSoftmaxOfDotProductsInIncreasingH) {
  // W = 1, E = 1, Q = 1 (id 1), K = 2, H = 4, bf16, two tokens, identity routed expert (Y = x).
  // alpha_1 = [1, 1, 1, -1], alpha_2 = 0, v = [0, 2, -2, 0].
  v2::Case c = make_case(1, 0, 1, 0, 0, 4, 2);
  c.const_expert_num = 1;
  const float big = 0x1p24f;
  c.ranks[0] = make_rank(2, exact_bf16_row({0, 1, 2, -0x1p21f, /**/ 0, 0, 0, 0}), {1, 0, /**/ 0, 1});
  c.ranks[0].expert_scales = {0.25f, 1.0f, /**/ 1.0f, 1.0f};
  c.ranks[0].ori_x = exact_bf16_row({big, 1, 1, big, /**/ 1, 0, 0, 0});
  c.ranks[0].const_expert_alpha_1 = exact_bf16_row({1, 1, 1, -1});
  c.ranks[0].const_expert_alpha_2 = exact_bf16_row({0, 0, 0, 0});
  c.ranks[0].const_expert_v = exact_bf16_row({0, 2, -2, 0});
  const std::vector<v2::RankOutput> out = v2::run(c);

  // Token 0: l1 = ((2^24 + 1) + 1) - 2^24 in increasing h = (2^24 + 1 -> 2^24, + 1 -> 2^24) - 2^24 = 0
  // (a pairwise sum would give 1); l2 = 0, so a1 = a2 = exp(0) / 2 = 0.5.
  // CONST = [2^23 + 0, 0.5 + 1, 0.5 - 1, 2^23] = [2^23, 1.5, -0.5, 2^23]; times 0.25 = [2^21, 0.375, -0.125, 2^21].
  // Then k = 1 routes to expert 0 with x = [0, 1, 2, -2^21]: [2^21, 1.375, 1.875, 0].
  const std::vector<std::uint16_t> token0 = exact_bf16_row({0x1p21f, 1.375f, 1.875f, 0.0f});
  EXPECT_EQ(row_of(out[0].combine_out, 0, 4), token0);

  // Token 1: routed x = 0, then const with ori_x = [1, 0, 0, 0]: l1 = 1, l2 = 0, m = 1,
  // e1 = exp(0) = 1, e2 = exp(-1); a1 = 1 / (1 + e2), a2 = e2 / (1 + e2);
  // CONST = [fl32(1 * a1) + fl32(0 * a2), 0 + fl32(2 * a2), 0 + fl32(-2 * a2), 0].
  const float e2 = std::exp(-1.0f);
  const float total = 1.0f + e2;
  const float a1 = 1.0f / total;
  const float a2 = e2 / total;
  const float two_a2 = 2.0f * a2;
  const std::vector<std::uint16_t> token1 = {moedist::numeric::f32_to_bf16_rne(a1),
                                             moedist::numeric::f32_to_bf16_rne(two_a2),
                                             moedist::numeric::f32_to_bf16_rne(-two_a2), 0};
  EXPECT_EQ(row_of(out[0].combine_out, 1, 4), token1);
  EXPECT_EQ(out[0].valid_rows, 2);  // one routed row per token; the const entries stay home
}

TEST(OracleV2Combine, SharedExpertXIsAddedAfterTheRoutedExperts) {
  // W = 1, S = 0 (Sn = 1 remapped to 0), E = 2, K = 2, H = 2, identity experts: ids [0, 1], weights
  // [1, -1], x = [2^24, 2], shared_expert_x = [1, 0.5].
  // h0: 2^24 - 2^24 = 0, + 1 = 1. Adding shared_expert_x first: 1 + 2^24 -> 2^24, - 2^24 = 0.
  // h1: 2 - 2 + 0.5 = 0.5 (weight 1, not a router weight).
  v2::Case c = make_case(1, 0, 2, 0, 1, 2, 2);
  c.ranks[0] = make_rank(1, exact_bf16_row({0x1p24f, 2}), {0, 1});
  c.ranks[0].expert_scales = {1.0f, -1.0f};
  c.ranks[0].shared_expert_x = exact_bf16_row({1, 0.5f});
  const std::vector<v2::RankOutput> out = v2::run(c);
  EXPECT_EQ(out[0].combine_out, exact_bf16_row({1, 0.5f}));
  EXPECT_EQ(out[0].ep_recv_counts, (std::vector<std::int32_t>{1, 2}));
}

TEST(OracleV2Combine, SharedExpertsInIncreasingJAfterTheRoutedOnes) {
  // W = 3, S = 2, Sn = 2 (R = 1: shared expert j on rank j), E = 1 (rank 2), K = 1, H = 1.
  // Rank 2's token: routed output 1, shared outputs 2^24 (j = 0) and -2^24 (j = 1), weight 1:
  // ((0 + 1) + 2^24) -> 2^24, - 2^24 = 0. Any other order gives 1.
  v2::Case c = make_case(3, 0, 1, 2, 2, 1, 1);
  c.ranks[0] = make_rank(0, {}, {});
  c.ranks[1] = make_rank(0, {}, {});
  c.ranks[2] = make_rank(1, exact_bf16_row({7}), {0});
  c.ranks[0].has_combine_x = true;
  c.ranks[0].combine_x = exact_bf16_row({0x1p24f});
  c.ranks[1].has_combine_x = true;
  c.ranks[1].combine_x = exact_bf16_row({-0x1p24f});
  c.ranks[2].has_combine_x = true;
  c.ranks[2].combine_x = exact_bf16_row({1});
  const std::vector<v2::RankOutput> out = v2::run(c);
  EXPECT_EQ(triples_of(out[0]), (Triples{{2, 0, 1}}));
  EXPECT_EQ(triples_of(out[1]), (Triples{{2, 0, 2}}));
  EXPECT_EQ(out[2].combine_out, exact_bf16_row({0}));
}

// ---------------------------------------------------------------------------------------------
// 2f. Shared experts (V2 §3.5): every active token reaches (r % R) + j*R once per j, with k = K + j,
// in (r, b) order, and nowhere else; every active routed entry reaches S + e/L once.

TEST(OracleV2SharedExperts, EveryActiveTokenOnceOnEachOfItsSharedRanks) {
  std::mt19937_64 rng(0x5eed0004);
  // (W, S, Sn) with Sn = 2 first, then other R.
  const std::vector<std::tuple<int, int, int>> shapes = {{6, 4, 2}, {3, 2, 2}, {5, 4, 2}, {7, 2, 2},
                                                         {5, 4, 4}, {4, 3, 1}, {6, 4, 1}, {8, 3, 3}};
  for (int iteration = 0; iteration < 160; ++iteration) {
    const auto [w, s, sn] = shapes[iteration % shapes.size()];
    Shape shape;
    shape.w = w;
    shape.s = s;
    shape.sn = sn;
    shape.t = uniform(rng, 0, 2);
    shape.l = shape.t == 2 ? 1 : uniform(rng, 1, 2);
    shape.z = uniform(rng, 0, 1);
    shape.copy = uniform(rng, 0, 1);
    v2::Case c = random_case(rng, shape);
    c.quant_mode = 0;
    c.comm_quant_mode = 0;
    for (v2::RankInput& rank : c.ranks) rank.scales.clear();
    const int mask_kind = uniform(rng, 0, 2);  // none, 1-D, 2-D
    for (v2::RankInput& rank : c.ranks) {
      if (mask_kind == 1) {
        const int n = uniform(rng, 0, static_cast<int>(rank.bs));
        rank.x_active_mask.assign(static_cast<std::size_t>(rank.bs), 0);
        std::fill(rank.x_active_mask.begin(), rank.x_active_mask.begin() + n, 1);
      } else if (mask_kind == 2) {
        rank.mask_2d = true;
        for (std::int64_t i = 0; i < rank.bs * c.k; ++i) rank.x_active_mask.push_back(uniform(rng, 0, 3) != 0);
      }
    }
    SCOPED_TRACE(describe(c));
    const std::vector<v2::RankOutput> out = v2::run(c);
    const int r_per = s / sn;
    const int l = shape.l;
    const int tp_size = std::max(c.tp_world_size, 1);

    for (int tp = 0; tp < tp_size; ++tp) {
      auto rank_in = [&](int ep) -> const v2::RankInput& { return c.ranks[ep * tp_size + tp]; };
      auto rank_out = [&](int ep) -> const v2::RankOutput& { return out[ep * tp_size + tp]; };
      // Activity, recomputed here from the rules of V2 §3.1-§3.3.
      auto token_on = [&](int r, std::int64_t b) {
        const v2::RankInput& in = rank_in(r);
        if (in.x_active_mask.empty()) return true;
        if (!in.mask_2d) return b < std::count(in.x_active_mask.begin(), in.x_active_mask.end(), 1);
        return std::any_of(in.x_active_mask.begin() + b * c.k, in.x_active_mask.begin() + (b + 1) * c.k,
                           [](std::uint8_t v) { return v != 0; });
      };
      auto entry_sent = [&](int r, std::int64_t b, std::int64_t k) {
        const v2::RankInput& in = rank_in(r);
        if (!token_on(r, b) || (in.mask_2d && in.x_active_mask[b * c.k + k] == 0)) return false;
        return in.expert_ids[b * c.k + k] < c.moe_expert_num;
      };

      for (int sr = 0; sr < s; ++sr) {
        const v2::RankOutput& so = rank_out(sr);
        const int j = sr / r_per;
        // Expected rows: every r with r % R == sr % R, its active tokens in increasing b.
        Triples expected;
        std::vector<std::int32_t> counts;
        for (int r = 0; r < w; ++r) {
          if (r % r_per == sr % r_per) {
            for (std::int64_t b = 0; b < rank_in(r).bs; ++b) {
              if (token_on(r, b)) expected.emplace_back(r, static_cast<int>(b), static_cast<int>(c.k) + j);
            }
          }
          counts.push_back(static_cast<std::int32_t>(expected.size()));
        }
        ASSERT_EQ(triples_of(so), expected) << "shared rank " << sr;
        EXPECT_EQ(std::vector<std::int32_t>(so.ep_recv_counts.begin(), so.ep_recv_counts.begin() + w), counts);
        for (std::size_t i = 0; i < expected.size(); ++i) {
          const auto [r, b, k] = expected[i];
          EXPECT_EQ(row_of(so.expand_x, static_cast<std::int64_t>(i), c.h), row_of(rank_in(r).x, b, c.h));
        }
      }
      // Each active token once per j on rank (r % R) + j*R, never on another shared rank.
      for (int r = 0; r < w; ++r) {
        for (std::int64_t b = 0; b < rank_in(r).bs; ++b) {
          for (int sr = 0; sr < s; ++sr) {
            const Triples triples = triples_of(rank_out(sr));
            const int j = sr / r_per;
            const auto copies = std::count(triples.begin(), triples.end(),
                                           std::make_tuple(r, static_cast<int>(b), static_cast<int>(c.k) + j));
            const bool home = token_on(r, b) && sr == r % r_per + j * r_per;
            EXPECT_EQ(copies, home ? 1 : 0) << "r " << r << " b " << b << " shared rank " << sr;
          }
        }
      }
      // Each active routed entry exactly once, on its expert's rank; special and masked entries nowhere.
      std::int64_t sent = 0;
      for (int r = 0; r < w; ++r) {
        for (std::int64_t b = 0; b < rank_in(r).bs; ++b) {
          for (std::int64_t k = 0; k < c.k; ++k) {
            if (!entry_sent(r, b, k)) continue;
            ++sent;
            const int d = s + rank_in(r).expert_ids[b * c.k + k] / l;
            const Triples triples = triples_of(rank_out(d));
            EXPECT_EQ(std::count(triples.begin(), triples.end(),
                                 std::make_tuple(r, static_cast<int>(b), static_cast<int>(k))),
                      1);
          }
        }
      }
      std::int64_t moe_rows = 0;
      for (int d = s; d < w; ++d) moe_rows += rank_out(d).own_rows;
      EXPECT_EQ(moe_rows, sent);
    }
    if (HasFailure()) return;
  }
}

// ---------------------------------------------------------------------------------------------
// TP (V2 §3.8): V1's layout, and the bf16 TP add rounds half to even (V2 changed V1's CAST_ROUND).

class OracleV2TensorParallel : public ::testing::TestWithParam<Half> {};

TEST_P(OracleV2TensorParallel, LayoutAndReduceRoundsHalfToEven) {
  const Half dtype = GetParam();
  auto row = [&](std::vector<double> v) {
    if (dtype == Half::fp16) return exact_fp16_row(v);
    return exact_bf16_row(std::vector<float>(v.begin(), v.end()));
  };
  // W = 2, T = 2, E = 2 (L = 1), K = 1, H = 2; g = 2 * ep + tp; EP group tp = {g = tp, g = 2 + tp}.
  // g0 (ep0, tp0): 2 tokens -> expert 0;  g1 (ep0, tp1): 1 token -> expert 1;
  // g2 (ep1, tp0): 1 token -> expert 1;   g3 (ep1, tp1): 1 token -> expert 0.
  v2::Case c = make_case(2, 2, 2, 0, 1, 2, 1);
  c.dtype = dtype;
  c.ranks[0] = make_rank(2, row({1, 2, 3, 4}), {0, 0});
  c.ranks[1] = make_rank(1, row({5, 6}), {1});
  c.ranks[2] = make_rank(1, row({7, 8}), {1});
  c.ranks[3] = make_rank(1, row({9, 10}), {0});
  const std::vector<v2::RankOutput> layout = v2::run(c);
  // g0 own: expert 0 in group 0 = g0 b0, b1; peer g1 own: expert 0 in group 1 = g3 b0.
  EXPECT_EQ(layout[0].expand_x, row({1, 2, 3, 4, 9, 10}));
  EXPECT_EQ(triples_of(layout[0]), (Triples{{0, 0, 0}, {0, 1, 0}}));
  EXPECT_EQ(layout[0].ep_recv_counts, (std::vector<std::int32_t>{2, 2, 0, 1}));
  EXPECT_EQ(layout[0].tp_recv_counts, (std::vector<std::int32_t>{2, 1}));
  EXPECT_EQ(layout[0].expert_token_nums, (std::vector<std::int64_t>{3}));
  EXPECT_EQ(layout[1].expand_x, row({9, 10, 1, 2, 3, 4}));
  EXPECT_EQ(triples_of(layout[1]), (Triples{{1, 0, 0}}));  // the peer's rows get no triples
  EXPECT_EQ(layout[1].ep_recv_counts, (std::vector<std::int32_t>{0, 1, 2, 2}));
  EXPECT_EQ(layout[1].tp_recv_counts, (std::vector<std::int32_t>{2, 1}));  // [tp] = own, [1 - tp] = peer
  EXPECT_EQ(layout[1].valid_rows, 3);
  EXPECT_EQ(layout[1].own_rows, 1);
  // g2 own: expert 1 in group 0 = g2 b0; peer g3 own: expert 1 in group 1 = g1 b0.
  EXPECT_EQ(layout[2].expand_x, row({7, 8, 5, 6}));
  EXPECT_EQ(layout[2].ep_recv_counts, (std::vector<std::int32_t>{0, 1, 1, 1}));
  EXPECT_EQ(layout[3].expand_x, row({5, 6, 7, 8}));
  EXPECT_EQ(triples_of(layout[3]), (Triples{{0, 0, 0}}));
  // Identity experts: the TP reduce doubles each row (K = 1, no weights).
  EXPECT_EQ(layout[0].combine_out, row({2, 4, 6, 8}));
  EXPECT_EQ(layout[3].combine_out, row({18, 20}));

  // Expert outputs: own rows [1, 1 + u], the peer's rows [u/2, u/2] with u the spacing at 1. The reduce
  // gives 1 + u/2 -> 1 (tie to even; half away from zero would give 1 + u) and 1 + 3u/2 -> 1 + 2u.
  const double u = dtype == Half::bf16 ? 0x1p-7 : 0x1p-10;
  for (std::size_t g = 0; g < c.ranks.size(); ++g) {
    c.ranks[g].has_combine_x = true;
    for (std::int64_t i = 0; i < layout[g].valid_rows; ++i) {
      const std::vector<std::uint16_t> values = i < layout[g].own_rows ? row({1, 1 + u}) : row({u / 2, u / 2});
      c.ranks[g].combine_x.insert(c.ranks[g].combine_x.end(), values.begin(), values.end());
    }
  }
  const std::vector<v2::RankOutput> out = v2::run(c);
  EXPECT_EQ(out[0].combine_out, row({1, 1 + 2 * u, 1, 1 + 2 * u}));
  for (int g = 1; g < 4; ++g) EXPECT_EQ(out[g].combine_out, row({1, 1 + 2 * u})) << "rank " << g;
}

INSTANTIATE_TEST_SUITE_P(Dtypes, OracleV2TensorParallel, ::testing::Values(Half::bf16, Half::fp16));

// ---------------------------------------------------------------------------------------------
// Output shapes and the weights of shared rows.

TEST(OracleV2Outputs, ExpandScalesAndQuantizedOutputs) {
  // W = 2, S = 1, Sn = 1, E = 2 (rank 1), K = 2, H = 2, quant 2, router weights on rank 1 only.
  v2::Case c = make_case(2, 0, 2, 1, 1, 2, 2);
  c.quant_mode = 2;
  c.ranks[0] = make_rank(1, exact_bf16_row({1, -2}), {1, 0});
  c.ranks[1] = make_rank(1, exact_bf16_row({4, 3}), {0, 1});
  c.ranks[1].expert_scales = {0.5f, 0.25f};
  const std::vector<v2::RankOutput> out = v2::run(c);
  // Rank 1 rows: e0: r0 (0,0,1), r1 (1,0,0); e1: r0 (0,0,0), r1 (1,0,1). Rank 0 gave no weights: 1.0.
  EXPECT_EQ(triples_of(out[1]), (Triples{{0, 0, 1}, {1, 0, 0}, {0, 0, 0}, {1, 0, 1}}));
  EXPECT_EQ(out[1].expand_scales, (std::vector<float>{1.0f, 0.5f, 1.0f, 0.25f}));
  EXPECT_EQ(out[0].expand_scales, (std::vector<float>{1.0f, 1.0f}));  // shared rows
  EXPECT_EQ(out[0].ep_recv_counts, (std::vector<std::int32_t>{1, 2}));
  EXPECT_TRUE(out[1].expand_x.empty());
  // Without smooth scales: amax 2 -> ds = 63.5, q = [63.5 -> 64 (tie to even), -127]; amax 4 -> ds = 31.75,
  // q = [127, 95.25 -> 95].
  EXPECT_EQ(out[1].expand_x_int8, (std::vector<std::int8_t>{64, -127, 127, 95, 64, -127, 127, 95}));
  EXPECT_EQ(out[0].expand_x_int8, (std::vector<std::int8_t>{64, -127, 127, 95}));
  EXPECT_EQ(out[1].dynamic_scales, (std::vector<float>{1.0f / 63.5f, 1.0f / 31.75f, 1.0f / 63.5f, 1.0f / 31.75f}));
  EXPECT_EQ(out[0].token_active, (std::vector<std::uint8_t>{1}));
}

}  // namespace
