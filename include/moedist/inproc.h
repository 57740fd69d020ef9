// The in-process runtime: N ranks as threads of one process, each calling dispatch/combine as a
// separate process would. No MPI, no setup.
#pragma once

#include <chrono>
#include <functional>
#include <memory>

#include "moedist/group.h"
#include "moedist/wait.h"

namespace moedist {

struct RuntimeOptions {
  // Longest wait for a peer in any phase (WaitOptions: 30 s by default).
  WaitOptions wait;
  // How long a waiting rank spins before it sleeps. Negative: automatic, 200 us when every rank can
  // have a core of its own; with more ranks than cores it instead yields the core for up to 2 ms
  // (spinning would take the core from the rank it waits for). Automatic waits also go on spinning
  // (yielding) while a rank still awaited is inside a dispatch or combine call, and sleep only while
  // none is. An explicit value (>= 0) spins that long and then sleeps.
  // Either way a waiter sleeps at once when the rank it awaits last ran on the waiter's own CPU, which
  // that rank cannot get while the waiter spins.
  std::chrono::microseconds spin{-1};
  // Virtual hosts: 0 puts every rank on one host. n > 0 puts global ranks [i*n, (i+1)*n) on host i:
  // ranks then address only their own host's windows and reach the others through messages, as ranks
  // on different machines do, so the node-aware paths run in one process.
  int ranks_per_host = 0;
};

class InProcessWorld {
 public:
  // world_size = ep_world_size * max(tp_world_size, 1) threads will join.
  explicit InProcessWorld(int world_size, RuntimeOptions options = {});
  ~InProcessWorld();
  InProcessWorld(const InProcessWorld&) = delete;
  InProcessWorld& operator=(const InProcessWorld&) = delete;

  int world_size() const noexcept;

  // Called once by each rank's thread; collective. The rank's place in the world is its global rank
  // ep_rank_id * max(tp_world_size, 1) + tp_rank_id. Ranks that disagree about the configuration get a
  // config_mismatch error. `options` are this rank's own (its worker threads): ranks may differ in them.
  std::unique_ptr<Group> join(const GroupConfig& config, const GroupOptions& options = {});

 private:
  struct Hub;
  std::shared_ptr<Hub> hub_;
};

// Runs fn(rank) for rank = 0..n-1 on n threads and waits for all. If any throw, rethrows the exception
// of the lowest failing rank after all threads finished.
void run_ranks(int n, const std::function<void(int rank)>& fn);

}  // namespace moedist
