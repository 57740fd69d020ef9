// The fork-join pool (worker_pool.h). A job is published by bumping epoch_; a waiting side first spins
// (a call's next parallel loop usually follows within microseconds), then parks. A parked side
// announces itself in sleeping_ / caller_sleeping_ before it re-checks its condition under the mutex,
// and the publishing side checks that flag after its store (both sequentially consistent), so either
// the sleeper sees the new value or the publisher sees the sleeper and notifies it: no lost wake-up.
#include "common/worker_pool.h"

#include <algorithm>
#include <chrono>

namespace moedist {

namespace {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Spins until done() holds or `spin` has passed; returns whether done() holds.
template <class Done>
bool spin_until(Done&& done, std::chrono::microseconds spin) {
  const auto deadline = std::chrono::steady_clock::now() + spin;
  for (int i = 1;; ++i) {
    if (done()) return true;
    cpu_relax();
    if (i % 64 == 0) {
      if (std::chrono::steady_clock::now() >= deadline) return done();
      std::this_thread::yield();  // with more threads than cores, let the one we wait for run
    }
  }
}

constexpr std::chrono::microseconds kWorkerSpin{100};  // between jobs, before a worker parks
constexpr std::chrono::microseconds kCallerSpin{50};   // for the last chunks, before the caller parks
constexpr int kChunkBits = 16;                         // threads <= 2^16 - 1

}  // namespace

WorkerPool::WorkerPool(int threads)
    : threads_(std::clamp(threads, 1, (1 << kChunkBits) - 1)), cpus_(static_cast<std::size_t>(threads_)) {
  for (std::atomic<int>& cpu : cpus_) cpu.store(-1, std::memory_order_relaxed);
  workers_.reserve(static_cast<std::size_t>(threads_ - 1));
  try {
    for (int i = 1; i < threads_; ++i) workers_.emplace_back([this, i] { worker_loop(i); });
  } catch (...) {
    shut_down();  // joins the workers already started
    throw;
  }
}

WorkerPool::~WorkerPool() { shut_down(); }

void WorkerPool::shut_down() noexcept {
  {
    const std::lock_guard<std::mutex> lock(mutex_);
    stop_.store(true);
  }
  wake_.notify_all();
  for (std::thread& t : workers_) {
    if (t.joinable()) t.join();
  }
  workers_.clear();
}

int WorkerPool::chunk_count(std::int64_t items, std::int64_t min_chunk) const {
  if (threads_ == 1 || items <= 1) return 1;
  const std::int64_t most = std::max<std::int64_t>(1, items / std::max<std::int64_t>(min_chunk, 1));
  return static_cast<int>(std::min<std::int64_t>(threads_, most));
}

void WorkerPool::run_chunk(int i) noexcept {
  const std::int64_t b = chunk_begin(job_.begin, job_.end, job_.chunks, i);
  const std::int64_t e = chunk_begin(job_.begin, job_.end, job_.chunks, i + 1);
  try {
    if (e > b) job_.call(job_.fn, b, e, i);
  } catch (...) {
    const std::lock_guard<std::mutex> lock(error_mutex_);
    if (!error_) error_ = std::current_exception();
  }
}

void WorkerPool::run(const Job& job) {
  job_ = job;
  error_ = nullptr;
  pending_.store(job.chunks - 1);
  // Publishes job_ to the workers: a new number, with the chunk count in the low bits.
  const std::uint64_t number = (epoch_.load() >> kChunkBits) + 1;
  epoch_.store(number << kChunkBits | static_cast<std::uint64_t>(job.chunks));
  if (sleeping_.load() > 0) {
    { const std::lock_guard<std::mutex> lock(mutex_); }
    wake_.notify_all();
  }
  const int my_cpu = current_cpu();
  cpus_[0].store(my_cpu, std::memory_order_relaxed);
  run_chunk(0);
  // A worker that last ran on this CPU cannot run its chunk while the caller spins here: park at once.
  const auto worker_here = [&] {
    if (my_cpu < 0) return false;
    for (int t = 1; t < job.chunks; ++t) {
      if (cpus_[static_cast<std::size_t>(t)].load(std::memory_order_relaxed) == my_cpu) return true;
    }
    return false;
  };
  if (!spin_until([&] { return pending_.load() == 0 || worker_here(); }, kCallerSpin) || pending_.load() != 0) {
    std::unique_lock<std::mutex> lock(mutex_);
    caller_sleeping_.store(true);
    done_.wait(lock, [&] { return pending_.load() == 0; });
    caller_sleeping_.store(false);
  }
  if (error_) {
    std::exception_ptr e = error_;
    error_ = nullptr;
    std::rethrow_exception(e);
  }
}

void WorkerPool::place_worker(int i) noexcept {
  int cpu = current_cpu();
  const auto shared = [&] {
    for (int t = 0; t < threads_; ++t) {
      if (t != i && cpus_[static_cast<std::size_t>(t)].load(std::memory_order_relaxed) == cpu) return true;
    }
    return false;
  };
  if (cpu >= 0 && shared() && move_off_cpu(cpu, cpus_, i, next_move_ns_)) cpu = current_cpu();
  cpus_[static_cast<std::size_t>(i)].store(cpu, std::memory_order_relaxed);
}

void WorkerPool::worker_loop(int i) {
  std::uint64_t seen = 0;
  for (;;) {
    const auto ready = [&] { return stop_.load() || epoch_.load() != seen; };
    if (!spin_until(ready, kWorkerSpin)) {
      std::unique_lock<std::mutex> lock(mutex_);
      sleeping_.fetch_add(1);
      wake_.wait(lock, ready);
      sleeping_.fetch_sub(1);
    }
    if (stop_.load()) return;
    seen = epoch_.load();
    // A job of fewer chunks than threads leaves the last workers out; they must not read job_, which
    // the caller may already be rewriting for the next job.
    if (i >= static_cast<int>(seen & ((1u << kChunkBits) - 1))) continue;
    place_worker(i);
    run_chunk(i);
    if (pending_.fetch_sub(1) == 1 && caller_sleeping_.load()) {
      { const std::lock_guard<std::mutex> lock(mutex_); }
      done_.notify_one();
    }
  }
}

}  // namespace moedist
