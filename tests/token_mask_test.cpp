// x_active_mask on the V1 operators (contract §3.7, the A2 kernel's 1-D mask): tokens [0, n) of a rank
// are active, n = the mask's trues. Checked here without the oracle, by what the rule implies:
//  - a masked call equals an unmasked call on the first n tokens of every rank (with global_bs keeping
//    the capacity the same), except that expand_idx keeps BS * K entries (0 past n * K) and combine
//    writes zero rows for the inactive tokens;
//  - combine given another mask than dispatch's is refused on every rank, before any output is written;
//  - all-false masks send nothing, and combine gives all-zero rows.
// The property tests (property_test, shm_test, mpi_oracle_check) compare masked cases with the oracle.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "moedist/moedist.h"
#include "outcome.h"
#include "test_support.h"

namespace moedist::testing {
namespace {

Tensor prefix_mask(std::int64_t bs, std::int64_t active) {
  Tensor t(DType::boolean, bs);
  for (std::int64_t b = 0; b < bs; ++b) t.data<std::uint8_t>()[b] = b < active ? 1 : 0;
  return t;
}

// The first n rows of a 1-D or 2-D tensor.
Tensor first_rows(const Tensor& t, std::int64_t n) { return copy_rows(t.view(), n); }

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.ndim() == b.ndim() && a.rows() == b.rows() && a.cols() == b.cols() &&
         (a.nbytes() == 0 || std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0);
}

// W = 4 ranks (one shared-expert rank, E = 6 on three MoE ranks), BS = 5, K = 2, H = 24, quant_mode 2
// with smooth scales, expert_scales; global_bs = BS * W so that truncated inputs keep the capacity.
casefile::Case base_case(std::uint64_t seed, int quant_mode) {
  std::mt19937_64 rng(seed);
  casefile::Case c;
  c.ep_world_size = 4;
  c.moe_expert_num = 6;
  c.shared_expert_rank_num = 1;
  c.global_bs = 5 * 4;
  c.quant_mode = quant_mode;
  c.dtype = DType::bf16;
  std::normal_distribution<float> value(0.0f, 1.0f);
  for (int g = 0; g < 4; ++g) {
    casefile::RankInputs in;
    in.x = Tensor(DType::bf16, 5, 24);
    for (std::int64_t i = 0; i < in.x.numel(); ++i)
      in.x.data<std::uint16_t>()[i] = to_half_bits(DType::bf16, value(rng));
    in.expert_ids = random_ids(rng, 5, 2, c.moe_expert_num);
    in.expert_scales = Tensor(DType::fp32, 5, 2);
    for (std::int64_t i = 0; i < 10; ++i) in.expert_scales.data<float>()[i] = value(rng);
    if (quant_mode == 2) {
      in.scales = Tensor(DType::fp32, c.moe_expert_num + 1, 24);
      for (std::int64_t i = 0; i < in.scales.numel(); ++i) in.scales.data<float>()[i] = 0.5f + std::abs(value(rng));
    }
    c.ranks.push_back(std::move(in));
  }
  return c;
}

TEST(TokenMask, EqualsTheCallOnTheActiveTokensAlone) {
  const std::int64_t active[] = {3, 0, 5, 2};  // the shared-expert rank 0 too
  for (int quant_mode : {0, 2}) {
    casefile::Case masked = base_case(11 + static_cast<std::uint64_t>(quant_mode), quant_mode);
    casefile::Case truncated = base_case(11 + static_cast<std::uint64_t>(quant_mode), quant_mode);  // the same inputs
    for (int g = 0; g < 4; ++g) {
      casefile::RankInputs& in = masked.ranks[static_cast<std::size_t>(g)];
      casefile::RankInputs& cut = truncated.ranks[static_cast<std::size_t>(g)];
      const std::int64_t n = active[g];
      cut.x = first_rows(in.x, n);
      cut.expert_ids = first_rows(in.expert_ids, n);
      cut.expert_scales = first_rows(in.expert_scales, n);
      in.x_active_mask = prefix_mask(5, n);
      // The inactive tokens' ids are never read: ones no dispatch could route.
      for (std::int64_t i = n * 2; i < 10; ++i) in.expert_ids.data<std::int32_t>()[i] = -1;
    }
    for (bool strided : {false, true}) {
      RunOptions options;
      options.strided_inputs = strided;  // a strided mask, and expand_idx passed to combine as (BS, K)
      options.caller_outputs = strided;  // combine's buffer starts as garbage: inactive rows must be written
      const std::vector<casefile::RankOutputs> got = run_runtime(masked, options);
      const std::vector<casefile::RankOutputs> want = run_runtime(truncated, RunOptions{});
      for (int g = 0; g < 4; ++g) {
        const casefile::RankOutputs& a = got[static_cast<std::size_t>(g)];
        const casefile::RankOutputs& b = want[static_cast<std::size_t>(g)];
        const std::string where =
            "rank " + std::to_string(g) + " quant_mode " + std::to_string(quant_mode) + (strided ? " strided" : "");
        EXPECT_TRUE(same_bytes(a.expand_x, b.expand_x)) << where;
        EXPECT_TRUE(same_bytes(a.dynamic_scales, b.dynamic_scales)) << where;
        EXPECT_TRUE(same_bytes(a.expand_scales, b.expand_scales)) << where;
        EXPECT_TRUE(same_bytes(a.expert_token_nums, b.expert_token_nums)) << where;
        EXPECT_TRUE(same_bytes(a.ep_recv_counts, b.ep_recv_counts)) << where;
        const std::int64_t n = active[g];
        ASSERT_EQ(a.expand_idx.rows(), 10) << where;
        EXPECT_TRUE(same_bytes(first_rows(a.expand_idx, n * 2), b.expand_idx)) << where;
        for (std::int64_t t = n * 2; t < 10; ++t)
          EXPECT_EQ(a.expand_idx.data<std::int32_t>()[t], 0) << where << " t " << t;
        ASSERT_EQ(a.combine_out.rows(), 5) << where;
        EXPECT_TRUE(same_bytes(first_rows(a.combine_out, n), b.combine_out)) << where;
        for (std::int64_t i = n * 24; i < 5 * 24; ++i) {
          ASSERT_EQ(a.combine_out.data<std::uint16_t>()[i], 0) << where << " element " << i;
        }
      }
    }
  }
}

TEST(TokenMask, AllFalseMasksSendNothingAndCombineToZeros) {
  casefile::Case c = base_case(21, 0);
  for (casefile::RankInputs& in : c.ranks) in.x_active_mask = prefix_mask(5, 0);
  const std::vector<casefile::RankOutputs> got = run_runtime(c, RunOptions{});
  for (const casefile::RankOutputs& out : got) {
    EXPECT_EQ(out.expand_x.rows(), 0);
    EXPECT_EQ(out.ep_recv_counts.data<std::int32_t>()[out.ep_recv_counts.rows() - 1], 0);
    for (std::int64_t i = 0; i < out.combine_out.numel(); ++i) ASSERT_EQ(out.combine_out.data<std::uint16_t>()[i], 0);
  }
}

// Rank 2 dispatches 3 active tokens but combines with a mask of 4: the rows the expert ranks hold for
// it no longer match what its expert_ids route, which combine sees before reading or writing anything.
TEST(TokenMask, CombineWithAnotherMaskThanDispatchIsRefusedOnEveryRank) {
  casefile::Case c = base_case(31, 0);
  for (casefile::RankInputs& in : c.ranks) in.x_active_mask = prefix_mask(5, 3);
  InProcessWorld world(4, RuntimeOptions{{std::chrono::milliseconds(30000)}});
  std::vector<Outcome> outcomes(4);
  std::vector<int> untouched(4, 0);  // not vector<bool>: each rank thread writes its own element
  run_ranks(4, [&](int g) {
    const casefile::RankInputs& in = c.ranks[static_cast<std::size_t>(g)];
    const std::unique_ptr<Group> group = world.join(rank_config(c, g));
    DispatchOptions d_options;
    d_options.x_active_mask = in.x_active_mask;
    d_options.expert_scales = in.expert_scales;
    const DispatchResult d = group->dispatch(in.x, in.expert_ids, d_options);
    const Tensor other_mask = prefix_mask(5, 4);
    CombineOptions c_options;
    c_options.x_active_mask = g == 2 ? other_mask.view() : in.x_active_mask.view();
    Tensor out(DType::bf16, 5, 24);
    std::fill_n(out.data<std::uint16_t>(), out.numel(), std::uint16_t{0x1234});
    c_options.out = out.mutable_view();
    const Tensor expert_rows = copy_rows(d.expand_x, d.expand_x.rows());
    outcomes[static_cast<std::size_t>(g)] = capture([&] {
      group->combine(expert_rows, in.expert_ids, d.expand_idx, d.ep_recv_counts, in.expert_scales, c_options);
    });
    untouched[static_cast<std::size_t>(g)] =
        std::all_of(out.data<std::uint16_t>(), out.data<std::uint16_t>() + out.numel(),
                    [](std::uint16_t v) { return v == 0x1234; });
  });
  for (int g = 0; g < 4; ++g) {
    const Outcome& o = outcomes[static_cast<std::size_t>(g)];
    EXPECT_TRUE(untouched[static_cast<std::size_t>(g)]) << "rank " << g << " wrote its output";
    if (g == 2) {
      EXPECT_EQ(o.kind, Outcome::Kind::validation) << describe(o);
      EXPECT_TRUE(contains(o.what, "x_active_mask given to dispatch")) << describe(o);
    } else {
      EXPECT_EQ(o.kind, Outcome::Kind::peer) << describe(o);
      EXPECT_EQ(o.peer, 2) << describe(o);
    }
  }
}

// expand_idx is read in row-major order from any 1-D or 2-D view of BS * K elements: (BS*K, 1),
// (K, BS), (1, BS*K) and a (BS, K) view with padded rows all combine as the 1-D one does; a 2-D shape
// whose extents multiply past 2^63 to wrap onto BS * K is refused.
TEST(ExpandIdxShape, AnyShapeOfBsTimesKElementsCombinesAlike) {
  casefile::Case c = base_case(41, 0);
  c.ep_world_size = 1;
  c.shared_expert_rank_num = 0;
  c.global_bs = 0;
  c.ranks.resize(1);
  c.moe_expert_num = 6;
  const casefile::RankInputs& in = c.ranks[0];
  InProcessWorld world(1, RuntimeOptions{{std::chrono::milliseconds(30000)}});
  const std::unique_ptr<Group> group = world.join(rank_config(c, 0));
  DispatchOptions d_options;
  d_options.expert_scales = in.expert_scales;
  const DispatchResult d = group->dispatch(in.x, in.expert_ids, d_options);
  const Tensor idx = copy_rows(d.expand_idx, d.expand_idx.rows());  // 10 entries: BS 5, K 2
  const Tensor rows = copy_rows(d.expand_x, d.valid_rows);
  const auto combine_with = [&](const TensorView& expand_idx) {
    return copy_rows(group->combine(rows, in.expert_ids, expand_idx, d.ep_recv_counts, in.expert_scales), 5);
  };
  const Tensor want = combine_with(idx.view());
  std::vector<std::int32_t> padded(5 * 3, -99);  // (5, 2) with a row stride of 3
  for (int t = 0; t < 10; ++t) padded[static_cast<std::size_t>(t / 2 * 3 + t % 2)] = idx.data<std::int32_t>()[t];
  const TensorView shapes[] = {matrix_view(idx.raw(), DType::int32, 10, 1), matrix_view(idx.raw(), DType::int32, 2, 5),
                               matrix_view(idx.raw(), DType::int32, 1, 10),
                               matrix_view(static_cast<const void*>(padded.data()), DType::int32, 5, 2, 3)};
  for (const TensorView& view : shapes) {
    const Tensor got = combine_with(view);
    EXPECT_TRUE(same_bytes(got, want)) << "expand_idx shape (" << view.shape[0] << ", " << view.shape[1] << ")";
  }
  TensorView wrapped = matrix_view(idx.raw(), DType::int32, 3, 0);
  wrapped.shape[1] = 6148914691236517210;  // 3 * this = 2^64 + 10: wraps to BS * K
  const Outcome o = capture([&] { group->combine(rows, in.expert_ids, wrapped, d.ep_recv_counts, in.expert_scales); });
  EXPECT_EQ(o.kind, Outcome::Kind::validation) << describe(o);
  EXPECT_EQ(o.parameter, "expand_idx.shape") << describe(o);
}

}  // namespace
}  // namespace moedist::testing
