// Review item 10 (MPI part), under `mpirun -np 2`: a join that fails after MPI_Comm_idup completed
// (here: both ranks claim group rank 0, config_mismatch; and ranks disagreeing about ranks_per_node)
// must free its duplicate communicator. MPI exposes no count of communicators, so the test reads the
// Fortran handle (MPI_Comm_c2f) of a fresh MPI_Comm_dup: Open MPI gives it the lowest free slot of its
// communicator table, so it is the same before and after 20 failed joins unless a join leaked one.
#include <mpi.h>

#include <cstdio>

#include "moedist/error.h"
#include "moedist/mpi.h"

using namespace moedist;

namespace {
MPI_Fint probe_slot() {
  MPI_Comm probe = MPI_COMM_NULL;
  MPI_Comm_dup(MPI_COMM_WORLD, &probe);
  const MPI_Fint slot = MPI_Comm_c2f(probe);
  MPI_Comm_free(&probe);
  return slot;
}
}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, size = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  GroupConfig same_rank;
  same_rank.moe_expert_num = 2 * size;
  same_rank.ep_world_size = size;
  same_rank.ep_rank_id = 0;
  MpiOptions o;
  o.wait.timeout = std::chrono::milliseconds(10000);
  MpiOptions uneven = o;
  uneven.ranks_per_node = rank == 0 ? 2 : 1;
  const MPI_Fint before = probe_slot();
  int refused = 0;
  for (int i = 0; i < 20; ++i) {
    try {
      join_mpi(MPI_COMM_WORLD, same_rank, i % 2 == 0 ? o : uneven);
    } catch (const Error& e) {
      refused += e.code() == ErrorCode::config_mismatch ? 1 : 0;
    }
    MPI_Barrier(MPI_COMM_WORLD);
  }
  const MPI_Fint after = probe_slot();
  const bool ok = refused == 20 && after == before;
  std::printf(
      "rank %d: %d of 20 joins refused (config_mismatch); communicator slot of a fresh dup %d before, %d after: %s\n",
      rank, refused, static_cast<int>(before), static_cast<int>(after),
      ok ? "ok" : "WRONG (a failed join leaked its communicator)");
  int all = ok ? 1 : 0;
  MPI_Allreduce(MPI_IN_PLACE, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  MPI_Finalize();
  return all == 1 ? 0 : 1;
}
