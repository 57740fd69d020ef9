// CUDA groups whose ranks meet over MPI (built with both the CUDA backend and MPI: MOEDIST_HAVE_CUDA and
// MOEDIST_HAVE_MPI). The group is the same CudaGroup as CudaGroup::join makes, with the same calls and
// errors; only the bootstrap differs: the ranks exchange their windows' IPC handles over a private
// duplicate of the caller's communicator instead of the shared-memory bootstrap and a job name.
//
// MPI's threading rules are moedist::join_mpi's (moedist/mpi.h): MPI initialized before, finalized after
// the group is destroyed (destruction meets the other ranks over MPI one last time).
#pragma once

#include <mpi.h>

#include <memory>

#include "moedist/config.h"
#include "moedist/cuda.h"

namespace moedist::cuda {

// Joins as the rank `config` names. `comm` holds exactly the ep_world_size * max(tp_world_size, 1) ranks
// of the group, in any order (each rank's place is ep_rank_id * max(T, 1) + tp_rank_id). Collective over
// `comm`; options.wait bounds every wait of joining as of the calls.
//
// Hosts: every rank must be on one host (hostname and boot id), or on one virtual host when
// `ranks_per_node` (0: MOEDIST_RANKS_PER_NODE when set) splits a node's ranks into hosts as
// moedist::join_mpi does. A group across hosts is refused on every rank with ErrorCode::unsupported
// naming two ranks on different hosts, before any device memory is allocated: the CUDA backend does not
// carry rows between hosts yet (docs/cuda.md, "Not done yet").
std::unique_ptr<CudaGroup> join_mpi(MPI_Comm comm, const GroupConfig& config, const CudaGroupOptions& options,
                                    int ranks_per_node = 0);

}  // namespace moedist::cuda
