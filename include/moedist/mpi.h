// Groups over MPI, for ranks on several machines. Ranks on one host (one machine: hostname and boot id) share memory
// as with join_shm; only the traffic between hosts goes through MPI, once per token and host
// (docs/mpi.md). Available when moedist was built with MPI (`moedist --version` says).
//
// MPI must be initialized (MPI_Init or MPI_Init_thread) before a group is made and finalized only after
// every group is destroyed. A group makes its MPI calls from the thread that calls join_mpi, dispatch and
// combine (one call at a time). With MPI_THREAD_SINGLE or MPI_THREAD_FUNNELED that must be the main
// thread (join_mpi checks, with MPI_Is_thread_main, and throws invalid_argument otherwise); from any
// other thread, initialize MPI at MPI_THREAD_SERIALIZED or better and do not call MPI elsewhere meanwhile.
#pragma once

#include <mpi.h>

#include <chrono>
#include <functional>
#include <memory>
#include <string_view>

#include "moedist/group.h"
#include "moedist/wait.h"

namespace moedist {

struct MpiOptions {
  // Longest wait for a peer in any phase, joining included (WaitOptions: 30 s by default). An
  // unreachable host (a cut link, a dead machine) is reported after this long, naming the rank waited for.
  WaitOptions wait;
  // How long a waiting rank polls before it starts to sleep between polls. Negative: automatic, as in
  // ShmOptions::spin.
  std::chrono::microseconds spin{-1};
  // This rank's execution options (its worker threads, GroupOptions): each rank may choose its own.
  GroupOptions group;
  // Virtual hosts: 0 takes MOEDIST_RANKS_PER_NODE from the environment when set, else the real nodes
  // (hostname and boot id). n > 0 splits each node's ranks, in global-rank order, into hosts of n ranks
  // whose traffic between each other goes through MPI as if they were separate machines. With TP,
  // n must be even (a TP pair shares a host).
  int ranks_per_node = 0;
  // Test hook: called with the phase name as every collective step starts (fault-injection tests kill
  // the process from here). Leave empty in production.
  std::function<void(std::string_view phase)> on_phase;
  // Test hook: when > 0, the longest message one rank may send another in a step (MPI's own limit is
  // 2^31 - 1 bytes), so that tests reach the "message too long" error without 2 GiB of data. Leave 0.
  std::size_t test_message_limit = 0;
};

// Joins the group as the rank `config` names. `comm` holds exactly the ep_world_size * max(tp_world_size, 1)
// ranks of the group, in any order (each rank's place is ep_rank_id * max(T, 1) + tp_rank_id); moedist
// duplicates it, so the caller's own traffic on `comm` is not disturbed. Collective over `comm`.
std::unique_ptr<Group> join_mpi(MPI_Comm comm, const GroupConfig& config, const MpiOptions& options = {});

// Joins with the ranks of `comm` placed the way the operator page's example splits them: comm rank
// g is ep_rank_id = g / T, tp_rank_id = g % T (EP groups [x*T + i], TP groups [x*T, x*T + 1]).
// ep_world_size is set to size(comm) / T; config's ep_rank_id and tp_rank_id are ignored.
std::unique_ptr<Group> join_mpi_world(GroupConfig config, MPI_Comm comm = MPI_COMM_WORLD, const MpiOptions& options = {});

}  // namespace moedist
