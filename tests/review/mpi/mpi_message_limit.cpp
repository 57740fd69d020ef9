// Review item 6, under `mpirun -np 3` with one rank per (virtual) host: rank 0's messages are over its
// message limit (MpiOptions::test_message_limit stands in for MPI's 2^31 - 1 bytes). Every rank must
// raise capacity naming rank 0 — not time out waiting for it — and the next call must be refused at
// once as unusable, not reuse requests still in flight.
#include <mpi.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "moedist/moedist.h"
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
  o.wait.timeout = std::chrono::milliseconds(20000);
  o.ranks_per_node = 1;
  if (rank == 0) o.test_message_limit = 64;
  bool ok = false;
  try {
    auto group = join_mpi_world(c, MPI_COMM_WORLD, o);
    constexpr int kTokens = 8, kTopK = 2, kHidden = 64;
    std::vector<std::uint16_t> x(kTokens * kHidden, 0x3f80);
    std::vector<std::int32_t> ids;
    for (int t = 0; t < kTokens; ++t)
      ids.insert(ids.end(), {(rank * 2 + 2 + t) % c.moe_expert_num, (rank * 2 + 3 + t) % c.moe_expert_num});
    const auto xv = matrix_view(x.data(), DType::bf16, kTokens, kHidden);
    const auto iv = matrix_view(ids.data(), DType::int32, kTokens, kTopK);
    std::string got = "no error";
    try {
      group->dispatch(xv, iv);
    } catch (const Error& e) {
      got = std::string(error_code_name(e.code())) + ": " + e.what();
      const auto* pe = dynamic_cast<const PeerError*>(&e);
      ok = e.code() == ErrorCode::capacity && pe != nullptr && pe->peer() == 0;
    }
    std::printf("rank %d: dispatch with rank 0 over its message limit: %s%s\n", rank,
                ok ? "ok: " : "WRONG: ", got.c_str());
    std::string next = "no error";
    try {
      group->dispatch(xv, iv);
      ok = false;
    } catch (const Error& e) {
      next = std::string(error_code_name(e.code())) + ": " + e.what();
      ok = ok && e.code() == ErrorCode::peer_failed;
    }
    std::printf("rank %d: the next dispatch: %s\n", rank, next.c_str());
  } catch (const Error& e) {
    std::printf("rank %d: join: WRONG: %s\n", rank, e.what());
  }
  std::fflush(stdout);
  // The group failed, so its ranks may not be in step: end with an exit code, not a collective.
  MPI_Finalize();
  return ok ? 0 : 1;
}
