// Just enough of CUDA, on the CPU, to compile and run src/cuda/kernels.cu unchanged: a launch runs its
// blocks one after another, each block as blockDim.x std::threads; __syncthreads is a std::barrier (a
// thread that returned drops out of it, as on the GPU); a warp shuffle goes through the block's slots;
// __shared__ variables are statics (one block runs at a time in a process, and each rank is its own
// process); atomics are std::atomic_ref. The few runtime calls the enqueue functions make are plain host
// copies. CUB's radix sort becomes std::stable_sort (the sort is stable on the GPU too).
//
// Used by tests/cuda_kernels_emulation_test.cpp, which defines MOEDIST_CUDA_EMULATION and includes
// kernels.cu after this header. Not a CUDA implementation: only what those kernels use.
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <numeric>
#include <thread>
#include <vector>

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
inline thread_local EmulatedDim3 threadIdx, blockIdx, blockDim, gridDim;

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

struct BlockState {
  std::barrier<>* barrier = nullptr;
  float* shuffle = nullptr;  // one slot per thread
  unsigned char* dynamic_shared = nullptr;
};
inline thread_local BlockState block;

// Runs grid blocks of `threads` threads each, one block at a time, on one team of threads: each block
// has its own barrier (a thread that returns drops out of it), and the team meets between blocks, so
// the statics that stand in for __shared__ belong to one block at a time.
template <class Kernel, class... Args>
void launch(unsigned grid, unsigned threads, std::size_t dynamic_bytes, Kernel kernel, Args... args) {
  std::vector<unsigned char> dynamic(dynamic_bytes + 16);
  std::vector<float> shuffle(threads);
  std::vector<std::unique_ptr<std::barrier<>>> block_barriers;
  for (unsigned b = 0; b < grid; ++b) block_barriers.push_back(std::make_unique<std::barrier<>>(static_cast<std::ptrdiff_t>(threads)));
  std::barrier<> between_blocks(static_cast<std::ptrdiff_t>(threads));
  std::vector<std::thread> team;
  team.reserve(threads);
  for (unsigned t = 0; t < threads; ++t) {
    team.emplace_back([&, t] {
      for (unsigned b = 0; b < grid; ++b) {
        threadIdx.x = t;
        blockIdx.x = b;
        blockDim.x = threads;
        gridDim.x = grid;
        block = BlockState{block_barriers[b].get(), shuffle.data(), dynamic.data()};
        kernel(args...);
        block_barriers[b]->arrive_and_drop();  // a thread that returned takes no part in later barriers
        between_blocks.arrive_and_wait();
      }
    });
  }
  for (auto& th : team) th.join();
}

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

#define MOEDIST_LAUNCH(kernel, grid, threads, dynamic_bytes, stream) \
  emu::Launch<decltype(&kernel)>{&kernel, static_cast<unsigned>(grid), static_cast<unsigned>(threads), static_cast<std::size_t>(dynamic_bytes)}

inline void __syncthreads() { emu::block.barrier->arrive_and_wait(); }
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
inline void __nanosleep(unsigned) { std::this_thread::yield(); }
inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
  std::atomic_ref<unsigned long long> a(*p);
  unsigned long long old = a.load();
  while (v < old && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}
