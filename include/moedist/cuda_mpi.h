// CUDA groups whose ranks meet over MPI (built with both the CUDA backend and MPI: MOEDIST_HAVE_CUDA and
// MOEDIST_HAVE_MPI), on one host or across hosts. The group is the same CudaGroup as CudaGroup::join
// makes, with the same calls, results and errors; the ranks meet over a private duplicate of the
// caller's communicator instead of the shared-memory bootstrap and a job name.
//
// MPI's rules are moedist::join_mpi's (moedist/mpi.h): MPI initialized before joining and finalized after
// the group is destroyed (destruction meets the other ranks over MPI one last time); join, the calls of a
// group across hosts and destruction make MPI calls from the calling thread, one at a time.
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
// Hosts: the ranks may be on several hosts (hostname and boot id), or on virtual hosts when
// `ranks_per_node` (0: MOEDIST_RANKS_PER_NODE when set) splits a node's ranks into hosts as
// moedist::join_mpi does. Within a host the ranks share windows through CUDA IPC; between hosts, records
// and rows travel through MPI, each token once to each other host that holds one of its targets, and
// results stay the oracle's, bit for bit (docs/cuda.md, "Across hosts"). Such a group needs the same
// number of ranks on every host and each TP pair on one host (ErrorCode::unsupported on every rank
// otherwise, before any device memory is allocated). Its calls wait for the stream between their steps
// while the host exchanges messages, so they cannot be captured in a CUDA graph (unsupported); their last
// kernels are enqueued as on one host, and synchronize() reports what the GPU saw, as always.
std::unique_ptr<CudaGroup> join_mpi(MPI_Comm comm, const GroupConfig& config, const CudaGroupOptions& options,
                                    int ranks_per_node = 0);

}  // namespace moedist::cuda
