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
#include <array>
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
#include <dlfcn.h>
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
// CUDA's own names, reserved as they are: kernels.cu compiles here unchanged.
// NOLINTBEGIN(bugprone-reserved-identifier)
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// NOLINTEND(bugprone-reserved-identifier)

namespace emu {

// ThreadSanitizer's happens-before annotations; nothing in other builds.
inline void happens_before_release(void* address) {
#ifdef MOEDIST_EMU_TSAN
  __tsan_release(address);
#else
  (void)address;
#endif
}
inline void happens_before_acquire(void* address) {
#ifdef MOEDIST_EMU_TSAN
  __tsan_acquire(address);
#else
  (void)address;
#endif
}

// Why fibers, not one std::thread per CUDA thread: a launch of 256 threads made 256 processes' worth of
// pids, and a test makes hundreds of thousands of them in seconds. Linux's pid space (32768 here) then
// wraps every few seconds, and mpirun (Open MPI 4.1) signals the process group of children it has
// already reaped: a recycled pid sent its SIGKILL to whatever group now owned the number, once the CI's
// own. Fibers need no pids, and a block's threads still run interleaved, meet at real barriers, and are
// separate threads to ThreadSanitizer (annotated below), so a missing __syncthreads is still a race.

// One CUDA thread of the block being run: a fiber on its own stack. A fiber lives as long as its
// OS thread and runs one block's body after another (no new context per block).
struct Fiber {
  ucontext_t context{};
  void* stack = nullptr;  // lowest address; the lowest page is a guard
  std::size_t stack_bytes = 0;
  void* tsan_fiber = nullptr;
  void* asan_fake_stack = nullptr;
  bool started = false;     // the scheduler's: the context is made
  EmulatedDim3 thread_idx;  // set before the block starts
  // Written by the fiber, read by the scheduler.
  std::atomic<bool> done{false};
  std::atomic<bool> at_barrier{false};
};

// A warp's exchange point for shuffles: only its own lanes wait for each other.
struct Warp {
  std::atomic<unsigned> arrived{0}, generation{0};
  int sync[2] = {0, 0};  // ThreadSanitizer: one address per generation parity
};

// The fibers of this OS thread (kept between launches) and the block they run now.
struct Runner {
  static constexpr unsigned kMaxThreads = 1024;
  static constexpr std::size_t kStackBytes = 512 * 1024;  // sanitizers' frames are several times larger

  std::vector<std::unique_ptr<Fiber>> pool;
  std::array<Warp, kMaxThreads / 32> warps;
  ucontext_t scheduler{};
  const void* scheduler_stack = nullptr;  // for AddressSanitizer: the stack a fiber returns to
  std::size_t scheduler_stack_bytes = 0;
  void* scheduler_tsan_fiber = nullptr;
  std::atomic<Fiber*> current{nullptr};  // the fiber running now
  const std::function<void()>* body = nullptr;
  std::atomic<unsigned> arrived{0};      // fibers waiting at the block's barrier
  std::atomic<unsigned> openings{0};     // times the block's barrier opened
  std::atomic<unsigned long> progress{0};  // arrivals and returns: a sweep without any only spun
  unsigned blocks_run = 0;
  // Addresses for ThreadSanitizer's happens-before annotations. Only the scheduler releases `handoff`
  // (what it set up reaches a fiber it resumes, but no fiber's work reaches another through it). The
  // barrier has one address per parity of its openings: a fiber that passes opening n acquires what
  // was released at opening n only, never what a faster fiber released on its way to opening n + 1.
  int handoff = 0, end_sync = 0;
  int barrier_sync[2] = {0, 0};

  void grow_to(unsigned n) {
    if (n > kMaxThreads) throw std::runtime_error("emulated CUDA: more than 1024 threads in a block");
    while (pool.size() < n) {
      auto f = std::make_unique<Fiber>();
      f->stack_bytes = kStackBytes;
      f->stack = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
      if (f->stack == MAP_FAILED) throw std::runtime_error("emulated CUDA: mmap of a fiber stack failed");
      // An overflow faults instead of corrupting the next stack.
      if (mprotect(f->stack, 4096, PROT_NONE) != 0) throw std::runtime_error("emulated CUDA: mprotect of a stack guard failed");
#ifdef MOEDIST_EMU_TSAN
      f->tsan_fiber = __tsan_create_fiber(0);
#endif
      pool.push_back(std::move(f));
    }
  }
  // Only at the OS thread's exit, never from inside a fiber. The ranks that run kernels end with _exit.
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

// The C library's swapcontext. AddressSanitizer's own (the interposed one) clears the shadow of the whole
// stack being switched to, before and after each switch: two system calls over 512 KiB per switch, which made
// the sanitizer runs 10x slower than their instrumentation alone. The switches here are announced to it
// (__sanitizer_start/finish_switch_fiber below), which is what it needs to follow them.
inline int switch_context(ucontext_t* from, const ucontext_t* to) {
#ifdef MOEDIST_EMU_ASAN
  using Swap = decltype(&::swapcontext);
  static const Swap libc_swap = [] {
    void* libc = dlopen("libc.so.6", RTLD_LAZY | RTLD_NOLOAD);
    void* found = libc != nullptr ? dlsym(libc, "swapcontext") : nullptr;
    return found != nullptr ? reinterpret_cast<Swap>(found) : &swapcontext;  // NOLINT: dlsym's pointer
  }();
  return libc_swap(from, to);
#else
  return swapcontext(from, to);
#endif
}

// A fiber gives the OS thread back to its scheduler.
inline void yield_to_scheduler(Runner& r, Fiber& f) {
#ifdef MOEDIST_EMU_TSAN
  __tsan_switch_to_fiber(r.scheduler_tsan_fiber, __tsan_switch_to_fiber_no_sync);
#endif
#ifdef MOEDIST_EMU_ASAN
  __sanitizer_start_switch_fiber(&f.asan_fake_stack, r.scheduler_stack, r.scheduler_stack_bytes);
#endif
  switch_context(&f.context, &r.scheduler);
#ifdef MOEDIST_EMU_ASAN
  __sanitizer_finish_switch_fiber(f.asan_fake_stack, &r.scheduler_stack, &r.scheduler_stack_bytes);
#endif
  happens_before_acquire(&r.handoff);
}

inline void fiber_main() {
  Runner& r = runner();
  Fiber& f = *r.current.load(std::memory_order_relaxed);
#ifdef MOEDIST_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &r.scheduler_stack, &r.scheduler_stack_bytes);
#endif
  happens_before_acquire(&r.handoff);
  for (;;) {  // one block per turn; resumed by the scheduler for the next
    (*r.body)();
    happens_before_release(&r.end_sync);
    f.done.store(true, std::memory_order_relaxed);
    r.progress.fetch_add(1, std::memory_order_relaxed);
    yield_to_scheduler(r, f);
  }
}

inline void switch_to(Runner& r, Fiber& f) {
  r.current.store(&f, std::memory_order_relaxed);
  happens_before_release(&r.handoff);
#ifdef MOEDIST_EMU_TSAN
  __tsan_switch_to_fiber(f.tsan_fiber, __tsan_switch_to_fiber_no_sync);
#endif
#ifdef MOEDIST_EMU_ASAN
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(&fake_stack, f.stack, f.stack_bytes);
#endif
  switch_context(&r.scheduler, &f.context);
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
// fiber runs until it waits at the barrier or a warp exchange, sleeps (__nanosleep) or returns; when
// every fiber still running waits at the barrier, the barrier opens (a thread that returned takes no
// part, as on the GPU). Each phase between barriers runs the threads in the opposite order of the one
// before, and the first phase alternates from block to block, so code that lacks a barrier sees its
// writes in both orders. A sweep in which nobody arrived anywhere or returned (threads waiting for a
// peer rank's flag) gives the CPU to the other processes.
inline void run_block(unsigned block_index, unsigned threads, const std::function<void()>& body) {
  Runner& r = runner();
  r.grow_to(threads);
  r.body = &body;
  r.arrived.store(0);
  for (Warp& w : r.warps) w.arrived.store(0);
#ifdef MOEDIST_EMU_TSAN
  if (r.scheduler_tsan_fiber == nullptr) r.scheduler_tsan_fiber = __tsan_get_current_fiber();  // this OS thread's own
#endif
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = *r.pool[t];
    f.done.store(false);
    f.at_barrier.store(false);
    f.thread_idx = EmulatedDim3{t, 0, 0};
    if (!f.started) {
      getcontext(&f.context);
      f.context.uc_stack.ss_sp = f.stack;
      f.context.uc_stack.ss_size = f.stack_bytes;
      f.context.uc_link = nullptr;
      makecontext(&f.context, fiber_main, 0);
      f.started = true;
    }
  }
  blockIdx = EmulatedDim3{block_index, 0, 0};
  blockDim = EmulatedDim3{threads, 0, 0};
  unsigned live = threads;
  bool reversed = (r.blocks_run++ % 2) == 1;
  while (live > 0) {
    const unsigned long progress_before = r.progress.load(std::memory_order_relaxed);
    for (unsigned k = 0; k < threads; ++k) {
      const unsigned t = reversed ? threads - 1 - k : k;
      Fiber& f = *r.pool[t];
      if (f.done.load(std::memory_order_relaxed) || f.at_barrier.load(std::memory_order_relaxed)) continue;
      switch_to(r, f);
      if (f.done.load(std::memory_order_relaxed)) --live;
    }
    if (live > 0 && r.arrived.load(std::memory_order_relaxed) == live) {
      r.arrived.store(0, std::memory_order_relaxed);
      r.openings.fetch_add(1, std::memory_order_relaxed);
      for (unsigned t = 0; t < threads; ++t) r.pool[t]->at_barrier.store(false, std::memory_order_relaxed);
      reversed = !reversed;
    } else if (r.progress.load(std::memory_order_relaxed) == progress_before) {
      std::this_thread::yield();
    }
  }
  happens_before_acquire(&r.end_sync);  // the host sees the block's work (a launch is ordered on its stream)
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

inline Fiber& running_fiber(Runner& r) { return *r.current.load(std::memory_order_relaxed); }

// __syncthreads, called by the fiber running now.
inline void wait_at_barrier() {
  Runner& r = runner();
  Fiber& f = running_fiber(r);
  int* sync = &r.barrier_sync[r.openings.load(std::memory_order_relaxed) % 2];
  happens_before_release(sync);
  f.at_barrier.store(true, std::memory_order_relaxed);
  r.arrived.fetch_add(1, std::memory_order_relaxed);
  r.progress.fetch_add(1, std::memory_order_relaxed);
  yield_to_scheduler(r, f);
  happens_before_acquire(sync);
}

// The lanes of warp `w` that have not returned (a full-mask shuffle needs every lane on the GPU).
inline unsigned live_lanes(Runner& r, unsigned w) {
  unsigned n = 0;
  for (unsigned t = w * 32; t < std::min(blockDim.x, w * 32 + 32); ++t) n += r.pool[t]->done.load(std::memory_order_relaxed) ? 0 : 1;
  return n;
}

// The point where the lanes of the running fiber's warp meet, and only they (a warp shuffle's sync).
inline void warp_sync() {
  Runner& r = runner();
  Fiber& f = running_fiber(r);
  const unsigned w = f.thread_idx.x / 32;
  Warp& warp = r.warps[w];
  const unsigned generation = warp.generation.load(std::memory_order_relaxed);
  int* sync = &warp.sync[generation % 2];
  happens_before_release(sync);
  warp.arrived.fetch_add(1, std::memory_order_relaxed);
  r.progress.fetch_add(1, std::memory_order_relaxed);
  while (warp.generation.load(std::memory_order_relaxed) == generation) {
    if (warp.arrived.load(std::memory_order_relaxed) >= live_lanes(r, w)) {
      warp.arrived.store(0, std::memory_order_relaxed);
      warp.generation.fetch_add(1, std::memory_order_relaxed);
      break;
    }
    yield_to_scheduler(r, f);
  }
  happens_before_acquire(sync);
}

// __nanosleep: the others run first.
inline void let_others_run() {
  Runner& r = runner();
  Fiber* f = r.current.load(std::memory_order_relaxed);
  if (f == nullptr) {
    std::this_thread::yield();
    return;
  }
  yield_to_scheduler(r, *f);
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
  cudaStream_t stream;  // unused: work runs when it is enqueued (every stream is idle)
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

// NOLINTBEGIN(bugprone-macro-parentheses): a kernel's name, taken by address
#define MOEDIST_LAUNCH(kernel, grid, threads, dynamic_bytes, stream)                                               \
  emu::Launch<decltype(&kernel)> {                                                                                 \
    &kernel, static_cast<unsigned>(grid), static_cast<unsigned>(threads), static_cast<std::size_t>(dynamic_bytes), \
        stream                                                                                                     \
  }
// NOLINTEND(bugprone-macro-parentheses)

// NOLINTBEGIN(bugprone-reserved-identifier): CUDA's intrinsics, by their names
inline void __syncthreads() { emu::wait_at_barrier(); }
// Synchronizes the warp only, as on the GPU (a block-wide barrier here would hide a missing one).
inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  emu::block.shuffle[threadIdx.x] = v;
  emu::warp_sync();
  const float other = emu::block.shuffle[threadIdx.x ^ static_cast<unsigned>(lane_mask)];
  emu::warp_sync();
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
// NOLINTEND(bugprone-reserved-identifier)
inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
  std::atomic_ref<unsigned long long> a(*p);
  unsigned long long old = a.load();
  while (v < old && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}
