// Review item 12, under `mpirun -np 2`: with MPI initialized at MPI_THREAD_FUNNELED, a join from a
// thread other than the main one must be refused with invalid_argument naming the level (MPI does not
// allow that thread to call MPI); the same join from the main thread must still work.
#include <mpi.h>

#include <cstdio>
#include <string>
#include <thread>

#include "moedist/error.h"
#include "moedist/mpi.h"

using namespace moedist;

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
  int rank = 0, size = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  GroupConfig c;
  c.moe_expert_num = 2 * size;
  MpiOptions o;
  o.wait.timeout = std::chrono::milliseconds(10000);
  bool ok = true;
  if (provided < MPI_THREAD_SERIALIZED) {
    std::string got = "no error";
    bool refused = false;
    std::thread other([&] {
      try {
        join_mpi_world(c, MPI_COMM_WORLD, o);
      } catch (const Error& e) {
        got = std::string(error_code_name(e.code())) + ": " + e.what();
        refused = e.code() == ErrorCode::invalid_argument && got.find("MPI_THREAD_") != std::string::npos &&
                  got.find("main thread") != std::string::npos;
      }
    });
    other.join();
    std::printf("rank %d: join from another thread at level %d: %s%s\n", rank, provided,
                refused ? "ok: " : "WRONG: ", got.c_str());
    ok = refused;
  }
  MPI_Barrier(MPI_COMM_WORLD);
  try {
    join_mpi_world(c, MPI_COMM_WORLD, o);
    std::printf("rank %d: join from the main thread: ok\n", rank);
  } catch (const Error& e) {
    std::printf("rank %d: join from the main thread: WRONG: %s\n", rank, e.what());
    ok = false;
  }
  int all = ok ? 1 : 0;
  MPI_Allreduce(MPI_IN_PLACE, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  MPI_Finalize();
  return all == 1 ? 0 : 1;
}
