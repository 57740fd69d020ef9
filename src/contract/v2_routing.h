// The V2 operators' routing (V2 §3.1-§3.5): which of a rank's tokens and (token, k) entries take part,
// what kind of expert each entry names, and the send plan that follows. Pure: a rank's expert_ids and
// mask in, counts and slots out.
#pragma once

#include <cstdint>
#include <vector>

#include "contract/layout.h"
#include "moedist/tensor.h"

namespace moedist::contract {

// The kinds of expert an id names (V2 §0.3): MoE experts [0, E), then zero, copy and const experts.
enum class ExpertKind : std::uint8_t { routed, zero, copy, constant };

struct SpecialExperts {
  std::int64_t E = 0, zero = 0, copy = 0, constant = 0;
  std::int64_t id_limit() const noexcept { return E + zero + copy + constant; }
  bool any() const noexcept { return zero + copy + constant > 0; }
  ExpertKind kind(std::int64_t id) const noexcept {
    if (id < E) return ExpertKind::routed;
    if (id < E + zero) return ExpertKind::zero;
    if (id < E + zero + copy) return ExpertKind::copy;
    return ExpertKind::constant;
  }
  std::int64_t const_index(std::int64_t id) const noexcept { return id - (E + zero + copy); }
};

// x_active_mask as V2 reads it (V2 §3.2-§3.3), after its rules were checked (check_entry_mask).
struct EntryMask {
  enum class Kind : std::uint8_t { none, tokens, entries };
  Kind kind = Kind::none;
  std::int64_t prefix = 0;  // Kind::tokens: tokens [0, prefix) take part
  TensorView mask;          // Kind::entries: (BS, K) bool

  bool entry_on(std::int64_t b, std::int64_t k) const noexcept {
    return kind != Kind::entries || mask.at<std::uint8_t>(b, k) != 0;
  }
  // A token takes part when it is inside the prefix, or has a true entry (special experts count).
  bool token_on(std::int64_t b) const noexcept {
    if (kind == Kind::none) return true;
    if (kind == Kind::tokens) return b < prefix;
    for (std::int64_t k = 0; k < mask.cols(); ++k)
      if (mask.at<std::uint8_t>(b, k) != 0) return true;
    return false;
  }
};

// What one rank sends in a V2 dispatch, from its own expert_ids and mask alone (ids of the entries
// that take part already validated: in [0, id_limit())).
struct SendPlanV2 {
  // counts[d * L + l]: rows for EP rank d's local expert l; a shared-expert rank d uses l = 0 (the
  // active tokens when d is one of this rank's Sn targets, else 0).
  std::vector<std::int32_t> counts;
  // slot[b * K + k]: a routed active entry's occurrence number among the active entries with its id
  // (V2 §3.1), i.e. its row inside its (expert, source) block; -1 for every other entry.
  std::vector<std::int32_t> slot;
  // token_slot[b]: an active token's place among the active tokens (its row in a shared-expert block);
  // -1 for an inactive token.
  std::vector<std::int32_t> token_slot;
  std::int64_t active_tokens = 0;

  void build(const Topology& topo, const TensorView& expert_ids, const EntryMask& mask, const SpecialExperts& experts,
             int source_ep);

 private:
  std::vector<std::int32_t> seen_;  // per expert, scratch
};

}  // namespace moedist::contract
