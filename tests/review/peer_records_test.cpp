// Review item 1: what a peer publishes in its count record is bounded before anything is sized or
// addressed from it, on the CPU path as on the GPU (contract/record_checks.h): its BS is capped at
// global_bs / W (this rank's BS with global_bs = 0), the receive prefix sums are 64-bit (records adding
// up past 2^31 rows used to wrap below the capacity and pass), and every row index a proxy or the TP
// all-gather computes from peers' counts is checked before the write.
//
// The bad records come from a transport wrapper that forwards to the in-process transport and rewrites
// one rank's record in what the allgather of "dispatch.counts" (or "combine.counts") hands each rank, as
// if that rank had published it. Every rank must refuse it alike, naming the rank at fault, and the group
// must stay usable: a clean round afterwards matches the oracle. On one host and on virtual hosts (the
// proxy path, write_carried_rows), without TP and with T = 2.
#include <gtest/gtest.h>

#include <chrono>
#include <climits>
#include <cstdint>
#include <functional>
#include <random>
#include <string>

#include "../outcome.h"
#include "../test_support.h"
#include "contract/blocks.h"
#include "moedist/inproc.h"
#include "ops/group_state.h"
#include "transport/inproc/inproc_transport.h"

namespace moedist::testing {
namespace {

// Rewrites a record: its header (ops/group_state.h's CallHeader) and the count_record_len() int32
// entries that follow it (dispatch: send counts d * L + l; combine: the row table).
using Rewrite = std::function<void(CallHeader& header, std::int32_t* counts)>;

// Forwards to another transport; the first time the allgather of `phase` returns, rewrites rank
// `victim`'s record in what this rank received. Every rank's wrapper does the same, so every rank
// (the victim too, which reads its own record back) sees the record the victim would have published.
class RecordCorruptingTransport final : public Transport {
 public:
  RecordCorruptingTransport(std::unique_ptr<Transport> inner, int victim, std::string phase, Rewrite rewrite)
      : inner_(std::move(inner)), victim_(victim), phase_(std::move(phase)), rewrite_(std::move(rewrite)) {}
  int rank() const noexcept override { return inner_->rank(); }
  int size() const noexcept override { return inner_->size(); }
  void allgather(const void* in, std::size_t bytes, void* out, std::string_view phase) override {
    inner_->allgather(in, bytes, out, phase);
    if (!armed_ || phase != phase_) return;
    armed_ = false;
    std::byte* record = static_cast<std::byte*>(out) + static_cast<std::size_t>(victim_) * bytes;
    CallHeader header;
    std::memcpy(&header, record, sizeof header);
    rewrite_(header, reinterpret_cast<std::int32_t*>(record + sizeof(CallHeader)));
    std::memcpy(record, &header, sizeof header);
  }
  void resize_window(std::size_t bytes, std::string_view phase) override { inner_->resize_window(bytes, phase); }
  std::size_t window_size(int r) const noexcept override { return inner_->window_size(r); }
  std::byte* window(int r) noexcept override { return inner_->window(r); }
  int host_count() const noexcept override { return inner_->host_count(); }
  int host_of(int r) const noexcept override { return inner_->host_of(r); }
  std::string host_name(int host) const override { return inner_->host_name(host); }
  void exchange(std::span<const Outgoing> out, std::span<const int> from, std::span<std::vector<std::byte>> in,
                std::string_view phase) override {
    inner_->exchange(out, from, in, phase);
  }

 private:
  std::unique_ptr<Transport> inner_;
  int victim_;
  std::string phase_;
  Rewrite rewrite_;
  bool armed_ = true;
};

// W EP ranks (no shared experts), T = tp_world_size, E = W experts (L = 1, which T = 2 needs), K per
// token, every rank with `bs` tokens, identity experts.
casefile::Case make_case(std::uint64_t seed, int W, int T, int K, std::int64_t h, std::int64_t bs,
                         std::int64_t global_bs, int quant_mode) {
  std::mt19937_64 rng(seed);
  casefile::Case c;
  c.ep_world_size = W;
  c.tp_world_size = T;
  c.moe_expert_num = W;
  c.global_bs = global_bs;
  c.quant_mode = quant_mode;
  c.dtype = DType::bf16;
  std::normal_distribution<float> value(0.0f, 1.0f);
  for (int g = 0; g < W * std::max(T, 1); ++g) {
    casefile::RankInputs in;
    in.x = Tensor(c.dtype, bs, h);
    for (std::int64_t i = 0; i < in.x.numel(); ++i) in.x.data<std::uint16_t>()[i] = to_half_bits(c.dtype, value(rng));
    in.expert_ids = random_ids(rng, bs, K, c.moe_expert_num);
    in.expert_scales = Tensor(DType::fp32, bs, K);
    for (std::int64_t i = 0; i < in.expert_scales.numel(); ++i) in.expert_scales.data<float>()[i] = value(rng);
    c.ranks.push_back(std::move(in));
  }
  return c;
}

struct Run {
  std::vector<Outcome> corrupted;              // per rank: what the round with the bad record raised
  std::vector<Outcome> clean;                  // per rank: the clean round after it
  std::vector<casefile::RankOutputs> outputs;  // per rank: the clean round's outputs
};

// Every rank runs one round (dispatch, then combine) with rank `victim`'s record rewritten in `phase`,
// then, with `clean_round`, one round more on the same group with nothing rewritten.
Run run_with_bad_record(const casefile::Case& c, int ranks_per_host, int victim, const std::string& phase,
                        const Rewrite& rewrite, bool clean_round) {
  const int world = c.ep_world_size * std::max(c.tp_world_size, 1);
  auto hub = std::make_shared<inproc::InProcHub>(world, std::chrono::milliseconds(20000), std::chrono::microseconds(-1),
                                                 ranks_per_host);
  Run run;
  run.corrupted.resize(static_cast<std::size_t>(world));
  run.clean.resize(static_cast<std::size_t>(world));
  run.outputs.resize(static_cast<std::size_t>(world));
  run_ranks(world, [&](int g) {
    const auto i = static_cast<std::size_t>(g);
    Group group(rank_config(c, g), std::make_unique<RecordCorruptingTransport>(
                                       std::make_unique<inproc::InProcTransport>(hub, g), victim, phase, rewrite));
    run.corrupted[i] = capture([&] { run_rank(group, c, g, RunOptions{}); });
    if (clean_round) run.clean[i] = capture([&] { run.outputs[i] = run_rank(group, c, g, RunOptions{}); });
  });
  return run;
}

// Every rank refused the bad record with a PeerError(code, naming `blamed`, in `phase`) containing
// `fragment`; then, with clean_round, every rank's next round matched the oracle.
void expect_refused_then_usable(const casefile::Case& c, int ranks_per_host, int victim, const std::string& phase,
                                const Rewrite& rewrite, ErrorCode code, int blamed, const std::string& fragment,
                                bool clean_round = true) {
  const Run run = run_with_bad_record(c, ranks_per_host, victim, phase, rewrite, clean_round);
  for (std::size_t g = 0; g < run.corrupted.size(); ++g) {
    EXPECT_TRUE(peer_error(run.corrupted[g], code, blamed, phase, fragment))
        << "rank " << g << ", ranks_per_host " << ranks_per_host << ": " << describe(c);
  }
  if (!clean_round) return;
  for (std::size_t g = 0; g < run.clean.size(); ++g) {
    ASSERT_EQ(run.clean[g].kind, Outcome::Kind::none) << "rank " << g << ": " << describe(run.clean[g]);
  }
  EXPECT_EQ(compare_with_oracle(c, run.outputs, oracle::run(to_oracle_case(c))), "") << describe(c);
}

// Host layouts to run each case on: one host, and virtual hosts of two ranks (rows to the other host
// go through a proxy there, which writes them: write_carried_rows).
constexpr int kHostLayouts[] = {0, 2};

// A record whose BS is past global_bs / W, with counts that BS allows (so only the BS rule can catch it):
// the CPU path checked BS >= 0 only. W = 4, global_bs = 16: BS at most 4. The victim says 5 and sends
// 3 + 3 + 2 + 2 = BS * K rows.
TEST(HostileRecords, PeerBsAboveGlobalBsOverW) {
  for (int T : {0, 2}) {
    for (int quant : {0, 2}) {
      const casefile::Case c = make_case(1 + static_cast<std::uint64_t>(T + quant), 4, T, 2, 16, 4, 16, quant);
      const int victim = 4 * std::max(T, 1) - 1;
      for (int per_host : kHostLayouts) {
        expect_refused_then_usable(
            c, per_host, victim, "dispatch.counts",
            [](CallHeader& h, std::int32_t* counts) {
              h.bs = h.active = 5;
              counts[0] = 3, counts[1] = 3, counts[2] = 2, counts[3] = 2;
            },
            ErrorCode::protocol, victim, "BS 5 is outside [0, 4] (global_bs / ep_world_size = 16 / 4)");
      }
    }
  }
}

// The same with BS = 2^31 - 1 and two entries of 2^31 - 1 each: consistent with that BS and K = 2, and
// (before the cap) the receivers' int32 prefix sums wrapped negative, under any capacity.
TEST(HostileRecords, PeerBsNearInt32Max) {
  for (int T : {0, 2}) {
    const casefile::Case c = make_case(7 + static_cast<std::uint64_t>(T), 4, T, 2, 16, 4, 16, 0);
    const int victim = 2 * std::max(T, 1);  // EP rank 2
    for (int per_host : kHostLayouts) {
      expect_refused_then_usable(
          c, per_host, victim, "dispatch.counts",
          [](CallHeader& h, std::int32_t* counts) {
            h.bs = h.active = INT32_MAX;
            counts[0] = INT32_MAX, counts[1] = INT32_MAX, counts[2] = 0, counts[3] = 0;
          },
          ErrorCode::protocol, victim, "BS 2147483647 is outside [0, 4]");
    }
  }
}

// With global_bs = 2^32 (W = 2) a BS of 2^31 - 1 is allowed, and so is a record that sends all of it
// to EP rank 0: with the rows EP rank 0 sends itself, that rank would receive more than 2^31 - 1 rows.
// The 64-bit sums see it; ep_recv_counts (int32) could not count them, so it is a capacity error naming
// the receiver, in dispatch.counts, on every rank, before any window is sized for the call. (No clean
// round: windows for global_bs = 2^32 would not fit in memory.)
TEST(HostileRecords, ReceivePrefixSumsPastInt32) {
  for (int T : {0, 2}) {
    casefile::Case c = make_case(11 + static_cast<std::uint64_t>(T), 2, T, 1, 8, 4, std::int64_t{1} << 32, 0);
    const int tp_lanes = std::max(T, 1);
    for (int tp = 0; tp < tp_lanes; ++tp) {  // EP rank 0 sends every token to its own expert
      Tensor& ids = c.ranks[static_cast<std::size_t>(tp)].expert_ids;
      std::fill_n(ids.data<std::int32_t>(), ids.numel(), 0);
    }
    const int victim = tp_lanes * 2 - 1;     // EP rank 1 in the last TP lane
    const int receiver = victim % tp_lanes;  // EP rank 0 of that lane
    for (int per_host : kHostLayouts) {
      expect_refused_then_usable(
          c, per_host, victim, "dispatch.counts",
          [](CallHeader& h, std::int32_t* counts) {
            h.bs = h.active = INT32_MAX;
            counts[0] = INT32_MAX, counts[1] = 0;
          },
          ErrorCode::capacity, receiver,
          "would receive 2147483651 rows but can hold at most 2147483647 (ep_recv_counts is int32)",
          /*clean_round=*/false);
    }
  }
}

// A record's active tokens (x_active_mask) bound its rows: more active tokens than BS is refused, and
// so are counts for all BS tokens from a rank that declares fewer active (W = E = 4, K = 2, BS = 4: its
// 8 rows put at least 2 on some rank, more than its one active token allows).
TEST(HostileRecords, ActiveTokensOutsideBsOrBelowTheCounts) {
  const casefile::Case c = make_case(17, 4, 0, 2, 16, 4, 16, 0);
  const int victim = 2;
  for (int per_host : kHostLayouts) {
    expect_refused_then_usable(
        c, per_host, victim, "dispatch.counts", [](CallHeader& h, std::int32_t*) { h.active = h.bs + 1; },
        ErrorCode::protocol, victim, "5 active tokens, outside [0, BS = 4]");
    expect_refused_then_usable(
        c, per_host, victim, "dispatch.counts", [](CallHeader& h, std::int32_t*) { h.active = 1; }, ErrorCode::protocol,
        victim, "is outside [0, active tokens = 1]");
  }
}

// Combine's records carry a BS too (windows are sized from it): the same cap.
TEST(HostileRecords, CombineRecordBsAboveGlobalBsOverW) {
  for (int T : {0, 2}) {
    const casefile::Case c = make_case(13 + static_cast<std::uint64_t>(T), 4, T, 2, 16, 4, 16, 0);
    const int victim = 1;
    for (int per_host : kHostLayouts) {
      expect_refused_then_usable(
          c, per_host, victim, "combine.counts", [](CallHeader& h, std::int32_t*) { h.bs = 1000; }, ErrorCode::protocol,
          victim, "reports BS 1000, outside [0, 4]");
    }
  }
}

// contract/blocks.h on its own: 64-bit prefix sums of records past 2^31 rows, exact.
TEST(HostileRecords, PrefixSumsAre64Bit) {
  const std::int32_t big[3] = {INT32_MAX, INT32_MAX, INT32_MAX};
  const auto records = [&](int) { return big; };  // W = 3, S = 0, L = 1: each source sends INT32_MAX rows
  std::int64_t out[3] = {};
  const std::int64_t total = contract::receive_prefix_sums(3, 0, 1, records, 0, 0, out);
  EXPECT_EQ(total, 3 * std::int64_t{INT32_MAX});
  EXPECT_EQ(out[0], std::int64_t{INT32_MAX});
  EXPECT_EQ(out[1], 2 * std::int64_t{INT32_MAX});
  EXPECT_EQ(out[2], 3 * std::int64_t{INT32_MAX});
  EXPECT_EQ(contract::receive_prefix_sums(3, 0, 1, records, 0, 0, nullptr), total);
}

}  // namespace
}  // namespace moedist::testing
