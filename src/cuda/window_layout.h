// The byte layout of a rank's window in the CUDA backend (device_state.h WindowOffsets): flags, the
// count-record inbox, the dispatch rows and the combine rows. Every rank uses the same layout, sized for
// the group's largest call and the larger of the two rank kinds (MoE, shared expert).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "contract/layout.h"
#include "cuda/device_state.h"

namespace moedist::cuda {

// Every rank's window has this layout, sized for the largest shape and the larger of the two rank kinds.
inline WindowOffsets window_offsets(const contract::Topology& topo, std::int64_t max_bs, std::int64_t k, std::int64_t h) {
  WindowOffsets o;
  const int world = topo.world_size();
  std::int64_t receive = topo.receive_rows(topo.W - 1, max_bs, k);           // a MoE rank (W - 1 >= S)
  if (topo.S > 0) {  // a shared-expert rank, in a V1 call and in a V2 call
    receive = std::max(receive, topo.receive_rows(0, max_bs, k));
    if (topo.Sn > 0) receive = std::max(receive, topo.receive_rows(0, max_bs, k, 2));
  }
  o.receive_rows = receive;
  o.dispatch_rows = contract::sat_mul(receive, static_cast<std::int64_t>(topo.T));
  const auto rows = static_cast<std::size_t>(o.dispatch_rows);
  const auto own_rows = static_cast<std::size_t>(receive);
  const auto hh = static_cast<std::size_t>(h);
  std::size_t at = 0;
  const auto take = [&](std::size_t bytes) {
    const std::size_t start = at;
    at = contract::align_up(contract::sat_add(at, bytes), 256);
    return start;
  };
  o.count_flags = take(sizeof(std::uint64_t) * static_cast<std::size_t>(world));
  o.rows_flags = take(sizeof(std::uint64_t) * static_cast<std::size_t>(world));
  o.combine_flags = take(sizeof(std::uint64_t) * static_cast<std::size_t>(world));
  o.tp_flag = take(sizeof(std::uint64_t));
  o.record_stride = contract::align_up(sizeof(RecordHeader) + sizeof(std::int32_t) * static_cast<std::size_t>(topo.count_record_len()), 64);
  o.inbox = take(o.record_stride * static_cast<std::size_t>(world));
  o.expand_x = take(contract::sat_mul(contract::sat_mul(rows, hh), std::size_t{2}));
  o.dynamic_scales = take(contract::sat_mul(rows, std::size_t{4}));
  o.expand_scales = take(contract::sat_mul(rows, std::size_t{4}));
  // A combine row holds H 16-bit values, or H int8 values then ceil(H/8) 16-bit group scales.
  const std::size_t quantized = contract::align_up(hh, 16) + 2 * ((hh + 7) / 8);
  o.combine_pitch = contract::align_up(std::max(2 * hh, quantized), 16);
  o.combine_rows = take(contract::sat_mul(own_rows, o.combine_pitch));
  o.tp_inbox = take(topo.T == 2 ? contract::sat_mul(contract::sat_mul(own_rows, hh), std::size_t{2}) : 0);
  // V2: triples, and the row index over (source, token, slot) for the largest BS a source may have.
  o.assist = take(contract::sat_mul(rows, std::size_t{12}));
  o.index_tokens = topo.global_bs != 0 ? topo.global_bs / topo.W : max_bs;
  o.index_slots = topo.K_slots(k);
  o.index = take(contract::sat_mul(
      contract::sat_mul(contract::sat_mul(static_cast<std::size_t>(topo.W), static_cast<std::size_t>(o.index_tokens)),
                        static_cast<std::size_t>(o.index_slots)),
      std::size_t{8}));
  o.index_counts = take(sizeof(std::int64_t) * static_cast<std::size_t>(topo.W));
  o.total = at;
  return o;
}

}  // namespace moedist::cuda
