// Groups over MPI: the EP (and TP) group from a communicator.
#include "common/format.h"
#include "moedist/mpi.h"
#include "transport/mpi/mpi_transport.h"

namespace moedist {

std::unique_ptr<Group> join_mpi(MPI_Comm comm, const GroupConfig& config, const MpiOptions& options) {
  validate_config(config);
  if (options.wait.timeout.count() <= 0)
    fail_value("MpiOptions::timeout (ms)", options.wait.timeout.count(), "must be > 0");
  validate_group_options(options.group);
  mpi::require_group_comm(comm, config);
  return std::make_unique<Group>(config, std::make_unique<mpi::MpiTransport>(comm, global_rank(config), options),
                                 options.group);
}

std::unique_ptr<Group> join_mpi_world(GroupConfig config, MPI_Comm comm, const MpiOptions& options) {
  const int size = mpi::comm_size_of(comm);
  const int t = tp_domain_size(config);
  if (size % t != 0) {
    fail(ErrorCode::config_mismatch, "tp_world_size", concat(config.tp_world_size),
         concat("must divide the size of comm, ", size));
  }
  int rank = 0;
  MPI_Comm_rank(comm, &rank);
  config.ep_world_size = size / t;
  config.ep_rank_id = rank / t;
  config.tp_rank_id = rank % t;
  return join_mpi(comm, config, options);
}

}  // namespace moedist
