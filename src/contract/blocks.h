// Where received rows land (contract §3.3, §3.4.1): the rows of each (local expert, source rank) block
// of a destination rank, and their inclusive prefix sums (ep_recv_counts). Host+device, so the CPU
// operators and the CUDA protocol (src/cuda/protocol.h) compute the same layout with the same code.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/hd.h"
#include "contract/shared_split.h"

namespace moedist::contract {

// Rows source EP rank `source` sends to local expert l of EP rank `dest`: entry dest * L + l of the
// source's send-count record (records(source)), except between two shared-expert ranks, where the
// entry is the V1 bookkeeping split of dest's own dest_bs rows, which no record carries.
template <class Records>
MOEDIST_HD std::int64_t block_rows(int S, int L, const Records& records, int dest, int l, int source,
                                   std::int64_t dest_bs) {
  if (dest < S && source < S) return shared_own_split(source, dest, dest_bs, S);
  return records(source)[dest * L + l];
}

// ep_recv_counts of EP rank `dest` (its own half): the inclusive prefix sums over its blocks in
// (local expert, source rank) order, W * (dest < S ? 1 : L) entries, into out (unless null). Returns
// the rows dest receives in all. records(r) is source rank r's send-count record; dest_bs dest's BS.
// The sums are 64-bit: peers' records can add up past 2^31 before anyone has compared them with a
// capacity. With an int32 `out` (the contract's ep_recv_counts) the entries are exact only when the
// returned total fits in int32, so check it first, or write to an int64 table (the CPU path does).
template <class Records, class Out>
MOEDIST_HD std::int64_t receive_prefix_sums(int W, int S, int L, const Records& records, int dest, std::int64_t dest_bs,
                                            Out* out) {
  std::int64_t sum = 0;
  for (int l = 0; l < (dest < S ? 1 : L); ++l) {
    for (int r = 0; r < W; ++r) {
      sum += block_rows(S, L, records, dest, l, r, dest_bs);
      if (out != nullptr) out[l * W + r] = static_cast<Out>(sum);
    }
  }
  return sum;
}
// The total alone.
template <class Records>
MOEDIST_HD std::int64_t receive_prefix_sums(int W, int S, int L, const Records& records, int dest, std::int64_t dest_bs,
                                            std::nullptr_t) {
  return receive_prefix_sums(W, S, L, records, dest, dest_bs, static_cast<std::int64_t*>(nullptr));
}

// The same for a V2 call (V2 §3.5, §3.7): every block is what its source's record says, a shared-expert
// rank's own tokens included (it sends them to itself like any source).
template <class Records, class Out>
MOEDIST_HD std::int64_t receive_prefix_sums_v2(int W, int S, int L, const Records& records, int dest, Out* out) {
  std::int64_t sum = 0;
  for (int l = 0; l < (dest < S ? 1 : L); ++l) {
    for (int r = 0; r < W; ++r) {
      sum += records(r)[dest * L + l];
      if (out != nullptr) out[l * W + r] = static_cast<Out>(sum);
    }
  }
  return sum;
}

}  // namespace moedist::contract
