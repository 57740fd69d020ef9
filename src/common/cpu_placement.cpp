#include "common/cpu_placement.h"

#include <sched.h>

namespace moedist {

int current_cpu() noexcept { return ::sched_getcpu(); }

bool CpuMover::move_off(int cpu, std::span<const int> taken) noexcept {
  if (!due() || cpu < 0 || cpu >= CPU_SETSIZE) return false;
  cpu_set_t allowed;
  CPU_ZERO(&allowed);
  if (::sched_getaffinity(0, sizeof allowed, &allowed) != 0) return false;
  cpu_set_t free = allowed;
  CPU_CLR(cpu, &free);
  for (int c : taken) {
    if (c >= 0 && c < CPU_SETSIZE) CPU_CLR(c, &free);
  }
  if (CPU_COUNT(&free) == 0) return false;  // no try: the CPUs may free up by the next wait
  next_try_ = std::chrono::steady_clock::now() + kInterval;
  if (::sched_setaffinity(0, sizeof free, &free) != 0) return false;
  const bool moved = ::sched_getcpu() != cpu;
  // The caller's own affinity again; a thread is moved only when its CPU leaves its mask, so it stays.
  ::sched_setaffinity(0, sizeof allowed, &allowed);
  return moved;
}

}  // namespace moedist
