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

bool move_off_cpu(int cpu, std::span<const int> taken, std::atomic<std::int64_t>& next_move_ns) noexcept {
  if (cpu < 0 || cpu >= CPU_SETSIZE) return false;
  const std::int64_t now = steady_now_ns();
  std::int64_t next = next_move_ns.load(std::memory_order_relaxed);
  if (now < next) return false;
  cpu_set_t allowed;
  CPU_ZERO(&allowed);
  if (::sched_getaffinity(0, sizeof allowed, &allowed) != 0) return false;
  cpu_set_t free = allowed;
  CPU_CLR(cpu, &free);
  for (int c : taken) {
    if (c >= 0 && c < CPU_SETSIZE) CPU_CLR(c, &free);
  }
  if (CPU_COUNT(&free) == 0) return false;  // no claim: the CPUs may free up by the next wait
  if (!next_move_ns.compare_exchange_strong(next, now + kMoveIntervalNs, std::memory_order_relaxed)) return false;
  if (::sched_setaffinity(0, sizeof free, &free) != 0) return false;
  const bool moved = ::sched_getcpu() != cpu;
  // The caller's own affinity again; a thread is moved only when its CPU leaves its mask, so it stays.
  ::sched_setaffinity(0, sizeof allowed, &allowed);
  return moved;
}

}  // namespace moedist
