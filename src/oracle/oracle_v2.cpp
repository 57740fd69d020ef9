// The V2 reference oracle, written straight from ascend-v2-semantics.md (§3, §4, §6) and the V1 contract
// it amends. Each EP group's dispatch is computed from every source rank's active entries with nested
// loops in the order the contract states; combine walks the recorded provenance (the assist_info
// triples) backwards. Plain loops and plain containers: this is the yardstick, so obviousness wins.
// Every fp32 multiply and add is its own statement, and moedist_flags compiles with -ffp-contract=off,
// so none of them becomes an FMA (the contract's ops are separate, V2 §4.3).
#include "oracle/oracle_v2.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "oracle/oracle_common.h"

namespace moedist::oracle::v2 {
namespace {

using common::global_rank;
using common::moe_local_expert_num;
using common::tp_domain_size;
using numeric::Half;

void require(bool condition, const std::string& what) {
  if (!condition) throw std::invalid_argument("moedist oracle v2: " + what);
}

// Internal consistency checks: these fire only if the oracle itself is wrong.
void ensure(bool condition, const char* what) {
  if (!condition) throw std::logic_error(std::string("moedist oracle v2 internal error: ") + what);
}

// ---------------------------------------------------------------------------------------------
// Geometry (V2 §0.3, V1 §3.1)

// Sn after the remap "S == 0 and Sn == 1 => Sn := 0".
int shared_expert_num(const Case& c) {
  return c.shared_expert_rank_num == 0 && c.shared_expert_num == 1 ? 0 : c.shared_expert_num;
}

// R = S / Sn: the ranks that host one shared expert (0 without shared experts).
int ranks_per_shared_expert(const Case& c) {
  const int sn = shared_expert_num(c);
  return sn == 0 ? 0 : c.shared_expert_rank_num / sn;
}

// The first id of each kind of special expert (V2 §0.3): zero [E, E+Z), copy [E+Z, E+Z+C), const [E+Z+C, E+Z+C+Q).
std::int64_t first_copy_id(const Case& c) { return std::int64_t{c.moe_expert_num} + c.zero_expert_num; }
std::int64_t first_const_id(const Case& c) { return first_copy_id(c) + c.copy_expert_num; }
std::int64_t end_of_ids(const Case& c) { return first_const_id(c) + c.const_expert_num; }

// ---------------------------------------------------------------------------------------------
// Which tokens and entries take part (V2 §3.1-§3.3, §6)

std::int64_t popcount(const std::vector<std::uint8_t>& mask) {
  std::int64_t trues = 0;
  for (const std::uint8_t value : mask) trues += value != 0 ? 1 : 0;
  return trues;
}

// No mask: all tokens; 1-D: b < popcount, wherever the trues sit; 2-D: any true in the token's row.
bool token_active(const Case& c, const RankInput& rank, std::int64_t b) {
  if (rank.x_active_mask.empty()) return true;
  if (!rank.mask_2d) return b < popcount(rank.x_active_mask);
  for (std::int64_t k = 0; k < c.k; ++k) {
    if (rank.x_active_mask[b * c.k + k] != 0) return true;
  }
  return false;
}

// An entry combine looks at: its token is active and (2-D mask) its own mask bit is true.
bool entry_unmasked(const Case& c, const RankInput& rank, std::int64_t b, std::int64_t k) {
  if (!token_active(c, rank, b)) return false;
  return !rank.mask_2d || rank.x_active_mask[b * c.k + k] != 0;
}

// An entry dispatch sends: unmasked, with a real MoE expert (special experts, ids >= E, stay home).
// Without special experts ids are in [0, E), so the id test changes nothing there.
bool entry_active(const Case& c, const RankInput& rank, std::int64_t b, std::int64_t k) {
  return entry_unmasked(c, rank, b, k) && rank.expert_ids[b * c.k + k] < c.moe_expert_num;
}

// ---------------------------------------------------------------------------------------------
// Dispatch rows

// Where a dispatched row came from, inside one EP group: its assist_info triple.
struct Provenance {
  int src_ep_rank = 0;
  std::int64_t token = 0;
  std::int64_t topk = 0;  // k for a routed row, K + j for shared expert j
};

// One row exactly as dispatch delivers it to the receiving rank.
struct DeliveredRow {
  Provenance from;
  common::RowPayload payload;
  float expand_scale = 1.0f;  // expert_scales[b, k]; 1.0 on shared-expert rows
};

// The payload of source row `from.token` of `src`, quantized on the sender with smooth row `scales_row`
// (V1 §2.2 / V2 §2.2 for quant_mode 2; a bit copy for quant_mode 0), as the V1 oracle builds its rows.
DeliveredRow make_row(const Case& c, const RankInput& src, const Provenance& from, std::int64_t scales_row) {
  DeliveredRow row;
  row.from = from;
  const float* smooth = src.scales.empty() ? nullptr : src.scales.data() + scales_row * c.h;
  row.payload = common::make_payload(c.dtype, c.quant_mode, src.x.data() + from.token * c.h, smooth, c.h);
  if (from.topk < c.k && !src.expert_scales.empty()) row.expand_scale = src.expert_scales[from.token * c.k + from.topk];
  return row;
}

// What one EP rank holds after the EP all-to-all, before any TP all-gather.
struct EpRankDispatch {
  std::vector<DeliveredRow> rows;                   // in expand_x order
  std::vector<std::int32_t> ep_recv_counts;         // inclusive cumsum: W*L (MoE rank) or W (shared rank)
  std::vector<std::int64_t> rows_per_local_expert;  // L entries (MoE rank) or 1 (shared rank)
};

std::vector<EpRankDispatch> dispatch_ep_group(const Case& c, int tp_rank) {
  const int w = c.ep_world_size;
  const int shared_ranks = c.shared_expert_rank_num;
  const int moe_l = moe_local_expert_num(c);
  const int sn = shared_expert_num(c);
  auto input = [&](int ep_rank) -> const RankInput& { return c.ranks[global_rank(c, ep_rank, tp_rank)]; };

  std::vector<EpRankDispatch> result(static_cast<std::size_t>(w));

  // MoE rank d (V1 §3.3 over active entries, V2 §3.1): blocks (l, r), l-major, r-minor; each block holds
  // r's active entries for expert e = (d - S) * L + l by increasing flattened index, which is slot order.
  for (int d = shared_ranks; d < w; ++d) {
    EpRankDispatch& out = result[d];
    out.rows_per_local_expert.assign(static_cast<std::size_t>(moe_l), 0);
    std::int32_t running = 0;
    for (int l = 0; l < moe_l; ++l) {
      const int expert = (d - shared_ranks) * moe_l + l;
      for (int r = 0; r < w; ++r) {
        const RankInput& src = input(r);
        for (std::int64_t b = 0; b < src.bs; ++b) {
          for (std::int64_t k = 0; k < c.k; ++k) {
            if (!entry_active(c, src, b, k) || src.expert_ids[b * c.k + k] != expert) continue;
            out.rows.push_back(make_row(c, src, Provenance{r, b, k}, std::int64_t{sn} + expert));  // smooth row Sn + e
            ++running;
            ++out.rows_per_local_expert[l];
          }
        }
        out.ep_recv_counts.push_back(running);
      }
    }
  }

  // Shared rank s (V2 §3.5) hosts shared expert j = s / R. Every rank r with r % R == s % R (s itself too)
  // sends it all its active tokens in increasing b; the other r give empty blocks. Smooth row j, k-field K + j.
  const int per_expert = ranks_per_shared_expert(c);
  for (int s = 0; s < shared_ranks; ++s) {
    EpRankDispatch& out = result[s];
    const int j = s / per_expert;
    std::int32_t running = 0;
    for (int r = 0; r < w; ++r) {
      const RankInput& src = input(r);
      if (r % per_expert == s % per_expert) {
        for (std::int64_t b = 0; b < src.bs; ++b) {
          if (!token_active(c, src, b)) continue;
          out.rows.push_back(make_row(c, src, Provenance{r, b, c.k + j}, j));
          ++running;
        }
      }
      out.ep_recv_counts.push_back(running);
    }
    out.rows_per_local_expert = {static_cast<std::int64_t>(out.rows.size())};
  }
  return result;
}

// ---------------------------------------------------------------------------------------------
// Combine arithmetic

// TP reduce of one element (V2 §3.8, V1 §4.4): the fp32 sum cast with RINT. V2 changed V1's bf16
// CAST_ROUND to CAST_RINT ([OT-K-C2] CustomAdd); fp16 is a native nearest-even add, and an fp32 sum of
// two fp16 values rounded once more to fp16 gives the same bits (24 >= 2*11 + 2).
std::uint16_t tp_add(Half dtype, std::uint16_t mine, std::uint16_t theirs) {
  const float sum = numeric::half_to_f32(dtype, mine) + numeric::half_to_f32(dtype, theirs);
  return numeric::f32_to_half_rne(dtype, sum);
}

// The mixing weights of const expert c for token b (V2 §4.4, G2): (a1, a2) = softmax(l1, l2) with
// l_i = <alpha_i[c], ori_x[b]>. The dot products add one fp32 product at a time in increasing h from
// 0.0f (moedist's fixed order; the kernel's tree order is not public); exp is float std::exp.
struct ConstMix {
  float a1 = 0.0f;
  float a2 = 0.0f;
};

ConstMix const_expert_mix(Half dtype, const std::uint16_t* alpha_1, const std::uint16_t* alpha_2,
                          const std::uint16_t* ori_x, std::int64_t h) {
  float l1 = 0.0f;
  float l2 = 0.0f;
  for (std::int64_t i = 0; i < h; ++i) {
    const float x = numeric::half_to_f32(dtype, ori_x[i]);
    const float p1 = numeric::half_to_f32(dtype, alpha_1[i]) * x;
    const float p2 = numeric::half_to_f32(dtype, alpha_2[i]) * x;
    l1 = l1 + p1;
    l2 = l2 + p2;
  }
  const float m = std::max(l1, l2);
  const float e1 = std::exp(l1 - m);
  const float e2 = std::exp(l2 - m);
  const float total = e1 + e2;
  return ConstMix{e1 / total, e2 / total};
}

// Where one routing entry's (or one token's shared-expert) output sits: EP rank and row of expand_x.
struct RowLocation {
  int ep_rank = -1;
  std::int64_t row = -1;
};

void validate(const Case& c) {
  require(c.ep_world_size >= 1, "ep_world_size must be >= 1");
  require(c.tp_world_size >= 0 && c.tp_world_size <= 2, "tp_world_size must be 0, 1 or 2");
  require(c.shared_expert_rank_num >= 0 && c.shared_expert_rank_num < c.ep_world_size,
          "shared_expert_rank_num must be in [0, W)");
  require(c.moe_expert_num > 0 && c.moe_expert_num % (c.ep_world_size - c.shared_expert_rank_num) == 0,
          "moe_expert_num must be a positive multiple of W - S");
  const int sn = shared_expert_num(c);
  if (c.shared_expert_rank_num == 0) {
    require(sn == 0, "without shared expert ranks shared_expert_num must be 0 or 1");
  } else {
    require(sn >= 1 && c.shared_expert_rank_num % sn == 0, "shared_expert_rank_num must be a multiple of Sn >= 1");
  }
  require(c.zero_expert_num >= 0 && c.copy_expert_num >= 0 && c.const_expert_num >= 0,
          "special expert counts must be >= 0");
  require(c.quant_mode == 0 || c.quant_mode == 2, "quant_mode must be 0 or 2");
  require(c.comm_quant_mode == 0 || c.comm_quant_mode == 2, "comm_quant_mode must be 0 or 2");
  require(c.expert_token_nums_type == 0 || c.expert_token_nums_type == 1, "expert_token_nums_type must be 0 or 1");
  require(c.tp_world_size != 2 || (moe_local_expert_num(c) == 1 && c.comm_quant_mode == 0),
          "tp_world_size 2 needs one expert per MoE rank and comm_quant_mode 0");
  require(c.h >= 1 && c.k >= 1, "h and k must be >= 1");
  require(static_cast<std::int64_t>(c.ranks.size()) == std::int64_t{c.ep_world_size} * tp_domain_size(c),
          "ranks must hold W * max(T, 1) entries");
  const std::int64_t h = c.h;
  for (const RankInput& rank : c.ranks) {
    const std::int64_t bs = rank.bs;
    auto empty_or = [](std::size_t size, std::int64_t n) { return size == 0 || static_cast<std::int64_t>(size) == n; };
    require(bs >= 0, "bs must be >= 0");
    require(static_cast<std::int64_t>(rank.x.size()) == bs * h, "x must hold bs * h values");
    require(static_cast<std::int64_t>(rank.expert_ids.size()) == bs * c.k, "expert_ids must hold bs * k values");
    require(empty_or(rank.scales.size(), (std::int64_t{sn} + c.moe_expert_num) * h),
            "scales must be empty or (Sn + E) * h values");
    require(empty_or(rank.expert_scales.size(), bs * c.k), "expert_scales must be empty or bs * k values");
    require(empty_or(rank.x_active_mask.size(), rank.mask_2d ? bs * c.k : bs),
            "x_active_mask must be empty, bs values, or (mask_2d) bs * k values");
    require(c.copy_expert_num + c.const_expert_num == 0 || static_cast<std::int64_t>(rank.ori_x.size()) == bs * h,
            "ori_x must hold bs * h values when there are copy or const experts");
    require(empty_or(rank.shared_expert_x.size(), bs * h), "shared_expert_x must be empty or bs * h values");
    require(rank.shared_expert_x.empty() || c.shared_expert_rank_num == 0, "shared_expert_x needs S == 0");
    if (c.const_expert_num > 0) {
      const std::int64_t n = std::int64_t{c.const_expert_num} * h;
      require(static_cast<std::int64_t>(rank.const_expert_alpha_1.size()) == n &&
                  static_cast<std::int64_t>(rank.const_expert_alpha_2.size()) == n &&
                  static_cast<std::int64_t>(rank.const_expert_v.size()) == n,
              "const_expert_alpha_1/2 and const_expert_v must hold Q * h values");
    }
    // Only the ids of unmasked entries of active tokens are ever read.
    for (std::int64_t b = 0; b < bs; ++b) {
      for (std::int64_t k = 0; k < c.k; ++k) {
        if (!entry_unmasked(c, rank, b, k)) continue;
        const std::int32_t id = rank.expert_ids[b * c.k + k];
        require(id >= 0 && id < end_of_ids(c), "expert id out of [0, E + Z + C + Q)");
      }
    }
  }
}

}  // namespace

std::vector<RankOutput> run(const Case& c) {
  validate(c);
  const int w = c.ep_world_size;
  const int tp_size = tp_domain_size(c);
  const bool has_tp_peer = c.tp_world_size == 2;
  const std::int64_t h = c.h;
  const std::int64_t topk = c.k;
  const int sn = shared_expert_num(c);

  std::vector<std::vector<EpRankDispatch>> group_dispatch;  // [tp_rank][ep_rank]
  for (int t = 0; t < tp_size; ++t) group_dispatch.push_back(dispatch_ep_group(c, t));

  // expand_scales exist when router weights were given; a rank that gave none counts as weight 1.0.
  bool any_expert_scales = false;
  for (const RankInput& rank : c.ranks) any_expert_scales = any_expert_scales || !rank.expert_scales.empty();

  // ---- dispatch outputs: own EP rows, then (TP) the peer's own EP rows (V1 §3.5, V2 §3.8) ----
  std::vector<RankOutput> outputs(c.ranks.size());
  for (int ep = 0; ep < w; ++ep) {
    for (int t = 0; t < tp_size; ++t) {
      RankOutput& out = outputs[global_rank(c, ep, t)];
      const EpRankDispatch& own = group_dispatch[t][ep];
      const EpRankDispatch* peer = has_tp_peer ? &group_dispatch[1 - t][ep] : nullptr;

      common::fill_dispatch_outputs(c, own, peer, t, any_expert_scales, out);
      out.own_rows = static_cast<std::int64_t>(own.rows.size());
      // Triples for the own EP rows only; the peer's gathered rows get none (V2 §3.6).
      for (const DeliveredRow& row : own.rows) {
        out.assist_info.push_back(row.from.src_ep_rank);
        out.assist_info.push_back(static_cast<std::int32_t>(row.from.token));
        out.assist_info.push_back(static_cast<std::int32_t>(row.from.topk));
      }
    }
  }

  // ---- combine: expert outputs Y per global rank, valid_rows * h in x's dtype ----
  std::vector<std::vector<std::uint16_t>> expert_out = common::expert_outputs(c, outputs, require);

  // TP reduce: own row i plus the peer's copy of it, which sits after the peer's own rows.
  if (has_tp_peer) {
    std::vector<std::vector<std::uint16_t>> reduced = expert_out;
    for (int ep = 0; ep < w; ++ep) {
      for (int t = 0; t < 2; ++t) {
        const int self_rank = global_rank(c, ep, t);
        const int peer_rank = global_rank(c, ep, 1 - t);
        const std::int64_t n_self = outputs[self_rank].own_rows;
        const std::int64_t n_peer_self = outputs[peer_rank].own_rows;
        for (std::int64_t row = 0; row < n_self; ++row) {
          for (std::int64_t i = 0; i < h; ++i) {
            reduced[self_rank][row * h + i] =
                tp_add(c.dtype, expert_out[self_rank][row * h + i], expert_out[peer_rank][(n_peer_self + row) * h + i]);
          }
        }
      }
    }
    expert_out = std::move(reduced);
  }

  // Every row sent back, routed or shared, travels int8-quantized (V2 §2.6).
  if (c.comm_quant_mode == 2) {
    for (std::size_t g = 0; g < c.ranks.size(); ++g) {
      const std::int64_t rows = outputs[g].valid_rows;
      for (std::int64_t row = 0; row < rows; ++row)
        common::comm_quant_round_trip(c.dtype, expert_out[g].data() + row * h, h);
    }
  }

  // Weighted sum per token (V2 §4.3), one EP group at a time.
  for (int t = 0; t < tp_size; ++t) {
    const std::vector<EpRankDispatch>& dispatch = group_dispatch[t];
    // Invert the triples: where did dispatch put (r, b, k), and (r, b)'s copy for shared expert j?
    std::vector<std::vector<RowLocation>> routed_at(static_cast<std::size_t>(w));
    std::vector<std::vector<RowLocation>> shared_at(static_cast<std::size_t>(w));
    for (int r = 0; r < w; ++r) {
      const std::int64_t bs = c.ranks[global_rank(c, r, t)].bs;
      routed_at[r].resize(static_cast<std::size_t>(bs * topk));
      shared_at[r].resize(static_cast<std::size_t>(bs * sn));
    }
    for (int d = 0; d < w; ++d) {
      for (std::size_t row = 0; row < dispatch[d].rows.size(); ++row) {
        const Provenance& from = dispatch[d].rows[row].from;
        RowLocation& slot = from.topk < topk ? routed_at[from.src_ep_rank][from.token * topk + from.topk]
                                             : shared_at[from.src_ep_rank][from.token * sn + (from.topk - topk)];
        ensure(slot.ep_rank == -1, "a routing entry was delivered twice");
        slot = RowLocation{d, static_cast<std::int64_t>(row)};
      }
    }
    auto expert_row = [&](const RowLocation& at) {
      ensure(at.ep_rank >= 0, "a routing entry was never delivered");
      return expert_out[global_rank(c, at.ep_rank, t)].data() + at.row * h;
    };

    for (int r = 0; r < w; ++r) {
      const int g = global_rank(c, r, t);
      const RankInput& src = c.ranks[g];
      RankOutput& out = outputs[g];
      out.token_active.assign(static_cast<std::size_t>(src.bs), 0);
      out.combine_out.assign(static_cast<std::size_t>(src.bs * h), 0);  // inactive tokens stay 0 (V2 §4.2)
      for (std::int64_t b = 0; b < src.bs; ++b) {
        if (!token_active(c, src, b)) continue;
        out.token_active[b] = 1;

        // Per entry, once per token: whether combine looks at it, and a const expert's mixing weights
        // (they depend on the whole ori_x row).
        std::vector<bool> unmasked(static_cast<std::size_t>(topk));
        std::vector<ConstMix> mix(static_cast<std::size_t>(topk));
        for (std::int64_t k = 0; k < topk; ++k) {
          unmasked[k] = entry_unmasked(c, src, b, k);
          if (!unmasked[k]) continue;
          const std::int64_t id = src.expert_ids[b * topk + k];
          if (id < first_const_id(c)) continue;
          const std::int64_t q = id - first_const_id(c);
          mix[k] = const_expert_mix(c.dtype, src.const_expert_alpha_1.data() + q * h,
                                    src.const_expert_alpha_2.data() + q * h, src.ori_x.data() + b * h, h);
        }

        for (std::int64_t i = 0; i < h; ++i) {
          float acc = 0.0f;
          for (std::int64_t k = 0; k < topk; ++k) {
            if (!unmasked[k]) continue;  // 2-D mask false: id and weight ignored
            const std::int64_t id = src.expert_ids[b * topk + k];
            const float weight = src.expert_scales.empty() ? 1.0f : src.expert_scales[b * topk + k];
            if (id < c.moe_expert_num) {
              const float y = numeric::half_to_f32(c.dtype, expert_row(routed_at[r][b * topk + k])[i]);
              const float weighted = y * weight;
              acc = acc + weighted;
            } else if (id < first_copy_id(c)) {
              // zero expert: contributes nothing
            } else if (id < first_const_id(c)) {
              const float weighted = numeric::half_to_f32(c.dtype, src.ori_x[b * h + i]) * weight;
              acc = acc + weighted;
            } else {
              const std::int64_t q = id - first_const_id(c);
              const float from_x = numeric::half_to_f32(c.dtype, src.ori_x[b * h + i]) * mix[k].a1;
              const float from_v = numeric::half_to_f32(c.dtype, src.const_expert_v[q * h + i]) * mix[k].a2;
              const float value = from_x + from_v;
              const float weighted = value * weight;
              acc = acc + weighted;
            }
          }
          // Shared experts in increasing j, weight 1 (V2 §4.5).
          for (int j = 0; j < sn; ++j) {
            acc = acc + numeric::half_to_f32(c.dtype, expert_row(shared_at[r][b * sn + j])[i]);
          }
          // Then the locally computed shared expert, weight 1.
          if (!src.shared_expert_x.empty()) acc = acc + numeric::half_to_f32(c.dtype, src.shared_expert_x[b * h + i]);
          out.combine_out[b * h + i] = numeric::f32_to_half_rne(c.dtype, acc);
        }
      }
    }
  }
  return outputs;
}

}  // namespace moedist::oracle::v2
