// Tests of the reference oracle against values derived by hand from the contract
// (ascend-op-semantics.md). Expected values are written out or computed here independently; the tests
// never call the oracle's internals, and they encode 16-bit floats with exact encoders of their own
// (test_inputs.h), not the conversions of numeric/convert.h.
#include "oracle/oracle.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "test_inputs.h"

namespace {

using moedist::numeric::Half;
using moedist::oracle::Case;
using moedist::oracle::RankInput;
using moedist::oracle::RankOutput;
using moedist::testing::exact_bf16;
using moedist::testing::exact_bf16_row;
using moedist::testing::exact_fp16;
using moedist::testing::exact_fp16_row;

// A case with the geometry filled in and empty ranks.
Case make_case(int ep_world_size, int tp_world_size, int moe_expert_num, int shared_expert_rank_num, std::int64_t h,
               std::int64_t k) {
  Case c;
  c.ep_world_size = ep_world_size;
  c.tp_world_size = tp_world_size;
  c.moe_expert_num = moe_expert_num;
  c.shared_expert_rank_num = shared_expert_rank_num;
  c.h = h;
  c.k = k;
  c.ranks.resize(static_cast<std::size_t>(ep_world_size * std::max(tp_world_size, 1)));
  return c;
}

RankInput make_rank(std::int64_t bs, std::vector<std::uint16_t> x, std::vector<std::int32_t> expert_ids) {
  RankInput rank;
  rank.bs = bs;
  rank.x = std::move(x);
  rank.expert_ids = std::move(expert_ids);
  return rank;
}

// Row `row` of a flat bs*h buffer.
template <typename T>
std::vector<T> row_of(const std::vector<T>& flat, std::int64_t row, std::int64_t h) {
  return std::vector<T>(flat.begin() + row * h, flat.begin() + (row + 1) * h);
}

// ---------------------------------------------------------------------------------------------
// 1. The worked example of §5.

// Every source row gets distinct values: x[r][b][i] = 16r + 4b + i + 1 (small integers, exact in bf16).
std::vector<float> worked_example_row(int r, int b) {
  return {static_cast<float>(16 * r + 4 * b + 1), static_cast<float>(16 * r + 4 * b + 2)};
}

Case worked_example_case() {
  Case c =
      make_case(/*ep_world_size=*/4, /*tp_world_size=*/0, /*moe_expert_num=*/8, /*shared_expert_rank_num=*/0, /*h=*/2,
                /*k=*/2);
  const std::vector<std::vector<std::int32_t>> ids = {{0, 3, 2, 3}, {3, 1, 0, 2}, {2, 3, 3, 0}, {1, 2, 3, 2}};
  for (int r = 0; r < 4; ++r) {
    std::vector<float> x = worked_example_row(r, 0);
    const std::vector<float> second = worked_example_row(r, 1);
    x.insert(x.end(), second.begin(), second.end());
    c.ranks[r] = make_rank(2, exact_bf16_row(x), ids[r]);
  }
  return c;
}

TEST(OracleWorkedExample, ExpandIdxOfEveryRank) {
  const std::vector<RankOutput> out = moedist::oracle::run(worked_example_case());
  ASSERT_EQ(out.size(), 4u);
  EXPECT_EQ(out[0].expand_idx, (std::vector<std::int32_t>{0, 0, 0, 1}));
  EXPECT_EQ(out[1].expand_idx, (std::vector<std::int32_t>{0, 0, 0, 0}));
  EXPECT_EQ(out[2].expand_idx, (std::vector<std::int32_t>{0, 0, 1, 0}));
  EXPECT_EQ(out[3].expand_idx, (std::vector<std::int32_t>{0, 0, 0, 1}));
}

TEST(OracleWorkedExample, Rank1RowProvenanceAndCounts) {
  const std::vector<RankOutput> out = moedist::oracle::run(worked_example_case());
  const RankOutput& rank1 = out[1];
  // (src_rank, b) of every row, from the table in §5.
  const std::vector<std::pair<int, int>> expected_sources = {
      {0, 1}, {1, 1}, {2, 0}, {3, 0}, {3, 1},          // l = 0, expert 2
      {0, 0}, {0, 1}, {1, 0}, {2, 0}, {2, 1}, {3, 1},  // l = 1, expert 3
  };
  ASSERT_EQ(rank1.valid_rows, 11);
  ASSERT_EQ(rank1.expand_x.size(), 11u * 2);
  for (std::size_t row = 0; row < expected_sources.size(); ++row) {
    const auto [src, b] = expected_sources[row];
    EXPECT_EQ(row_of(rank1.expand_x, static_cast<std::int64_t>(row), 2), exact_bf16_row(worked_example_row(src, b)))
        << "row " << row;
  }
  EXPECT_EQ(rank1.ep_recv_counts, (std::vector<std::int32_t>{1, 2, 3, 5, 7, 8, 10, 11}));
  EXPECT_EQ(rank1.expert_token_nums, (std::vector<std::int64_t>{5, 6}));
  EXPECT_TRUE(rank1.tp_recv_counts.empty());
  EXPECT_TRUE(rank1.expand_x_int8.empty());
  EXPECT_TRUE(rank1.dynamic_scales.empty());
  EXPECT_TRUE(rank1.expand_scales.empty());
}

TEST(OracleWorkedExample, ExpertTokenNumsType0IsCumulative) {
  Case c = worked_example_case();
  c.expert_token_nums_type = 0;
  const std::vector<RankOutput> out = moedist::oracle::run(c);
  EXPECT_EQ(out[1].expert_token_nums, (std::vector<std::int64_t>{5, 11}));
}

// ---------------------------------------------------------------------------------------------
// 2. Hand-derived checks.

// One rank, one expert, K = 1: every token is a single routed row, so expand_x row b is token b.
Case single_rank_case(std::int64_t h, const std::vector<std::vector<float>>& rows) {
  Case c = make_case(1, 0, 1, 0, h, 1);
  std::vector<float> x;
  std::vector<std::int32_t> ids;
  for (const std::vector<float>& row : rows) {
    x.insert(x.end(), row.begin(), row.end());
    ids.push_back(0);
  }
  c.ranks[0] = make_rank(static_cast<std::int64_t>(rows.size()), exact_bf16_row(x), ids);
  return c;
}

TEST(OracleDynamicQuant, ExactScalesAndTiesToEven) {
  // Row 0: amax 127 -> ds = 1, q = rint(v): -63.5 -> -64 and 2.5 -> 2 and 0.5 -> 0 (ties to even); scale 1.
  // Row 1: amax 254 -> ds = 0.5, w = [127, 2.5, -1.5, 0.5] -> q = [127, 2, -2, 0]; scale 1/0.5 = 2.
  Case c = single_rank_case(4, {{127.0f, -63.5f, 2.5f, 0.5f}, {254.0f, 5.0f, -3.0f, 1.0f}});
  c.quant_mode = 2;
  const RankOutput out = moedist::oracle::run(c)[0];
  EXPECT_TRUE(out.expand_x.empty());
  EXPECT_EQ(out.expand_x_int8, (std::vector<std::int8_t>{127, -64, 2, 0, 127, 2, -2, 0}));
  ASSERT_EQ(out.dynamic_scales.size(), 2u);
  EXPECT_EQ(out.dynamic_scales[0], 1.0f);
  EXPECT_EQ(out.dynamic_scales[1], 2.0f);
  // Identity experts return q * scale: [127, -64, 2, 0] and [254, 4, -4, 0].
  EXPECT_EQ(out.combine_out, exact_bf16_row({127.0f, -64.0f, 2.0f, 0.0f, 254.0f, 4.0f, -4.0f, 0.0f}));
}

TEST(OracleDynamicQuant, NonPowerOfTwoScale) {
  // amax 3: ds = fl32(127/3) = 42.333332; w = [42.33, -84.67, 21.17, 127.0] -> q = [42, -85, 21, 127].
  // dynamic_scale = fl32(1/ds), which is the float nearest 3/127: 0x1.83060cp-6.
  // Second row, amax 11: ds = fl32(127/11) = 11.545455; w = [127.00001, -57.727276, 11.545455, 0]
  //   -> q = [127, -58, 12, 0]. dynamic_scale = fl32(1/ds) = 0x1.62c58ap-4, one ulp below fl32(11/127) =
  //   0x1.62c58cp-4: the scale is the reciprocal of ds, not recomputed as amax/127.
  Case c = single_rank_case(4, {{1.0f, -2.0f, 0.5f, 3.0f}, {11.0f, -5.0f, 1.0f, 0.0f}});
  c.quant_mode = 2;
  const RankOutput out = moedist::oracle::run(c)[0];
  EXPECT_EQ(out.expand_x_int8, (std::vector<std::int8_t>{42, -85, 21, 127, 127, -58, 12, 0}));
  ASSERT_EQ(out.dynamic_scales.size(), 2u);
  EXPECT_EQ(out.dynamic_scales[0], 0x1.83060cp-6f);
  EXPECT_EQ(out.dynamic_scales[1], 0x1.62c58ap-4f);
}

TEST(OracleDynamicQuant, AllZeroRowGivesZeroValuesAndZeroScale) {
  Case c = single_rank_case(3, {{0.0f, 0.0f, 0.0f}});
  c.quant_mode = 2;
  const RankOutput out = moedist::oracle::run(c)[0];
  EXPECT_EQ(out.expand_x_int8, (std::vector<std::int8_t>{0, 0, 0}));
  ASSERT_EQ(out.dynamic_scales.size(), 1u);
  EXPECT_EQ(std::bit_cast<std::uint32_t>(out.dynamic_scales[0]), 0u);  // +0.0
  EXPECT_EQ(out.combine_out, exact_bf16_row({0.0f, 0.0f, 0.0f}));
}

TEST(OracleDynamicQuant, SmoothScalesRowSelectionWithSharedExperts) {
  // W = 2, S = 1: rank 0 is the shared rank, rank 1 hosts experts 0 and 1 (L = 2). With S > 0 the MoE
  // expert e uses smooth row e + 1 and the shared expert row 0.
  Case c = make_case(2, 0, 2, 1, 4, 1);
  c.quant_mode = 2;
  // rank 0: token [2,2,2,2] -> expert 0 (row 1 of rank 0's scales); its shared copy stays on rank 0 (row 0).
  c.ranks[0] = make_rank(1, exact_bf16_row({2, 2, 2, 2}), {0});
  c.ranks[0].scales = {1, 1,     1, 1,   // row 0: shared expert
                       1, 0.25f, 1, 1,   // row 1: expert 0
                       3, 3,     3, 3};  // row 2: expert 1 (unused by rank 0)
  // rank 1: token [1,1,1,1] -> expert 1 (row 2 of rank 1's scales); its shared copy goes to rank 0 (row 0).
  c.ranks[1] = make_rank(1, exact_bf16_row({1, 1, 1, 1}), {1});
  c.ranks[1].scales = {1,   1,     1, 1,      // row 0: shared expert
                       2,   2,     2, 2,      // row 1: expert 0 (must not be used)
                       127, 63.5f, 0, -127};  // row 2: expert 1
  const std::vector<RankOutput> out = moedist::oracle::run(c);

  // Rank 1 rows: block (l=0, r=0) = rank 0's token, block (l=1, r=1) = rank 1's token.
  //   rank 0 token, row 1: v = [2, 0.5, 2, 2], ds = 63.5, w = [127, 31.75, 127, 127] -> [127, 32, 127, 127],
  //     scale 1/63.5 (= the float nearest 2/127).
  //   rank 1 token, row 2: v = [127, 63.5, 0, -127], ds = 1 -> [127, 64 (tie to even), 0, -127], scale 1.
  EXPECT_EQ(out[1].expand_x_int8, (std::vector<std::int8_t>{127, 32, 127, 127, 127, 64, 0, -127}));
  EXPECT_EQ(out[1].dynamic_scales, (std::vector<float>{2.0f / 127.0f, 1.0f}));
  EXPECT_EQ(out[1].ep_recv_counts, (std::vector<std::int32_t>{1, 1, 1, 2}));  // index l*W + r
  EXPECT_EQ(out[1].expert_token_nums, (std::vector<std::int64_t>{1, 1}));

  // Rank 0 rows: own token (row 0 of rank 0: all 2 -> 127s, scale 2/127), then rank 1's token
  // (row 0 of rank 1: all 1 -> 127s, scale 1/127).
  EXPECT_EQ(out[0].expand_x_int8, (std::vector<std::int8_t>{127, 127, 127, 127, 127, 127, 127, 127}));
  EXPECT_EQ(out[0].dynamic_scales, (std::vector<float>{2.0f / 127.0f, 1.0f / 127.0f}));
  EXPECT_EQ(out[0].ep_recv_counts, (std::vector<std::int32_t>{1, 2}));
  EXPECT_EQ(out[0].expert_token_nums, (std::vector<std::int64_t>{2}));
}

TEST(OracleSharedExperts, V1SplitWithNonDivisibleBatch) {
  // W = 4, S = 2, BS = 3 everywhere, E = 2 (expert 0 on rank 2, expert 1 on rank 3), K = 1, token b -> b % 2.
  // Rank r sends token b to shared rank s(b) = ceil((b+1+T0)*2/3) - 1 - r, T0 = floor(3r/2):
  //   r = 2 (T0 = 3): s = ceil(8/3)-3 = 0, ceil(10/3)-3 = 1, ceil(12/3)-3 = 1  -> rank 0 gets {b0}, rank 1 {b1, b2}
  //   r = 3 (T0 = 4): s = ceil(10/3)-4 = 0, ceil(12/3)-4 = 0, ceil(14/3)-4 = 1 -> rank 0 gets {b0, b1}, rank 1 {b2}
  // Bookkeeping split of a shared rank's own 3 rows over r < S: floor((r+s+1)*3/2) - floor((r+s)*3/2):
  //   s = 0: r0 -> 1, r1 -> 2;  s = 1: r0 -> 2, r1 -> 1.
  Case c = make_case(4, 0, 2, 2, 1, 1);
  for (int r = 0; r < 4; ++r) {
    c.ranks[r] = make_rank(3, exact_bf16_row({float(10 * r + 1), float(10 * r + 2), float(10 * r + 3)}), {0, 1, 0});
  }
  const std::vector<RankOutput> out = moedist::oracle::run(c);
  auto token = [](int r, int b) { return exact_bf16(float(10 * r + b + 1)); };

  EXPECT_EQ(out[0].expand_x,
            (std::vector<std::uint16_t>{token(0, 0), token(0, 1), token(0, 2), token(2, 0), token(3, 0), token(3, 1)}));
  EXPECT_EQ(out[0].ep_recv_counts, (std::vector<std::int32_t>{1, 3, 4, 6}));
  EXPECT_EQ(out[0].expert_token_nums, (std::vector<std::int64_t>{6}));

  EXPECT_EQ(out[1].expand_x,
            (std::vector<std::uint16_t>{token(1, 0), token(1, 1), token(1, 2), token(2, 1), token(2, 2), token(3, 2)}));
  EXPECT_EQ(out[1].ep_recv_counts, (std::vector<std::int32_t>{2, 3, 5, 6}));
  EXPECT_EQ(out[1].expert_token_nums, (std::vector<std::int64_t>{6}));

  // MoE ranks: expert 0 gets b0 and b2 of every rank, expert 1 gets b1 of every rank.
  EXPECT_EQ(out[2].ep_recv_counts, (std::vector<std::int32_t>{2, 4, 6, 8}));
  EXPECT_EQ(out[3].ep_recv_counts, (std::vector<std::int32_t>{1, 2, 3, 4}));
  for (int r = 0; r < 4; ++r) EXPECT_EQ(out[r].expand_idx, (std::vector<std::int32_t>{0, 0, 1})) << "rank " << r;

  // Identity experts: every token comes back once from its MoE expert and once (weight 1) from the
  // shared expert, so combine gives exactly 2x. A wrong shared slot would pick another token's value.
  for (int r = 0; r < 4; ++r) {
    EXPECT_EQ(out[r].combine_out,
              exact_bf16_row({float(2 * (10 * r + 1)), float(2 * (10 * r + 2)), float(2 * (10 * r + 3))}))
        << "rank " << r;
  }
}

TEST(OracleSharedExperts, RanksWithDifferentBatchSizesIncludingZero) {
  // W = 3, S = 1, E = 2 (L = 1): shared rank 0 has BS 2, MoE rank 1 has BS 0, MoE rank 2 has BS 3.
  Case c = make_case(3, 0, 2, 1, 1, 1);
  c.global_bs = 3 * 3;
  c.ranks[0] = make_rank(2, exact_bf16_row({1, 2}), {0, 1});
  c.ranks[1] = make_rank(0, {}, {});
  c.ranks[2] = make_rank(3, exact_bf16_row({3, 4, 5}), {1, 1, 0});
  const std::vector<RankOutput> out = moedist::oracle::run(c);

  // With S = 1 every MoE token goes to rank 0; its own 2 rows are the r = 0 entry.
  EXPECT_EQ(out[0].expand_x, exact_bf16_row({1, 2, 3, 4, 5}));
  EXPECT_EQ(out[0].ep_recv_counts, (std::vector<std::int32_t>{2, 2, 5}));
  EXPECT_EQ(out[0].expert_token_nums, (std::vector<std::int64_t>{5}));
  // Rank 1 (expert 0): rank 0's b0, rank 2's b2. Rank 2 (expert 1): rank 0's b1, rank 2's b0 and b1.
  EXPECT_EQ(out[1].expand_x, exact_bf16_row({1, 5}));
  EXPECT_EQ(out[1].ep_recv_counts, (std::vector<std::int32_t>{1, 1, 2}));
  EXPECT_EQ(out[2].expand_x, exact_bf16_row({2, 3, 4}));
  EXPECT_EQ(out[2].ep_recv_counts, (std::vector<std::int32_t>{1, 1, 3}));
  EXPECT_EQ(out[2].expand_idx, (std::vector<std::int32_t>{0, 1, 0}));
  // The empty rank still gets its counts but no per-token outputs.
  EXPECT_TRUE(out[1].expand_idx.empty());
  EXPECT_TRUE(out[1].combine_out.empty());
  EXPECT_EQ(out[0].combine_out, exact_bf16_row({2, 4}));
  EXPECT_EQ(out[2].combine_out, exact_bf16_row({6, 8, 10}));
}

TEST(OracleTensorParallel, LayoutCountsAndIdentityCombine) {
  // W = 2, T = 2, E = 2 (L = 1), K = 1. Global rank g = 2 * ep + t; EP group t = {g = t, g = 2 + t}.
  Case c = make_case(2, 2, 2, 0, 1, 1);
  c.ranks[0] = make_rank(2, exact_bf16_row({1, 2}), {0, 1});        // ep 0, t 0
  c.ranks[1] = make_rank(1, exact_bf16_row({3}), {1});              // ep 0, t 1
  c.ranks[2] = make_rank(1, exact_bf16_row({4}), {0});              // ep 1, t 0
  c.ranks[3] = make_rank(3, exact_bf16_row({5, 6, 7}), {0, 0, 1});  // ep 1, t 1
  const std::vector<RankOutput> out = moedist::oracle::run(c);

  // Group t = 0: expert 0 (ep 0) gets g0.b0, g2.b0 -> counts [1, 2]; expert 1 (ep 1) gets g0.b1 -> [1, 1].
  // Group t = 1: expert 0 (ep 0) gets g3.b0, g3.b1 -> [0, 2]; expert 1 (ep 1) gets g1.b0, g3.b2 -> [1, 2].
  EXPECT_EQ(out[0].expand_x, exact_bf16_row({1, 4, 5, 6}));  // own rows, then the peer's own rows
  EXPECT_EQ(out[0].tp_recv_counts, (std::vector<std::int32_t>{2, 2}));
  EXPECT_EQ(out[0].ep_recv_counts, (std::vector<std::int32_t>{1, 2, 0, 2}));
  EXPECT_EQ(out[0].expert_token_nums, (std::vector<std::int64_t>{4}));

  EXPECT_EQ(out[1].expand_x, exact_bf16_row({5, 6, 1, 4}));  // own rows first whatever the tp_rank
  EXPECT_EQ(out[1].tp_recv_counts, (std::vector<std::int32_t>{2, 2}));
  EXPECT_EQ(out[1].ep_recv_counts, (std::vector<std::int32_t>{0, 2, 1, 2}));
  EXPECT_EQ(out[1].expert_token_nums, (std::vector<std::int64_t>{4}));

  EXPECT_EQ(out[2].expand_x, exact_bf16_row({2, 3, 7}));
  EXPECT_EQ(out[2].tp_recv_counts, (std::vector<std::int32_t>{1, 2}));  // [t] = own, [1 - t] = peer
  EXPECT_EQ(out[2].ep_recv_counts, (std::vector<std::int32_t>{1, 1, 1, 2}));
  EXPECT_EQ(out[2].expert_token_nums, (std::vector<std::int64_t>{3}));

  EXPECT_EQ(out[3].expand_x, exact_bf16_row({3, 7, 2}));
  EXPECT_EQ(out[3].tp_recv_counts, (std::vector<std::int32_t>{1, 2}));
  EXPECT_EQ(out[3].ep_recv_counts, (std::vector<std::int32_t>{1, 2, 1, 1}));
  EXPECT_EQ(out[3].expert_token_nums, (std::vector<std::int64_t>{3}));
  EXPECT_EQ(out[3].expand_idx, (std::vector<std::int32_t>{0, 1, 0}));

  // Identity experts: each TP partial is the token itself, so the reduce doubles it (K = 1).
  EXPECT_EQ(out[0].combine_out, exact_bf16_row({2, 4}));
  EXPECT_EQ(out[1].combine_out, exact_bf16_row({6}));
  EXPECT_EQ(out[2].combine_out, exact_bf16_row({8}));
  EXPECT_EQ(out[3].combine_out, exact_bf16_row({10, 12, 14}));
}

TEST(OracleTensorParallel, Bf16ReduceRoundsHalfAwayFromZero) {
  // W = 1, T = 2: g0 and g1 both host expert 0. g0's expand_x = [g0.b0, g1.b0], g1's = [g1.b0, g0.b0].
  // g0's reduced row = Y_g0[0] + Y_g1[1]; g1's = Y_g1[0] + Y_g0[1].
  // 1 + 2^-8 and -(1 + 2^-8) lie exactly halfway between bf16 neighbours (spacing 2^-7 at 1): round-half-
  // away gives +-(1 + 2^-7), round-half-even would give +-1. Likewise 3 + 2^-7 (spacing 2^-6) -> 3 + 2^-6.
  Case c = make_case(1, 2, 1, 0, 2, 1);
  c.ranks[0] = make_rank(1, exact_bf16_row({0, 0}), {0});
  c.ranks[1] = make_rank(1, exact_bf16_row({0, 0}), {0});
  c.ranks[0].has_combine_x = true;
  c.ranks[0].combine_x = exact_bf16_row({1.0f, 3.0f, -0x1p-8f, -0x1p-7f});  // [own row, copy of g1's row]
  c.ranks[1].has_combine_x = true;
  c.ranks[1].combine_x = exact_bf16_row({-1.0f, -3.0f, 0x1p-8f, 0x1p-7f});  // [own row, copy of g0's row]
  const std::vector<RankOutput> out = moedist::oracle::run(c);
  EXPECT_EQ(out[0].combine_out, exact_bf16_row({1.0f + 0x1p-7f, 3.0f + 0x1p-6f}));
  EXPECT_EQ(out[1].combine_out, exact_bf16_row({-1.0f - 0x1p-7f, -3.0f - 0x1p-6f}));
}

TEST(OracleTensorParallel, Fp16ReduceRoundsHalfToEven) {
  // 1 + 2^-11 is halfway between fp16 neighbours (spacing 2^-10 at 1): nearest-even gives 1.
  // 1 + 3 * 2^-11 is halfway between 1 + 2^-10 (odd) and 1 + 2^-9 (even): gives 1 + 2^-9.
  Case c = make_case(1, 2, 1, 0, 2, 1);
  c.dtype = Half::fp16;
  c.ranks[0] = make_rank(1, exact_fp16_row({0, 0}), {0});
  c.ranks[1] = make_rank(1, exact_fp16_row({0, 0}), {0});
  c.ranks[0].has_combine_x = true;
  c.ranks[0].combine_x = exact_fp16_row({1.0, 1.0 + 0x1p-10, 0.0, 0.0});
  c.ranks[1].has_combine_x = true;
  c.ranks[1].combine_x = exact_fp16_row({0.0, 0.0, 0x1p-11, 0x1p-11});
  const std::vector<RankOutput> out = moedist::oracle::run(c);
  EXPECT_EQ(out[0].combine_out, exact_fp16_row({1.0, 1.0 + 0x1p-9}));
  EXPECT_EQ(out[1].combine_out, exact_fp16_row({0.0, 0.0}));
}

TEST(OracleCombine, WeightsExpertsAndAddsSharedExpertUnweighted) {
  // W = 2, S = 1, E = 2 (rank 1 hosts experts 0 and 1), K = 2, H = 1.
  // rank 0 (shared): token ids [0, 1], weights [2, 4]; rank 1: token ids [1, 0], weights [0.5, 0.25].
  // Rank 1 rows: (l=0: r0 b0 k0, r1 b0 k1), (l=1: r0 b0 k1, r1 b0 k0). Rank 0 rows: own b0, rank 1's b0.
  Case c = make_case(2, 0, 2, 1, 1, 2);
  c.ranks[0] = make_rank(1, exact_bf16_row({0}), {0, 1});
  c.ranks[0].expert_scales = {2.0f, 4.0f};
  c.ranks[1] = make_rank(1, exact_bf16_row({0}), {1, 0});
  c.ranks[1].expert_scales = {0.5f, 0.25f};
  c.ranks[1].has_combine_x = true;
  c.ranks[1].combine_x = exact_bf16_row({1, 8, 3, 16});
  c.ranks[0].has_combine_x = true;
  c.ranks[0].combine_x = exact_bf16_row({100, 1000});
  const std::vector<RankOutput> out = moedist::oracle::run(c);

  EXPECT_EQ(out[1].expand_scales, (std::vector<float>{2.0f, 0.25f, 4.0f, 0.5f}));
  EXPECT_EQ(out[0].expand_scales, (std::vector<float>{1.0f, 1.0f}));  // shared-expert rows
  // rank 0: 1*2 + 3*4 + 100 = 114 (exact in bf16).
  EXPECT_EQ(out[0].combine_out, exact_bf16_row({114}));
  // rank 1: 16*0.5 + 8*0.25 + 1000 = 1010, halfway between the bf16 values 1008 and 1012 (spacing 4):
  // nearest-even gives 1008. (Weighting the shared output by a router weight would give something else.)
  EXPECT_EQ(out[1].combine_out, exact_bf16_row({1008}));
}

TEST(OracleCombine, AccumulatesInIncreasingKThenAddsShared) {
  // W = 2, S = 1, E = 3 (rank 1 hosts experts 0..2), K = 3; the shared rank 0 has no tokens (BS = 0).
  // Rank 1's token routes to [0, 1, 2]; expert outputs [1, 2^24, 1]; the shared output is -2^24.
  // fp32: ((0 + 1) + 2^24) = 2^24 + 1 -> 2^24 (tie to even), + 1 -> 2^24 again, then - 2^24 = 0.
  // Any other order (1 + 1 first, or the shared output first) would give 2.
  Case c = make_case(2, 0, 3, 1, 1, 3);
  c.ranks[0] = make_rank(0, {}, {});
  c.ranks[0].has_combine_x = true;
  c.ranks[0].combine_x = exact_bf16_row({-0x1p24f});
  c.ranks[1] = make_rank(1, exact_bf16_row({0}), {0, 1, 2});
  c.ranks[1].has_combine_x = true;
  c.ranks[1].combine_x = exact_bf16_row({1.0f, 0x1p24f, 1.0f});
  const std::vector<RankOutput> out = moedist::oracle::run(c);
  EXPECT_EQ(out[1].combine_out, exact_bf16_row({0.0f}));
  // Counts of the empty shared rank: its own-row split is 0, then 1 row from rank 1.
  EXPECT_EQ(out[0].ep_recv_counts, (std::vector<std::int32_t>{0, 1}));
  EXPECT_EQ(out[1].ep_recv_counts, (std::vector<std::int32_t>{0, 1, 1, 2, 2, 3}));
  EXPECT_TRUE(out[0].combine_out.empty());
  EXPECT_TRUE(out[0].expand_idx.empty());
}

TEST(OracleCombine, CommQuantMode2RoundTripsThroughInt8InGroupsOf8) {
  // fp16, H = 19: groups [0, 8), [8, 16), [16, 19) (a short tail). Identity weights, K = 1, one rank.
  // Group 0, max 200: sc = fl32(200 * fl32(1/127)) = 1.5748031; sc_T = exact_fp16(sc) = 1.5751953125.
  //   y      y/sc (fp32)   fp16      q      y' = exact_fp16(q * sc_T)
  //   200    127.0         127       127    200.0498 -> 200
  //   199.25 126.52375     126.5     126    198.4746 -> 198.5   (without the fp16 step q would be 127)
  //   199    126.365       126.375   126    198.5
  //   -100   -63.5         -63.5     -64    -100.8125            (tie to even)
  //   1      0.635         0.63477   1      1.5751953125
  //   0.5    0.3175        0.31738   0      0
  //   3      1.905         1.90527   2      3.150390625
  //   150    95.25         95.25     95     149.6436 -> 149.625
  // Group 1: all zero -> sc = 0 -> q = 0 -> zeros.
  // Group 2, max 2: sc = 0.015748031, sc_T = 0x1.02p-6 = 0.0157470703125.
  //   -2 -> -127 -> -1.99988 -> -2;  1 -> 63.5 -> 64 (tie to even) -> 1.0078125;  0.25 -> 15.875 -> 16 -> 0.251953125
  Case c = make_case(1, 0, 1, 0, 19, 1);
  c.dtype = Half::fp16;
  c.comm_quant_mode = 2;
  const std::vector<double> y = {200, 199.25, 199, -100, 1, 0.5, 3, 150, 0, 0, 0, 0, 0, 0, 0, 0, -2, 1, 0.25};
  c.ranks[0] = make_rank(1, exact_fp16_row(std::vector<double>(19, 0.0)), {0});
  c.ranks[0].has_combine_x = true;
  c.ranks[0].combine_x = exact_fp16_row(y);
  const RankOutput out = moedist::oracle::run(c)[0];
  EXPECT_EQ(out.combine_out, exact_fp16_row({200, 198.5, 198.5, -100.8125, 1.5751953125, 0, 3.150390625, 149.625,  //
                                             0, 0, 0, 0, 0, 0, 0, 0,                                               //
                                             -2, 1.0078125, 0.251953125}));
}

TEST(OracleLayout, RandomRoutingMatchesBlockOrderDerivedByNestedLoops) {
  // §5 test oracle (2)/(3), derived without sorting: on MoE rank d, for l, for source r, for token b in
  // order, token b of rank r is one row iff it routes to expert (d - S) * L + l. Each token carries its
  // identity in x: [r, b]. Many entries per expert, so an unstable sort would show.
  const int w = 6, shared = 2, experts = 8, local = experts / (w - shared);
  const std::int64_t k = 3;
  Case c = make_case(w, 0, experts, shared, 2, k);
  c.global_bs = w * 40;
  std::mt19937 rng(7);
  for (int r = 0; r < w; ++r) {
    RankInput& rank = c.ranks[r];
    rank.bs = 20 + 4 * r;
    for (std::int64_t b = 0; b < rank.bs; ++b) {
      rank.x.push_back(exact_bf16(float(r)));
      rank.x.push_back(exact_bf16(float(b)));
      std::vector<std::int32_t> ids = {0, 1, 2, 3, 4, 5, 6, 7};
      std::shuffle(ids.begin(), ids.end(), rng);
      rank.expert_ids.insert(rank.expert_ids.end(), ids.begin(), ids.begin() + k);
    }
  }
  const std::vector<RankOutput> out = moedist::oracle::run(c);
  for (int d = shared; d < w; ++d) {
    std::vector<std::uint16_t> expected_rows;
    std::vector<std::int32_t> expected_counts;
    std::vector<std::int64_t> expected_per_expert;
    for (int l = 0; l < local; ++l) {
      const int expert = (d - shared) * local + l;
      std::int64_t per_expert = 0;
      for (int r = 0; r < w; ++r) {
        const RankInput& rank = c.ranks[r];
        for (std::int64_t b = 0; b < rank.bs; ++b) {
          for (std::int64_t j = 0; j < k; ++j) {
            if (rank.expert_ids[b * k + j] != expert) continue;
            expected_rows.push_back(exact_bf16(float(r)));
            expected_rows.push_back(exact_bf16(float(b)));
            ++per_expert;
          }
        }
        expected_counts.push_back(static_cast<std::int32_t>(expected_rows.size() / 2));
      }
      expected_per_expert.push_back(per_expert);
    }
    EXPECT_EQ(out[d].expand_x, expected_rows) << "rank " << d;
    EXPECT_EQ(out[d].ep_recv_counts, expected_counts) << "rank " << d;
    EXPECT_EQ(out[d].expert_token_nums, expected_per_expert) << "rank " << d;
  }
}

// ---------------------------------------------------------------------------------------------
// 3. Round trip: quant_mode 0, identity experts, weights 1, S = 0 -> combine_out = round(K * x).

// bf16 nearest to `value`, ties to even, found by comparing the two bf16 neighbours in double.
std::uint16_t nearest_bf16(double value) {
  const auto truncated = static_cast<std::uint16_t>(std::bit_cast<std::uint32_t>(static_cast<float>(value)) >> 16);
  // static_cast<float> may itself have rounded up past value; step back to the bf16 at or below |value|.
  auto as_double = [](std::uint16_t bits) {
    return static_cast<double>(std::bit_cast<float>(std::uint32_t{bits} << 16));
  };
  std::uint16_t lower = truncated;
  while (std::fabs(as_double(lower)) > std::fabs(value)) --lower;
  const auto upper = static_cast<std::uint16_t>(lower + 1);
  const double below = std::fabs(value - as_double(lower));
  const double above = std::fabs(as_double(upper) - value);
  if (below < above) return lower;
  if (above < below) return upper;
  return (lower & 1u) == 0 ? lower : upper;
}

// A random case with W = 4, E = 8, S = 0, distinct expert ids per token and different BS per rank.
Case random_round_trip_case(Half dtype, std::int64_t k, std::uint32_t seed) {
  const std::int64_t h = 5;
  Case c = make_case(4, 0, 8, 0, h, k);
  c.dtype = dtype;
  c.global_bs = 4 * 6;
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> mantissa(-255, 255);
  std::uniform_int_distribution<int> exponent(-6, 6);
  const std::int64_t batch_sizes[] = {6, 0, 3, 5};
  for (int r = 0; r < 4; ++r) {
    RankInput rank;
    rank.bs = batch_sizes[r];
    for (std::int64_t i = 0; i < rank.bs * h; ++i) {
      // m * 2^e with |m| < 256 is exact in bf16 (8 significant bits) and in fp16 (11).
      const double value = std::ldexp(mantissa(rng), exponent(rng));
      rank.x.push_back(dtype == Half::bf16 ? exact_bf16(static_cast<float>(value)) : exact_fp16(value));
    }
    for (std::int64_t b = 0; b < rank.bs; ++b) {
      std::vector<std::int32_t> experts = {0, 1, 2, 3, 4, 5, 6, 7};
      std::shuffle(experts.begin(), experts.end(), rng);
      rank.expert_ids.insert(rank.expert_ids.end(), experts.begin(), experts.begin() + k);
    }
    rank.expert_scales.assign(static_cast<std::size_t>(rank.bs * k), 1.0f);
    c.ranks[r] = std::move(rank);
  }
  return c;
}

TEST(OracleRoundTrip, TopOneReturnsXExactly) {
  for (const Half dtype : {Half::bf16, Half::fp16}) {
    const Case c = random_round_trip_case(dtype, 1, 1234);
    const std::vector<RankOutput> out = moedist::oracle::run(c);
    for (int r = 0; r < 4; ++r) EXPECT_EQ(out[r].combine_out, c.ranks[r].x) << "rank " << r;
  }
}

TEST(OracleRoundTrip, TopKReturnsRoundedKTimesX) {
  const std::int64_t k = 3;
  const Case c = random_round_trip_case(Half::bf16, k, 99);
  const std::vector<RankOutput> out = moedist::oracle::run(c);
  for (int r = 0; r < 4; ++r) {
    std::vector<std::uint16_t> expected;
    for (const std::uint16_t bits : c.ranks[r].x) {
      const double value = static_cast<double>(std::bit_cast<float>(std::uint32_t{bits} << 16));
      expected.push_back(nearest_bf16(static_cast<double>(k) * value));  // 3x is exact in fp32, so one rounding
    }
    EXPECT_EQ(out[r].combine_out, expected) << "rank " << r;
  }
}

}  // namespace
