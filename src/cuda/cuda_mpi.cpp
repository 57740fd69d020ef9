// CUDA groups whose ranks meet over MPI: the MPI transport as the join's bootstrap.
#include "moedist/cuda_mpi.h"

#include "common/format.h"
#include "cuda/group_join.h"
#include "moedist/error.h"
#include "moedist/mpi.h"
#include "transport/mpi/mpi_transport.h"

namespace moedist::cuda {

std::unique_ptr<CudaGroup> join_mpi(MPI_Comm comm, const GroupConfig& config, const CudaGroupOptions& options,
                                    int ranks_per_node) {
  if (ranks_per_node < 0) fail_value("ranks_per_node", ranks_per_node, "must be >= 0");
  validate_config(config);
  mpi::require_group_comm(comm, config);
  return GroupJoin::join(config, options, [&](const CudaGroupOptions& resolved) -> std::unique_ptr<Transport> {
    MpiOptions boot;
    boot.wait.timeout = resolved.wait.timeout;
    boot.ranks_per_node = ranks_per_node;
    return std::make_unique<mpi::MpiTransport>(comm, global_rank(config), boot);
  });
}

}  // namespace moedist::cuda
