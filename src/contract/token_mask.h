// x_active_mask: which of a rank's tokens take part in a call (V1 contract §3.7, the A2 V1 kernel;
// V2 §3.1-§3.2). A 1-D bool mask (BS,) whose trues all come before its falses makes tokens [0, n)
// active, n = its number of trues: only they are sent (to MoE and shared experts), counted, given
// expand_idx entries and combined. Without a mask every token is active. Pure: shape, dtype and
// value rules only; the operators turn the count into rows.
#pragma once

#include <cstdint>

#include "moedist/config.h"
#include "moedist/tensor.h"

namespace moedist::contract {

enum class Values : std::uint8_t;  // contract/checks.h

// Checks the mask of a call with bs tokens against its rules and returns the number of active tokens
// (bs without a mask). `values` says whether the mask's bytes can be read here (on_device: only its
// shape and dtype are checked, and bs is returned). Rules, each a ValidationError naming the parameter:
//  - the ascend_a3 profile refuses a mask, as the A3 V1 kernel does;
//  - dtype bool, shape (BS,) (the 2-D (BS, K) form is V2's);
//  - a rank with fewer tokens than global_bs / ep_world_size cannot pass one (V2 §3.9: with different
//    BS per rank every token must be active);
//  - every true comes before every false (a mask that is not a prefix would be read as its popcount,
//    which silently drops the wrong tokens).
std::int64_t check_token_mask(const GroupConfig& config, const TensorView& mask, std::int64_t bs, Values values);

struct EntryMask;  // contract/v2_routing.h

// The V2 operators' mask (V2 §3.2-§3.3): absent, (BS,) bool with its trues first (the rules above, but
// allowed under ascend_a3), or (BS, K) bool (not under ascend_a2, whose kernel takes only (BS,)).
// Its values are read where `values` says they can be (on_device: the prefix rule is left to the GPU
// and the returned prefix is bs).
EntryMask check_entry_mask(const GroupConfig& config, const TensorView& mask, std::int64_t bs, std::int64_t k,
                           Values values);

}  // namespace moedist::contract
