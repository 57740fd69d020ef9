// The kernel arguments of one call, from the caller's views (after the host-side checks). Pure C++:
// the CUDA group and the CPU emulation test build their arguments the same way.
#pragma once

#include "contract/layout.h"
#include "cuda/device_state.h"
#include "moedist/group.h"

namespace moedist::cuda {

// Everything but the output pointers (expand_idx, expert_token_nums, ep_recv_counts, tp_recv_counts).
DispatchArgs dispatch_args(const contract::Topology& topo, const TensorView& x, const TensorView& expert_ids,
                           const DispatchOptions& options, const contract::CallShape& shape);

// Everything but staged_in_place and the output.
CombineArgs combine_args(const TensorView& expand_x, const TensorView& expert_ids, const TensorView& expand_idx,
                         const TensorView& ep_send_counts, const TensorView& expert_scales, const CombineOptions& options,
                         const contract::CallShape& shape);

// The same for the V2 operators (version 2): the mask, the special experts, performance_info, V2's
// capacities; combine's triples, ori_x, shared_expert_x and const experts.
DispatchArgs dispatch_args_v2(const contract::Topology& topo, const TensorView& x, const TensorView& expert_ids,
                              const DispatchV2Options& options, const contract::CallShape& shape);
CombineArgs combine_args_v2(const TensorView& expand_x, const TensorView& expert_ids,
                            const TensorView& assist_info_for_combine, const TensorView& ep_send_counts,
                            const TensorView& expert_scales, const CombineV2Options& options,
                            const contract::CallShape& shape);

}  // namespace moedist::cuda
