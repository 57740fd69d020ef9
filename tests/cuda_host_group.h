// A CUDA group's per-rank state (DeviceGroup) over host memory, and the arguments, outputs and expert
// outputs of a case, built the way CudaGroup builds them: shared by the CPU tests that run the CUDA
// protocol (cuda_protocol_test: protocol.h functions rank by rank; cuda_kernels_emulation_test: the
// kernels themselves, ranks as processes).
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "casefile/case_file.h"
#include "contract/layout.h"
#include "cuda/device_state.h"
#include "moedist/tensor.h"

namespace moedist::cuda::testing {

struct HostRank {
  GroupConfig config;
  DeviceGroup g;
  Status status;
  std::vector<std::int32_t> keys_in, keys_out, vals_in, vals_out, ids, expand_idx, expert_counts, record, recv_counts, tp_counts;
  std::vector<std::int64_t> block_start, tp_shift, shared_start, call_shape;
  std::vector<std::int32_t> token_slot;  // V2
  std::vector<std::int64_t> source_bs, found_rows;
  std::vector<float> const_logits;
  std::vector<std::int32_t> assist_in;         // V2 combine: the triples passed back (maybe permuted)
  std::vector<std::int64_t> performance_info;  // V2: (W,), raised by every call
  std::vector<std::int32_t> out_expand_idx, out_ep_recv_counts, out_tp_recv_counts;
  std::vector<std::int64_t> out_token_nums;
  std::vector<std::uint16_t> combine_out;
  DispatchArgs dispatch;  // the latest dispatch's arguments
  contract::CallShape shape;
  // Expert outputs and unit weights of the latest combine (kept alive for its arguments).
  Tensor expert_out, ones;
};

// The largest BS of the case's calls (what CudaGroupOptions::max_bs would be).
std::int64_t case_max_bs(const casefile::Case& c);
// The window layout of the case's group (every rank's).
WindowOffsets case_window_offsets(const casefile::Case& c);

// Sets up rank r: its DeviceGroup over host vectors, with `bases` every rank's window (its own included,
// laid out by `off`) and `timeout_ns` for its waits.
void init_host_rank(HostRank& e, const casefile::Case& c, int r, const WindowOffsets& off, std::byte* const* bases, std::int64_t timeout_ns);

// The arguments CudaGroup::dispatch (a V1 case) or CudaGroup::dispatch_v2 (a V2 case, op 2, with
// performance_info in e) passes for rank r of the case, outputs pointing into e.
DispatchArgs rank_dispatch_args(const casefile::Case& c, int r, HostRank& e);

// After dispatch: rank r's outputs, read from its window and e's output vectors.
casefile::RankOutputs dispatch_outputs(const casefile::Case& c, int r, const HostRank& e);

// The arguments of rank r's combine (combine_v2 for a V2 case): identity experts (the dispatched rows,
// dequantized) unless the case gives combine_x; with `in_window` (T = 1, no comm quantization) the
// experts' rows are written into the rank's combine buffer and read in place. A V2 case's own rows are
// passed back in the order of `order` (a permutation of them, with their triples; empty: as dispatched;
// T = 1 only, since a TP peer adds its rows in dispatch order). The output goes to e.combine_out.
CombineArgs rank_combine_args(const casefile::Case& c, int r, HostRank& e, const casefile::RankOutputs& dispatched,
                              bool in_window, const std::vector<std::int64_t>& order = {});

// A random order of rank r's own rows for rank_combine_args (empty where it cannot be permuted).
std::vector<std::int64_t> random_row_order(const casefile::Case& c, const casefile::RankOutputs& dispatched,
                                           std::mt19937_64& rng);

// The next V2 call on the same group: the configuration, shapes, modes, special experts and masks'
// kinds of `c`, with new x, expert ids, masks, router weights and combine inputs; identity experts.
casefile::Case next_call_v2(const casefile::Case& c, std::mt19937_64& rng);

// Whether a V2 case's combine reads const experts (the GPU's exp may differ from the host's there).
bool uses_const_experts(const casefile::Case& c);

// Rank r's combine output.
Tensor combine_output(const casefile::Case& c, int r, const HostRank& e);

// The error a status describes, as "<code name>: <message>" (status_errors.h), or "" when it has none.
std::string status_error_text(const Status& st, int me, std::int64_t call_k);

}  // namespace moedist::cuda::testing
