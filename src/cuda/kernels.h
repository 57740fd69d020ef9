// Host entry points of the CUDA kernels: each enqueues the kernels of one call on a stream, with no host
// synchronization and no allocation, so a call can be captured in a CUDA graph. Errors found on the GPU
// go to the status block (device_state.h); launch errors are returned.
#pragma once

#if !defined(MOEDIST_CUDA_EMULATION)
#include <cuda_runtime_api.h>
#endif

#include <cstddef>
#include <cstdint>

#include "cuda/device_state.h"

namespace moedist::cuda {

// Bytes of CUB scratch the routing sort needs for up to max_entries routing entries.
cudaError_t sort_scratch_bytes(std::int64_t max_entries, int key_bits, std::size_t* bytes);

struct SortScratch {
  void* temp = nullptr;
  std::size_t bytes = 0;
  int key_bits = 1;  // bits of an expert id: ids are sorted on [0, key_bits)
};

cudaError_t enqueue_dispatch(const DeviceGroup& group, const DispatchArgs& args, const SortScratch& sort,
                             Status* status_mirror, cudaStream_t stream);
cudaError_t enqueue_combine(const DeviceGroup& group, const CombineArgs& args, Status* status_mirror,
                            cudaStream_t stream);

// The same calls in steps, for a group across hosts, whose host sends messages between them
// (docs/cuda.md, "Across hosts"). Dispatch: records (ids checked, sorted, counted, the record published
// on this host) | rows (all records in: layout, rows to this host's targets) | finish (flags, status).
cudaError_t enqueue_dispatch_records(const DeviceGroup& group, const DispatchArgs& args, const SortScratch& sort,
                                     cudaStream_t stream);
cudaError_t enqueue_dispatch_rows(const DeviceGroup& group, const DispatchArgs& args, cudaStream_t stream);
cudaError_t enqueue_dispatch_finish(const DeviceGroup& group, const DispatchArgs& args, Status* status_mirror,
                                    cudaStream_t stream);
// Combine: front (checks, TP, staging, the flags of this host's ranks) | back (rows from other hosts in
// remote_rows: find, reduce, status).
cudaError_t enqueue_combine_front(const DeviceGroup& group, const CombineArgs& args, cudaStream_t stream);
cudaError_t enqueue_combine_back(const DeviceGroup& group, const CombineArgs& args, Status* status_mirror,
                                 cudaStream_t stream);

// A proxy writing a sender's rows into its host's windows: write_rows with the sender's group and
// arguments (their arrays staged here); then raise_flags with the sender's flag word.
cudaError_t enqueue_write_rows(const DeviceGroup& group, const DispatchArgs& args, cudaStream_t stream);
cudaError_t enqueue_raise_flags(const DeviceGroup& group, std::size_t region, int slot, std::uint64_t word,
                                cudaStream_t stream);
// A sender: x (BS, H) and expert_scales (BS, K, when given) copied contiguous.
cudaError_t enqueue_compact_inputs(const DispatchArgs& args, std::uint16_t* x, float* expert_scales,
                                   cudaStream_t stream);
// A source: every (token, slot)'s request to another host, [BS * remote_slots].
cudaError_t enqueue_remote_requests(const DeviceGroup& group, const CombineArgs& args, RemoteRequest* out,
                                    cudaStream_t stream);
// A proxy: the rows (combine_pitch bytes each), index entries and (V2) holder counts [W] that n requests
// of EP rank source_ep name.
cudaError_t enqueue_gather_requested_rows(const DeviceGroup& group, const RemoteRequest* requests, std::int64_t n,
                                          int version, int source_ep, std::byte* rows, std::uint64_t* entries,
                                          std::int64_t* counts, cudaStream_t stream);

}  // namespace moedist::cuda
