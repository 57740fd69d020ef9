// Just enough of CUDA, on the CPU, to compile and run src/cuda/kernels.cu unchanged: a launch runs its
// blocks one after another, each block's blockDim.x threads as fibers on the calling thread (see
// emu::run_block); __syncthreads is a barrier between them (a thread that returned drops out of it, as on
// the GPU); a warp shuffle goes through the block's slots; __shared__ variables are statics (one block
// runs at a time in a process, and each rank is its own process); atomics are std::atomic_ref. The few
// runtime calls the enqueue functions make are plain host copies. CUB's radix sort becomes
// std::stable_sort (the sort is stable on the GPU too).
//
// Used by tests/cuda_kernels_emulation_test.cpp, which defines MOEDIST_CUDA_EMULATION and includes
// kernels.cu after this header. Not a CUDA implementation: only what those kernels use.
#pragma once

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <numeric>
#include <stdexcept>
#include <thread>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define MOEDIST_EMU_ASAN 1
#endif
#if defined(__SANITIZE_THREAD__)
#define MOEDIST_EMU_TSAN 1
#endif
#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define MOEDIST_EMU_ASAN 1
#endif
#if __has_feature(thread_sanitizer)
#define MOEDIST_EMU_TSAN 1
#endif
#endif
#ifdef MOEDIST_EMU_ASAN
#include <sanitizer/common_interface_defs.h>
#endif
#ifdef MOEDIST_EMU_TSAN
#include <sanitizer/tsan_interface.h>
#endif

#if defined(MOEDIST_CUDA_FAKE_RUNTIME)
// With tests/cuda_emulation/fake_runtime.cpp: the real runtime header's types and declarations, the
// fake's definitions (cuda_group.cpp, compiled as usual, shares them).
#include <cuda_runtime_api.h>
#else
struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaError_t : int { cudaSuccess = 0 };
enum cudaMemcpyKind : int { cudaMemcpyHostToHost = 0, cudaMemcpyHostToDevice = 1, cudaMemcpyDeviceToHost = 2, cudaMemcpyDeviceToDevice = 3 };
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind, cudaStream_t) {
  std::memcpy(dst, src, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }

struct uint4 {
  unsigned x, y, z, w;
};
struct uint2 {
  unsigned x, y;
};
#endif
struct EmulatedDim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local EmulatedDim3 blockIdx, blockDim, gridDim;  // threadIdx: the running fiber's (below)

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#undef __launch_bounds__
#undef __align__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

namespace emu {

// Why fibers, not one std::thread per CUDA thread: a launch of 256 threads made 256 processes' worth of
// pids, and a test makes hundreds of thousands of them in seconds. Linux's pid space (32768 here) then
// wraps every few seconds, and mpirun (Open MPI 4.1) signals the process group of children it has
// already reaped: a recycled pid sent its SIGKILL to whatever group now owned the number, once the CI's
// own. Fibers need no pids, and a block's threads still run interleaved, meet at real barriers, and are
// separate threads to ThreadSanitizer (annotated below), so a missing __syncthreads is still a race.

// One CUDA thread of the block being run: a fiber on its own stack.
struct Fiber {
  ucontext_t context{};
  void* stack = nullptr;  // lowest address; the lowest page is a guard
  std::size_t stack_bytes = 0;
  void* tsan_fiber = nullptr;
  void* asan_fake_stack = nullptr;
  EmulatedDim3 thread_idx;  // set before the block starts
  // Written by the fiber, read by the scheduler.
  std::atomic<bool> done{false};
  std::atomic<bool> at_barrier{false};
};

// The fibers of this OS thread (kept between launches) and the block they run now.
struct Runner {
  std::vector<std::unique_ptr<Fiber>> pool;
  ucontext_t scheduler{};
  const void* scheduler_stack = nullptr;  // for AddressSanitizer: the stack a fiber returns to
  std::size_t scheduler_stack_bytes = 0;
  void* scheduler_tsan_fiber = nullptr;
  std::atomic<Fiber*> current{nullptr};  // the fiber running now
  const std::function<void()>* body = nullptr;
  std::atomic<unsigned> arrived{0};  // fibers waiting at the barrier
  // Addresses for ThreadSanitizer's happens-before annotations. Only the scheduler releases `handoff`
  // (what it set up reaches a fiber it resumes, but no fiber's work reaches another through it).
  int handoff = 0, barrier_sync = 0, end_sync = 0;

  static constexpr std::size_t kStackBytes = 512 * 1024;  // sanitizers' frames are several times larger

  void grow_to(unsigned threads) {
    while (pool.size() < threads) {
      auto f = std::make_unique<Fiber>();
      f->stack_bytes = kStackBytes;
      f->stack = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
      if (f->stack == MAP_FAILED) throw std::runtime_error("emulated CUDA: mmap of a fiber stack failed");
      mprotect(f->stack, 4096, PROT_NONE);  // an overflow faults instead of corrupting the next stack
#ifdef MOEDIST_EMU_TSAN
      f->tsan_fiber = __tsan_create_fiber(0);
#endif
      pool.push_back(std::move(f));
    }
  }
  ~Runner() {
    for (auto& f : pool) {
#ifdef MOEDIST_EMU_TSAN
      __tsan_destroy_fiber(f->tsan_fiber);
#endif
      munmap(f->stack, f->stack_bytes);
    }
  }
};
inline Runner& runner() {
  static thread_local Runner r;
  return r;
}

// A fiber gives the OS thread back to its scheduler (`leaving`: for good, it returned).
inline void yield_to_scheduler(Runner& r, Fiber& f, bool leaving) {
#ifdef MOEDIST_EMU_TSAN
  __tsan_switch_to_fiber(r.scheduler_tsan_fiber, __tsan_switch_to_fiber_no_sync);
#endif
#ifdef MOEDIST_EMU_ASAN
  __sanitizer_start_switch_fiber(leaving ? nullptr : &f.asan_fake_stack, r.scheduler_stack, r.scheduler_stack_bytes);
#else
  (void)leaving;
#endif
  swapcontext(&f.context, &r.scheduler);
#ifdef MOEDIST_EMU_ASAN
  __sanitizer_finish_switch_fiber(f.asan_fake_stack, &r.scheduler_stack, &r.scheduler_stack_bytes);
#endif
#ifdef MOEDIST_EMU_TSAN
  __tsan_acquire(&r.handoff);
#endif
}

inline void fiber_main() {
  Runner& r = runner();
  Fiber& f = *r.current.load(std::memory_order_relaxed);
#ifdef MOEDIST_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &r.scheduler_stack, &r.scheduler_stack_bytes);
#endif
#ifdef MOEDIST_EMU_TSAN
  __tsan_acquire(&r.handoff);
#endif
  (*r.body)();
#ifdef MOEDIST_EMU_TSAN
  __tsan_release(&r.end_sync);
#endif
  f.done.store(true, std::memory_order_relaxed);
  yield_to_scheduler(r, f, true);
}

inline void switch_to(Runner& r, Fiber& f) {
  r.current.store(&f, std::memory_order_relaxed);
#ifdef MOEDIST_EMU_TSAN
  __tsan_release(&r.handoff);
  __tsan_switch_to_fiber(f.tsan_fiber, __tsan_switch_to_fiber_no_sync);
#endif
#ifdef MOEDIST_EMU_ASAN
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(&fake_stack, f.stack, f.stack_bytes);
#endif
  swapcontext(&r.scheduler, &f.context);
#ifdef MOEDIST_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#endif
  r.current.store(nullptr, std::memory_order_relaxed);
}

struct BlockState {
  float* shuffle = nullptr;  // one slot per thread
  unsigned char* dynamic_shared = nullptr;
};
inline thread_local BlockState block;

// Runs one block of `threads` threads, each calling `body`, until all have returned. Round-robin: a
// fiber runs until it waits at the barrier, sleeps (__nanosleep) or returns; when every fiber still
// running waits at the barrier, the barrier opens (a thread that returned takes no part, as on the
// GPU). Each phase between barriers runs the threads in the opposite order of the one before, so code
// that needs a barrier it lacks sees its writes in both orders.
inline void run_block(unsigned block_index, unsigned threads, const std::function<void()>& body) {
  Runner& r = runner();
  r.grow_to(threads);
  r.body = &body;
  r.arrived.store(0);
#ifdef MOEDIST_EMU_TSAN
  if (r.scheduler_tsan_fiber == nullptr) r.scheduler_tsan_fiber = __tsan_get_current_fiber();  // this OS thread's own
#endif
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = *r.pool[t];
    f.done.store(false);
    f.at_barrier.store(false);
    f.thread_idx = EmulatedDim3{t, 0, 0};
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack;
    f.context.uc_stack.ss_size = f.stack_bytes;
    f.context.uc_link = nullptr;
    makecontext(&f.context, fiber_main, 0);
  }
  blockIdx = EmulatedDim3{block_index, 0, 0};
  blockDim = EmulatedDim3{threads, 0, 0};
  unsigned live = threads;
  bool reversed = false;
  while (live > 0) {
    for (unsigned k = 0; k < threads; ++k) {
      const unsigned t = reversed ? threads - 1 - k : k;
      Fiber& f = *r.pool[t];
      if (f.done.load(std::memory_order_relaxed) || f.at_barrier.load(std::memory_order_relaxed)) continue;
      switch_to(r, f);
      if (f.done.load(std::memory_order_relaxed)) --live;
    }
    if (live > 0 && r.arrived.load(std::memory_order_relaxed) == live) {
      r.arrived.store(0, std::memory_order_relaxed);
      for (unsigned t = 0; t < threads; ++t) r.pool[t]->at_barrier.store(false, std::memory_order_relaxed);
      reversed = !reversed;
    }
  }
#ifdef MOEDIST_EMU_TSAN
  __tsan_acquire(&r.end_sync);  // the host sees the block's work (a launch is ordered on its stream)
#endif
}

// Runs grid blocks of `threads` threads each, one block at a time (so the statics that stand in for
// __shared__ belong to one block at a time).
template <class Kernel, class... Args>
void launch(unsigned grid, unsigned threads, std::size_t dynamic_bytes, Kernel kernel, Args... args) {
  std::vector<unsigned char> dynamic(dynamic_bytes + 16);
  std::vector<float> shuffle(threads);
  block = BlockState{shuffle.data(), dynamic.data()};
  gridDim = EmulatedDim3{grid, 0, 0};
  const std::function<void()> body = [&] { kernel(args...); };
  for (unsigned b = 0; b < grid; ++b) run_block(b, threads, body);
}

// Called by the fiber running now: wait at the block's barrier, or only let the others run.
inline void wait_at_barrier() {
  Runner& r = runner();
  Fiber& f = *r.current.load(std::memory_order_relaxed);
#ifdef MOEDIST_EMU_TSAN
  __tsan_release(&r.barrier_sync);
#endif
  f.at_barrier.store(true, std::memory_order_relaxed);
  r.arrived.fetch_add(1, std::memory_order_relaxed);
  yield_to_scheduler(r, f, false);
#ifdef MOEDIST_EMU_TSAN
  __tsan_acquire(&r.barrier_sync);
#endif
}
inline void let_others_run() {
  Runner& r = runner();
  Fiber* f = r.current.load(std::memory_order_relaxed);
  if (f == nullptr) {
    std::this_thread::yield();
    return;
  }
  yield_to_scheduler(r, *f, false);
}
inline const EmulatedDim3& current_thread_idx() { return runner().current.load(std::memory_order_relaxed)->thread_idx; }

// Stream work runs as it is enqueued, except while a stream is being captured into a graph: then it is
// recorded, with its arguments as they are now (as a CUDA graph freezes kernel parameters), and runs
// when the graph is launched. The fake runtime (fake_runtime.cpp) owns the capture state.
#if defined(MOEDIST_CUDA_FAKE_RUNTIME)
std::vector<std::function<void()>>*& capture_target();
#else
inline std::vector<std::function<void()>>*& capture_target() {
  static std::vector<std::function<void()>>* none = nullptr;
  return none;
}
#endif
inline void enqueue(std::function<void()> work) {
  if (capture_target() != nullptr) {
    capture_target()->push_back(std::move(work));
  } else {
    work();
  }
}

template <class Kernel>
struct Launch {
  Kernel kernel;
  unsigned grid, threads;
  std::size_t dynamic_bytes;
  template <class... Args>
  void operator()(Args... args) const {
    const Launch self = *this;
    enqueue([self, args...] { launch(self.grid, self.threads, self.dynamic_bytes, self.kernel, args...); });
  }
};

// CUB's stable radix sort of (key, value) pairs on the low `end_bit` bits of the keys.
inline void sort_pairs(const std::int32_t* keys_in, std::int32_t* keys_out, const std::int32_t* values_in, std::int32_t* values_out,
                       std::int64_t n, int end_bit) {
  const auto key_of = [&](std::int32_t k) {
    return static_cast<std::uint32_t>(k) & (end_bit >= 32 ? ~0u : ((1u << end_bit) - 1u));
  };
  std::vector<std::int64_t> order(static_cast<std::size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](std::int64_t a, std::int64_t b) { return key_of(keys_in[a]) < key_of(keys_in[b]); });
  for (std::int64_t p = 0; p < n; ++p) {
    keys_out[p] = keys_in[order[static_cast<std::size_t>(p)]];
    values_out[p] = values_in[order[static_cast<std::size_t>(p)]];
  }
}

}  // namespace emu

#define threadIdx (::emu::current_thread_idx())

#define MOEDIST_LAUNCH(kernel, grid, threads, dynamic_bytes, stream) \
  emu::Launch<decltype(&kernel)>{&kernel, static_cast<unsigned>(grid), static_cast<unsigned>(threads), static_cast<std::size_t>(dynamic_bytes)}

inline void __syncthreads() { emu::wait_at_barrier(); }
inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  emu::block.shuffle[threadIdx.x] = v;
  __syncthreads();
  const float other = emu::block.shuffle[threadIdx.x ^ static_cast<unsigned>(lane_mask)];
  __syncthreads();
  return other;
}
// Fences: the rows a rank writes reach its peers (other processes) before its release store of the flag
// that announces them. ThreadSanitizer supports no fences; the flags' release / acquire order suffices there.
#if defined(__SANITIZE_THREAD__)
inline void __threadfence() {}
inline void __threadfence_system() {}
#else
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_system() { std::atomic_thread_fence(std::memory_order_seq_cst); }
#endif
inline void __nanosleep(unsigned) { emu::let_others_run(); }
inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
  std::atomic_ref<unsigned long long> a(*p);
  unsigned long long old = a.load();
  while (v < old && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}
