// Validation of one rank's call arguments (contract §6): every rule that can be checked on this rank
// alone, before anything is exchanged or written. Rules that need all ranks (equal BS with
// global_bs = 0, equal H / K / dtype, expand_idx against the expert rank's counts) are checked by the
// operators on the exchanged records, with the helpers at the end of this file.
#pragma once

#include <cstdint>
#include <string>

#include "contract/layout.h"
#include "moedist/config.h"
#include "moedist/group.h"

namespace moedist::contract {

// Where a call's tensors live. Values in device memory (the CUDA backend) cannot be read here: the
// rules about them (id ranges, counts) are checked on the GPU instead, and only shapes, dtypes and
// options are checked on the host.
enum class Values : std::uint8_t { on_host, on_device };

// A view's shape as errors show it: "None", "(n,)" or "(rows, cols)".
std::string shape_text(const Layout& v);

// The per-call limits of the opt-in Ascend profiles (H, K, BS) for the V1 or V2 operators; nothing for
// Profile::portable.
void check_profile_call_limits(const GroupConfig& config, std::int64_t bs, std::int64_t k, std::int64_t h,
                               int version = 1);

// The rules only the V1 operators have: shared_expert_num 1, ep_world_size a multiple of
// shared_expert_rank_num.
void check_v1_config(const GroupConfig& config);

// Checks x, expert_ids, the options and any caller output buffers. Returns the call shape.
CallShape check_dispatch(const GroupConfig& config, const TensorView& x, const TensorView& expert_ids,
                         const DispatchOptions& options, Values values = Values::on_host);

struct CombineCounts {
  std::int64_t own_rows = 0;   // rows of expand_x that came from this rank's EP group (n_self); -1 on device
  std::int64_t peer_rows = 0;  // rows that came from the TP peer (n_peer; 0 without TP); -1 on device
};

// Checks the combine arguments; returns the call shape and the row counts read from ep_send_counts.
CallShape check_combine(const GroupConfig& config, const TensorView& expand_x, const TensorView& expert_ids,
                        const TensorView& expand_idx, const TensorView& ep_send_counts,
                        const TensorView& expert_scales, const CombineOptions& options, CombineCounts* counts,
                        Values values = Values::on_host);

// The V2 operators (V2 §1, §3, §4, §7). Both read the mask and the ids (host memory; on_device: only
// shapes, dtypes and options, the GPU checks the values, and `counts` is -1); `mask` and `experts`
// receive what the call's routing follows from.
struct EntryMask;
struct SpecialExperts;
CallShape check_dispatch_v2(const GroupConfig& config, const TensorView& x, const TensorView& expert_ids,
                            const DispatchV2Options& options, EntryMask* mask, SpecialExperts* experts,
                            Values values = Values::on_host);
CallShape check_combine_v2(const GroupConfig& config, const TensorView& expand_x, const TensorView& expert_ids,
                           const TensorView& assist_info_for_combine, const TensorView& ep_send_counts,
                           const TensorView& expert_scales, const CombineV2Options& options, CombineCounts* counts,
                           EntryMask* mask, SpecialExperts* experts, Values values = Values::on_host);

}  // namespace moedist::contract
