// The reference oracle: a plain, all-ranks implementation of the contract
// (../shared/reference/ascend-op-semantics.md §5 with §2.2, §3.2-§3.5, §3.7 (the A2 kernel's 1-D
// x_active_mask), §3.9, §3.11, §4.2-§4.6; V1 operators, kernel-code column). It takes every rank's inputs and returns
// every rank's outputs. It is written for obviousness, not speed, and shares nothing with the fast path beyond
// src/numeric/convert.h. It assumes valid inputs (validation is the fast path's job and is tested separately).
#pragma once

#include <cstdint>
#include <vector>

#include "numeric/convert.h"

namespace moedist::oracle {

struct RankInput {
  std::int64_t bs = 0;                    // tokens on this rank
  std::vector<std::uint16_t> x;           // bs*h, bf16 or fp16 bits, row-major
  std::vector<std::int32_t> expert_ids;   // bs*k, row-major
  std::vector<float> scales;              // empty, or (E + (S > 0 ? 1 : 0)) * h smooth scales, row-major
  std::vector<float> expert_scales;       // empty (= all 1.0 in combine), or bs*k router weights
  // x_active_mask (§3.7): empty = every token active; else bs entries (0 = false), trues first. The
  // kernel takes tokens [0, n) with n = the number of trues; only they are sent, counted and combined.
  std::vector<std::uint8_t> x_active_mask;
  bool has_combine_x = false;             // false: identity experts (see Case)
  std::vector<std::uint16_t> combine_x;   // valid_rows*h expert outputs in expand_x row order (x's dtype)
};

struct Case {
  int ep_world_size = 0;            // W
  int tp_world_size = 0;            // T in {0,1,2}
  int moe_expert_num = 0;           // E
  int shared_expert_rank_num = 0;   // S
  std::int64_t global_bs = 0;       // 0 = BS*W
  int quant_mode = 0;               // 0 or 2
  int expert_token_nums_type = 1;   // 0 or 1
  int comm_quant_mode = 0;          // 0 or 2
  numeric::Half dtype = numeric::Half::bf16;
  std::int64_t h = 0;
  std::int64_t k = 0;
  // Indexed by global rank g = ep_rank * max(T,1) + tp_rank; size W * max(T,1).
  std::vector<RankInput> ranks;
};

struct RankOutput {
  // Dispatch. Only valid rows are returned (no padding up to A).
  std::int64_t valid_rows = 0;               // own EP rows + (T == 2) peer rows
  std::vector<std::uint16_t> expand_x;       // valid_rows*h, quant_mode 0 (x's dtype bits)
  std::vector<std::int8_t> expand_x_int8;    // valid_rows*h, quant_mode 2
  std::vector<float> dynamic_scales;         // valid_rows, quant_mode 2
  std::vector<float> expand_scales;          // valid_rows, when expert_scales were given (1.0 on shared-expert rows)
  std::vector<std::int32_t> expand_idx;      // bs*k (0 for the entries of inactive tokens)
  std::vector<std::int64_t> expert_token_nums;  // local_expert_num
  std::vector<std::int32_t> ep_recv_counts;     // W*local_expert_num*(T==2 ? 2 : 1)
  std::vector<std::int32_t> tp_recv_counts;     // T == 2: 2 entries, else empty
  // Combine: bs*h in x's dtype bits, zero rows for inactive tokens. Expert outputs are combine_x when given, else
  // identity experts: the dispatched row itself (quant_mode 0) or cast_rint(fl32(float(q) * dynamic_scale)) (quant_mode
  // 2).
  std::vector<std::uint16_t> combine_out;
};

// Runs dispatch then combine for every rank.
std::vector<RankOutput> run(const Case& c);

}  // namespace moedist::oracle
