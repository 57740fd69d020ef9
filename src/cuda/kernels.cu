// The CUDA kernels of dispatch and combine. One call is a short chain of kernels on one stream:
//
//   dispatch: begin -> check ids -> sort ids (CUB, stable) -> expand_idx + per-expert counts
//             -> publish the count record to every rank -> layout (wait for all records, check them,
//                compute where this rank's blocks land and the outputs) -> rows (gather + quantize, each
//                row written straight into its receiver's window, and into the receiver's TP peer)
//             -> finish (signal, then wait until every rank wrote its rows)
//   combine:  begin -> check against the dispatch handle -> [TP: send partial rows to the TP peer]
//             -> stage (TP reduce, comm quantization) into this rank's window -> signal and wait
//             -> weighted gather-reduce reading the expert rows from the holders' windows
//
// Ranks meet through flag words in their windows ((seq << 1) | failed); every wait has a timeout on the
// GPU's global timer. Every kernel returns early once the rank's status holds an error, and every
// signal is still sent (with the failed bit), so peers stop waiting instead of timing out.
// The arithmetic is src/cuda/row_math.h, the same fp32 operation order as the oracle.
#if !defined(MOEDIST_CUDA_EMULATION)  // tests/cuda_emulation/host_cuda.h stands in for CUDA on the CPU
#include <cub/cub.cuh>
#define MOEDIST_LAUNCH(kernel, grid, threads, dynamic_bytes, stream) kernel<<<grid, threads, dynamic_bytes, stream>>>
#endif

#include <algorithm>
#include <chrono>

#include "cuda/kernels.h"
#include "cuda/protocol.h"

namespace moedist::cuda {
namespace {

__device__ __forceinline__ std::uint64_t global_timer_ns() {
#if defined(__CUDA_ARCH__)
  std::uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
#else
  return static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count());
#endif
}
__device__ __forceinline__ std::uint64_t load_acquire(const std::uint64_t* p) {
#if defined(__CUDA_ARCH__)
  std::uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
#else
  return __atomic_load_n(p, __ATOMIC_ACQUIRE);
#endif
}
__device__ __forceinline__ void store_release(std::uint64_t* p, std::uint64_t v) {
#if defined(__CUDA_ARCH__)
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
#else
  __atomic_store_n(p, v, __ATOMIC_RELEASE);
#endif
}

// Waits until `flag` signals call `seq` or the timeout passes after `start` (global timer, ns: when the
// waiting thread began to poll). Every rank waits for its peers to arrive, a failed one too, so that no
// rank runs a call ahead of a peer and rewrites what the peer still reads; only a rank that already timed
// out (a peer is gone) stops waiting. What it sees is recorded as the rank's error unless it has one: a
// failed peer, a flag of another call, a timeout. With `perf` (V2 performance_info) the time from `start`
// to the poll that saw the flag raises the peer's EP rank's entry, in µs (V2 §5.1).
__device__ bool wait_flag(const DeviceGroup& g, const std::uint64_t* flag, std::uint64_t seq, std::uint64_t start, int peer, Phase phase,
                          const PerfOut& perf = {}) {
  const std::uint64_t deadline = start + static_cast<std::uint64_t>(g.timeout_ns);
  for (;;) {
    const std::uint64_t v = load_acquire(flag);
    if ((v >> 1) >= seq) {
      const std::uint64_t now = global_timer_ns();
      record_wait(perf, peer / g.T, now > start ? now - start : 0);
      if ((v >> 1) != seq) {
        record_failure(g.status, ErrorCode::protocol, peer, phase, Rule::out_of_step, 0, static_cast<std::int64_t>(v >> 1), static_cast<std::int64_t>(seq));
        return false;
      }
      if ((v & 1u) != 0) {
        record_failure(g.status, ErrorCode::peer_failed, peer, phase, Rule::peer_failed);
        return false;
      }
      return true;
    }
    if (status_code(g.status) == static_cast<std::int32_t>(ErrorCode::timeout)) return false;
    if (global_timer_ns() > deadline) {
      record_failure(g.status, ErrorCode::timeout, peer, phase, Rule::timeout, 0, 0, g.timeout_ns / 1000000);
      return false;
    }
    __nanosleep(200);
  }
}


// Loads and stores of 8-element chunks: 16-byte vectors when rows are contiguous and aligned (VEC),
// element by element otherwise. Both give the same values.
template <bool VEC>
__device__ __forceinline__ void load_half8(const std::uint16_t* row, std::int64_t col_stride, std::int64_t i0, int n, std::uint16_t v[kChunk]) {
  if constexpr (VEC) {
    const uint4 raw = *reinterpret_cast<const uint4*>(row + i0);
    memcpy(v, &raw, 16);
  } else {
    for (int u = 0; u < kChunk; ++u) v[u] = u < n ? row[(i0 + u) * col_stride] : 0;
  }
}
template <bool VEC>
__device__ __forceinline__ void store_half8(std::uint16_t* row, std::int64_t col_stride, std::int64_t i0, int n, const std::uint16_t v[kChunk]) {
  if constexpr (VEC) {
    uint4 raw;
    memcpy(&raw, v, 16);
    *reinterpret_cast<uint4*>(row + i0) = raw;
  } else {
    for (int u = 0; u < n; ++u) row[(i0 + u) * col_stride] = v[u];
  }
}
template <bool VEC>
__device__ __forceinline__ void store_int8x8(std::int8_t* row, std::int64_t i0, int n, const std::int8_t q[kChunk]) {
  if constexpr (VEC) {
    uint2 raw;
    memcpy(&raw, q, 8);
    *reinterpret_cast<uint2*>(row + i0) = raw;
  } else {
    for (int u = 0; u < n; ++u) row[i0 + u] = q[u];
  }
}
template <bool VEC>
__device__ __forceinline__ void load_int8x8(const std::int8_t* row, std::int64_t i0, int n, std::int8_t q[kChunk]) {
  if constexpr (VEC) {
    const uint2 raw = *reinterpret_cast<const uint2*>(row + i0);
    memcpy(q, &raw, 8);
  } else {
    for (int u = 0; u < kChunk; ++u) q[u] = u < n ? row[i0 + u] : 0;
  }
}

// A thread's chunk of a row: the one it holds in registers (`one_chunk`: a thread per chunk), else loaded.
template <bool VEC>
__device__ __forceinline__ void chunk_of_row(bool one_chunk, const std::uint16_t held[kChunk], const std::uint16_t* row,
                                             std::int64_t col_stride, std::int64_t i0, int n, std::uint16_t v[kChunk]) {
  if (one_chunk) {
    for (int u = 0; u < kChunk; ++u) v[u] = held[u];
  } else {
    load_half8<VEC>(row, col_stride, i0, n, v);
  }
}

// Block-wide max (exact in any order: a max of floats rounds nothing).
__device__ float block_max(float v, float* shared /* [32] */) {
  for (int o = 16; o > 0; o >>= 1) v = max_ignoring_nan(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // `shared` may still be read from the previous reduction
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  float m = 0.0f;
  const int warps = (blockDim.x + 31) / 32;
  for (int w = 0; w < warps; ++w) m = max_ignoring_nan(m, shared[w]);
  return m;
}

__device__ std::int64_t thread_index() { return blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; }
__device__ void mark_lowest(Status* st, std::uint64_t mark) {
  atomicMin(reinterpret_cast<unsigned long long*>(&st->first_bad_entry), static_cast<unsigned long long>(mark));
}

// The block's K + 1 targets live in dynamic shared memory (targets_bytes(K) at launch), so small K
// leaves room for more blocks per multiprocessor.
__device__ Target* shared_targets() {
#if defined(MOEDIST_CUDA_EMULATION)
  return reinterpret_cast<Target*>(emu::block.dynamic_shared);
#else
  extern __shared__ __align__(16) unsigned char dynamic_shared[];
  return reinterpret_cast<Target*>(dynamic_shared);
#endif
}
std::size_t targets_bytes(std::int64_t k) {
  return static_cast<std::size_t>(k + kMaxSharedExperts + 1) * std::max(sizeof(Target), sizeof(TermV2));
}

// Token b's targets (protocol.h call_target), thread j finding target j, shared with the block.
template <class Args>
__device__ int block_targets(const DeviceGroup& g, const Args& a, std::int64_t b, Target* targets) {
  const int count = target_count(g, a.k, a.version);
  for (int j = threadIdx.x; j < count; j += blockDim.x) targets[j] = call_target(g, a, b, j);
  __syncthreads();
  return count;
}

// ---------------------------------------------------------------------------------------------
// Dispatch

__global__ void begin_call(DeviceGroup g) {
  g.status->seq += 1;
  g.status->first_bad_entry = ~std::uint64_t{0};
}

// ids in range and distinct per row; the sort input and the handle's copy of the ids.
__global__ void check_dispatch_ids(DeviceGroup g, DispatchArgs a) {
  const std::int64_t b = thread_index();
  if (b >= a.bs || status_failed(g.status)) return;
  for (std::int64_t j = 0; j < a.k; ++j) {
    const std::int64_t t = b * a.k + j;
    const std::int32_t e = a.ids[b * a.ids_row_stride + j * a.ids_col_stride];
    const bool bad = id_is_bad(g, a, b, j);
    if (bad) mark_lowest(g.status, static_cast<std::uint64_t>(t));
    g.sort_keys_in[t] = bad ? 0 : e;
    g.sort_vals_in[t] = static_cast<std::int32_t>(t);
    g.dispatch_ids[t] = e;
  }
}

// V2: token b's activity, its entries' sort keys and states, and the rules of its mask and ids.
__global__ void check_dispatch_ids_v2(DeviceGroup g, DispatchArgs a) {
  const std::int64_t b = thread_index();
  if (b >= a.bs || status_failed(g.status)) return;
  const std::uint64_t mark = classify_token_v2(g, a, b);
  if (mark != kNoMark) mark_lowest(g.status, mark);
}

// V2: numbers the active tokens (their rows on the shared-expert ranks) in one block: each thread counts
// a range of tokens, thread 0 sums the counts, each thread numbers its range from there.
__global__ void __launch_bounds__(1024) number_active_tokens(DeviceGroup g, DispatchArgs a) {
  __shared__ std::int64_t before[1024];
  const std::int64_t per = (a.bs + blockDim.x - 1) / blockDim.x;
  const std::int64_t first = threadIdx.x * per;
  const std::int64_t begin = first < a.bs ? first : a.bs, end = begin + per < a.bs ? begin + per : a.bs;
  std::int64_t mine = 0;
  for (std::int64_t b = begin; b < end; ++b) mine += g.token_slot[b];
  before[threadIdx.x] = mine;
  __syncthreads();
  if (threadIdx.x == 0) {
    std::int64_t running = 0;
    for (unsigned t = 0; t < blockDim.x; ++t) {
      const std::int64_t n = before[t];
      before[t] = running;
      running += n;
    }
    g.status->active_tokens = running;
  }
  __syncthreads();
  number_tokens(g.token_slot, begin, end, before[threadIdx.x]);
}

// After the sort, one launch for both: thread p < BS*K gives entry p its expand_idx (its position in the
// stably sorted run of its expert), thread e < E counts expert e's entries.
__global__ void index_and_count(DeviceGroup g, DispatchArgs a) {
  const std::int64_t n = a.bs * a.k, p = thread_index();
  if (p < g.E) {
    const auto key = static_cast<std::int32_t>(p);
    g.expert_counts[p] = static_cast<std::int32_t>(lower_bound(g.sort_keys_out, n, key + 1) - lower_bound(g.sort_keys_out, n, key));
  }
  if (p >= n || status_failed(g.status) || g.status->first_bad_entry != ~std::uint64_t{0}) return;
  const std::int32_t e = g.sort_keys_out[p];
  if (e >= g.E) return;  // V2: an entry that is not sent (its state is set already)
  g.dispatch_expand_idx[g.sort_vals_out[p]] = static_cast<std::int32_t>(p - lower_bound(g.sort_keys_out, n, e));
}

// The count record goes into slot [me] of every rank's inbox, then the count flag.
__global__ void publish_record(DeviceGroup g, DispatchArgs a) {
  const bool v2 = a.version == 2;
  if (threadIdx.x == 0 && g.status->first_bad_entry != kNoMark) {
    if (v2) report_dispatch_mark_v2(g, a, g.status->first_bad_entry);
    else report_bad_id(g, a, g.status->first_bad_entry);
  }
  __syncthreads();
  const bool failed = status_failed(g.status);
  const std::uint64_t seq = status_seq(g.status);
  const int entries = g.W * g.L;
  const std::int64_t active = v2 ? g.status->active_tokens : a.bs;
  for (int i = threadIdx.x; i < entries; i += blockDim.x) g.record[i] = failed ? 0 : v2 ? record_entry_v2(g, active, i) : record_entry(g, a.bs, i);
  __syncthreads();
  const RecordHeader header = record_header_of(a, failed, active);
  for (int r = 0; r < g.world; ++r) {
    if (!on_this_host(g, r)) continue;  // the host sends it there (cuda_group.cpp)
    std::byte* slot = inbox_slot(g, r, g.me);
    if (threadIdx.x == 0) *reinterpret_cast<RecordHeader*>(slot) = header;
    auto* counts = reinterpret_cast<std::int32_t*>(slot + sizeof(RecordHeader));
    for (int i = threadIdx.x; i < entries; i += blockDim.x) counts[i] = g.record[i];
  }
  __threadfence_system();
  __syncthreads();
  for (int r = threadIdx.x; r < g.world; r += blockDim.x) {
    if (on_this_host(g, r)) store_release(flag_at(g, r, g.off.count_flags, g.me), flag_word(seq, failed));
  }
}

__global__ void plan_layout(DeviceGroup g, DispatchArgs a) {
  __shared__ int any_failed;
  const std::uint64_t seq = status_seq(g.status), start = global_timer_ns();
  for (int r = threadIdx.x; r < g.world; r += blockDim.x) wait_flag(g, flag_at(g, g.me, g.off.count_flags, r), seq, start, r, Phase::dispatch_counts, a.perf);
  __syncthreads();
  for (int r = threadIdx.x; r < g.world && !status_failed(g.status); r += blockDim.x) check_record(g, a, r);
  __syncthreads();
  if (threadIdx.x == 0) any_failed = status_failed(g.status);
  __syncthreads();
  if (any_failed) return;
  for (int d = threadIdx.x; d < g.W; d += blockDim.x) plan_destination(g, a, d);
  __syncthreads();
  if (threadIdx.x == 0 && !status_failed(g.status)) plan_outputs(g, a);
}

// One block per token: gather the row once, quantize it (once, or per target with smooth scales), and
// write it into every target's window (and the target's TP peer's).
// Two blocks per multiprocessor (32 registers): a memory-bound kernel wants the occupancy more than the
// 16 bytes of register spill this costs (to L1); the GPU session's resource report and benchmark decide.
template <bool VEC>
__global__ void __launch_bounds__(1024, 2) write_rows(DeviceGroup g, DispatchArgs a) {
  __shared__ float reduce_scratch[32];
  Target* targets = shared_targets();
  if (status_failed(g.status)) return;
  const std::int64_t b = blockIdx.x;
  const std::uint16_t* x = a.x + b * a.x_row_stride;
  const std::int64_t chunks = chunks_of(a.h);
  // When each thread has one chunk (H <= 8 * 1024) it loads it now, while the targets are being found,
  // and keeps it in registers: x is read once.
  const bool one_chunk = chunks <= static_cast<std::int64_t>(blockDim.x);
  std::uint16_t held[kChunk] = {};
  if (one_chunk && threadIdx.x < chunks) {
    const std::int64_t i0 = threadIdx.x * static_cast<std::int64_t>(kChunk);
    load_half8<VEC>(x, a.x_col_stride, i0, VEC ? kChunk : chunk_len(a.h, i0), held);
  }
  const int n_targets = block_targets(g, a, b, targets);
  const int copies = g.T == 2 ? 2 : 1;
  const bool bf16 = a.bf16 != 0;
  // The caller's expand_idx (V1), written only now that every rank's checks passed.
  if (a.expand_idx != nullptr) {
    for (std::int64_t j = threadIdx.x; j < a.k; j += blockDim.x) a.expand_idx[b * a.k + j] = g.dispatch_expand_idx[b * a.k + j];
  }
  // V2: a token sends nothing for its masked entries and special experts (targets with ep -1), and
  // nothing at all when it does not take part; each row it sends carries its triple.
  bool any = false;
  for (int i = 0; i < n_targets; ++i) any = any || targets[i].ep >= 0;
  if (!any) return;
  if (a.version == 2) {
    for (int i = threadIdx.x; i < n_targets; i += blockDim.x) {
      if (targets[i].ep >= 0) write_triple(g, targets[i], b);
    }
  }
  if (a.expert_scales != nullptr) {
    for (int slot = threadIdx.x; slot < n_targets * copies; slot += blockDim.x) {
      const int i = slot / copies;
      std::byte* at = targets[i].ep < 0 ? nullptr : target_row(g, targets[i], slot % copies, g.off.expand_scales, sizeof(float));
      if (at != nullptr) *reinterpret_cast<float*>(at) = targets[i].weight;
    }
  }
  if (a.quant == 0) {
    for (std::int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
      const std::int64_t i0 = c * kChunk;
      const int n = VEC ? kChunk : chunk_len(a.h, i0);  // VEC: H is a multiple of the chunk
      std::uint16_t v[kChunk];
      chunk_of_row<VEC>(one_chunk, held, x, a.x_col_stride, i0, n, v);
      for (int slot = 0; slot < n_targets * copies; ++slot) {
        if (targets[slot / copies].ep < 0) continue;
        std::byte* row = target_row(g, targets[slot / copies], slot % copies, g.off.expand_x, static_cast<std::size_t>(a.h) * 2);
        if (row != nullptr) store_half8<VEC>(reinterpret_cast<std::uint16_t*>(row), 1, i0, n, v);
      }
    }
  } else {
    // Without smooth scales every target gets the same int8 row: quantize once. With them, per target.
    const bool per_target = a.scales != nullptr;
    for (int first = 0; first < n_targets; first += per_target ? 1 : n_targets) {
      if (per_target && targets[first].ep < 0) continue;  // the same for every thread: the targets are shared
      const float* smooth = per_target ? a.scales + targets[first].smooth_row * a.scales_row_stride : nullptr;
      const int last = per_target ? first + 1 : n_targets;
      float amax = 0.0f;
      for (std::int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
        const std::int64_t i0 = c * kChunk;
        std::uint16_t v[kChunk];
        const int n = VEC ? kChunk : chunk_len(a.h, i0);
        chunk_of_row<VEC>(one_chunk, held, x, a.x_col_stride, i0, n, v);
        amax = chunk_amax(bf16, v, n, smooth, i0, amax);
      }
      amax = block_max(amax, reduce_scratch);
      const float ds = quant_ds(amax);
      for (int slot = threadIdx.x; slot < (last - first) * copies; slot += blockDim.x) {
        if (targets[first + slot / copies].ep < 0) continue;
        std::byte* at = target_row(g, targets[first + slot / copies], slot % copies, g.off.dynamic_scales, sizeof(float));
        if (at != nullptr) *reinterpret_cast<float*>(at) = quant_scale_out(ds);
      }
      for (std::int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
        const std::int64_t i0 = c * kChunk;
        const int n = VEC ? kChunk : chunk_len(a.h, i0);  // VEC: H is a multiple of the chunk
        std::uint16_t v[kChunk];
        chunk_of_row<VEC>(one_chunk, held, x, a.x_col_stride, i0, n, v);
        std::int8_t q[kChunk];
        quantize_chunk(bf16, v, n, smooth, i0, ds, q);
        for (int slot = first * copies; slot < last * copies; ++slot) {
          if (targets[slot / copies].ep < 0) continue;
          std::byte* row = target_row(g, targets[slot / copies], slot % copies, g.off.expand_x, static_cast<std::size_t>(a.h));
          if (row != nullptr) store_int8x8<VEC>(reinterpret_cast<std::int8_t*>(row), i0, n, q);
        }
      }
    }
  }
  __threadfence_system();
}

// Whether this rank had failed when the block began, read once for all its threads: a thread that read
// it after another thread saw a peer's failure while waiting would signal that failure as this rank's
// own, and its peers would name this rank instead of the one that failed.
__device__ bool failed_before_waiting(const DeviceGroup& g) {
  __shared__ int failed;
  if (threadIdx.x == 0) failed = status_failed(g.status) ? 1 : 0;
  __syncthreads();
  return failed != 0;
}

// Signals "my rows of this call are written" to every rank, then waits for every rank's rows.
__global__ void finish_dispatch(DeviceGroup g, PerfOut perf) {
  const std::uint64_t seq = status_seq(g.status);
  const bool failed = failed_before_waiting(g);
  __threadfence_system();
  for (int r = threadIdx.x; r < g.world; r += blockDim.x) {
    if (on_this_host(g, r)) store_release(flag_at(g, r, g.off.rows_flags, g.me), flag_word(seq, failed));
  }
  // A rank of another host: its proxy here raised its flag after writing its rows (raise_flags).
  const std::uint64_t start = global_timer_ns();
  for (int r = threadIdx.x; r < g.world; r += blockDim.x) wait_flag(g, flag_at(g, g.me, g.off.rows_flags, r), seq, start, r, Phase::dispatch_rows, perf);
}

// ---------------------------------------------------------------------------------------------
// Combine

__global__ void check_combine_args(DeviceGroup g, CombineArgs a) {
  const std::int64_t t = thread_index();
  if (t >= a.bs * a.k || status_failed(g.status)) return;
  const std::uint64_t mark = combine_entry_mark(g, a, t);
  if (mark != 0) mark_lowest(g.status, mark);
}

__global__ void finish_combine_checks(DeviceGroup g, CombineArgs a) {
  if (!status_failed(g.status)) report_combine_args(g, a, g.status->first_bad_entry);
}

// TP: this rank's outputs for the peer's rows (rows own..own+peer of expand_x) go to the peer's inbox.
template <bool VEC>
__global__ void __launch_bounds__(1024) send_tp_partials(DeviceGroup g, CombineArgs a) {
  if (status_failed(g.status)) return;
  const std::int64_t own = g.status->own_rows, peer = g.status->peer_rows;
  auto* inbox = reinterpret_cast<std::uint16_t*>(g.windows[global_rank(g, g.ep_rank, 1 - g.tp_rank)] + g.off.tp_inbox);
  const std::int64_t chunks = chunks_of(a.h);
  for (std::int64_t row = blockIdx.x; row < peer; row += gridDim.x) {
    const std::uint16_t* src = a.expand_x + (own + row) * a.expand_x_row_stride;
    for (std::int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
      const std::int64_t i0 = c * kChunk;
      const int n = VEC ? kChunk : chunk_len(a.h, i0);
      std::uint16_t v[kChunk];
      load_half8<VEC>(src, a.expand_x_col_stride, i0, n, v);
      store_half8<VEC>(inbox + row * a.h, 1, i0, n, v);
    }
  }
  __threadfence_system();
}

__global__ void signal_tp_peer(DeviceGroup g) {
  __threadfence_system();
  store_release(flag_at(g, global_rank(g, g.ep_rank, 1 - g.tp_rank), g.off.tp_flag, 0), flag_word(status_seq(g.status), status_failed(g.status)));
}

// T = 2: waits, in one thread of one block, for the TP peer's partial rows. (Waiting in every block of
// stage_rows could fill the GPU with spinning blocks while the peer's kernels need it.)
__global__ void wait_tp_peer(DeviceGroup g, PerfOut perf) {
  if (threadIdx.x == 0) {
    wait_flag(g, flag_at(g, g.me, g.off.tp_flag, 0), status_seq(g.status), global_timer_ns(), global_rank(g, g.ep_rank, 1 - g.tp_rank),
              Phase::combine_tp, perf);
  }
}

// Stages this rank's own rows where the source ranks read them: TP-reduced (T == 2), and quantized
// in groups of 8 with comm_quant_mode 2.
template <bool VEC>
__global__ void __launch_bounds__(1024) stage_rows(DeviceGroup g, CombineArgs a) {
  if (status_failed(g.status)) return;
  const std::int64_t own = g.status->own_rows;
  const bool bf16 = a.bf16 != 0;
  const std::int64_t chunks = chunks_of(a.h);
  const auto* inbox = reinterpret_cast<const std::uint16_t*>(g.windows[g.me] + g.off.tp_inbox);
  for (std::int64_t row = blockIdx.x; row < own; row += gridDim.x) {
    const std::uint16_t* src = a.expand_x + row * a.expand_x_row_stride;
    std::byte* dst = g.windows[g.me] + g.off.combine_rows + static_cast<std::size_t>(row) * g.off.combine_pitch;
    for (std::int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
      const std::int64_t i0 = c * kChunk;
      const int n = VEC ? kChunk : chunk_len(a.h, i0);  // VEC: H is a multiple of the chunk
      std::uint16_t y[kChunk], partner[kChunk];
      load_half8<VEC>(src, a.expand_x_col_stride, i0, n, y);
      if (g.T == 2) load_half8<VEC>(inbox + row * a.h, 1, i0, n, partner);
      std::int8_t q[kChunk];
      stage_chunk(bf16, a.comm_quant == 2, y, g.T == 2 ? partner : nullptr, n, a.h, c, dst, q, a.version == 2);
      if (a.comm_quant == 2) store_int8x8<VEC>(reinterpret_cast<std::int8_t*>(dst), i0, n, q);
      else store_half8<VEC>(reinterpret_cast<std::uint16_t*>(dst), 1, i0, n, y);
    }
  }
  __threadfence_system();
}

// Signals "my rows are staged" to the ranks of this EP group, then waits for all of them.
__global__ void exchange_combine_flags(DeviceGroup g, PerfOut perf) {
  const std::uint64_t seq = status_seq(g.status);
  const bool failed = failed_before_waiting(g);
  __threadfence_system();
  for (int d = threadIdx.x; d < g.W; d += blockDim.x) {
    const int r = global_rank(g, d, g.tp_rank);
    if (on_this_host(g, r)) store_release(flag_at(g, r, g.off.combine_flags, g.me), flag_word(seq, failed));
  }
  if (threadIdx.x == 0) g.status->combine_signalled_failed = failed ? 1 : 0;  // for the ranks of other hosts
  // Rows of other hosts' ranks come through their proxies after this exchange (remote_rows).
  const std::uint64_t start = global_timer_ns();
  for (int d = threadIdx.x; d < g.W; d += blockDim.x) {
    const int r = global_rank(g, d, g.tp_rank);
    if (on_this_host(g, r)) wait_flag(g, flag_at(g, g.me, g.off.combine_flags, r), seq, start, r, Phase::combine_rows, perf);
  }
}

// Chunk c (n elements) of row `row` staged in EP rank ep's combine region (this lane), in 16-bit form:
// the stored values, or (comm_quant_mode 2) the dequantized int8 ones.
template <bool VEC>
__device__ __forceinline__ void load_staged_chunk(const DeviceGroup& g, const CombineArgs& a, int ep, std::int64_t row, std::int64_t b,
                                                  std::int64_t slot, std::int64_t c, int n, std::uint16_t y[kChunk]) {
  const std::byte* at = staged_row(g, ep, row, b, slot);
  const std::int64_t i0 = c * kChunk;
  if (a.comm_quant == 2) {
    std::int8_t q[kChunk];
    load_int8x8<VEC>(reinterpret_cast<const std::int8_t*>(at), i0, n, q);
    dequantize_chunk(a.bf16 != 0, q, reinterpret_cast<const std::uint16_t*>(at + comm_scales_offset(a.h))[c], y);
  } else {
    load_half8<VEC>(reinterpret_cast<const std::uint16_t*>(at), 1, i0, n, y);
  }
}

// One block per token: acc = sum_k float(y_k) * w_k in k order, + the shared expert's row, then rounded.
template <bool VEC>
__global__ void __launch_bounds__(1024) reduce_tokens(DeviceGroup g, CombineArgs a) {
  Target* targets = shared_targets();
  if (status_failed(g.status)) return;
  const std::int64_t b = blockIdx.x;
  const int n_targets = block_targets(g, a, b, targets);
  const bool bf16 = a.bf16 != 0;
  const std::int64_t chunks = chunks_of(a.h);
  for (std::int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
    const std::int64_t i0 = c * kChunk;
    const int n = VEC ? kChunk : chunk_len(a.h, i0);  // VEC: H is a multiple of the chunk
    float acc[kChunk];
    for (int u = 0; u < kChunk; ++u) acc[u] = 0.0f;
    for (int i = 0; i < n_targets; ++i) {
      std::uint16_t y[kChunk];
      load_staged_chunk<VEC>(g, a, targets[i].ep, targets[i].row, b, i, c, n, y);
      accumulate_chunk(bf16, acc, y, n, i < a.k, targets[i].weight);
    }
    std::uint16_t out[kChunk];
    for (int u = 0; u < kChunk; ++u) out[u] = f32_to_half_rne(bf16, acc[u]);
    store_half8<VEC>(a.out + b * a.out_row_stride, a.out_col_stride, i0, n, out);
  }
}

// ---------------------------------------------------------------------------------------------
// Combine V2: the expert rank indexes its rows by their triples; the source ranks find theirs there.

__global__ void check_combine_args_v2(DeviceGroup g, CombineArgs a) {
  const std::int64_t t = thread_index();
  if (t >= a.bs * a.k || status_failed(g.status)) return;
  const std::uint64_t mark = combine_entry_mark_v2(g, a, t);
  if (mark != kNoMark) mark_lowest(g.status, mark);
}

// Reports the arguments' first fault, and clears this rank's per-source row counts for the index (the
// sources read them only after this call's exchange of combine flags).
__global__ void finish_combine_checks_v2(DeviceGroup g, CombineArgs a) {
  if (!status_failed(g.status)) report_combine_args_v2(g, a, g.status->first_bad_entry);
  g.status->first_bad_entry = kNoMark;
  std::int64_t* counts = index_counts_of(g, g.me);
  for (int r = 0; r < g.W; ++r) counts[r] = 0;
}

// The own rows' triples (their number is on the GPU: a grid-stride loop).
__global__ void check_triples(DeviceGroup g, CombineArgs a) {
  if (status_failed(g.status)) return;
  const std::int64_t rows = g.status->own_rows, step = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = thread_index(); i < rows; i += step) {
    const std::uint64_t mark = triple_mark(g, a, i);
    if (mark != kNoMark) mark_lowest(g.status, mark);
  }
}

__global__ void report_triples(DeviceGroup g, CombineArgs a) {
  if (!status_failed(g.status) && g.status->first_bad_entry != kNoMark) report_triple_mark(g, a, g.status->first_bad_entry);
  g.status->first_bad_entry = kNoMark;
}

__global__ void index_own_rows(DeviceGroup g, CombineArgs a) {
  if (status_failed(g.status)) return;
  const std::uint64_t seq = status_seq(g.status);
  const std::int64_t rows = g.status->own_rows, step = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = thread_index(); i < rows; i += step) index_row(g, a, i, seq);
}

// The dot products of the const experts' gates: one thread per (entry, gate), each a sequential sum.
__global__ void const_logits(DeviceGroup g, CombineArgs a) {
  const std::int64_t i = thread_index();
  if (i >= a.bs * a.k * 2 || status_failed(g.status)) return;
  g.const_logits[i] = const_logit(g, a, i / 2, static_cast<int>(i % 2));
}

// After the exchange: thread i < BS * (K + Sn) finds slot i's row in its holder's index, the next W
// threads compare each holder's count of this rank's rows with what this rank sent it.
__global__ void find_rows(DeviceGroup g, CombineArgs a) {
  if (status_failed(g.status)) return;
  const std::int64_t n = a.bs * g.off.index_slots, i = thread_index();
  std::uint64_t mark = kNoMark;
  if (i < n) mark = find_row(g, a, i / g.off.index_slots, i % g.off.index_slots, status_seq(g.status));
  else if (i < n + g.W) mark = holder_count_mark(g, static_cast<int>(i - n));
  if (mark != kNoMark) mark_lowest(g.status, mark);
}

__global__ void report_found(DeviceGroup g, CombineArgs a) {
  if (!status_failed(g.status) && g.status->first_bad_entry != kNoMark) report_find_mark(g, a, g.status->first_bad_entry);
}

// One block per token (V2 §4.3): the K entries in k order (routed rows and copy and const experts
// weighted, zero experts and masked entries nothing), the Sn shared experts' rows and shared_expert_x
// unweighted, one rounding; an inactive token's row is zeros.
template <bool VEC>
__global__ void __launch_bounds__(1024) reduce_tokens_v2(DeviceGroup g, CombineArgs a) {
  auto* terms = reinterpret_cast<TermV2*>(shared_targets());
  if (status_failed(g.status)) return;
  const std::int64_t b = blockIdx.x;
  const int n_terms = term_count(g, a.k);
  for (int s = threadIdx.x; s < n_terms; s += blockDim.x) terms[s] = term_of(g, a, b, s);
  __syncthreads();
  const bool bf16 = a.bf16 != 0;
  const std::int64_t chunks = chunks_of(a.h);
  for (std::int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
    const std::int64_t i0 = c * kChunk;
    const int n = VEC ? kChunk : chunk_len(a.h, i0);  // VEC: H is a multiple of the chunk
    float acc[kChunk];
    for (int u = 0; u < kChunk; ++u) acc[u] = 0.0f;
    for (int s = 0; s < n_terms; ++s) {
      const TermV2& t = terms[s];
      if (t.kind == TermKind::none) continue;
      std::uint16_t y[kChunk], v[kChunk];
      if (t.kind == TermKind::expert_row) {
        load_staged_chunk<VEC>(g, a, t.ep, t.row, b, s, c, n, y);
      } else {  // the caller's rows: any strides
        std::int64_t cs = 1;
        const std::uint16_t* row = term_row(a, t, b, &cs);
        load_half8<false>(row, cs, i0, n, y);
        if (t.kind == TermKind::constant) {
          const std::uint16_t* vrow = const_vector_row(a, t, &cs);
          load_half8<false>(vrow, cs, i0, n, v);
        }
      }
      accumulate_term(bf16, acc, t, y, v, n);
    }
    std::uint16_t out[kChunk];
    for (int u = 0; u < kChunk; ++u) out[u] = f32_to_half_rne(bf16, acc[u]);
    store_half8<VEC>(a.out + b * a.out_row_stride, a.out_col_stride, i0, n, out);
  }
}

// ---------------------------------------------------------------------------------------------
// Across hosts (docs/cuda.md, "Across hosts"): the steps the host orchestration enqueues between its
// messages.

// A proxy raises `slot`'s flag word in `region` of every rank of its host, on a rank of another host's
// behalf (its records or rows are in place); the host raises a record's count flag in its own window.
__global__ void raise_flags(DeviceGroup g, std::size_t region, int slot, std::uint64_t word) {
  __threadfence_system();
  for (int r = threadIdx.x; r < g.world; r += blockDim.x) {
    if (on_this_host(g, r)) store_release(flag_at(g, r, region, slot), word);
  }
}

// A source rank, after the combine flags: what each (token, slot) asks of another host.
// After a failure of this call (or of the group) nothing is asked: the ids may be the bad ones.
__global__ void list_remote_requests(DeviceGroup g, CombineArgs a, RemoteRequest* out) {
  const std::int64_t i = thread_index();
  if (i >= a.bs * g.remote_slots) return;
  out[i] = status_failed(g.status) ? RemoteRequest{} : remote_request_of(g, a, i / g.remote_slots, i % g.remote_slots);
}

// A proxy: block i copies the row request i names (zeros when it names none) and its index entry; the
// threads past the requests of block 0 read the holders' counts of the source's rows (V2).
__global__ void gather_requested_rows(DeviceGroup g, const RemoteRequest* requests, std::int64_t n, int version, int source_ep,
                                      std::byte* rows, std::uint64_t* entries, std::int64_t* counts) {
  const std::uint64_t seq = status_seq(g.status);
  if (blockIdx.x == 0) {
    for (int d = threadIdx.x; d < g.W; d += blockDim.x) {
      const int holder = global_rank(g, d, g.tp_rank);
      const bool counted = version == 2 && source_ep >= 0 && source_ep < g.W && on_this_host(g, holder);
      counts[d] = counted ? index_counts_of(g, holder)[source_ep] : 0;
    }
  }
  for (std::int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    std::uint64_t entry = 0;
    const std::byte* from = requested_row(g, requests[i], version, seq, source_ep, &entry);
    if (threadIdx.x == 0) entries[i] = entry;
    std::byte* to = rows + static_cast<std::size_t>(i) * g.off.combine_pitch;
    for (std::size_t u = threadIdx.x; u < g.off.combine_pitch; u += blockDim.x) to[u] = from != nullptr ? from[u] : std::byte{0};
  }
}

// A source rank, before its reduce: a proxy that reported a failure fails this rank's call, naming it.
__global__ void absorb_remote_failures(DeviceGroup g) {
  for (int r = threadIdx.x; r < g.world; r += blockDim.x) {
    if (g.remote_failed[r] != 0) record_failure(g.status, ErrorCode::peer_failed, r, Phase::combine_rows, Rule::peer_failed);
  }
}

// A sender's x rows and expert_scales in contiguous form, for its messages to other hosts.
__global__ void compact_inputs(DispatchArgs a, std::uint16_t* x, float* expert_scales) {
  const std::int64_t i = thread_index();
  if (i < a.bs * a.h) x[i] = a.x[(i / a.h) * a.x_row_stride + (i % a.h) * a.x_col_stride];
  if (expert_scales != nullptr && i < a.bs * a.k)
    expert_scales[i] = a.expert_scales[(i / a.k) * a.expert_scales_row_stride + (i % a.k) * a.expert_scales_col_stride];
}

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

int threads_for(std::int64_t h) {
  const std::int64_t warps = std::min<std::int64_t>(32, std::max<std::int64_t>(1, (chunks_of(h) + 31) / 32));
  return static_cast<int>(warps * 32);
}

unsigned blocks_for(std::int64_t n, int threads) { return static_cast<unsigned>(std::max<std::int64_t>(1, (n + threads - 1) / threads)); }

}  // namespace

cudaError_t sort_scratch_bytes(std::int64_t max_entries, int key_bits, std::size_t* bytes) {
  *bytes = 0;
#if defined(MOEDIST_CUDA_EMULATION)
  (void)max_entries;
  (void)key_bits;
  return cudaSuccess;
#else
  return cub::DeviceRadixSort::SortPairs(nullptr, *bytes, static_cast<const std::int32_t*>(nullptr), static_cast<std::int32_t*>(nullptr),
                                         static_cast<const std::int32_t*>(nullptr), static_cast<std::int32_t*>(nullptr),
                                         static_cast<int>(std::max<std::int64_t>(max_entries, 1)), 0, key_bits);
#endif
}

cudaError_t enqueue_dispatch_records(const DeviceGroup& g, const DispatchArgs& a, const SortScratch& sort, cudaStream_t stream) {
  const std::int64_t n = a.bs * a.k;
  MOEDIST_LAUNCH(begin_call, 1, 1, 0, stream)(g);
  if (a.version == 2) MOEDIST_LAUNCH(check_dispatch_ids_v2, blocks_for(a.bs, 128), 128, 0, stream)(g, a);
  else MOEDIST_LAUNCH(check_dispatch_ids, blocks_for(a.bs, 128), 128, 0, stream)(g, a);
  if (n > 0) {
#if defined(MOEDIST_CUDA_EMULATION)
    emu::enqueue([g, n, bits = sort.key_bits] { emu::sort_pairs(g.sort_keys_in, g.sort_keys_out, g.sort_vals_in, g.sort_vals_out, n, bits); });
#else
    std::size_t bytes = sort.bytes;
    const cudaError_t sorted = cub::DeviceRadixSort::SortPairs(sort.temp, bytes, g.sort_keys_in, g.sort_keys_out, g.sort_vals_in,
                                                               g.sort_vals_out, static_cast<int>(n), 0, sort.key_bits, stream);
    if (sorted != cudaSuccess) return sorted;
#endif
  }
  MOEDIST_LAUNCH(index_and_count, blocks_for(std::max<std::int64_t>(n, g.E), 256), 256, 0, stream)(g, a);
  if (a.version == 2) MOEDIST_LAUNCH(number_active_tokens, 1, 256, 0, stream)(g, a);
  MOEDIST_LAUNCH(publish_record, 1, 256, 0, stream)(g, a);
  return cudaGetLastError();
}

cudaError_t enqueue_write_rows(const DeviceGroup& g, const DispatchArgs& a, cudaStream_t stream) {
  const bool vec = a.x_col_stride == 1 && a.h % kChunk == 0 && aligned16(a.x) && (a.x_row_stride * 2) % 16 == 0 &&
                   (a.quant == 2 ? a.h % 16 == 0 : true);
  if (a.bs > 0) {
    if (vec) MOEDIST_LAUNCH(write_rows<true>, static_cast<unsigned>(a.bs), threads_for(a.h), targets_bytes(a.k), stream)(g, a);
    else MOEDIST_LAUNCH(write_rows<false>, static_cast<unsigned>(a.bs), threads_for(a.h), targets_bytes(a.k), stream)(g, a);
  }
  return cudaGetLastError();
}

cudaError_t enqueue_dispatch_rows(const DeviceGroup& g, const DispatchArgs& a, cudaStream_t stream) {
  MOEDIST_LAUNCH(plan_layout, 1, 256, 0, stream)(g, a);
  return enqueue_write_rows(g, a, stream);
}

cudaError_t enqueue_dispatch_finish(const DeviceGroup& g, const DispatchArgs& a, Status* status_mirror, cudaStream_t stream) {
  MOEDIST_LAUNCH(finish_dispatch, 1, 256, 0, stream)(g, a.perf);
  cudaError_t launched = cudaGetLastError();
  if (launched != cudaSuccess) return launched;
  return cudaMemcpyAsync(status_mirror, g.status, sizeof(Status), cudaMemcpyDeviceToHost, stream);
}

cudaError_t enqueue_dispatch(const DeviceGroup& g, const DispatchArgs& a, const SortScratch& sort, Status* status_mirror,
                             cudaStream_t stream) {
  cudaError_t err = enqueue_dispatch_records(g, a, sort, stream);
  if (err == cudaSuccess) err = enqueue_dispatch_rows(g, a, stream);
  if (err == cudaSuccess) err = enqueue_dispatch_finish(g, a, status_mirror, stream);
  return err;
}

cudaError_t enqueue_raise_flags(const DeviceGroup& g, std::size_t region, int slot, std::uint64_t word, cudaStream_t stream) {
  MOEDIST_LAUNCH(raise_flags, 1, 256, 0, stream)(g, region, slot, word);
  return cudaGetLastError();
}

cudaError_t enqueue_compact_inputs(const DispatchArgs& a, std::uint16_t* x, float* expert_scales, cudaStream_t stream) {
  const std::int64_t n = std::max(a.bs * a.h, a.bs * a.k);
  if (n > 0) MOEDIST_LAUNCH(compact_inputs, blocks_for(n, 256), 256, 0, stream)(a, x, expert_scales);
  return cudaGetLastError();
}

cudaError_t enqueue_remote_requests(const DeviceGroup& g, const CombineArgs& a, RemoteRequest* out, cudaStream_t stream) {
  const std::int64_t n = a.bs * g.remote_slots;
  if (n > 0) MOEDIST_LAUNCH(list_remote_requests, blocks_for(n, 256), 256, 0, stream)(g, a, out);
  return cudaGetLastError();
}

cudaError_t enqueue_gather_requested_rows(const DeviceGroup& g, const RemoteRequest* requests, std::int64_t n, int version,
                                          int source_ep, std::byte* rows, std::uint64_t* entries, std::int64_t* counts,
                                          cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(std::max<std::int64_t>(1, std::min<std::int64_t>(n, 264)));
  MOEDIST_LAUNCH(gather_requested_rows, grid, 256, 0, stream)(g, requests, n, version, source_ep, rows, entries, counts);
  return cudaGetLastError();
}

namespace {
bool combine_vec(const CombineArgs& a) {
  return a.expand_x_col_stride == 1 && a.h % 16 == 0 && aligned16(a.expand_x) && (a.expand_x_row_stride * 2) % 16 == 0 &&
         a.out_col_stride == 1 && aligned16(a.out) && (a.out_row_stride * 2) % 16 == 0;
}
}  // namespace

cudaError_t enqueue_combine_front(const DeviceGroup& g, const CombineArgs& a, cudaStream_t stream) {
  const std::int64_t n = a.bs * a.k;
  const bool v2 = a.version == 2;
  MOEDIST_LAUNCH(begin_call, 1, 1, 0, stream)(g);
  if (v2) {
    if (n > 0) MOEDIST_LAUNCH(check_combine_args_v2, blocks_for(n, 256), 256, 0, stream)(g, a);
    MOEDIST_LAUNCH(finish_combine_checks_v2, 1, 1, 0, stream)(g, a);
  } else {
    if (n > 0) MOEDIST_LAUNCH(check_combine_args, blocks_for(n, 256), 256, 0, stream)(g, a);
    MOEDIST_LAUNCH(finish_combine_checks, 1, 1, 0, stream)(g, a);
  }
  const bool vec = combine_vec(a);
  const int threads = threads_for(a.h);
  // Row loops stride over a fixed grid: the row counts live on the GPU (static shapes for graphs).
  const unsigned grid = 264;
  if (v2) {
    MOEDIST_LAUNCH(check_triples, grid, 256, 0, stream)(g, a);
    MOEDIST_LAUNCH(report_triples, 1, 1, 0, stream)(g, a);
    MOEDIST_LAUNCH(index_own_rows, grid, 256, 0, stream)(g, a);
    if (a.special.constant > 0 && n > 0) MOEDIST_LAUNCH(const_logits, blocks_for(2 * n, 256), 256, 0, stream)(g, a);
  }
  if (g.T == 2) {
    if (vec) MOEDIST_LAUNCH(send_tp_partials<true>, grid, threads, 0, stream)(g, a);
    else MOEDIST_LAUNCH(send_tp_partials<false>, grid, threads, 0, stream)(g, a);
    MOEDIST_LAUNCH(signal_tp_peer, 1, 32, 0, stream)(g);
    MOEDIST_LAUNCH(wait_tp_peer, 1, 32, 0, stream)(g, a.perf);
  }
  if (!a.staged_in_place) {
    if (vec) MOEDIST_LAUNCH(stage_rows<true>, grid, threads, 0, stream)(g, a);
    else MOEDIST_LAUNCH(stage_rows<false>, grid, threads, 0, stream)(g, a);
  }
  MOEDIST_LAUNCH(exchange_combine_flags, 1, 256, 0, stream)(g, a.perf);
  return cudaGetLastError();
}

cudaError_t enqueue_combine_back(const DeviceGroup& g, const CombineArgs& a, Status* status_mirror, cudaStream_t stream) {
  const bool v2 = a.version == 2;
  const bool vec = combine_vec(a);
  const int threads = threads_for(a.h);
  if (g.remote_failed != nullptr) MOEDIST_LAUNCH(absorb_remote_failures, 1, 256, 0, stream)(g);
  if (v2) {
    MOEDIST_LAUNCH(find_rows, blocks_for(a.bs * g.off.index_slots + g.W, 256), 256, 0, stream)(g, a);
    MOEDIST_LAUNCH(report_found, 1, 1, 0, stream)(g, a);
  }
  if (a.bs > 0) {
    if (v2) {
      if (vec) MOEDIST_LAUNCH(reduce_tokens_v2<true>, static_cast<unsigned>(a.bs), threads, targets_bytes(a.k), stream)(g, a);
      else MOEDIST_LAUNCH(reduce_tokens_v2<false>, static_cast<unsigned>(a.bs), threads, targets_bytes(a.k), stream)(g, a);
    } else if (vec) {
      MOEDIST_LAUNCH(reduce_tokens<true>, static_cast<unsigned>(a.bs), threads, targets_bytes(a.k), stream)(g, a);
    } else {
      MOEDIST_LAUNCH(reduce_tokens<false>, static_cast<unsigned>(a.bs), threads, targets_bytes(a.k), stream)(g, a);
    }
  }
  cudaError_t launched = cudaGetLastError();
  if (launched != cudaSuccess) return launched;
  return cudaMemcpyAsync(status_mirror, g.status, sizeof(Status), cudaMemcpyDeviceToHost, stream);
}

cudaError_t enqueue_combine(const DeviceGroup& g, const CombineArgs& a, Status* status_mirror, cudaStream_t stream) {
  const cudaError_t err = enqueue_combine_front(g, a, stream);
  return err == cudaSuccess ? enqueue_combine_back(g, a, status_mirror, stream) : err;
}

}  // namespace moedist::cuda
