// The V1 assignment of a MoE rank's tokens to the shared-expert ranks (contract §3.4.1).
//
// MoE rank r (r >= S) with bs tokens sends shared rank s the contiguous token range
// [begin(r, s), begin(r, s + 1)) with begin(r, s) = floor((s + r) * bs / S) - floor(r * bs / S):
// the kernel's s(b) = ceil((b + 1 + T0) * S / bs) - 1 - r, slot = b - begin(r, s(b)), in range form.
#pragma once

#include <cstdint>

#include "common/hd.h"

namespace moedist::contract {

MOEDIST_HD std::int64_t shared_range_begin(std::int64_t r, std::int64_t s, std::int64_t bs, std::int64_t S) noexcept {
  return (s + r) * bs / S - r * bs / S;
}

MOEDIST_HD std::int64_t shared_range_count(std::int64_t r, std::int64_t s, std::int64_t bs, std::int64_t S) noexcept {
  return shared_range_begin(r, s + 1, bs, S) - shared_range_begin(r, s, bs, S);
}

// The split of a shared rank's own bs rows that its ep_recv_counts records in entries r < S:
// floor((r + s + 1) * bs / S) - floor((r + s) * bs / S); the entries add up to bs.
MOEDIST_HD std::int64_t shared_own_split(std::int64_t r, std::int64_t s, std::int64_t bs, std::int64_t S) noexcept {
  return (r + s + 1) * bs / S - (r + s) * bs / S;
}

}  // namespace moedist::contract
