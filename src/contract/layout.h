// Where rows live: the rank topology of a group (contract §3.1), the capacity A (§3.3, §3.4.1, §3.5)
// and the byte layout of a rank's communication window. Pure functions of the configuration and the
// call shape; nothing here knows how bytes move.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "moedist/config.h"

namespace moedist::contract {

// shared_expert_num as V2 reads it: S == 0 with the default 1 means none (V2 §0.3).
inline int v2_shared_expert_num(const GroupConfig& c) noexcept {
  return c.shared_expert_rank_num == 0 && c.shared_expert_num == 1 ? 0 : c.shared_expert_num;
}

// Saturating arithmetic for sizes: shapes come from callers and from peers' records, and a product
// that overflowed would wrap to a small size (and a window too small for what is then written). A
// saturated size is larger than any window, so every check against one fails and no address is formed.
inline constexpr std::int64_t kSizeLimit = std::int64_t{1} << 62;
inline std::int64_t sat_mul(std::int64_t a, std::int64_t b) noexcept {
  if (a <= 0 || b <= 0) return 0;  // sizes are never negative
  std::int64_t r = 0;
  return __builtin_mul_overflow(a, b, &r) || r > kSizeLimit ? kSizeLimit : r;
}
inline std::int64_t sat_add(std::int64_t a, std::int64_t b) noexcept {
  std::int64_t r = 0;
  return __builtin_add_overflow(a, b, &r) || r > kSizeLimit ? kSizeLimit : r;
}
inline std::size_t sat_mul(std::size_t a, std::size_t b) noexcept {
  std::size_t r = 0;
  return __builtin_mul_overflow(a, b, &r) || r > static_cast<std::size_t>(kSizeLimit) ? static_cast<std::size_t>(kSizeLimit) : r;
}
inline std::size_t sat_add(std::size_t a, std::size_t b) noexcept {
  std::size_t r = 0;
  return __builtin_add_overflow(a, b, &r) || r > static_cast<std::size_t>(kSizeLimit) ? static_cast<std::size_t>(kSizeLimit) : r;
}

struct CallShape {
  std::int64_t bs = 0;  // this rank's tokens
  std::int64_t k = 0;
  std::int64_t h = 0;
  std::int64_t active = 0;  // tokens that take part: bs, or fewer with x_active_mask (contract/token_mask.h)
  int version = 1;          // 1: the V1 operators; 2: the V2 operators (another shared-rank capacity, triples)
};

class Topology {
 public:
  explicit Topology(const GroupConfig& c)
      : W(c.ep_world_size),
        S(c.shared_expert_rank_num),
        E(c.moe_expert_num),
        L(moe_local_expert_num(c)),
        T(tp_domain_size(c)),
        ep_rank(c.ep_rank_id),
        tp_rank(c.tp_rank_id),
        Sn(v2_shared_expert_num(c)),
        R(Sn > 0 ? S / Sn : 0),
        global_bs(c.global_bs) {}

  int W, S, E, L, T, ep_rank, tp_rank;
  // V2 (V2 §0.3, §3.5): Sn shared experts, each on R = S / Sn consecutive shared-expert ranks.
  int Sn, R;
  std::int64_t global_bs;

  bool is_shared(int ep) const noexcept { return ep < S; }
  int local_experts(int ep) const noexcept { return ep < S ? 1 : L; }
  int expert_rank(int expert) const noexcept { return S + expert / L; }
  int expert_local(int expert) const noexcept { return expert % L; }
  int global_rank(int ep, int tp) const noexcept { return ep * T + tp; }
  int world_size() const noexcept { return W * T; }
  // Entries of a send-count record: rows per (destination EP rank d, local expert l), index d * L + l.
  int count_record_len() const noexcept { return W * L; }
  int ep_recv_counts_len(int ep) const noexcept { return W * local_experts(ep) * (T == 2 ? 2 : 1); }
  // V2: (token, k) slots per token in combine, K routed experts then Sn shared ones (V2 §4.1).
  std::int64_t K_slots(std::int64_t k) const noexcept { return k + Sn; }
  std::int64_t effective_global_bs(std::int64_t bs) const noexcept { return global_bs != 0 ? global_bs : sat_mul(bs, W); }
  // V2: the shared expert j's EP rank that source rank r sends its tokens to (V2 §3.5), and the
  // expert a shared-expert rank hosts.
  int v2_shared_target(int r, int j) const noexcept { return r % R + j * R; }
  int v2_shared_expert_of(int ep) const noexcept { return ep / R; }
  bool v2_sends_to_shared(int r, int d) const noexcept { return d < S && r % R == d % R; }
  // The contract's A: shared rank global_bs / S (V1) or maxBS * ceil(W / R) (V2 §1.4, §3.5), MoE rank
  // global_bs * min(L, K).
  std::int64_t capacity_a(int ep, std::int64_t bs, std::int64_t k, int version = 1) const noexcept {
    const std::int64_t gbs = effective_global_bs(bs);
    if (!is_shared(ep)) return sat_mul(gbs, std::min<std::int64_t>(L, k));
    return version == 2 ? sat_mul(gbs / W, (W + R - 1) / R) : gbs / S;
  }
  // The most rows rank `ep` can really receive in its EP group. On a MoE rank that is A. On a
  // shared-expert rank A = global_bs / S is exact when every rank has the same BS, but ranks with
  // different BS can exceed it (the V1 split rotates each rank's remainder independently), so the
  // bound is max(A, maxBS + (W - S) * ceil(maxBS / S)): its own rows plus at most ceil(BS_r / S) rows
  // from each MoE rank r.
  // In V2 every source sends a shared-expert rank at most maxBS rows, and at most ceil(W / R) sources
  // send to it: A is exact.
  std::int64_t receive_rows(int ep, std::int64_t bs, std::int64_t k, int version = 1) const noexcept {
    const std::int64_t a = capacity_a(ep, bs, k, version);
    if (!is_shared(ep) || version == 2) return a;
    const std::int64_t max_bs = effective_global_bs(bs) / W;
    return std::max(a, sat_add(max_bs, sat_mul(static_cast<std::int64_t>(W - S), sat_add(max_bs, S - 1) / S)));
  }
};

inline std::size_t align_up(std::size_t n, std::size_t a) noexcept { return (n + a - 1) / a * a; }

// A rank's window. The dispatch region holds expand_x (rows of H elements, int8 or 16-bit),
// dynamic_scales and expand_scales exactly as the outputs are shaped, so results can be views into it.
// The combine region holds this rank's expert-output rows ready for the source ranks to read (after
// the TP reduce, optionally int8-quantized) and the inbox for the TP peer's partial rows. The layout
// does not depend on quant modes, so dispatch and combine of one shape agree on it.
struct WindowLayout {
  WindowLayout(const Topology& topo, const CallShape& shape, int ep) {
    capacity_a = topo.capacity_a(ep, shape.bs, shape.k, shape.version);
    receive_rows = topo.receive_rows(ep, shape.bs, shape.k, shape.version);
    dispatch_rows = sat_mul(receive_rows, static_cast<std::int64_t>(topo.T));
    const auto rows = static_cast<std::size_t>(dispatch_rows);
    const auto h = static_cast<std::size_t>(shape.h);
    comm_quant_groups = (h + 7) / 8;
    expand_x_offset = 0;
    dynamic_scales_offset = align_up(sat_add(expand_x_offset, sat_mul(sat_mul(rows, h), std::size_t{2})), 64);
    expand_scales_offset = align_up(sat_add(dynamic_scales_offset, sat_mul(rows, std::size_t{4})), 64);
    combine_row_bytes = std::max(sat_mul(h, std::size_t{2}), align_up(sat_add(comm_quant_groups * 2, h), 2));
    combine_rows_offset = align_up(sat_add(expand_scales_offset, sat_mul(rows, std::size_t{4})), 64);
    const auto own_rows = static_cast<std::size_t>(receive_rows);
    tp_inbox_offset = align_up(sat_add(combine_rows_offset, sat_mul(own_rows, combine_row_bytes)), 64);
    std::size_t end =
        align_up(sat_add(tp_inbox_offset, topo.T == 2 ? sat_mul(sat_mul(own_rows, h), std::size_t{2}) : 0), 64);
    if (shape.version == 2) {
      // The triples of the rows dispatch writes (V2 §3.6), and combine's row index: per source rank, an
      // entry per (token, k) slot of its largest batch (V2 §4.1) naming the row that holds it.
      assist_offset = end;
      lookup_slots = static_cast<std::size_t>(topo.K_slots(shape.k));
      lookup_tokens = static_cast<std::size_t>(topo.effective_global_bs(shape.bs) / topo.W);
      lookup_offset = align_up(sat_add(assist_offset, sat_mul(rows, std::size_t{12})), 64);
      lookup_counts_offset = align_up(
          sat_add(
              lookup_offset,
              sat_mul(sat_mul(sat_mul(static_cast<std::size_t>(topo.W), lookup_tokens), lookup_slots), std::size_t{8})),
          64);
      end = align_up(sat_add(lookup_counts_offset, sat_mul(static_cast<std::size_t>(topo.W), std::size_t{8})), 64);
    }
    total_bytes = end;
  }

  std::int64_t capacity_a = 0;     // the contract's A
  std::int64_t receive_rows = 0;   // the most rows this rank can receive in its EP group (>= A)
  std::int64_t dispatch_rows = 0;  // receive_rows * max(T, 1): rows of expand_x in the window
  std::size_t comm_quant_groups = 0;
  std::size_t expand_x_offset = 0, dynamic_scales_offset = 0, expand_scales_offset = 0;
  std::size_t combine_rows_offset = 0, combine_row_bytes = 0, tp_inbox_offset = 0;
  // V2 only (0 otherwise): int32 triples of the dispatch rows; combine's row index (int64 entries,
  // tokens * slots per source rank) and its per-source row counts (int64).
  std::size_t assist_offset = 0, lookup_offset = 0, lookup_counts_offset = 0;
  std::size_t lookup_tokens = 0, lookup_slots = 0;
  std::size_t total_bytes = 0;
};

// Bytes of the outputs a group keeps outside its window (expand_idx, counts, the combine output and
// the count-exchange buffers).
inline std::size_t group_output_bytes(const Topology& topo, const CallShape& s, int ep) noexcept {
  const auto bsk = static_cast<std::size_t>(sat_mul(s.bs, s.k));
  const std::size_t record = 64 + static_cast<std::size_t>(topo.count_record_len()) * 4;
  std::size_t total = sat_mul(bsk, std::size_t{8});
  total = sat_add(total, static_cast<std::size_t>(topo.local_experts(ep)) * 8 + static_cast<std::size_t>(topo.ep_recv_counts_len(ep)) * 4 + 8);
  total = sat_add(total, sat_mul(static_cast<std::size_t>(sat_mul(s.bs, s.h)), std::size_t{2}));
  return sat_add(total, record * static_cast<std::size_t>(topo.world_size() + 1));
}

}  // namespace moedist::contract
