// Review item 2, under `mpirun --enable-recovery -np 3`: ranks that reach the join's hello at staggered
// times (the on_phase hook delays rank 0 by 1 s and rank 2 by 2.6 s, with a 2 s timeout). Rank 1's
// hello times out while ranks 0 and 2 complete theirs; every join_mpi must still return, with a named
// error, within the delay plus about twice the timeout (a blocking collective after the hello would
// leave ranks 0 and 2 waiting forever for rank 1). Each rank prints "returned" once it has.
#include <mpi.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <thread>

#include "moedist/error.h"
#include "moedist/mpi.h"

using namespace moedist;

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, size = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  GroupConfig c;
  c.moe_expert_num = 2 * size;
  MpiOptions o;
  o.wait.timeout = std::chrono::milliseconds(2000);
  o.ranks_per_node = 1;
  const std::chrono::milliseconds delay(rank == 0 ? 1000 : rank == 2 ? 2600 : 0);
  int steps = 0;
  o.on_phase = [&](std::string_view) {
    if (steps++ == 0) std::this_thread::sleep_for(delay);  // the hello: this rank arrives late
  };
  MPI_Barrier(MPI_COMM_WORLD);
  const auto start = std::chrono::steady_clock::now();
  std::string got = "no error";
  bool named = false;
  try {
    join_mpi_world(c, MPI_COMM_WORLD, o);
  } catch (const Error& e) {
    got = std::string(error_code_name(e.code())) + ": " + e.what();
    named = e.code() == ErrorCode::timeout || e.code() == ErrorCode::peer_lost;
  }
  const auto ms =
      std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - start).count();
  // Generous: the bound that matters is "returns at all"; 2 timeouts + the delay + slack for a loaded machine.
  const bool in_time = ms < delay.count() + 3 * o.wait.timeout.count() + 10000;
  std::printf("rank %d: join %s after %lld ms (%s): %s\n", rank, named && in_time ? "returned" : "WRONG",
              static_cast<long long>(ms), in_time ? "in time" : "too late", got.c_str());
  std::fflush(stdout);
  // The ranks are out of step after a failed join: no collective, leave without MPI_Finalize.
  std::_Exit(0);
}
