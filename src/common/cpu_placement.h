// Where a thread runs: the CPU it is on, and a way off a CPU it shares with the thread it waits for.
// Used by the transports' waits (ranks) and the worker pool (a rank's threads).
#pragma once

#include <chrono>
#include <span>

namespace moedist {

// The CPU the calling thread runs on now, -1 when the kernel cannot tell. Waits compare it with the CPU
// the awaited thread (a peer rank, a worker) last ran on: a thread that waits on the very CPU the other
// needs must give that CPU up, for the scheduler keeps two spinning threads that share a CPU together,
// each holding it for a whole slice (about 0.5 ms) while the other waits, even when another CPU is idle.
int current_cpu() noexcept;

// Moves a thread off the CPU it shares with a thread it works with, when the scheduler will not: a
// wake-up on a busy CPU does not always look for an idle one, so two ranks (or a rank's caller and its
// worker) that start on one CPU can stay there for a whole run, taking turns, while another CPU idles.
// The thread narrows its affinity to the allowed CPUs that are neither `cpu` nor `taken` (the CPUs the
// other threads last ran on), which
// makes the kernel move it at once, and then restores the affinity it had (it stays where it landed).
// A thread pinned to one CPU, or whose allowed CPUs are all taken, stays. At most one move per 5 ms, so
// a thread that the kernel keeps putting back is left alone.
class CpuMover {
 public:
  // Whether a try is allowed now (the caller then gathers `taken`).
  bool due() const noexcept { return std::chrono::steady_clock::now() >= next_try_; }
  // Tries to move the calling thread off `cpu`; returns whether it now runs elsewhere.
  bool move_off(int cpu, std::span<const int> taken) noexcept;

 private:
  std::chrono::steady_clock::time_point next_try_{};
  static constexpr std::chrono::milliseconds kInterval{5};
};

}  // namespace moedist
