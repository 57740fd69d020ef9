// The reference oracle, written straight from the contract (ascend-op-semantics.md §5, V1, kernel-code
// column). Every rank's dispatch is computed from the global routing stream, then combine walks the
// recorded provenance of every row backwards. Plain loops and plain containers throughout: this code
// is the yardstick the fast path is measured against, so it favours obviousness over speed.
#include "oracle/oracle.h"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "oracle/oracle_common.h"

namespace moedist::oracle {
namespace {

using common::global_rank;
using common::moe_local_expert_num;
using common::tp_domain_size;
using numeric::Half;

// ---------------------------------------------------------------------------------------------
// Rank geometry (§0.3, §3.1)

int expert_home_rank(const Case& c, int expert) { return c.shared_expert_rank_num + expert / moe_local_expert_num(c); }

int expert_local_index(const Case& c, int expert) { return expert % moe_local_expert_num(c); }

// Smooth-scales row for a MoE expert (§2.3, V1): e + 1 when shared experts exist (row 0 is theirs), else e.
int smooth_row_for_moe_expert(const Case& c, int expert) { return c.shared_expert_rank_num > 0 ? expert + 1 : expert; }
constexpr int kSmoothRowForSharedExpert = 0;

// Integer floor / ceil division of non-negative numbers, as the V1 shared split (§3.4.1) writes them.
std::int64_t floor_div(std::int64_t numerator, std::int64_t denominator) { return numerator / denominator; }
std::int64_t ceil_div(std::int64_t numerator, std::int64_t denominator) {
  return (numerator + denominator - 1) / denominator;
}

void require(bool condition, const std::string& what) {
  if (!condition) throw std::invalid_argument("moedist oracle: " + what);
}

// Internal consistency checks: these fire only if the oracle itself is wrong.
void ensure(bool condition, const char* what) {
  if (!condition) throw std::logic_error(std::string("moedist oracle internal error: ") + what);
}

// ---------------------------------------------------------------------------------------------
// Dispatch rows

// top-k index recorded for a row that carries a whole token to the shared expert.
constexpr std::int64_t kSharedExpertSlot = -1;

// Where a dispatched row came from, inside one EP group.
struct Provenance {
  int src_ep_rank = 0;
  std::int64_t token = 0;
  std::int64_t topk = kSharedExpertSlot;
};

// One row exactly as dispatch delivers it to the receiving rank.
struct DeliveredRow {
  Provenance from;
  common::RowPayload payload;
  float expand_scale = 1.0f;  // expert_scales[b, k]; 1.0 on shared-expert rows
};

// Builds the payload of source row `token` of `src`, quantized on the sender with smooth row `scales_row`
// (§2.2 for quant_mode 2, §2.4 for quant_mode 0).
DeliveredRow make_row(const Case& c, const RankInput& src, const Provenance& from, int scales_row) {
  DeliveredRow row;
  row.from = from;
  const float* smooth = src.scales.empty() ? nullptr : src.scales.data() + scales_row * c.h;
  row.payload = common::make_payload(c.dtype, c.quant_mode, src.x.data() + from.token * c.h, smooth, c.h);
  if (from.topk != kSharedExpertSlot && !src.expert_scales.empty()) {
    row.expand_scale = src.expert_scales[from.token * c.k + from.topk];
  }
  return row;
}

// ---------------------------------------------------------------------------------------------
// Dispatch inside one EP group (one TP rank's view of the world)

// What one EP rank holds after the EP all-to-all, before any TP all-gather.
struct EpRankDispatch {
  std::vector<DeliveredRow> rows;                   // in expand_x order
  std::vector<std::int32_t> ep_recv_counts;         // inclusive cumsum, W * local_expert_num
  std::vector<std::int64_t> rows_per_local_expert;  // local_expert_num entries
  std::vector<std::int32_t> expand_idx;             // bs * k
};

// One (src_rank, b, k) routing entry of the global stream (§5 golden).
struct RoutingEntry {
  int src_ep_rank = 0;
  std::int64_t token = 0;
  std::int64_t topk = 0;
  int expert = 0;
};

// V1 shared-expert destination of token b on MoE rank r (§3.4.1, the s(b) form exactly as written).
struct SharedTarget {
  int shared_rank = 0;
  std::int64_t slot = 0;  // position inside the (source r) block on that shared rank
};

// §3.7: the A2 kernel counts the mask's trues and takes that many tokens from the front.
std::int64_t active_tokens(const RankInput& rank) {
  if (rank.x_active_mask.empty()) return rank.bs;
  std::int64_t trues = 0;
  for (const std::uint8_t value : rank.x_active_mask) trues += value != 0 ? 1 : 0;
  return trues;
}

SharedTarget v1_shared_target(int src_ep_rank, std::int64_t token, std::int64_t bs, int shared_rank_num) {
  const std::int64_t r = src_ep_rank;
  const std::int64_t s_num = shared_rank_num;
  const std::int64_t t0 = floor_div(r * bs, s_num);
  const std::int64_t s = ceil_div((token + 1 + t0) * s_num, bs) - 1 - r;
  const std::int64_t slot = token - (floor_div((s + r) * bs, s_num) - t0);
  return SharedTarget{static_cast<int>(s), slot};
}

std::vector<EpRankDispatch> dispatch_ep_group(const Case& c, int tp_rank) {
  const int w = c.ep_world_size;
  const int shared_num = c.shared_expert_rank_num;
  const int moe_l = moe_local_expert_num(c);
  auto input = [&](int ep_rank) -> const RankInput& { return c.ranks[global_rank(c, ep_rank, tp_rank)]; };

  std::vector<EpRankDispatch> result(static_cast<std::size_t>(w));

  // expand_idx (§3.2): occurrence number of each id among earlier entries of the same source rank.
  // Entries of inactive tokens are not sent and get no occurrence number (0 here).
  for (int r = 0; r < w; ++r) {
    const RankInput& src = input(r);
    std::vector<std::int32_t> seen(static_cast<std::size_t>(c.moe_expert_num), 0);
    result[r].expand_idx.assign(src.expert_ids.size(), 0);
    for (std::int64_t t = 0; t < active_tokens(src) * c.k; ++t) {
      const std::int32_t expert = src.expert_ids[t];
      result[r].expand_idx[t] = seen[expert];
      ++seen[expert];
    }
  }

  // The global (src_rank, b, k) stream, stably sorted by expert (§3.3 golden). Within one expert the
  // stable sort keeps source-rank-major, flattened-index-minor order, which is the block order.
  std::vector<RoutingEntry> stream;
  for (int r = 0; r < w; ++r) {
    const RankInput& src = input(r);
    for (std::int64_t b = 0; b < active_tokens(src); ++b) {
      for (std::int64_t k = 0; k < c.k; ++k) {
        stream.push_back(RoutingEntry{r, b, k, src.expert_ids[b * c.k + k]});
      }
    }
  }
  std::stable_sort(stream.begin(), stream.end(),
                   [](const RoutingEntry& a, const RoutingEntry& b) { return a.expert < b.expert; });

  // MoE ranks (§3.3): their experts are consecutive, so their slice of the sorted stream is already in
  // (local expert, source rank, flattened index) order.
  for (int d = shared_num; d < w; ++d) {
    EpRankDispatch& out = result[d];
    std::vector<std::int32_t> block_count(static_cast<std::size_t>(moe_l) * w, 0);  // index l*W + r
    out.rows_per_local_expert.assign(static_cast<std::size_t>(moe_l), 0);
    for (const RoutingEntry& entry : stream) {
      if (expert_home_rank(c, entry.expert) != d) continue;
      const int local = expert_local_index(c, entry.expert);
      const Provenance from{entry.src_ep_rank, entry.token, entry.topk};
      out.rows.push_back(make_row(c, input(entry.src_ep_rank), from, smooth_row_for_moe_expert(c, entry.expert)));
      ++block_count[local * w + entry.src_ep_rank];
      ++out.rows_per_local_expert[local];
    }
    std::int32_t running = 0;
    for (const std::int32_t count : block_count) {
      running += count;
      out.ep_recv_counts.push_back(running);
    }
  }

  // Shared ranks (§3.4.1): own tokens first, then one block per MoE source rank r = S..W-1.
  for (int s = 0; s < shared_num; ++s) {
    EpRankDispatch& out = result[s];
    const RankInput& own = input(s);
    std::vector<std::int32_t> source_count(static_cast<std::size_t>(w), 0);

    const std::int64_t own_bs = active_tokens(own);
    for (std::int64_t b = 0; b < own_bs; ++b) {
      out.rows.push_back(make_row(c, own, Provenance{s, b, kSharedExpertSlot}, kSmoothRowForSharedExpert));
    }
    // The r < S entries are the kernel's bookkeeping split of the own rows; they sum to BS_s.
    for (int r = 0; r < shared_num; ++r) {
      const std::int64_t count = floor_div((r + s + 1) * own_bs, shared_num) - floor_div((r + s) * own_bs, shared_num);
      source_count[r] = static_cast<std::int32_t>(count);
    }

    for (int r = shared_num; r < w; ++r) {
      const RankInput& src = input(r);
      // Collect the tokens rank r sends here, each at the slot the formula gives it.
      std::vector<std::int64_t> token_at_slot;
      std::vector<std::int64_t> slot_of_token;
      // The kernel splits the tokens it sends, the active ones, as if they were all of BS.
      const std::int64_t src_bs = active_tokens(src);
      for (std::int64_t b = 0; b < src_bs; ++b) {
        const SharedTarget target = v1_shared_target(r, b, src_bs, shared_num);
        if (target.shared_rank != s) continue;
        slot_of_token.push_back(target.slot);
        token_at_slot.push_back(b);
      }
      std::vector<std::int64_t> block(token_at_slot.size(), -1);
      for (std::size_t i = 0; i < token_at_slot.size(); ++i) {
        const std::int64_t slot = slot_of_token[i];
        ensure(slot >= 0 && slot < static_cast<std::int64_t>(block.size()) && block[slot] == -1,
               "V1 shared-expert slots do not form a permutation");
        block[slot] = token_at_slot[i];
      }
      for (const std::int64_t b : block) {
        out.rows.push_back(make_row(c, src, Provenance{r, b, kSharedExpertSlot}, kSmoothRowForSharedExpert));
      }
      source_count[r] = static_cast<std::int32_t>(block.size());
    }

    std::int32_t running = 0;
    for (const std::int32_t count : source_count) {
      running += count;
      out.ep_recv_counts.push_back(running);
    }
    out.rows_per_local_expert = {static_cast<std::int64_t>(out.rows.size())};
    ensure(running == static_cast<std::int32_t>(out.rows.size()), "shared-rank counts disagree with its rows");
  }
  return result;
}

// ---------------------------------------------------------------------------------------------
// Combine arithmetic

// Where one routing entry's (or one token's shared) expert output sits: EP rank and row of expand_x.
struct RowLocation {
  int ep_rank = -1;
  std::int64_t row = -1;
};

void validate_shapes(const Case& c) {
  require(c.ep_world_size >= 1, "ep_world_size must be >= 1");
  require(c.tp_world_size >= 0 && c.tp_world_size <= 2, "tp_world_size must be 0, 1 or 2");
  require(c.shared_expert_rank_num >= 0 && c.shared_expert_rank_num < c.ep_world_size,
          "shared_expert_rank_num must be in [0, W)");
  require(c.moe_expert_num > 0 && c.moe_expert_num % (c.ep_world_size - c.shared_expert_rank_num) == 0,
          "moe_expert_num must be a positive multiple of W - S");
  require(c.quant_mode == 0 || c.quant_mode == 2, "quant_mode must be 0 or 2");
  require(c.h >= 1 && c.k >= 1, "h and k must be >= 1");
  require(static_cast<std::int64_t>(c.ranks.size()) == std::int64_t{c.ep_world_size} * tp_domain_size(c),
          "ranks must hold W * max(T, 1) entries");
  for (const RankInput& rank : c.ranks) {
    require(rank.bs >= 0, "bs must be >= 0");
    require(static_cast<std::int64_t>(rank.x.size()) == rank.bs * c.h, "x must hold bs * h values");
    require(static_cast<std::int64_t>(rank.expert_ids.size()) == rank.bs * c.k, "expert_ids must hold bs * k values");
    require(rank.x_active_mask.empty() || static_cast<std::int64_t>(rank.x_active_mask.size()) == rank.bs,
            "x_active_mask must be empty or bs values");
    for (std::int64_t t = 0; t < active_tokens(rank) * c.k; ++t)  // inactive tokens' ids are never read
      require(rank.expert_ids[t] >= 0 && rank.expert_ids[t] < c.moe_expert_num, "expert id out of range");
    const std::int64_t scale_rows = c.moe_expert_num + (c.shared_expert_rank_num > 0 ? 1 : 0);
    require(rank.scales.empty() || static_cast<std::int64_t>(rank.scales.size()) == scale_rows * c.h,
            "scales must be empty or (E + (S > 0)) * h values");
    require(rank.expert_scales.empty() || static_cast<std::int64_t>(rank.expert_scales.size()) == rank.bs * c.k,
            "expert_scales must be empty or bs * k values");
  }
}

}  // namespace

std::vector<RankOutput> run(const Case& c) {
  validate_shapes(c);
  const int w = c.ep_world_size;
  const int tp_size = tp_domain_size(c);
  const bool has_tp_peer = c.tp_world_size == 2;
  const std::int64_t h = c.h;
  const std::int64_t topk = c.k;

  std::vector<std::vector<EpRankDispatch>> group_dispatch;  // [tp_rank][ep_rank]
  for (int t = 0; t < tp_size; ++t) group_dispatch.push_back(dispatch_ep_group(c, t));

  // expand_scales exist when router weights were given; a rank that gave none counts as weight 1.0.
  bool any_expert_scales = false;
  for (const RankInput& rank : c.ranks) any_expert_scales = any_expert_scales || !rank.expert_scales.empty();

  // ---- dispatch outputs: own EP rows, then (TP) the peer's own EP rows (§3.5) ----
  std::vector<RankOutput> outputs(c.ranks.size());
  for (int ep = 0; ep < w; ++ep) {
    for (int t = 0; t < tp_size; ++t) {
      RankOutput& out = outputs[global_rank(c, ep, t)];
      const EpRankDispatch& own = group_dispatch[t][ep];
      const EpRankDispatch* peer = has_tp_peer ? &group_dispatch[1 - t][ep] : nullptr;

      common::fill_dispatch_outputs(c, own, peer, t, any_expert_scales, out);
      out.expand_idx = own.expand_idx;
    }
  }

  // ---- combine: expert outputs Y per global rank, valid_rows * h in x's dtype ----
  std::vector<std::vector<std::uint16_t>> expert_out = common::expert_outputs(c, outputs, require);

  // TP reduce (§4.4): own row i plus the peer's copy of it, which sits after the peer's own rows.
  if (has_tp_peer) {
    std::vector<std::vector<std::uint16_t>> reduced = expert_out;
    for (int ep = 0; ep < w; ++ep) {
      for (int t = 0; t < 2; ++t) {
        const int self_rank = global_rank(c, ep, t);
        const int peer_rank = global_rank(c, ep, 1 - t);
        const auto n_self = static_cast<std::int64_t>(group_dispatch[t][ep].rows.size());
        const auto n_peer_self = static_cast<std::int64_t>(group_dispatch[1 - t][ep].rows.size());
        for (std::int64_t row = 0; row < n_self; ++row) {
          for (std::int64_t i = 0; i < h; ++i) {
            const float mine = numeric::half_to_f32(c.dtype, expert_out[self_rank][row * h + i]);
            const float theirs = numeric::half_to_f32(c.dtype, expert_out[peer_rank][(n_peer_self + row) * h + i]);
            const float sum = mine + theirs;
            // V1 CustomAdd: bf16 rounds half away from zero (CAST_ROUND); fp16 is a native, nearest-even add.
            reduced[self_rank][row * h + i] =
                c.dtype == Half::bf16 ? numeric::f32_to_bf16_round_away(sum) : numeric::f32_to_fp16_rne(sum);
          }
        }
      }
    }
    expert_out = std::move(reduced);
  }

  if (c.comm_quant_mode == 2) {  // §4.5
    for (std::size_t g = 0; g < c.ranks.size(); ++g) {
      const std::int64_t rows = outputs[g].valid_rows;
      for (std::int64_t row = 0; row < rows; ++row)
        common::comm_quant_round_trip(c.dtype, expert_out[g].data() + row * h, h);
    }
  }

  // Weighted sum per token (§4.2, §4.3), one EP group at a time.
  for (int t = 0; t < tp_size; ++t) {
    const std::vector<EpRankDispatch>& dispatch = group_dispatch[t];
    // Invert the provenance records: where did dispatch put (r, b, k), and (r, b)'s shared copy?
    std::vector<std::vector<RowLocation>> moe_location(static_cast<std::size_t>(w));
    std::vector<std::vector<RowLocation>> shared_location(static_cast<std::size_t>(w));
    for (int r = 0; r < w; ++r) {
      const std::int64_t bs = c.ranks[global_rank(c, r, t)].bs;
      moe_location[r].resize(static_cast<std::size_t>(bs * topk));
      shared_location[r].resize(static_cast<std::size_t>(bs));
    }
    for (int d = 0; d < w; ++d) {
      for (std::size_t row = 0; row < dispatch[d].rows.size(); ++row) {
        const Provenance& from = dispatch[d].rows[row].from;
        RowLocation& slot = from.topk == kSharedExpertSlot
                                ? shared_location[from.src_ep_rank][from.token]
                                : moe_location[from.src_ep_rank][from.token * topk + from.topk];
        ensure(slot.ep_rank == -1, "a routing entry was delivered twice");
        slot = RowLocation{d, static_cast<std::int64_t>(row)};
      }
    }

    for (int r = 0; r < w; ++r) {
      const int g = global_rank(c, r, t);
      const RankInput& src = c.ranks[g];
      RankOutput& out = outputs[g];
      out.combine_out.assign(static_cast<std::size_t>(src.bs * h), 0);  // inactive tokens stay 0 (§4.6)
      for (std::int64_t b = 0; b < active_tokens(src); ++b) {
        for (std::int64_t i = 0; i < h; ++i) {
          float acc = 0.0f;
          for (std::int64_t k = 0; k < topk; ++k) {
            const RowLocation& at = moe_location[r][b * topk + k];
            ensure(at.ep_rank >= 0, "a routing entry was never delivered");
            const std::uint16_t y = expert_out[global_rank(c, at.ep_rank, t)][at.row * h + i];
            const float weight = src.expert_scales.empty() ? 1.0f : src.expert_scales[b * topk + k];
            const float weighted = numeric::half_to_f32(c.dtype, y) * weight;
            acc = acc + weighted;
          }
          if (c.shared_expert_rank_num > 0) {
            // The shared expert's output is added with weight 1 (§4.2, [DOC≠CODE] #1).
            const RowLocation& at = shared_location[r][b];
            ensure(at.ep_rank >= 0, "a token never reached a shared expert");
            const std::uint16_t y = expert_out[global_rank(c, at.ep_rank, t)][at.row * h + i];
            acc = acc + numeric::half_to_f32(c.dtype, y);
          }
          out.combine_out[b * h + i] = numeric::f32_to_half_rne(c.dtype, acc);
        }
      }
    }
  }
  return outputs;
}

}  // namespace moedist::oracle
