// A complete dispatch -> experts -> combine round trip on 4 in-process ranks.
// Built as `moedist_example` and run by the test suite; the README quotes it.
#include <cstdio>
#include <vector>

#include "moedist/moedist.h"

int main() {
  constexpr int kRanks = 4, kExperts = 8, kTokens = 3, kTopK = 2, kHidden = 16;
  moedist::InProcessWorld world(kRanks);
  moedist::run_ranks(kRanks, [&](int rank) {
    moedist::GroupConfig config;
    config.ep_world_size = kRanks;
    config.ep_rank_id = rank;
    config.moe_expert_num = kExperts;  // 2 experts per rank
    std::unique_ptr<moedist::Group> group = world.join(config);

    // Inputs of this rank: tokens x (bf16 bits), top-k expert ids and router weights.
    std::vector<std::uint16_t> x(kTokens * kHidden, 0x3f80);  // 1.0 in bf16
    std::vector<std::int32_t> expert_ids;
    std::vector<float> weights;
    for (int t = 0; t < kTokens; ++t) {
      expert_ids.insert(expert_ids.end(), {(rank + t) % kExperts, (rank + t + 3) % kExperts});
      weights.insert(weights.end(), {0.75f, 0.25f});
    }
    const auto x_view = moedist::matrix_view(x.data(), moedist::DType::bf16, kTokens, kHidden);
    const auto ids_view = moedist::matrix_view(expert_ids.data(), moedist::DType::int32, kTokens, kTopK);
    const auto w_view = moedist::matrix_view(weights.data(), moedist::DType::fp32, kTokens, kTopK);

    moedist::DispatchOptions dispatch_options;
    dispatch_options.quant_mode = 0;
    const moedist::DispatchResult d = group->dispatch(x_view, ids_view, dispatch_options);
    // d.expand_x rows [0, d.valid_rows) hold this rank's experts' tokens, expert-major;
    // d.expert_token_nums says how many rows each local expert got. Run the experts here
    // (identity experts in this example) and hand their outputs, in the same row order, to combine.
    const moedist::TensorView y = group->combine(d.expand_x, ids_view, d.expand_idx, d.ep_recv_counts, w_view);
    // y is (kTokens, kHidden): sum_k weight_k * expert_k(x) = 0.75 + 0.25 = 1.0 for every element.
    std::printf("rank %d: received %lld rows, combine(y)[0][0] = 0x%04x\n", rank,
                static_cast<long long>(d.valid_rows), y.at<std::uint16_t>(0, 0));
  });
  return 0;
}
