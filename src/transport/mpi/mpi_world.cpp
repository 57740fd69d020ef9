// Groups over MPI: the EP (and TP) group from a communicator.
#include "common/format.h"
#include "moedist/mpi.h"
#include "transport/mpi/mpi_transport.h"

namespace moedist {

namespace {
int comm_size_of(MPI_Comm comm) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (initialized == 0)
    throw Error(ErrorCode::invalid_argument, "join_mpi: MPI is not initialized (call MPI_Init first)");
  if (comm == MPI_COMM_NULL)
    fail(ErrorCode::invalid_argument, "comm", "MPI_COMM_NULL", "must be a communicator of the group's ranks");
  int size = 0;
  MPI_Comm_size(comm, &size);
  return size;
}
}  // namespace

std::unique_ptr<Group> join_mpi(MPI_Comm comm, const GroupConfig& config, const MpiOptions& options) {
  validate_config(config);
  if (options.wait.timeout.count() <= 0)
    fail_value("MpiOptions::timeout (ms)", options.wait.timeout.count(), "must be > 0");
  validate_group_options(options.group);
  const int world = config.ep_world_size * tp_domain_size(config);
  const int size = comm_size_of(comm);
  if (size != world) {
    fail(ErrorCode::config_mismatch, "ep_world_size * max(tp_world_size, 1)", concat(world),
         concat("must equal the size of comm, ", size));
  }
  return std::make_unique<Group>(config, std::make_unique<mpi::MpiTransport>(comm, global_rank(config), options),
                                 options.group);
}

std::unique_ptr<Group> join_mpi_world(GroupConfig config, MPI_Comm comm, const MpiOptions& options) {
  const int size = comm_size_of(comm);
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
