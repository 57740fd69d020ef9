// A CUDA group across hosts: the host's part of a call (docs/cuda.md, "Across hosts"). Within a host,
// the kernels write and read each other's windows through CUDA IPC as always; between the kernel steps
// of kernels.h this class carries what crosses hosts, over the group's transport (MPI):
//
//   dispatch  records: every rank's count record to every rank of the other hosts (an all-gather);
//             rows: each token once to each other host that holds one of its targets, to the rank with
//             this rank's local index there (its proxy), with the sender's routing state; the proxy
//             runs the unchanged write_rows as the sender, into its own host's windows, and raises the
//             sender's flags there;
//   combine   each source asks its proxies for the rows it reduces from their hosts (V1 by row, V2 by
//             slot, looked up in the holder's index); they send the rows as staged (not partial sums),
//             and the reduce reads them from remote_rows in top-k order.
//
// Everything a peer sends is checked (bridge_messages.h; against the sender's record; the proxy plans
// the sender's block starts itself) before it is used as a size or an index. A message that breaks a
// rule makes its sender count as failed: its flags carry the failed bit and the ranks name it.
// The host waits for the stream between the steps, so such calls cannot be captured in a CUDA graph.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <set>
#include <string_view>
#include <vector>

#include "contract/layout.h"
#include "cuda/bridge_messages.h"
#include "cuda/device_state.h"
#include "moedist/cuda.h"
#include "transport/transport.h"

namespace moedist::cuda {

class HostBridge {
 public:
  // `group` is the rank's DeviceGroup (windows of other hosts null) and `window` its own window; the
  // constructor allocates the buffers of remote rows and points group's remote_* fields at them.
  // `transport` and `group` outlive the bridge.
  HostBridge(Transport& transport, DeviceGroup& group, const contract::Topology& topo, std::int64_t max_bs,
             std::int64_t k, std::int64_t h, std::byte* window);
  ~HostBridge();
  HostBridge(const HostBridge&) = delete;
  HostBridge& operator=(const HostBridge&) = delete;

  // After enqueue_dispatch_records: the records of the other hosts' ranks into this rank's inbox.
  void exchange_records(cudaStream_t stream);
  // After enqueue_dispatch_rows: this rank's tokens to its proxies, and as a proxy, the rows of the
  // senders of other hosts with this rank's local index into this host's windows.
  void carry_rows(const DispatchArgs& a, cudaStream_t stream);
  // After enqueue_combine_front: the rows this rank reduces from other hosts into remote_rows.
  void carry_combine_rows(const CombineArgs& a, cudaStream_t stream);
  // What this rank sent to other hosts in its latest call (dispatch: from exchange_records on).
  CudaHostTraffic traffic() const { return traffic_; }

 private:
  template <class T>
  T* device_array(std::int64_t n);
  Status read_status() const;
  // Per host: the tokens of a sender (hg, ha: its routing state) with a target there, ascending, and the
  // smooth-scale rows those targets need.
  struct HostNeeds {
    std::vector<std::vector<std::int32_t>> tokens;
    std::vector<std::set<std::int64_t>> smooth;
  };
  HostNeeds needs_by_host(const DeviceGroup& hg, const DispatchArgs& ha, bool smooth_scales) const;
  // Where rank `sender`'s blocks start on every rank (plan_destination on this call's records, as the
  // sender planned them).
  void plan_as(int sender, int version, std::vector<std::int64_t>* block_start, std::vector<std::int64_t>* tp_shift,
               std::vector<std::int64_t>* shared_start) const;
  // One round with the proxies: messages[i] to proxies_[i] (counted in traffic_), and theirs back.
  std::vector<std::vector<std::byte>> exchange_with_proxies(const std::vector<std::vector<std::byte>>& messages,
                                                            std::string_view phase);
  void proxy_rows(int sender, const std::vector<std::byte>& message, cudaStream_t stream);
  std::vector<std::byte> answer_requests(int source, const std::vector<std::byte>& message, int version,
                                         std::uint64_t seq, cudaStream_t stream);

  Transport& transport_;
  DeviceGroup& g_;
  contract::Topology topo_;
  std::int64_t max_bs_, h_;
  std::byte* window_;
  BridgeLimits limits_;         // what a message from another host is checked against
  std::vector<int> proxies_;    // per other host, its rank with this rank's local index (both ways)
  std::vector<int> host_slot_;  // per host, its place in proxies_ (-1: this rank's host)
  std::vector<void*> allocations_;
  std::vector<std::byte> inbox_image_;  // this call's records of every rank, at the inbox's offset
  CudaHostTraffic traffic_;
  // A sender's compacted x and expert_scales on their way out, in one pinned allocation.
  std::byte* pinned_ = nullptr;
  std::uint16_t* x_pinned_ = nullptr;
  float* es_pinned_ = nullptr;
  // A sender's inputs, compacted.
  std::uint16_t* x_compact_ = nullptr;
  float* es_compact_ = nullptr;
  // A proxy's copy of one sender's state and inputs.
  DeviceGroup as_;
  std::uint16_t* x_stage_ = nullptr;
  float* es_stage_ = nullptr;
  float* scales_stage_ = nullptr;
  // Combine: this rank's requests, and a proxy's copy of a source's, with the rows gathered for them.
  RemoteRequest* requests_ = nullptr;
  RemoteRequest* proxy_requests_ = nullptr;
  std::byte* gathered_rows_ = nullptr;
  std::uint64_t* gathered_entries_ = nullptr;
  std::int64_t* gathered_counts_ = nullptr;
};

}  // namespace moedist::cuda
