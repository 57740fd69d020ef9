#include "common/cpu_placement.h"

#include <sched.h>

#include <chrono>

namespace moedist {

int current_cpu() noexcept { return ::sched_getcpu(); }

namespace {

std::int64_t steady_now_ns() noexcept {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
}  // namespace

bool move_due(const std::atomic<std::int64_t>& next_move_ns) noexcept {
  return steady_now_ns() >= next_move_ns.load(std::memory_order_relaxed);
}

namespace {

// move_off_cpu's work; clear_taken(set) removes the other threads' CPUs from `set`.
template <class ClearTaken>
bool move_off(int cpu, const ClearTaken& clear_taken, std::atomic<std::int64_t>& next_move_ns) noexcept {
  if (cpu < 0 || cpu >= CPU_SETSIZE) return false;
  const std::int64_t now = steady_now_ns();
  std::int64_t next = next_move_ns.load(std::memory_order_relaxed);
  if (now < next) return false;
  cpu_set_t allowed;
  CPU_ZERO(&allowed);
  if (::sched_getaffinity(0, sizeof allowed, &allowed) != 0) return false;
  cpu_set_t free = allowed;
  CPU_CLR(cpu, &free);
  clear_taken(free);
  if (CPU_COUNT(&free) == 0) return false;  // no claim: the CPUs may free up by the next wait
  if (!next_move_ns.compare_exchange_strong(next, now + kMoveIntervalNs, std::memory_order_relaxed)) return false;
  if (::sched_setaffinity(0, sizeof free, &free) != 0) return false;
  const bool moved = ::sched_getcpu() != cpu;
  // The caller's own affinity again; a thread is moved only when its CPU leaves its mask, so it stays.
  ::sched_setaffinity(0, sizeof allowed, &allowed);
  return moved;
}

void clear_cpu(int c, cpu_set_t& set) noexcept {
  if (c >= 0 && c < CPU_SETSIZE) CPU_CLR(c, &set);
}

}  // namespace

bool move_off_cpu(int cpu, std::span<const int> taken, std::atomic<std::int64_t>& next_move_ns) noexcept {
  return move_off(
      cpu,
      [&](cpu_set_t& set) {
        for (int c : taken) clear_cpu(c, set);
      },
      next_move_ns);
}

bool move_off_cpu(int cpu, std::span<const std::atomic<int>> cpus, int self,
                  std::atomic<std::int64_t>& next_move_ns) noexcept {
  return move_off(
      cpu,
      [&](cpu_set_t& set) {
        for (std::size_t t = 0; t < cpus.size(); ++t) {
          if (static_cast<int>(t) != self) clear_cpu(cpus[t].load(std::memory_order_relaxed), set);
        }
      },
      next_move_ns);
}

}  // namespace moedist
