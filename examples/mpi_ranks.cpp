// One rank of an MPI job. Start 4 of them, on one machine or across several, with
//   mpirun -np 4 moedist_mpi_example
// (add `-x MOEDIST_RANKS_PER_NODE=2` on one machine to make 2 virtual hosts of 2 ranks). Ranks of one
// node share memory; tokens bound for another host cross the network once. Each rank dispatches its
// tokens, runs identity experts and combines; it checks that every output element equals x (weights
// 0.75 + 0.25 of the same row) and exits non-zero otherwise.
#include <mpi.h>

#include <cstdio>
#include <vector>

#include "moedist/moedist.h"
#include "moedist/mpi.h"

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int status = 0;
  try {
    moedist::GroupConfig config;
    int world = 0;
    MPI_Comm_size(MPI_COMM_WORLD, &world);
    config.moe_expert_num = 2 * world;  // 2 experts per rank
    // ep_world_size, ep_rank_id and tp_rank_id come from MPI_COMM_WORLD's size and ranks.
    std::unique_ptr<moedist::Group> group = moedist::join_mpi_world(config);
    const int rank = group->config().ep_rank_id, experts = config.moe_expert_num;

    constexpr int kTokens = 5, kTopK = 2, kHidden = 32;
    std::vector<std::uint16_t> x(kTokens * kHidden);
    for (int i = 0; i < kTokens * kHidden; ++i) x[static_cast<std::size_t>(i)] = static_cast<std::uint16_t>(0x3f80 + (rank * 7 + i) % 64);
    std::vector<std::int32_t> ids;
    std::vector<float> weights;
    for (int t = 0; t < kTokens; ++t) {
      ids.insert(ids.end(), {(rank + t) % experts, (rank + t + 1) % experts});
      weights.insert(weights.end(), {0.75f, 0.25f});
    }
    const auto x_view = moedist::matrix_view(x.data(), moedist::DType::bf16, kTokens, kHidden);
    const auto ids_view = moedist::matrix_view(ids.data(), moedist::DType::int32, kTokens, kTopK);
    const auto w_view = moedist::matrix_view(weights.data(), moedist::DType::fp32, kTokens, kTopK);
    const moedist::DispatchResult d = group->dispatch(x_view, ids_view);
    const moedist::TensorView y = group->combine(d.expand_x, ids_view, d.expand_idx, d.ep_recv_counts, w_view);
    for (int t = 0; t < kTokens && status == 0; ++t) {
      for (int h = 0; h < kHidden; ++h) {
        if (y.at<std::uint16_t>(t, h) != x[static_cast<std::size_t>(t * kHidden + h)]) {
          std::fprintf(stderr, "rank %d: token %d element %d differs\n", rank, t, h);
          status = 1;
          break;
        }
      }
    }
    const moedist::TrafficCounters& traffic = group->traffic();
    if (status == 0) {
      std::printf("rank %d of %d: %lld rows received, combine == x; %lld bytes to other hosts in dispatch (%lld without node-aware routing)\n",
                  rank, world, static_cast<long long>(d.valid_rows), static_cast<long long>(traffic.dispatch_bytes_between_hosts),
                  static_cast<long long>(traffic.dispatch_bytes_between_hosts_flat));
    }
  } catch (const moedist::Error& e) {
    std::fprintf(stderr, "error (%s): %s\n", moedist::error_code_name(e.code()), e.what());
    // A rank that stops leaves its peers waiting (until their timeout); end the whole job instead.
    MPI_Abort(MPI_COMM_WORLD, 2);
  }
  MPI_Finalize();
  return status;
}
