// The errors of joining a group over MPI, under `mpirun -np 2`: each scenario must raise the
// documented error with its message on both ranks, and the next scenario must still work.
#include <mpi.h>

#include <cstdio>
#include <functional>
#include <string>

#include "moedist/error.h"
#include "moedist/mpi.h"

using namespace moedist;

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, size = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  int passed = 0, total = 0;
  const auto expect = [&](const char* name, ErrorCode code, const std::string& text, const std::function<void()>& join) {
    ++total;
    std::string got = "no error";
    bool ok = false;
    try {
      join();
    } catch (const Error& e) {
      got = std::string(error_code_name(e.code())) + ": " + e.what();
      ok = e.code() == code && std::string(e.what()).find(text) != std::string::npos;
    }
    std::printf("rank %d: %s: %s%s\n", rank, name, ok ? "ok: " : "WRONG: ", got.c_str());
    passed += ok ? 1 : 0;
    MPI_Barrier(MPI_COMM_WORLD);
  };
  GroupConfig c;
  c.ep_world_size = size;
  c.ep_rank_id = rank;
  c.moe_expert_num = 2 * size;
  MpiOptions o;
  o.wait.timeout = std::chrono::milliseconds(10000);

  GroupConfig wrong_size = c;
  wrong_size.ep_world_size = size + 1;
  wrong_size.moe_expert_num = 2 * (size + 1);
  expect("a config for another world size", ErrorCode::config_mismatch,
         "ep_world_size * max(tp_world_size, 1) = " + std::to_string(size + 1) + ": must equal the size of comm, " + std::to_string(size),
         [&] { join_mpi(MPI_COMM_WORLD, wrong_size, o); });

  GroupConfig same_rank = c;
  same_rank.ep_rank_id = 0;
  expect("two ranks joining as rank 0", ErrorCode::config_mismatch, "both joined as group rank 0",
         [&] { join_mpi(MPI_COMM_WORLD, same_rank, o); });

  MpiOptions uneven = o;
  uneven.ranks_per_node = rank == 0 ? 2 : 1;
  expect("ranks disagreeing about ranks_per_node", ErrorCode::config_mismatch, "every rank must use the same value",
         [&] { join_mpi(MPI_COMM_WORLD, c, uneven); });

  GroupConfig tp = c;
  tp.ep_world_size = size / 2;
  tp.ep_rank_id = rank / 2;
  tp.tp_world_size = 2;
  tp.tp_rank_id = rank % 2;
  tp.moe_expert_num = size / 2;
  MpiOptions split = o;
  split.ranks_per_node = 1;
  expect("a TP pair split over two hosts", ErrorCode::config_mismatch, "must share a host",
         [&] { join_mpi(MPI_COMM_WORLD, tp, split); });

  // And a correct group afterwards.
  ++total;
  try {
    auto group = join_mpi(MPI_COMM_WORLD, c, o);
    ++passed;
    std::printf("rank %d: a correct group after the failed ones: ok\n", rank);
  } catch (const Error& e) {
    std::printf("rank %d: a correct group after the failed ones: WRONG: %s\n", rank, e.what());
  }
  int all = 0;
  MPI_Allreduce(&passed, &all, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  if (rank == 0) std::printf("join errors: %d of %d as documented\n", all, total * size);
  MPI_Finalize();
  return all == total * size ? 0 : 1;
}
