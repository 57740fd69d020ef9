// The checks every rank runs on the records its peers publish at the start of a dispatch (contract
// §3.2, §6), once for both paths: the CPU operators (src/ops/) and the CUDA protocol
// (src/cuda/protocol.h) call these same host+device functions. Device code can neither throw nor build
// strings, so a check returns what it found as a small POD and each side turns that into its error: the
// CPU path an exception with its message, the GPU path its status code.
#pragma once

#include <cstdint>

#include "common/hd.h"

namespace moedist::contract {

// The fields of a call all ranks must agree on, in the order they are compared. The values are the
// GPU status's encoding of the field (Status::index with Rule::same_call), so they must not change.
enum class CallField : std::int32_t { bs = 0, k, h, dtype, mode, expert_scales };

struct CallFields {
  std::int64_t bs = 0, k = 0, h = 0, dtype = 0, mode = 0, has_expert_scales = 0;
};

struct CallMismatch {
  bool found = false;
  CallField field = CallField::bs;
  std::int64_t theirs = 0, mine = 0;
};

// The first field in which a peer's call differs from this rank's. BS only with compare_bs: with
// global_bs = 0 every rank sizes the others' rows by its own BS, so all must have the same.
MOEDIST_HD CallMismatch first_call_mismatch(const CallFields& theirs, const CallFields& mine, bool compare_bs) {
  if (theirs.h != mine.h) return CallMismatch{true, CallField::h, theirs.h, mine.h};
  if (theirs.k != mine.k) return CallMismatch{true, CallField::k, theirs.k, mine.k};
  if (theirs.dtype != mine.dtype) return CallMismatch{true, CallField::dtype, theirs.dtype, mine.dtype};
  if (theirs.mode != mine.mode) return CallMismatch{true, CallField::mode, theirs.mode, mine.mode};
  if (theirs.has_expert_scales != mine.has_expert_scales) {
    return CallMismatch{true, CallField::expert_scales, theirs.has_expert_scales, mine.has_expert_scales};
  }
  if (compare_bs && theirs.bs != mine.bs) return CallMismatch{true, CallField::bs, theirs.bs, mine.bs};
  return CallMismatch{};
}

// The largest BS a peer may announce (contract §3.11): global_bs / W, or with global_bs = 0 this rank's
// own BS, which every rank must then share. Every size derived from a peer's BS (its rows, the V1 split
// of a shared-expert rank's own rows, its window) is bounded by this, on the CPU and the GPU alike.
MOEDIST_HD std::int64_t peer_bs_limit(std::int64_t global_bs, int W, std::int64_t own_bs) {
  return global_bs != 0 ? global_bs / W : own_bs;
}

// What is wrong with a send-count record, if anything.
enum class RecordFault : std::int32_t {
  none = 0,
  entry_range,         // entry `entry` = value is outside [0, BS = bound]
  entry_shared_local,  // entry `entry` = value (bound: BS) is non-zero but names local expert entry % L > 0 of a
                       // shared-expert rank
  moe_rows,            // the MoE entries add up to value, not BS * K = bound
  shared_rows,         // the shared-expert entries add up to value, not bound
  bs_range,            // the sender's BS = value is outside [0, peer_bs_limit() = bound]
  active_range,        // the sender's active tokens = value are outside [0, its BS = bound]
};

struct RecordCheck {
  RecordFault fault = RecordFault::none;
  std::int32_t entry = 0;
  std::int64_t value = 0, bound = 0;
};

// A send-count record (entries d * L + l for the W EP ranks d and their L local experts) of a rank with
// bs tokens, `active` of which take part (x_active_mask; = bs without one), and k >= 1 routing entries
// each, from EP rank source_ep, must describe a routing that its active tokens and K allow: otherwise
// writing its rows could land outside the receiver's rows. BS in [0, max_bs] (peer_bs_limit()), active
// in [0, BS]; every entry in [0, active]; a shared-expert rank d (d < S) only in entry l = 0; the MoE
// entries add up to active * K; the shared ones to active from a MoE rank when S > 0, to 0 from a
// shared-expert rank. The first rule broken, in that order (BS, active, entries in index order, then the
// two sums). No arithmetic here can overflow, whatever the record holds: the sums are of at most W * L
// int32 values.
MOEDIST_HD RecordCheck check_send_counts(const std::int32_t* counts, int W, int S, int L, int source_ep,
                                         std::int64_t bs, std::int64_t active, std::int64_t k, std::int64_t max_bs) {
  if (bs < 0 || bs > max_bs) return RecordCheck{RecordFault::bs_range, -1, bs, max_bs};
  if (active < 0 || active > bs) return RecordCheck{RecordFault::active_range, -1, active, bs};
  bs = active;  // from here on only the active tokens' routing counts
  std::int64_t moe_rows = 0, shared_rows = 0;
  for (int i = 0; i < W * L; ++i) {
    const std::int32_t c = counts[i];
    if (c < 0 || c > bs) return RecordCheck{RecordFault::entry_range, i, c, bs};
    if (i >= S * L) {
      moe_rows += c;
    } else if (i % L == 0) {
      shared_rows += c;
    } else if (c != 0) {
      return RecordCheck{RecordFault::entry_shared_local, i, c, bs};
    }
  }
  // moe_rows == bs * k without forming bs * k, which a BS near 2^63 / K would overflow.
  if (moe_rows % k != 0 || moe_rows / k != bs) {
    const std::int64_t most = 0x7fffffffffffffff;
    return RecordCheck{RecordFault::moe_rows, 0, moe_rows, bs <= most / k ? bs * k : most};
  }
  const std::int64_t want_shared = source_ep < S ? 0 : (S > 0 ? bs : 0);
  if (shared_rows != want_shared) return RecordCheck{RecordFault::shared_rows, 0, shared_rows, want_shared};
  return RecordCheck{};
}

// The same for a V2 dispatch record (V2 §3.1-§3.5): `active` tokens take part; a MoE entry counts
// active entries, so each is in [0, active] and together they are at most active * K (masked entries
// and special experts send nothing); a shared-expert rank d receives exactly `active` rows from every
// source with d % R == source % R (its Sn targets), and nothing from the others. Faults as above
// (moe_rows: value > bound; shared_rows: entry `entry` holds value, not bound).
MOEDIST_HD RecordCheck check_send_counts_v2(const std::int32_t* counts, int W, int S, int L, int R, int source_ep,
                                            std::int64_t bs, std::int64_t active, std::int64_t k, std::int64_t max_bs) {
  if (bs < 0 || bs > max_bs) return RecordCheck{RecordFault::bs_range, -1, bs, max_bs};
  if (active < 0 || active > bs) return RecordCheck{RecordFault::active_range, -1, active, bs};
  std::int64_t moe_rows = 0;
  for (int i = 0; i < W * L; ++i) {
    const std::int32_t c = counts[i];
    if (c < 0 || c > active) return RecordCheck{RecordFault::entry_range, i, c, active};
    if (i >= S * L) {
      moe_rows += c;
    } else if (i % L != 0) {
      if (c != 0) return RecordCheck{RecordFault::entry_shared_local, i, c, active};
    } else {
      const int d = i / L;
      const std::int64_t want = d % R == source_ep % R ? active : 0;
      if (c != want) return RecordCheck{RecordFault::shared_rows, i, c, want};
    }
  }
  const std::int64_t most = active <= 0x7fffffffffffffff / k ? active * k : 0x7fffffffffffffff;
  if (moe_rows > most) return RecordCheck{RecordFault::moe_rows, 0, moe_rows, most};
  return RecordCheck{};
}

}  // namespace moedist::contract
