// Ranks as separate processes on one host, connected through shared memory.
//
// Each rank's window is a memfd mapped by every rank of the job: dispatch writes every row straight
// into its receiver's window (one copy), combine reads expert outputs straight from the expert ranks'
// windows. Nothing is created in /dev/shm. Processes find each other through abstract Unix sockets
// named after the job, accept only peers of the same user, and exchange the memfds over them.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "moedist/group.h"
#include "moedist/launch.h"  // LaunchEnvironment, which join_shm_from_env reads
#include "moedist/wait.h"

namespace moedist {

struct ShmOptions {
  // Longest wait for a peer in any phase, connecting included (WaitOptions: 30 s by default). A peer
  // that exits or is killed is reported sooner, as soon as its connection closes (ErrorCode::peer_lost).
  WaitOptions wait;
  // How long a waiting rank spins before it sleeps on a futex. Negative: automatic, 200 us when every
  // rank of the job can have a core of its own; with more ranks than cores it instead yields the core
  // for up to 2 ms (spinning would take the core from the rank it waits for). Automatic waits also go
  // on spinning (yielding) while the awaited rank is inside a dispatch or combine call, on its way to
  // the step, and sleep only while it is not (between calls, in the caller's own work). An explicit
  // value (>= 0) spins that long and then sleeps.
  // Either way a waiter sleeps at once when the rank it awaits last ran on the waiter's own CPU, which
  // that rank cannot get while the waiter spins.
  std::chrono::microseconds spin{-1};
  // This rank's execution options (its worker threads, GroupOptions): each process may choose its own.
  GroupOptions group;
  // Test hook: called with the phase name as every collective step starts (fault-injection tests
  // kill the process from here). Leave empty in production.
  std::function<void(std::string_view phase)> on_phase;
};

// Joins the group of job `job` as the rank the config names (global rank ep_rank_id * max(T, 1) +
// tp_rank_id, world size ep_world_size * max(T, 1)). Collective over all processes of the job.
std::unique_ptr<Group> join_shm(const GroupConfig& config, const std::string& job, const ShmOptions& options = {});

// Joins from the launcher's environment (launch_environment(), moedist/launch.h): ep_rank_id and tp_rank_id
// come from MOEDIST_RANK (global rank g = ep_rank * max(tp_world_size, 1) + tp_rank); tp_world_size from
// MOEDIST_TP_WORLD_SIZE unless the config sets it; the world size must equal ep_world_size * max(T, 1).
std::unique_ptr<Group> join_shm_from_env(GroupConfig config, const ShmOptions& options = {});

}  // namespace moedist
