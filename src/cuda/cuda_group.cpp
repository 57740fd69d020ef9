// The host side of the CUDA group: joining (a bootstrap transport, device windows exported and opened
// through CUDA IPC), host-side validation of every call, and turning the status the
// GPU recorded into typed errors. The kernels are in kernels.cu; the contract's checks in src/contract.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstring>
#include <initializer_list>
#include <utility>
#include <vector>

#include "common/format.h"
#include "contract/checks.h"
#include "contract/layout.h"
#include "contract/v2_routing.h"
#include "cuda/call_args.h"
#include "cuda/device_guard.h"
#include "cuda/group_join.h"
#include "cuda/host_bridge.h"
#include "cuda/kernels.h"
#include "cuda/status_errors.h"
#include "cuda/window_layout.h"
#include "moedist/cuda.h"
#include "moedist/error.h"
#include "moedist/shm.h"
#include "transport/shm/shm_transport.h"

namespace moedist::cuda {

namespace {

constexpr int kMaxWorld = 1024;  // flag arrays and the per-rank loops of the planning kernel are sized for this
constexpr std::int64_t kMaxK = 1024;

int bits_for(int max_value) {
  int bits = 1;
  while (bits < 31 && (std::int64_t{1} << bits) <= max_value) ++bits;
  return bits;
}

// Which tensors a call may pass: device memory of the group's device (or managed memory).
// The kernels send every token: a mask would be silently ignored, so it is refused by name.
void refuse_token_mask(const TensorView& mask) {
  if (mask.present())
    fail(ErrorCode::unsupported, "x_active_mask", "given",
         "is not supported by the CUDA backend yet (the CPU transports support it)");
}

void require_device_tensor(const char* name, const void* data, std::int64_t numel, int device) {
  if (data == nullptr || numel == 0) return;
  cudaPointerAttributes attr{};
  const cudaError_t err = cudaPointerGetAttributes(&attr, data);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error of an unknown pointer
    fail(ErrorCode::invalid_argument, concat(name, ".data"), "host memory", "must be CUDA device memory");
  }
  if (attr.type == cudaMemoryTypeManaged) return;
  if (attr.type != cudaMemoryTypeDevice)
    fail(ErrorCode::invalid_argument, concat(name, ".data"),
         attr.type == cudaMemoryTypeHost ? "pinned host memory" : "host memory", "must be CUDA device memory");
  if (attr.device != device)
    fail(ErrorCode::invalid_argument, concat(name, ".data"), concat("memory of device ", attr.device),
         concat("must be memory of this rank's device ", device));
}

// An error an earlier, unrelated launch of this process left pending would otherwise be reported as
// this call's; it is reported as what it is, before anything is enqueued.
void require_no_pending_error(const char* call) {
  const cudaError_t pending = cudaGetLastError();
  if (pending != cudaSuccess) {
    throw Error(ErrorCode::internal, concat("a CUDA error from earlier work of this process was pending when ", call, " started: ",
                                            cudaGetErrorName(pending), " (", cudaGetErrorString(pending), "); nothing was enqueued"));
  }
}

}  // namespace

bool available(std::string* reason) {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    if (reason != nullptr) {
      *reason = err != cudaSuccess ? concat("the CUDA runtime reports ", cudaGetErrorName(err), ": ", cudaGetErrorString(err))
                                   : std::string("the CUDA runtime sees no device");
    }
    cudaGetLastError();
    return false;
  }
  return true;
}

struct CudaGroup::State {
  GroupConfig config;
  CudaGroupOptions options;
  contract::Topology topo;
  std::unique_ptr<Transport> bootstrap;      // kept until destruction: the last barrier before freeing
  std::unique_ptr<cuda::HostBridge> bridge;  // a group across hosts: what crosses them (null on one host)
  cuda::WindowOffsets off;
  cuda::DeviceGroup dev;
  cuda::SortScratch sort;
  std::byte* window = nullptr;                 // this rank's window (device)
  std::vector<std::byte*> opened;              // peers' windows opened through IPC (nullptr for self)
  std::vector<std::byte*> bases;               // every rank's window in this process
  std::byte** window_table = nullptr;          // device copy of every rank's base
  cuda::Status* status = nullptr;              // device
  cuda::Status* mirror = nullptr;              // pinned host copy, refreshed at the end of every call
  // What the host knows: the mirror as of the last synchronize(). The mirror itself is written by a copy
  // on the stream that may still be running (a torn status, an error reported before synchronize()
  // saw it), so the host reads it only right after waiting for that stream.
  cuda::Status seen{};
  std::vector<void*> allocations;              // device scratch
  void* combine_out = nullptr;                 // (max_bs, H) 16-bit
  void* expand_idx_out = nullptr;
  void* token_nums_out = nullptr;
  void* recv_counts_out = nullptr;
  void* tp_counts_out = nullptr;
  std::string broken;                          // why the group cannot go on after a host-side CUDA failure mid-call
  bool dispatched = false;
  bool combined_since_dispatch = false;
  contract::CallShape last_shape;
  DType last_dtype = DType::bf16;
  int last_quant = 0;
  int last_version = 1;           // the operators of the latest dispatch
  cuda::SpecialIds last_special;  // and, of a dispatch_v2, its special experts and its mask's rank
  int last_mask_ndim = 0;

  State(const GroupConfig& c, const CudaGroupOptions& o) : config(c), options(o), topo(c) {}
  ~State() { release(); }

  template <class T>
  T* device_array(std::int64_t n) {
    void* p = nullptr;
    check_cuda(cudaMalloc(&p, static_cast<std::size_t>(std::max<std::int64_t>(n, 1)) * sizeof(T)), "cudaMalloc (group scratch)");
    allocations.push_back(p);
    return static_cast<T*>(p);
  }

  void release() noexcept {
    // Kernels of this rank may still be running (a group destroyed without synchronize()); every wait
    // in them ends by the timeout. Then all ranks meet, so that no rank frees its window or closes a
    // peer's while a peer's kernels may still touch it. cudaDeviceSynchronize waits for the current
    // device only: the group's is made current (the destroying thread's may be another) and the
    // caller's restored at the end.
    int previous = -1;
    const bool switched = cudaGetDevice(&previous) == cudaSuccess && previous != options.device &&
                          cudaSetDevice(options.device) == cudaSuccess;
    cudaDeviceSynchronize();
    cudaGetLastError();
    if (bootstrap) {
      try {
        std::uint8_t token = 0;
        std::vector<std::uint8_t> all(static_cast<std::size_t>(bootstrap->size()));
        bootstrap->allgather(&token, 1, all.data(), "cuda.close");
      } catch (...) {  // a peer that is gone cannot touch the window either
      }
    }
    bridge.reset();
    for (std::byte* p : opened) {
      if (p != nullptr) cudaIpcCloseMemHandle(p);
    }
    opened.clear();
    for (void* p : allocations) cudaFree(p);
    allocations.clear();
    if (window != nullptr) cudaFree(window);
    window = nullptr;
    if (mirror != nullptr) cudaFreeHost(mirror);
    mirror = nullptr;
    if (switched) cudaSetDevice(previous);
    cudaGetLastError();
  }

  // A launch that failed after the call's first kernel leaves this rank a call behind its peers on the
  // GPU: the group cannot go on.
  void enqueue_or_break(cudaError_t err, const char* call) {
    if (err == cudaSuccess) return;
    broken = concat("rank ", dev.me, ": enqueuing ", call, " failed: ", cudaGetErrorName(err), " (", cudaGetErrorString(err),
                    "); this group is unusable and its peers will time out in this call");
    throw Error(ErrorCode::internal, broken);
  }

  // A step of a call across hosts (host_bridge.h): a message that did not come (PeerError, timeout) or a
  // CUDA failure between the kernel steps leaves the group out of step with its peers.
  template <class Step>
  void across_hosts(const Step& step) {
    try {
      step();
    } catch (const Error& e) {
      broken = concat("rank ", dev.me, ": a call across hosts failed: ", e.what(), "; this group is unusable");
      throw;
    }
  }

  void throw_if_failed() const {
    if (!broken.empty()) throw Error(ErrorCode::internal, broken);
    cuda::throw_status_error(seen, dev.me, last_shape.k);
  }
};

// Windows of this host's ranks only: another host's rank stays null (its rows go through the bridge).
template <class Record>
void open_peer_windows(CudaGroup::State& s, const std::vector<Record>& all, int me, int world) {
  s.opened.assign(static_cast<std::size_t>(world), nullptr);
  std::vector<std::byte*> bases(static_cast<std::size_t>(world));
  for (int r = 0; r < world; ++r) {
    if (r == me) {
      bases[static_cast<std::size_t>(r)] = s.window;
      continue;
    }
    if (s.bootstrap->host_of(r) != s.bootstrap->host_of(me)) continue;
    void* peer = nullptr;
    const cudaError_t err = cudaIpcOpenMemHandle(&peer, all[static_cast<std::size_t>(r)].handle, cudaIpcMemLazyEnablePeerAccess);
    if (err != cudaSuccess) {
      cudaGetLastError();
      throw PeerError(
          ErrorCode::unsupported, r, "cuda.join",
          concat("rank ", me, " (device ", s.options.device, ") cannot open the window of rank ", r, " (device ",
                 all[static_cast<std::size_t>(r)].fields[13], ") through CUDA IPC: ", cudaGetErrorString(err),
                 "; ranks of one CUDA group on one host must be on GPUs with peer access"));
    }
    s.opened[static_cast<std::size_t>(r)] = static_cast<std::byte*>(peer);
    bases[static_cast<std::size_t>(r)] = static_cast<std::byte*>(peer);
  }

  s.bases = bases;
}

// The device table of window bases, the status and its host mirror, the scratch, the dispatch handle and
// the outputs the group keeps, all sized for the group's largest call.
void allocate_group_memory(CudaGroup::State& s, const contract::Topology& topo, const GroupConfig& config, int world, int me) {
  const CudaGroupOptions& opts = s.options;
  const std::vector<std::byte*>& bases = s.bases;
  const std::int64_t entries = opts.max_bs * opts.k;
  const int local = topo.local_experts(config.ep_rank_id);
  cuda::DeviceGroup& g = s.dev;
  g.W = topo.W;
  g.S = topo.S;
  g.E = topo.E;
  g.L = topo.L;
  g.T = topo.T;
  g.ep_rank = topo.ep_rank;
  g.tp_rank = topo.tp_rank;
  g.world = world;
  g.me = me;
  g.local_experts = local;
  g.global_bs = config.global_bs;
  g.timeout_ns = static_cast<std::int64_t>(opts.wait.timeout.count()) * 1000000;
  g.off = s.off;
  s.window_table = s.device_array<std::byte*>(world);
  check_cuda(cudaMemcpy(s.window_table, bases.data(), sizeof(std::byte*) * bases.size(), cudaMemcpyHostToDevice), "cudaMemcpy (window table)");
  g.windows = s.window_table;
  s.status = s.device_array<cuda::Status>(1);
  const cuda::Status fresh{};
  check_cuda(cudaMemcpy(s.status, &fresh, sizeof(fresh), cudaMemcpyHostToDevice), "cudaMemcpy (status)");
  g.status = s.status;
  void* mirror = nullptr;
  check_cuda(cudaHostAlloc(&mirror, sizeof(cuda::Status), cudaHostAllocDefault), "cudaHostAlloc (status)");
  s.mirror = static_cast<cuda::Status*>(mirror);
  *s.mirror = fresh;
  g.sort_keys_in = s.device_array<std::int32_t>(entries);
  g.sort_keys_out = s.device_array<std::int32_t>(entries);
  g.sort_vals_in = s.device_array<std::int32_t>(entries);
  g.sort_vals_out = s.device_array<std::int32_t>(entries);
  g.dispatch_ids = s.device_array<std::int32_t>(entries);
  g.dispatch_expand_idx = s.device_array<std::int32_t>(entries);
  g.expert_counts = s.device_array<std::int32_t>(topo.E);
  g.record = s.device_array<std::int32_t>(topo.count_record_len());
  g.block_start = s.device_array<std::int64_t>(topo.count_record_len());
  g.tp_shift = s.device_array<std::int64_t>(topo.W);
  g.shared_start = s.device_array<std::int64_t>(std::max(topo.S, 1));
  g.recv_counts = s.device_array<std::int32_t>(topo.ep_recv_counts_len(config.ep_rank_id));
  g.tp_counts = s.device_array<std::int32_t>(2);
  g.call_shape = s.device_array<std::int64_t>(3);
  g.Sn = topo.Sn;
  g.R = topo.R;
  g.token_slot = s.device_array<std::int32_t>(opts.max_bs);
  g.source_bs = s.device_array<std::int64_t>(topo.W);
  g.found_rows = s.device_array<std::int64_t>(contract::sat_mul(opts.max_bs, topo.K_slots(opts.k)));
  g.const_logits = s.device_array<float>(contract::sat_mul(entries, std::int64_t{2}));
  s.expand_idx_out = s.device_array<std::int32_t>(entries);
  s.token_nums_out = s.device_array<std::int64_t>(local);
  s.recv_counts_out = s.device_array<std::int32_t>(topo.ep_recv_counts_len(config.ep_rank_id));
  s.tp_counts_out = s.device_array<std::int32_t>(2);
  s.combine_out = s.device_array<std::uint16_t>(contract::sat_mul(opts.max_bs, opts.h));
  s.sort.key_bits = bits_for(topo.E);  // ids [0, E) and V2's key E for entries that are not sent
  check_cuda(cuda::sort_scratch_bytes(entries, s.sort.key_bits, &s.sort.bytes), "cub::DeviceRadixSort (scratch size)");
  s.sort.temp = s.device_array<std::byte>(static_cast<std::int64_t>(s.sort.bytes));
  check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize (join)");
}

// A group across hosts: each rank's proxy on another host is the rank with its local index there, so
// every host has as many ranks; a TP pair writes into each other's windows, so it shares a host.
void require_bridgeable_hosts(const Transport& t, const contract::Topology& topo) {
  if (t.host_count() <= 1) return;
  std::vector<int> ranks(static_cast<std::size_t>(t.host_count()), 0);
  for (int r = 0; r < t.size(); ++r) ++ranks[static_cast<std::size_t>(t.host_of(r))];
  for (int h = 1; h < t.host_count(); ++h) {
    if (ranks[static_cast<std::size_t>(h)] != ranks[0])
      fail(ErrorCode::unsupported, "ranks per host",
           concat(ranks[0], " on ", t.host_name(0), ", ", ranks[static_cast<std::size_t>(h)], " on ", t.host_name(h)),
           "must be the same on every host of a CUDA group across hosts");
  }
  for (int ep = 0; ep < topo.W && topo.T == 2; ++ep) {
    if (t.host_of(topo.global_rank(ep, 0)) != t.host_of(topo.global_rank(ep, 1)))
      fail(ErrorCode::unsupported, concat("the TP pair of EP rank ", ep), "split across hosts", "must share a host");
  }
}

CudaGroup::CudaGroup(std::unique_ptr<State> state) : state_(std::move(state)) {}
CudaGroup::~CudaGroup() = default;

const GroupConfig& CudaGroup::config() const noexcept { return state_->config; }
int CudaGroup::device() const noexcept { return state_->options.device; }

std::unique_ptr<CudaGroup> CudaGroup::join(const GroupConfig& config, const std::string& job, const CudaGroupOptions& options) {
  return GroupJoin::join(config, options, [&](const CudaGroupOptions& resolved) -> std::unique_ptr<Transport> {
    ShmOptions boot;
    boot.wait.timeout = resolved.wait.timeout;
    return std::make_unique<shm::ShmTransport>(job, global_rank(config), config.ep_world_size * tp_domain_size(config),
                                               boot);
  });
}

std::unique_ptr<CudaGroup> GroupJoin::join(const GroupConfig& config, const CudaGroupOptions& options,
                                           const Bootstrap& bootstrap) {
  validate_config(config);
  const contract::Topology topo(config);
  const int world = topo.world_size();
  if (world > kMaxWorld)
    fail(ErrorCode::unsupported, "ep_world_size * max(tp_world_size, 1)", concat(world),
         concat("the CUDA backend supports at most ", kMaxWorld, " ranks"));
  // K <= E is a V1 call's rule (checked at the call): a V2 call's K may reach E + its special experts.
  if (options.k < 1 || options.k > kMaxK)
    fail_value("CudaGroupOptions::k", options.k, concat("must be in [1, ", kMaxK, "]"));
  if (options.h < 1) fail_value("CudaGroupOptions::h", options.h, "must be >= 1");
  if (options.wait.timeout.count() <= 0)
    fail_value("CudaGroupOptions::timeout (ms)", options.wait.timeout.count(), "must be > 0");
  CudaGroupOptions opts = options;
  if (config.global_bs != 0) {
    const std::int64_t limit = config.global_bs / config.ep_world_size;
    if (opts.max_bs == 0) opts.max_bs = limit;
    if (opts.max_bs < 0 || opts.max_bs > limit)
      fail_value("CudaGroupOptions::max_bs", opts.max_bs,
                 concat("must be in [0, global_bs / ep_world_size = ", limit, "]"));
  } else if (opts.max_bs < 0) {
    fail_value("CudaGroupOptions::max_bs", opts.max_bs, "must be >= 0");
  }
  if (contract::sat_mul(opts.max_bs, opts.k) > (std::int64_t{1} << 30))
    fail_value("CudaGroupOptions::max_bs * k", opts.max_bs * opts.k, "must be <= 2^30 routing entries");
  std::string reason;
  if (!available(&reason))
    fail(ErrorCode::unsupported, "CUDA device", "none", concat("a CUDA group needs one: ", reason));
  if (opts.device < 0) check_cuda(cudaGetDevice(&opts.device), "cudaGetDevice");
  // The group's device is current while joining; the caller's is restored however join ends (declared
  // before the state, so that a failed join's teardown still runs on the group's device).
  const DeviceGuard on_device(opts.device);

  auto state = std::make_unique<CudaGroup::State>(config, opts);
  CudaGroup::State& s = *state;
  s.off = cuda::window_offsets(topo, opts.max_bs, opts.k, opts.h);
  if (s.off.total >= static_cast<std::size_t>(contract::kSizeLimit))
    fail_value("CudaGroupOptions::max_bs", opts.max_bs, "gives a window of more than 2^62 bytes");

  s.bootstrap = bootstrap(opts);
  // Every rank sees the same host map, so all of them refuse together, before any device memory exists.
  require_bridgeable_hosts(*s.bootstrap, topo);

  // Each phase below meets every peer even when this rank's local step failed (a failed word in its
  // record), so that all ranks leave join with an error together instead of waiting in another phase.
  const int me = global_rank(config);
  struct JoinRecord {
    cudaIpcMemHandle_t handle;
    std::int64_t fields[14];
    std::int64_t failed;
  } mine{};
  std::exception_ptr local_error;
  try {
    // The window: flags start at 0 (no call signalled), then it is exported.
    void* window = nullptr;
    check_cuda(cudaMalloc(&window, s.off.total), "cudaMalloc (window)");
    s.window = static_cast<std::byte*>(window);
    check_cuda(cudaMemset(window, 0, s.off.total), "cudaMemset (window)");
    check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize (join)");
    check_cuda(cudaIpcGetMemHandle(&mine.handle, window), "cudaIpcGetMemHandle");
  } catch (...) {
    local_error = std::current_exception();
    mine.failed = 1;
  }
  const std::int64_t fields[14] = {config.ep_world_size,
                                   config.moe_expert_num,
                                   config.tp_world_size,
                                   config.shared_expert_rank_num,
                                   config.shared_expert_num,
                                   config.expert_shard_type,
                                   config.global_bs,
                                   static_cast<std::int64_t>(config.profile),
                                   opts.max_bs,
                                   opts.k,
                                   opts.h,
                                   opts.wait.timeout.count(),
                                   static_cast<std::int64_t>(s.off.total),
                                   opts.device};
  std::memcpy(mine.fields, fields, sizeof(fields));
  std::vector<JoinRecord> all(static_cast<std::size_t>(world));
  s.bootstrap->allgather(&mine, sizeof(mine), all.data(), "cuda.join");
  const auto rethrow_failures = [&](const std::vector<JoinRecord>& records, const char* phase) {
    if (local_error) std::rethrow_exception(local_error);
    for (int r = 0; r < world; ++r) {
      if (records[static_cast<std::size_t>(r)].failed != 0) {
        throw PeerError(ErrorCode::peer_failed, r, phase, concat("rank ", me, ": rank ", r, " failed to set up its CUDA window (", phase, "); see its error"));
      }
    }
  };
  rethrow_failures(all, "cuda.join");
  static const char* const kFieldNames[12] = {"ep_world_size", "moe_expert_num", "tp_world_size", "shared_expert_rank_num",
                                              "shared_expert_num", "expert_shard_type", "global_bs", "profile",
                                              "CudaGroupOptions::max_bs", "CudaGroupOptions::k", "CudaGroupOptions::h",
                                              "CudaGroupOptions::timeout (ms)"};
  for (int r = 0; r < world; ++r) {
    for (int f = 0; f < 12; ++f) {
      if (all[static_cast<std::size_t>(r)].fields[f] != fields[f]) {
        throw PeerError(ErrorCode::config_mismatch, r, "cuda.join",
                        concat("rank ", me, " has ", kFieldNames[f], " = ", fields[f], " but rank ", r, " has ",
                               all[static_cast<std::size_t>(r)].fields[f], ": all ranks must agree on it"));
      }
    }
  }
  JoinRecord ready{};
  try {
    open_peer_windows(s, all, me, world);
    allocate_group_memory(s, topo, config, world, me);
    if (s.bootstrap->host_count() > 1)
      s.bridge = std::make_unique<cuda::HostBridge>(*s.bootstrap, s.dev, topo, opts.max_bs, opts.k, opts.h, s.window);
  } catch (...) {
    local_error = std::current_exception();
    ready.failed = 1;
  }
  // Nobody signals a peer before every rank opened every window.
  std::vector<JoinRecord> again(static_cast<std::size_t>(world));
  s.bootstrap->allgather(&ready, sizeof(ready), again.data(), "cuda.ready");
  rethrow_failures(again, "cuda.ready");
  return std::unique_ptr<CudaGroup>(new CudaGroup(std::move(state)));
}

namespace {

// The call shape against the group's (the windows are sized for its largest call).
void require_group_shape(const CudaGroup::State& s, const contract::CallShape& shape) {
  if (shape.h != s.options.h)
    fail(ErrorCode::invalid_shape, "x.shape[1] (H)", concat(shape.h), concat("must be the group's H = ", s.options.h));
  if (shape.k != s.options.k)
    fail(ErrorCode::invalid_shape, "expert_ids.shape[1] (K)", concat(shape.k),
         concat("must be the group's K = ", s.options.k));
  if (shape.bs > s.options.max_bs)
    fail(ErrorCode::invalid_shape, "x.shape[0] (BS)", concat(shape.bs),
         concat("must be <= the group's max_bs = ", s.options.max_bs));
}

// Caller output buffers: both dispatch operators return theirs in group memory. `index` is the
// operator's own (expand_idx, assist_info_for_combine).
template <class Outputs>
void refuse_dispatch_outputs(const Outputs& out, std::pair<const char*, const MutableTensorView*> index) {
  for (const auto& [name, buffer] : {std::pair<const char*, const MutableTensorView*>{"out.expand_x", &out.expand_x},
                                     {"out.dynamic_scales", &out.dynamic_scales},
                                     {"out.expand_scales", &out.expand_scales},
                                     index,
                                     {"out.expert_token_nums", &out.expert_token_nums},
                                     {"out.ep_recv_counts", &out.ep_recv_counts},
                                     {"out.tp_recv_counts", &out.tp_recv_counts}}) {
    if (buffer->present())
      fail(ErrorCode::unsupported, name, "given",
           "the CUDA backend returns its outputs in group memory (leave options.out empty)");
  }
}

// The inputs both dispatch operators take, on the group's device.
void require_dispatch_tensors(int dev, const TensorView& x, const TensorView& expert_ids, const TensorView& scales,
                              const TensorView& expert_scales) {
  require_device_tensor("x", x.data, x.numel(), dev);
  require_device_tensor("expert_ids", expert_ids.data, expert_ids.numel(), dev);
  require_device_tensor("scales", scales.data, scales.numel(), dev);
  require_device_tensor("expert_scales", expert_scales.data, expert_scales.numel(), dev);
}

// A call of a group across hosts waits for its stream between steps: a graph cannot capture it.
void refuse_capture_across_hosts(cudaStream_t stream, const char* call) {
  cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
  check_cuda(cudaStreamIsCapturing(stream, &capturing), "cudaStreamIsCapturing");
  if (capturing != cudaStreamCaptureStatusNone)
    fail(ErrorCode::unsupported, "stream", "capturing a CUDA graph",
         concat(call, " of a CUDA group across hosts waits for its stream between steps and cannot be captured"));
}

// Enqueues a dispatch whose arguments (but the output pointers) are `a`, and returns its outputs.
CudaDispatchResult run_dispatch(CudaGroup::State& s, cuda::DispatchArgs& a, const contract::CallShape& shape,
                                DType dtype, int quant_mode, bool has_expert_scales, Stream stream) {
  const contract::Topology& topo = s.topo;
  const int version = a.version;
  a.expand_idx = version == 2 ? nullptr : static_cast<std::int32_t*>(s.expand_idx_out);
  a.expert_token_nums = static_cast<std::int64_t*>(s.token_nums_out);
  a.ep_recv_counts = static_cast<std::int32_t*>(s.recv_counts_out);
  a.tp_recv_counts = topo.T == 2 ? static_cast<std::int32_t*>(s.tp_counts_out) : nullptr;
  const char* call = version == 2 ? "dispatch_v2" : "dispatch";
  require_no_pending_error(call);
  const auto st = reinterpret_cast<cudaStream_t>(stream);
  if (s.bridge) {
    refuse_capture_across_hosts(st, call);
    s.enqueue_or_break(cuda::enqueue_dispatch_records(s.dev, a, s.sort, st), call);
    s.across_hosts([&] { s.bridge->exchange_records(st); });
    s.enqueue_or_break(cuda::enqueue_dispatch_rows(s.dev, a, st), call);
    s.across_hosts([&] { s.bridge->carry_rows(a, st); });
    s.enqueue_or_break(cuda::enqueue_dispatch_finish(s.dev, a, s.mirror, st), call);
  } else {
    s.enqueue_or_break(cuda::enqueue_dispatch(s.dev, a, s.sort, s.mirror, st), call);
  }
  s.dispatched = true;
  s.combined_since_dispatch = false;
  s.last_shape = shape;
  s.last_dtype = dtype;
  s.last_quant = quant_mode;
  s.last_version = version;

  CudaDispatchResult r;
  const int me_ep = s.config.ep_rank_id;
  r.A = topo.capacity_a(me_ep, shape.bs, shape.k, version);
  // A shared-expert rank can receive more than A rows when ranks have different BS (global_bs != 0, V1);
  // the views cover every row this call can produce, as the CPU path's outputs do, so that they can be
  // read up to valid_rows and passed back to combine. The window is sized for this bound.
  const std::int64_t rows = topo.receive_rows(me_ep, shape.bs, shape.k, version) * topo.T;
  r.expand_x = matrix_view(s.window + s.off.expand_x, quant_mode == 2 ? DType::int8 : dtype, rows, shape.h);
  r.dynamic_scales = vector_view(s.window + s.off.dynamic_scales, DType::fp32, rows);
  if (has_expert_scales) r.expand_scales = vector_view(s.window + s.off.expand_scales, DType::fp32, rows);
  if (version == 2)
    r.assist_info_for_combine = vector_view(s.window + s.off.assist, DType::int32, 3 * rows);
  else
    r.expand_idx = vector_view(s.expand_idx_out, DType::int32, shape.bs * shape.k);
  r.expert_token_nums = vector_view(s.token_nums_out, DType::int64, topo.local_experts(me_ep));
  r.ep_recv_counts = vector_view(s.recv_counts_out, DType::int32, topo.ep_recv_counts_len(me_ep));
  if (topo.T == 2) r.tp_recv_counts = vector_view(s.tp_counts_out, DType::int32, 2);
  return r;
}

// Combine's pairing with the latest dispatch, as far as the host sees it.
void require_paired(const CudaGroup::State& s, const contract::CallShape& shape, DType dtype, int version) {
  if (!s.dispatched)
    fail(ErrorCode::invalid_argument, version == 2 ? "combine_v2" : "combine", "before any dispatch",
         "needs a dispatch on this group first");
  if (s.last_version != version)
    fail(ErrorCode::invalid_argument, version == 2 ? "combine_v2" : "combine",
         concat("after a V", s.last_version, " dispatch"),
         concat("pairs with ", version == 2 ? "dispatch_v2" : "dispatch", " (the latest dispatch of the group)"));
  if (s.combined_since_dispatch)
    fail(ErrorCode::invalid_argument, version == 2 ? "combine_v2" : "combine", "a second combine",
         "the CUDA backend pairs one combine with each dispatch");
  if (shape.bs != s.last_shape.bs || shape.k != s.last_shape.k || shape.h != s.last_shape.h) {
    fail(ErrorCode::invalid_shape, "expert_ids.shape / expand_x.shape[1]",
         concat("(", shape.bs, ", ", shape.k, ") / ", shape.h),
         concat("must be the latest dispatch's (", s.last_shape.bs, ", ", s.last_shape.k, ") / ", s.last_shape.h));
  }
  if (dtype != s.last_dtype)
    fail(ErrorCode::invalid_dtype, "expand_x.dtype", std::string(dtype_name(dtype)),
         concat("must be the dispatched x's dtype ", dtype_name(s.last_dtype)));
}

}  // namespace

CudaDispatchResult CudaGroup::dispatch(const TensorView& x, const TensorView& expert_ids, const DispatchOptions& o,
                                       Stream stream) {
  State& s = *state_;
  s.throw_if_failed();
  const DeviceGuard on_device(s.options.device);
  const contract::CallShape shape = contract::check_dispatch(s.config, x, expert_ids, o, contract::Values::on_device);
  refuse_token_mask(o.x_active_mask);
  require_group_shape(s, shape);
  refuse_dispatch_outputs(o.out, {"out.expand_idx", &o.out.expand_idx});
  require_dispatch_tensors(s.options.device, x, expert_ids, o.scales, o.expert_scales);
  cuda::DispatchArgs a = cuda::dispatch_args(s.topo, x, expert_ids, o, shape);
  return run_dispatch(s, a, shape, x.dtype, o.quant_mode, o.expert_scales.present(), stream);
}

CudaDispatchResult CudaGroup::dispatch_v2(const TensorView& x, const TensorView& expert_ids, const DispatchV2Options& o,
                                          Stream stream) {
  State& s = *state_;
  s.throw_if_failed();
  const DeviceGuard on_device(s.options.device);
  contract::EntryMask mask;
  contract::SpecialExperts experts;
  const contract::CallShape shape =
      contract::check_dispatch_v2(s.config, x, expert_ids, o, &mask, &experts, contract::Values::on_device);
  require_group_shape(s, shape);
  refuse_dispatch_outputs(o.out, {"out.assist_info_for_combine", &o.out.assist_info_for_combine});
  const int dev = s.options.device;
  require_dispatch_tensors(dev, x, expert_ids, o.scales, o.expert_scales);
  require_device_tensor("x_active_mask", o.x_active_mask.data, o.x_active_mask.numel(), dev);
  require_device_tensor("performance_info", o.performance_info.data, o.performance_info.numel(), dev);
  cuda::DispatchArgs a = cuda::dispatch_args_v2(s.topo, x, expert_ids, o, shape);
  CudaDispatchResult r = run_dispatch(s, a, shape, x.dtype, o.quant_mode, o.expert_scales.present(), stream);
  s.last_special = a.special;
  s.last_mask_ndim = o.x_active_mask.ndim;
  return r;
}

MutableTensorView CudaGroup::combine_buffer(DType dtype) {
  State& s = *state_;
  if (s.topo.T == 2 || (dtype != DType::bf16 && dtype != DType::fp16)) return {};
  return matrix_view(s.window + s.off.combine_rows, dtype, s.off.receive_rows, s.options.h, static_cast<std::int64_t>(s.off.combine_pitch / 2));
}

namespace {

// What both combine operators share after their own checks: where expand_x is (the combine buffer, read
// in place, or other memory staged into the window), the output, the enqueue.
TensorView run_combine(CudaGroup& group, CudaGroup::State& s, cuda::CombineArgs& a, const TensorView& expand_x,
                       const MutableTensorView& caller_out, int comm_quant_mode, const contract::CallShape& shape,
                       Stream stream) {
  const MutableTensorView in_window = group.combine_buffer(expand_x.dtype);
  a.staged_in_place = comm_quant_mode == 0 && in_window.present() && expand_x.data == in_window.data &&
                      expand_x.strides[0] == in_window.strides[0] && expand_x.strides[1] == 1;
  const auto* x_begin = static_cast<const std::byte*>(expand_x.data);
  const std::byte* region = s.window + s.off.combine_rows;
  if (!a.staged_in_place && x_begin >= region &&
      x_begin < region + s.off.receive_rows * static_cast<std::int64_t>(s.off.combine_pitch)) {
    fail(ErrorCode::invalid_argument, "expand_x", "a view of combine_buffer()",
         comm_quant_mode == 2
             ? "cannot be staged in place with comm_quant_mode 2 (quantization rewrites those rows): pass it from "
               "other memory"
             : "must be exactly combine_buffer(dtype) (same start and row stride) when it lies in it");
  }
  if (caller_out.present() && shape.bs > 0) {  // the source ranks read the window while this rank writes out
    const auto* first = static_cast<const std::byte*>(caller_out.data);
    const std::byte* last =
        first + ((shape.bs - 1) * caller_out.strides[0] + (shape.h - 1) * caller_out.strides[1] + 1) * 2;
    if (first < s.window + s.off.total && last > s.window) {
      fail(ErrorCode::invalid_argument, "out", "a view of the group's window",
           "must not lie in the group's window (peers read it during combine)");
    }
  }
  MutableTensorView out =
      caller_out.present() ? caller_out : matrix_view(s.combine_out, expand_x.dtype, shape.bs, shape.h);
  a.out = static_cast<std::uint16_t*>(out.data);
  a.out_row_stride = out.strides[0];
  a.out_col_stride = out.strides[1];
  const char* call = a.version == 2 ? "combine_v2" : "combine";
  require_no_pending_error(call);
  const auto st = reinterpret_cast<cudaStream_t>(stream);
  if (s.bridge) {
    refuse_capture_across_hosts(st, call);
    s.enqueue_or_break(cuda::enqueue_combine_front(s.dev, a, st), call);
    s.across_hosts([&] { s.bridge->carry_combine_rows(a, st); });
    s.enqueue_or_break(cuda::enqueue_combine_back(s.dev, a, s.mirror, st), call);
  } else {
    s.enqueue_or_break(cuda::enqueue_combine(s.dev, a, s.mirror, st), call);
  }
  s.combined_since_dispatch = true;
  return out;
}

}  // namespace

TensorView CudaGroup::combine(const TensorView& expand_x, const TensorView& expert_ids, const TensorView& expand_idx,
                              const TensorView& ep_send_counts, const TensorView& expert_scales, const CombineOptions& o, Stream stream) {
  State& s = *state_;
  s.throw_if_failed();
  const DeviceGuard on_device(s.options.device);
  contract::CombineCounts counts;
  const contract::CallShape shape =
      contract::check_combine(s.config, expand_x, expert_ids, expand_idx, ep_send_counts, expert_scales, o, &counts, contract::Values::on_device);
  refuse_token_mask(o.x_active_mask);
  // The kernels read expand_idx through one stride: a (BS, K) view must be flat in memory. (Its extents
  // multiply to BS * K without overflow: check_combine saw to it; a stride times them still may not.)
  std::int64_t row_span = 0;
  if (expand_idx.ndim == 2 && expand_idx.numel() > 0 && expand_idx.shape[0] > 1 &&
      (__builtin_mul_overflow(expand_idx.shape[1], expand_idx.strides[1], &row_span) ||
       expand_idx.strides[0] != row_span))
    fail(ErrorCode::unsupported, "expand_idx.stride()",
         concat("(", expand_idx.strides[0], ", ", expand_idx.strides[1], ")"),
         "a 2-D expand_idx must be row-major without gaps between rows on the CUDA backend (pass a contiguous one)");
  require_paired(s, shape, expand_x.dtype, 1);
  const int dev = s.options.device;
  require_device_tensor("expand_x", expand_x.data, expand_x.numel(), dev);
  require_device_tensor("expert_ids", expert_ids.data, expert_ids.numel(), dev);
  require_device_tensor("expand_idx", expand_idx.data, expand_idx.numel(), dev);
  require_device_tensor("ep_send_counts", ep_send_counts.data, ep_send_counts.numel(), dev);
  require_device_tensor("expert_scales", expert_scales.data, expert_scales.numel(), dev);
  require_device_tensor("tp_send_counts", o.tp_send_counts.data, o.tp_send_counts.numel(), dev);
  require_device_tensor("out", o.out.data, o.out.numel(), dev);
  cuda::CombineArgs a = cuda::combine_args(expand_x, expert_ids, expand_idx, ep_send_counts, expert_scales, o, shape);
  return run_combine(*this, s, a, expand_x, o.out, o.comm_quant_mode, shape, stream);
}

TensorView CudaGroup::combine_v2(const TensorView& expand_x, const TensorView& expert_ids, const TensorView& assist,
                                 const TensorView& ep_send_counts, const TensorView& expert_scales,
                                 const CombineV2Options& o, Stream stream) {
  State& s = *state_;
  s.throw_if_failed();
  const DeviceGuard on_device(s.options.device);
  contract::CombineCounts counts;
  contract::EntryMask mask;
  contract::SpecialExperts experts;
  const contract::CallShape shape =
      contract::check_combine_v2(s.config, expand_x, expert_ids, assist, ep_send_counts, expert_scales, o, &counts,
                                 &mask, &experts, contract::Values::on_device);
  require_paired(s, shape, expand_x.dtype, 2);
  const cuda::SpecialIds special{o.zero_expert_num, o.copy_expert_num, o.const_expert_num};
  if (special.zero != s.last_special.zero || special.copy != s.last_special.copy ||
      special.constant != s.last_special.constant)
    fail(ErrorCode::invalid_argument, "zero_expert_num, copy_expert_num, const_expert_num",
         concat(special.zero, ", ", special.copy, ", ", special.constant),
         concat("must be the latest dispatch_v2's (", s.last_special.zero, ", ", s.last_special.copy, ", ",
                s.last_special.constant, ")"));
  if (o.x_active_mask.ndim != s.last_mask_ndim)
    fail(ErrorCode::invalid_argument, "x_active_mask", contract::shape_text(o.x_active_mask),
         concat("must be the latest dispatch_v2's x_active_mask (",
                s.last_mask_ndim == 0 ? "None" : concat(s.last_mask_ndim, "-D"), ")"));
  const int dev = s.options.device;
  for (const auto& [name, t] : {std::pair<const char*, const TensorView*>{"expand_x", &expand_x},
                                {"expert_ids", &expert_ids},
                                {"assist_info_for_combine", &assist},
                                {"ep_send_counts", &ep_send_counts},
                                {"expert_scales", &expert_scales},
                                {"tp_send_counts", &o.tp_send_counts},
                                {"x_active_mask", &o.x_active_mask},
                                {"ori_x", &o.ori_x},
                                {"shared_expert_x", &o.shared_expert_x},
                                {"const_expert_alpha_1", &o.const_expert_alpha_1},
                                {"const_expert_alpha_2", &o.const_expert_alpha_2},
                                {"const_expert_v", &o.const_expert_v}}) {
    require_device_tensor(name, t->data, t->numel(), dev);
  }
  require_device_tensor("performance_info", o.performance_info.data, o.performance_info.numel(), dev);
  require_device_tensor("out", o.out.data, o.out.numel(), dev);
  cuda::CombineArgs a = cuda::combine_args_v2(expand_x, expert_ids, assist, ep_send_counts, expert_scales, o, shape);
  return run_combine(*this, s, a, expand_x, o.out, o.comm_quant_mode, shape, stream);
}

void CudaGroup::synchronize(Stream stream) {
  const DeviceGuard on_device(state_->options.device);
  check_cuda(cudaStreamSynchronize(reinterpret_cast<cudaStream_t>(stream)), "cudaStreamSynchronize");
  // The calls' copies into the mirror ran on this stream (all calls of a group use one stream): done now.
  std::memcpy(&state_->seen, state_->mirror, sizeof(state_->seen));
  state_->throw_if_failed();
}

void CudaGroup::check() const { state_->throw_if_failed(); }

std::int64_t CudaGroup::last_valid_rows() const { return state_->seen.valid_rows; }

CudaHostTraffic CudaGroup::last_host_traffic() const {
  return state_->bridge ? state_->bridge->traffic() : CudaHostTraffic{};
}

}  // namespace moedist::cuda
