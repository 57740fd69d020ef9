// Dispatch and combine on NVIDIA GPUs (built when CMake finds the CUDA toolkit; MOEDIST_HAVE_CUDA).
//
// Each rank is a process driving one GPU; several ranks may share a GPU. The ranks of a host map each
// other's device windows through CUDA IPC and write rows straight into their receivers' windows, as
// NVLink peers do. A call enqueues kernels on the caller's stream and returns without waiting: no host
// synchronization and no allocation, so dispatch and combine can be captured in a CUDA graph (a group
// across hosts, moedist/cuda_mpi.h, is the exception: its calls wait between steps). Shapes are
// static: the group is created for the largest call (max_bs, k, h) and sizes its windows by the
// contract's capacity A for it.
//
// Results are the oracle's, bit for bit (the same fp32 operation order and rounding as the CPU paths).
//
// Errors. Host-visible problems (shapes, dtypes, options, a tensor not in device memory) throw a
// moedist::ValidationError before anything is enqueued; this rank then makes no call, so its peers'
// kernels fail with a timeout naming it. Problems only the GPU can see (an expert id out of range, a peer
// that failed or timed out, a call that does not match dispatch's) are recorded on the GPU: the kernels
// of the call and of every later call then write no output, peers are told, and synchronize() throws the
// typed error naming the parameter or the peer (a later call throws it too, once a synchronize() has
// seen it). A group that reported an error stays failed; create a new one.
//
// Streams. All calls of a group go to one stream (or to streams ordered by events): the call counter,
// the dispatch handle and the status live on the GPU and rely on the calls running in order. The host
// keeps track of the pairing of dispatch and combine for calls made through this API; replays of a
// captured graph bypass it, so a program that replays graphs should not mix them with direct calls.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "moedist/config.h"
#include "moedist/group.h"
#include "moedist/tensor.h"
#include "moedist/wait.h"

struct CUstream_st;  // cudaStream_t is CUstream_st*

namespace moedist::cuda {

using Stream = CUstream_st*;

// Whether this build has the CUDA backend and this process sees a CUDA device; `reason` says why not.
bool available(std::string* reason = nullptr);

struct CudaGroupOptions {
  int device = -1;          // the CUDA device of this rank; -1: the calling thread's current device
  std::int64_t max_bs = 0;  // most tokens a rank passes in one call (with global_bs != 0 at most global_bs / W)
  std::int64_t k = 0;       // top-k K of every call (1 <= K <= 1024; a V1 call also needs K <= moe_expert_num)
  std::int64_t h = 0;       // hidden size H of every call
  // The longest a rank waits for a peer on the GPU, in any step, before it reports ErrorCode::timeout
  // (WaitOptions: 30 s by default). Also bounds joining. With several ranks time-sharing one GPU
  // without MPS, allow for the time slices.
  WaitOptions wait;
};

// Outputs of a dispatch, in device memory. valid_rows is not known on the host until synchronize():
// read last_valid_rows() then, or use ep_recv_counts / tp_recv_counts on the GPU.
struct CudaDispatchResult {
  // Rows R * max(T,1) with R = the most rows this rank can receive: A, except on a shared-expert rank
  // with global_bs != 0 and uneven BS, where it can be more (capacity().max_receive_rows).
  TensorView expand_x;        // (R * max(T,1), H): views into this rank's window, valid until the next dispatch
  TensorView dynamic_scales;  // (R * max(T,1),) fp32
  TensorView expand_idx;      // (BS * K,) int32 (V1 only)
  // V2 only: (3 * R * max(T,1),) int32, a view into this rank's window valid until the next dispatch:
  // entries [0, 3 * own EP rows) hold (source EP rank, token, k) per row (V2 §3.6), the rest unspecified.
  TensorView assist_info_for_combine;
  TensorView expert_token_nums;  // (local_expert_num,) int64
  TensorView ep_recv_counts;     // (W * local_expert_num * (T == 2 ? 2 : 1),) int32
  TensorView tp_recv_counts;     // (2,) int32 when T == 2, else absent
  TensorView expand_scales;      // (R * max(T,1),) fp32 when expert_scales was given, else absent
  std::int64_t A = 0;            // the contract's capacity for this call
};

// What a rank sent to other hosts in its latest call, in a group across hosts (moedist/cuda_mpi.h;
// zeros on one host).
struct CudaHostTraffic {
  // Dispatch: rows of this rank's tokens, each sent once to each other host that holds one of its targets
  // (node-aware: not once per target rank).
  std::int64_t token_rows = 0;
  // Every byte of the messages it sent to ranks of other hosts: records, rows with their routing state,
  // row requests and answers.
  std::int64_t bytes = 0;
};

class CudaGroup {
 public:
  // Joins the group of job `job` (every process of the job calls it with its own config): the ranks of
  // the job meet over the shared-memory bootstrap (abstract Unix sockets, as join_shm), allocate their
  // windows on their devices and open each other's through CUDA IPC. Collective. The calling thread's
  // current device is the same afterwards; destruction synchronizes the group's device from any thread.
  // Processes started by mpirun can meet over their communicator instead (moedist/cuda_mpi.h).
  static std::unique_ptr<CudaGroup> join(const GroupConfig& config, const std::string& job, const CudaGroupOptions& options);
  ~CudaGroup();
  CudaGroup(const CudaGroup&) = delete;
  CudaGroup& operator=(const CudaGroup&) = delete;

  const GroupConfig& config() const noexcept;
  int device() const noexcept;

  // torch_npu.npu_moe_distribute_dispatch on `stream`. x: (BS, H) bf16/fp16 with BS <= max_bs and the
  // group's H; expert_ids: (BS, K) int32. All tensors in device memory. options.out is not supported
  // (outputs live in the group; copy them if they must outlive the next dispatch).
  CudaDispatchResult dispatch(const TensorView& x, const TensorView& expert_ids, const DispatchOptions& options, Stream stream);

  // torch_npu.npu_moe_distribute_combine on `stream`, paired with this group's latest dispatch (one
  // combine per dispatch): expert_ids, expand_idx, ep_send_counts and tp_send_counts must be that
  // dispatch's (checked on the GPU). Returns (BS, H) in expand_x's dtype: options.out if given, else group
  // memory valid until the next combine.
  TensorView combine(const TensorView& expand_x, const TensorView& expert_ids, const TensorView& expand_idx,
                     const TensorView& ep_send_counts, const TensorView& expert_scales, const CombineOptions& options,
                     Stream stream);

  // torch_npu.npu_moe_distribute_dispatch_v2 on `stream` (Group::dispatch_v2's semantics): x_active_mask
  // (BS,) or (BS, K), zero / copy / const experts, shared_expert_num 0-4, assist_info_for_combine in
  // place of expand_idx, performance_info (device memory, raised to the longest wait per EP rank in µs,
  // measured on the GPU's global timer). Same rules as dispatch: device tensors, options.out refused.
  // The GPU checks the values (ids, the mask's prefix rule) and names the first that breaks a rule.
  CudaDispatchResult dispatch_v2(const TensorView& x, const TensorView& expert_ids, const DispatchV2Options& options,
                                 Stream stream);

  // torch_npu.npu_moe_distribute_combine_v2 on `stream`, paired with this group's latest dispatch_v2:
  // expert_ids and x_active_mask must be that dispatch's (checked on the GPU), and the special-expert
  // counts too. Row i of expand_x goes back to the token and k of its triple in
  // assist_info_for_combine, in any row order (the GPU indexes the rows by their triples and checks that
  // every row a source expects is there once). expert_scales may be absent (weights 1).
  TensorView combine_v2(const TensorView& expand_x, const TensorView& expert_ids,
                        const TensorView& assist_info_for_combine, const TensorView& ep_send_counts,
                        const TensorView& expert_scales, const CombineV2Options& options, Stream stream);

  // A (rows, H) view in this rank's window where experts can write their outputs (row stride may exceed
  // H); passed to combine as expand_x it is read in place by the source ranks, with no staging copy.
  // Absent with a TP domain (T = 2) or comm_quant_mode 2, whose staging transforms the rows.
  MutableTensorView combine_buffer(DType dtype);

  // Waits for `stream` and throws the first error the GPU recorded (ValidationError for a bad argument,
  // PeerError for a peer's failure, timeout or malformed record).
  void synchronize(Stream stream);
  // Throws an error recorded by the calls synchronize() already waited for (no waiting). The host
  // reads the GPU's status only in synchronize(), after waiting for the stream that copies it out (the
  // calls' stream): an error of a call not yet synchronized is not seen here, nor by the next call's
  // host-side check.
  void check() const;
  // The latest dispatch's valid rows (own + TP peer's), as of the last synchronize() (0 before the
  // first; a dispatch not yet synchronized does not change it).
  std::int64_t last_valid_rows() const;
  // What crossed hosts in this rank's latest call (known when the call returns: calls across hosts wait).
  CudaHostTraffic last_host_traffic() const;

  struct State;

 private:
  friend struct GroupJoin;  // the joins over each bootstrap (src/cuda/group_join.h)
  explicit CudaGroup(std::unique_ptr<State> state);
  std::unique_ptr<State> state_;
};

}  // namespace moedist::cuda
