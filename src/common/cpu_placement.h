// Where a thread runs: the CPU it is on, and a way off a CPU it shares with the thread it waits for.
// Used by the transports' waits (ranks) and the worker pool (a rank's threads).
#pragma once

#include <atomic>
#include <cstdint>
#include <span>

namespace moedist {

// The CPU the calling thread runs on now, -1 when the kernel cannot tell. Waits compare it with the CPU
// the awaited thread (a peer rank, a worker) last ran on: a thread that waits on the very CPU the other
// needs must give that CPU up, for the scheduler keeps two spinning threads that share a CPU together,
// each holding it for a whole slice (about 0.5 ms) while the other waits, even when another CPU is idle.
int current_cpu() noexcept;

// Moves the calling thread off `cpu`, a CPU it shares with a thread it works with, when the scheduler
// will not: a wake-up on a busy CPU does not always look for an idle one, so two ranks (or a rank's
// caller and its worker) that start on one CPU can stay there for a whole run, taking turns, while
// another CPU idles. The thread narrows its affinity to the allowed CPUs that are neither `cpu` nor
// `taken` (the CPUs the other threads last ran on), which makes the kernel move it at once, and then
// restores the affinity it had (it stays where it landed). A thread pinned to one CPU, or whose allowed
// CPUs are all taken, stays. Returns whether it now runs elsewhere.
//
// The threads that may move for one another (a host's ranks, a pool's threads) share `next_move_ns`
// (steady clock): one move among them per 1 ms, claimed by the first that tries, so that two threads
// on one CPU never both move to the same free one, and a thread the kernel keeps putting back is left
// alone for a while.
bool move_off_cpu(int cpu, std::span<const int> taken, std::atomic<std::int64_t>& next_move_ns) noexcept;
// The same with `taken` read from `cpus`, each thread's last CPU (current_cpu), all but thread `self`'s.
bool move_off_cpu(int cpu, std::span<const std::atomic<int>> cpus, int self,
                  std::atomic<std::int64_t>& next_move_ns) noexcept;
inline constexpr std::int64_t kMoveIntervalNs = 1'000'000;
// Whether a move may be tried now (the caller then gathers `taken`).
bool move_due(const std::atomic<std::int64_t>& next_move_ns) noexcept;

}  // namespace moedist
