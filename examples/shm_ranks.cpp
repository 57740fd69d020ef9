// One rank of a multi-process job over shared memory. Start 4 of them with
//   moedist launch -n 4 -- moedist_shm_example
// Each rank dispatches its tokens, runs identity experts and combines; it checks that every output
// element equals x (weights 0.75 + 0.25 of the same row) and exits non-zero otherwise.
#include <cstdio>
#include <vector>

#include "moedist/moedist.h"

int main() {
  try {
    const moedist::LaunchEnvironment env = moedist::launch_environment();
    moedist::GroupConfig config;
    config.ep_world_size = env.world_size;
    config.moe_expert_num = 2 * env.world_size;  // 2 experts per rank
    std::unique_ptr<moedist::Group> group = moedist::join_shm_from_env(config);

    constexpr int kTokens = 5, kTopK = 2, kHidden = 32;
    const int rank = env.rank, experts = config.moe_expert_num;
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
    for (int t = 0; t < kTokens; ++t) {
      for (int h = 0; h < kHidden; ++h) {
        if (y.at<std::uint16_t>(t, h) != x[static_cast<std::size_t>(t * kHidden + h)]) {
          std::fprintf(stderr, "rank %d: token %d element %d differs\n", rank, t, h);
          return 1;
        }
      }
    }
    std::printf("rank %d of %d: %lld rows received, combine == x\n", rank, env.world_size, static_cast<long long>(d.valid_rows));
    return 0;
  } catch (const moedist::Error& e) {
    std::fprintf(stderr, "error (%s): %s\n", moedist::error_code_name(e.code()), e.what());
    return 2;
  }
}
