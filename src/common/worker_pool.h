// A fork-join pool for one rank's row work: N - 1 persistent worker threads plus the calling thread.
// parallel_for splits [begin, end) into at most N contiguous chunks, chunk i to thread i (the caller
// runs chunk 0), and returns once every chunk is done. With N == 1, or a range too small to split, it
// runs inline with no synchronisation at all. Between calls the workers spin briefly, then sleep on a
// condition variable, so an idle pool costs no CPU. An exception thrown by a chunk reaches the caller
// (the first one recorded wins) after every chunk has finished.
//
// One parallel_for at a time, from one thread (the group's calls are serial); not from inside a chunk.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#include "common/cpu_placement.h"

namespace moedist {

class WorkerPool {
 public:
  explicit WorkerPool(int threads);  // threads >= 1: the caller plus threads - 1 workers
  ~WorkerPool();
  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;

  int size() const noexcept { return threads_; }

  // fn(chunk_begin, chunk_end, thread) for contiguous chunks covering [begin, end), thread in [0, size()).
  // Chunks hold at least min_chunk items each (when the range has that many), so small ranges stay on
  // the calling thread.
  template <class Fn>
  void parallel_for(std::int64_t begin, std::int64_t end, std::int64_t min_chunk, Fn&& fn) {
    const int chunks = chunk_count(end - begin, min_chunk);
    if (chunks <= 1) {
      if (end > begin) fn(begin, end, 0);
      return;
    }
    auto call = [](void* f, std::int64_t b, std::int64_t e, int thread) { (*static_cast<Fn*>(f))(b, e, thread); };
    run(Job{call, static_cast<void*>(&fn), begin, end, chunks});
  }

  // Chunk i of `chunks` over [begin, end): the split parallel_for uses.
  static std::int64_t chunk_begin(std::int64_t begin, std::int64_t end, int chunks, int i) {
    return begin + (end - begin) * i / chunks;
  }

 private:
  struct Job {
    void (*call)(void*, std::int64_t, std::int64_t, int) = nullptr;
    void* fn = nullptr;
    std::int64_t begin = 0, end = 0;
    int chunks = 0;
  };

  int chunk_count(std::int64_t items, std::int64_t min_chunk) const;
  void run(const Job& job);
  void run_chunk(int i) noexcept;
  // Records where worker i runs, moving it first when it shares a CPU with another thread of the pool.
  void place_worker(int i) noexcept;
  void worker_loop(int i);
  void shut_down() noexcept;

  const int threads_;
  std::vector<std::thread> workers_;
  Job job_;
  // The job's number (high bits) and its chunk count (low 16 bits), bumped for every job: a worker
  // reads whether it has a chunk from here, and touches job_ only then (the caller waits for it).
  std::atomic<std::uint64_t> epoch_{0};
  std::atomic<int> pending_{0};  // chunks of the current job not finished yet
  std::atomic<bool> stop_{false};
  std::atomic<int> sleeping_{0};  // workers parked on wake_
  std::atomic<bool> caller_sleeping_{false};
  std::mutex mutex_;
  std::condition_variable wake_;  // workers: a new epoch or stop
  std::condition_variable done_;  // the caller: pending_ reached 0
  std::mutex error_mutex_;
  std::exception_ptr error_;
  // The CPU each thread (0: the caller) last ran a chunk on (current_cpu). A worker woken onto the
  // caller's CPU, or another worker's, moves to a free one (move_off_cpu); else the pool would run its
  // chunks one after the other on one CPU.
  std::vector<std::atomic<int>> cpus_;
  std::atomic<std::int64_t> next_move_ns_{0};
};

}  // namespace moedist
