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

}  // namespace moedist::cuda
