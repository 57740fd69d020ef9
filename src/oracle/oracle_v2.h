// The V2 reference oracle: a plain, all-ranks implementation of npu_moe_distribute_dispatch_v2 /
// combine_v2 as ../shared/reference/ascend-v2-semantics.md describes them (a delta against the V1
// contract, ascend-op-semantics.md): active entries and tokens (§3.1-§3.3), special experts (§3.4, §4.3,
// §4.4 in its G2 form), Sn shared experts placed at (r % R) + j*R (§3.5), assist_info triples (§3.6),
// TP (§3.8) and the combine accumulation order (§4.3, §4.5). Like the V1 oracle it takes every rank's
// inputs, returns every rank's outputs, favours obviousness over speed, shares nothing with the fast
// path beyond src/numeric/convert.h, and assumes valid inputs.
#pragma once

#include <cstdint>
#include <vector>

#include "numeric/convert.h"

namespace moedist::oracle::v2 {

struct RankInput {
  std::int64_t bs = 0;                   // tokens on this rank
  std::vector<std::uint16_t> x;          // bs*h, bf16 or fp16 bits, row-major
  std::vector<std::int32_t> expert_ids;  // bs*k, in [0, E+Z+C+Q) where read (ids of inactive entries are not)
  // Empty, or (Sn + E) * h smooth scales (Sn after the remap): shared expert j -> row j, MoE expert e -> row Sn + e.
  std::vector<float> scales;
  std::vector<float> expert_scales;  // empty (= weight 1.0 in combine), or bs*k router weights
  // Empty (every token active); bs entries (1-D: tokens [0, popcount) active, trues first); or bs*k
  // entries when mask_2d (entry (b,k) active iff true; a token is active iff its row has a true).
  std::vector<std::uint8_t> x_active_mask;
  bool mask_2d = false;
  std::vector<std::uint16_t> ori_x;            // empty, or bs*h (x's dtype): input of copy and const experts
  std::vector<std::uint16_t> shared_expert_x;  // empty, or bs*h (x's dtype), added with weight 1 (S == 0 only)
  // Const experts (G2 form): empty, or Q*h each (x's dtype). CONST = softmax(<alpha_1,x>, <alpha_2,x>) mix of x and v.
  std::vector<std::uint16_t> const_expert_alpha_1, const_expert_alpha_2, const_expert_v;
  bool has_combine_x = false;            // false: identity experts (as in the V1 oracle)
  std::vector<std::uint16_t> combine_x;  // valid_rows*h expert outputs in expand_x row order (x's dtype)
};

struct Case {
  int ep_world_size = 0;           // W
  int tp_world_size = 0;           // T in {0,1,2}; T == 2 needs L == 1 and comm_quant_mode 0
  int moe_expert_num = 0;          // E
  int shared_expert_rank_num = 0;  // S
  int shared_expert_num = 1;       // Sn as passed; S == 0 && Sn == 1 is remapped to Sn = 0 (V2 §0.3)
  int zero_expert_num = 0;         // Z: ids [E, E+Z)
  int copy_expert_num = 0;         // C: ids [E+Z, E+Z+C)
  int const_expert_num = 0;        // Q: ids [E+Z+C, E+Z+C+Q)
  std::int64_t global_bs = 0;      // 0 = BS*W; does not change the data (V2 §3.9)
  int quant_mode = 0;              // 0 or 2
  int expert_token_nums_type = 1;  // 0 (prefix sums) or 1 (counts)
  int comm_quant_mode = 0;         // 0 or 2
  numeric::Half dtype = numeric::Half::bf16;
  std::int64_t h = 0;
  std::int64_t k = 0;
  // Indexed by global rank g = ep_rank * max(T,1) + tp_rank; size W * max(T,1).
  std::vector<RankInput> ranks;
};

struct RankOutput {
  // Dispatch. Only valid rows are returned (no padding up to A).
  std::int64_t valid_rows = 0;                  // own EP rows + (T == 2) the TP peer's own EP rows
  std::int64_t own_rows = 0;                    // own EP rows: the rows with triples
  std::vector<std::uint16_t> expand_x;          // valid_rows*h, quant_mode 0 (x's dtype bits)
  std::vector<std::int8_t> expand_x_int8;       // valid_rows*h, quant_mode 2
  std::vector<float> dynamic_scales;            // valid_rows, quant_mode 2
  std::vector<float> expand_scales;             // valid_rows when any rank gave expert_scales (1.0 on shared rows)
  std::vector<std::int32_t> assist_info;        // 3*own_rows: (source EP rank, source token b, k) per own row
  std::vector<std::int64_t> expert_token_nums;  // L on MoE ranks, 1 on shared ranks
  std::vector<std::int32_t> ep_recv_counts;     // W*L*(T==2 ? 2 : 1) on MoE ranks, W*(T==2 ? 2 : 1) on shared ranks
  std::vector<std::int32_t> tp_recv_counts;     // T == 2: 2 entries, else empty
  // Combine.
  std::vector<std::uint8_t> token_active;  // bs: 1 for the tokens combine produces (V2 §4.2)
  std::vector<std::uint16_t> combine_out;  // bs*h (x's dtype bits); zero rows for inactive tokens (moedist's choice)
};

// Runs dispatch then combine for every rank.
std::vector<RankOutput> run(const Case& c);

}  // namespace moedist::oracle::v2
