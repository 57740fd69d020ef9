// Joining a CUDA group over any bootstrap transport: the shared-memory one (CudaGroup::join, a job name)
// or MPI's (cuda::join_mpi). The bootstrap only carries the join's records and the last barrier at
// destruction; rows never travel through it.
#pragma once

#include <functional>
#include <memory>

#include "moedist/cuda.h"
#include "transport/transport.h"

namespace moedist::cuda {

struct GroupJoin {
  // Makes the bootstrap (collective over the group's ranks) for options that join has validated and
  // completed (the device chosen, max_bs from global_bs).
  using Bootstrap = std::function<std::unique_ptr<Transport>(const CudaGroupOptions& resolved)>;
  static std::unique_ptr<CudaGroup> join(const GroupConfig& config, const CudaGroupOptions& options,
                                         const Bootstrap& bootstrap);
};

}  // namespace moedist::cuda
