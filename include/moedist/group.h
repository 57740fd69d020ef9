// The long-lived group object of one rank, and the dispatch / combine operators.
//
// A Group is created once per rank for an EP domain (and optional TP domain) by a runtime (see
// moedist/inproc.h), owns its buffers and is reused across calls. Every rank of the world calls
// dispatch (and later combine) with its own inputs; the calls are collective.
#pragma once

#include <cstdint>
#include <memory>
#include <string_view>

#include "moedist/config.h"
#include "moedist/tensor.h"

namespace moedist {

class Transport;  // internal

// Caller-provided output buffers. Any subset may be given; absent ones come from the group's own
// storage (valid until the next dispatch on this group; a window that grows keeps its previous buffer
// until it grows again, so two combines of ever larger shapes after one dispatch would release it).
// Shapes must be at least the ones dispatch reports (expand_x rows >= A * max(T, 1), and so on). Rows
// of the group's storage that are passed back to combine are read by other ranks in place: see
// Group::combine for how long they stay theirs.
struct DispatchOutputs {
  MutableTensorView expand_x;           // (A*max(T,1), H) int8 (quant_mode 2) or x.dtype
  MutableTensorView dynamic_scales;     // (A*max(T,1),) fp32
  MutableTensorView expand_idx;         // (BS*K,) int32
  MutableTensorView expert_token_nums;  // (local_expert_num,) int64
  MutableTensorView ep_recv_counts;     // (W*local_expert_num*(T==2?2:1),) int32
  MutableTensorView tp_recv_counts;     // (T,) int32 (T == 2 only)
  MutableTensorView expand_scales;      // (A*max(T,1),) fp32 (when expert_scales is given)
};

struct DispatchOptions {
  TensorView scales;         // optional smooth scales (E, H) fp32, or (E+1, H) with shared experts
  TensorView x_active_mask;  // optional (BS,) bool, trues first: tokens [0, trues) are active (docs/contract.md)
  TensorView expert_scales;  // optional (BS, K) fp32 router weights, carried to expand_scales
  int quant_mode = 0;        // 0 = none, 2 = dynamic per-token int8
  int expert_token_nums_type = 1;  // 0 = prefix sum over local experts, 1 = count per local expert
  DispatchOutputs out;       // optional caller buffers
};

// Views of the seven outputs. Only the valid prefix of expand_x / dynamic_scales / expand_scales
// (valid_rows rows) is written; rows past it are unspecified, as on the NPU. Without caller buffers,
// expand_x, dynamic_scales and expand_scales are views of this rank's window, readable until the next
// dispatch. The experts may write their outputs into expand_x in place (16-bit rows) and pass it to
// combine; from then on it must not be written until this rank's next dispatch or combine (Group::combine).
struct DispatchResult {
  TensorView expand_x;
  TensorView dynamic_scales;     // present (A*max(T,1) long) for every quant_mode; meaningful for quant_mode 2
  TensorView expand_idx;         // V1 only
  // V2 only: (3 * A * max(T,1),) int32 (under the ascend_a3 profile torch_npu's max(BS * K, 128 * A), which
  // its combine requires); entries [0, 3 * own EP rows) hold (source EP rank, token, k) per row (V2 §3.6),
  // the rest are unspecified (the TP peer's rows have none, as on the NPU).
  TensorView assist_info_for_combine;
  TensorView expert_token_nums;
  TensorView ep_recv_counts;
  TensorView tp_recv_counts;     // absent unless T == 2
  TensorView expand_scales;      // absent unless expert_scales was given
  std::int64_t valid_rows = 0;   // rows written: own EP rows + (T == 2) the TP peer's rows
  std::int64_t A = 0;            // the capacity of this call
};

struct CombineOptions {
  TensorView tp_send_counts;    // dispatch's tp_recv_counts (T == 2 only)
  TensorView x_active_mask;     // dispatch's x_active_mask (inactive tokens' rows come back zero)
  TensorView activation_scale;  // reserved: must be absent
  TensorView weight_scale;      // reserved: must be absent
  TensorView group_list;        // reserved: must be absent
  TensorView expand_scales;     // accepted (dispatch's expand_scales), checked, not used: weights come from expert_scales
  TensorView shared_expert_x;   // reserved in V1: must be absent
  int out_dtype = 0;            // reserved: must be 0
  int comm_quant_mode = 0;      // 0 = none, 2 = int8 communication quantization of expert outputs
  int group_list_type = 0;      // reserved: must be 0
  MutableTensorView out;        // optional caller buffer (BS, H), same dtype as expand_x
};

// The V2 operators (torch_npu.npu_moe_distribute_dispatch_v2 / combine_v2; docs/contract.md, "The V2
// operators"). shared_expert_num of the group's configuration may be 0 to 4 here.
struct DispatchV2Outputs {
  MutableTensorView expand_x;                 // (A*max(T,1), H)
  MutableTensorView dynamic_scales;           // (A*max(T,1),) fp32
  MutableTensorView assist_info_for_combine;  // (>= 3*A,) int32
  MutableTensorView expert_token_nums;        // (local_expert_num,) int64
  MutableTensorView ep_recv_counts;           // (W*local_expert_num*(T==2?2:1),) int32
  MutableTensorView tp_recv_counts;           // (T,) int32 (T == 2 only)
  MutableTensorView expand_scales;            // (A*max(T,1),) fp32 (when expert_scales is given)
};

struct DispatchV2Options {
  TensorView scales;  // optional smooth scales (Sn + E, H) fp32: shared expert j row j, MoE expert e row Sn + e
  // optional: (BS,) bool with its trues first (tokens [0, trues) take part), or (BS, K) bool (entry (b, k)
  // takes part where true; a token with no true is inactive). V2 §3.2-3.3.
  TensorView x_active_mask;
  TensorView expert_scales;  // optional (BS, K) fp32 router weights, carried to expand_scales
  TensorView elastic_info;   // must be absent: elastic scaling is not supported
  // optional (W,) int64: entry r becomes max(entry, the microseconds this rank waited for EP rank r in
  // this call) (V2 §5.1, the kernels' maximum). Never zeroed by the operator.
  MutableTensorView performance_info;
  int quant_mode = 0;  // 0 = none, 2 = dynamic per-token int8
  int expert_token_nums_type = 1;
  // Special experts (V2 §3.4): ids [E, E+Z) zero, [E+Z, E+Z+C) copy, [E+Z+C, E+Z+C+Q) const experts;
  // never sent, evaluated by combine.
  int zero_expert_num = 0, copy_expert_num = 0, const_expert_num = 0;
  std::string_view comm_alg;  // "", "0", "fullmesh", "fullmesh_v1", "fullmesh_v2" or "hierarchy": same results
  DispatchV2Outputs out;
};

struct CombineV2Options {
  TensorView tp_send_counts;           // dispatch's tp_recv_counts (T == 2 only)
  TensorView x_active_mask;            // dispatch's x_active_mask (inactive tokens' rows come back zero)
  TensorView expand_scales;            // accepted (dispatch's expand_scales), checked, not used
  TensorView shared_expert_x;          // optional (BS, H), added with weight 1 (only with shared_expert_rank_num 0)
  TensorView elastic_info;             // must be absent
  TensorView ori_x;                    // (BS, H): the copy and const experts' input (required when C or Q > 0)
  TensorView const_expert_alpha_1;     // (Q, H) gate rows of the const experts (V2 §4.4)
  TensorView const_expert_alpha_2;     // (Q, H)
  TensorView const_expert_v;           // (Q, H) the const experts' vectors
  MutableTensorView performance_info;  // as in DispatchV2Options
  int zero_expert_num = 0, copy_expert_num = 0, const_expert_num = 0;  // as given to dispatch
  int comm_quant_mode = 0;                                             // 0 = none, 2 = int8 communication quantization
  std::string_view comm_alg;
  MutableTensorView out;  // optional caller buffer (BS, H), same dtype as expand_x
};

// Bytes this rank moved in its last call (for benchmarks and tests).
struct TrafficCounters {
  std::int64_t dispatch_rows_sent = 0;   // rows this rank wrote into receive windows (its own included)
  std::int64_t dispatch_bytes_sent = 0;
  std::int64_t combine_rows_read = 0;    // expert-output rows this rank read back
  std::int64_t combine_bytes_read = 0;
  // Between hosts (transports with several hosts, e.g. MPI): the bytes this rank sent to other hosts in
  // the last call (dispatch: its tokens, once per remote host, with their destinations; combine: its
  // requests and the rows it carried back for other hosts' tokens), and what a flat all-to-all that sends
  // every row to its destination rank would have sent for the same call.
  std::int64_t dispatch_bytes_between_hosts = 0;
  std::int64_t dispatch_bytes_between_hosts_flat = 0;
  std::int64_t combine_bytes_between_hosts = 0;
  std::int64_t combine_bytes_between_hosts_flat = 0;
};

// How one rank runs its share of a call: not part of GroupConfig (which mirrors torch_npu's and must
// match on every rank), so ranks may differ here.
struct GroupOptions {
  // Threads for this rank's row work (quantizing and writing dispatch's rows, combine's TP reduce, comm
  // quantization and weighted sums): the calling thread plus worker_threads - 1 threads the group starts
  // and joins when it is destroyed. In [1, kMaxWorkerThreads]. Results are bit-identical for every value
  // (each row is computed by one thread, with the same kernels in the same order).
  int worker_threads = 1;
  // The least row work (bytes of rows) worth handing to another thread: smaller loops stay on the
  // calling thread. 0 = automatic (16 KiB); tests set 1 to split every loop.
  std::int64_t min_chunk_bytes = 0;
  static constexpr int kMaxWorkerThreads = 256;
};

// Throws a ValidationError (invalid_argument) naming the field, its value and the rule when options are
// out of range. The group's constructor and the runtimes' join functions call it.
void validate_group_options(const GroupOptions& options);

class Group {
 public:
  Group(const GroupConfig& config, std::unique_ptr<Transport> transport, const GroupOptions& options = {});
  ~Group();
  Group(const Group&) = delete;
  Group& operator=(const Group&) = delete;

  const GroupConfig& config() const noexcept;
  const GroupOptions& options() const noexcept;
  int local_expert_num() const noexcept;
  bool is_shared_expert_rank() const noexcept;

  // torch_npu.npu_moe_distribute_dispatch. x: (BS, H) bf16/fp16; expert_ids: (BS, K) int32.
  DispatchResult dispatch(const TensorView& x, const TensorView& expert_ids, const DispatchOptions& options = {});

  // torch_npu.npu_moe_distribute_combine. Returns (BS, H) in expand_x's dtype: options.out if given,
  // else group storage valid until the next combine on this group. expand_idx may have any 1-D or 2-D
  // shape of BS * K elements, read in row-major order (1-D under the ascend_a3 profile).
  //
  // Lifetime of the rows it reads. Without a TP domain (T <= 1) the other ranks of this rank's host read
  // its expert-output rows straight from its window: combine_buffer(), dispatch's expand_x passed back,
  // or the copy combine stages there from any other expand_x. combine has no closing barrier (it would
  // cost every call a round of waiting), so it may return here while slower ranks still read them.
  // They stay theirs until this rank's next collective call on the group, dispatch or combine, whose
  // first exchange waits for every rank to finish this combine. Until then do not write
  // combine_buffer() or dispatch's expand_x; the group refuses what it can see of that: combine_buffer()
  // is absent, and a combine whose expand_x lies in this rank's window raises invalid_argument (on every
  // rank) instead of reading rows that may have been rewritten. Combining again from a buffer of the
  // caller's own is fine. With T = 2 the rows read by others are staged by combine in a region no view
  // exposes, and none of this applies.
  TensorView combine(const TensorView& expand_x, const TensorView& expert_ids, const TensorView& expand_idx,
                     const TensorView& ep_send_counts, const TensorView& expert_scales,
                     const CombineOptions& options = {});

  // torch_npu.npu_moe_distribute_dispatch_v2: active entries only, special experts never sent, Sn shared
  // experts, and assist_info_for_combine (triples) in place of expand_idx. Outputs as dispatch's.
  DispatchResult dispatch_v2(const TensorView& x, const TensorView& expert_ids, const DispatchV2Options& options = {});

  // torch_npu.npu_moe_distribute_combine_v2. Row i of expand_x (i below ep_send_counts' last own entry,
  // plus the TP peer's rows with T = 2) goes back to the token and k its triple in
  // assist_info_for_combine names, in any row order. expert_scales may be absent (weights 1) except
  // under the ascend_a3 profile. Lifetime of the rows it reads: as combine's.
  TensorView combine_v2(const TensorView& expand_x, const TensorView& expert_ids,
                        const TensorView& assist_info_for_combine, const TensorView& ep_send_counts,
                        const TensorView& expert_scales, const CombineV2Options& options = {});

  const TrafficCounters& traffic() const noexcept;

  // A (rows, H) view in this rank's communication window, after a dispatch and until the combine that
  // reads it, where the experts can write their outputs (rows in expand_x order). Passed to combine as
  // expand_x, its rows are read by the source ranks in place, with no copy, possibly after combine has
  // returned here: do not write it again before the next dispatch (see combine). Absent with a TP domain
  // (T = 2), whose reduce needs both halves, before the first dispatch, and from a combine until the
  // next dispatch.
  MutableTensorView combine_buffer(DType dtype);

  struct State;  // implementation detail (src/ops/group_state.h)

 private:
  std::unique_ptr<State> state_;
};

}  // namespace moedist
