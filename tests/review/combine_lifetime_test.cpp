// Review item 13: combine returns while slower ranks may still read this rank's window. Without a TP
// domain the source ranks read each expert rank's rows in place (combine_buffer(), or dispatch's
// expand_x passed back), and a rank that is done returns at once; no closing barrier waits for the
// others. The lifetime of those rows ends at this rank's next collective call instead (its first
// exchange waits for every rank to finish the combine), as include/moedist/group.h and
// docs/architecture.md ("Lifetimes") say. The group enforces what it can see of that rule:
// combine_buffer() is absent from a combine until the next dispatch, and a combine refuses rows in the
// window after a combine that read them in place, on every rank.
//
// The tests hold one rank (the slow one) inside combine, after it has learned where every rank's rows
// are and before it reads them, while the other rank overwrites its rows.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <random>
#include <stdexcept>

#include "../outcome.h"
#include "../test_support.h"
#include "moedist/inproc.h"
#include "transport/inproc/inproc_transport.h"

namespace moedist::testing {
namespace {

// A one-shot signal between the two rank threads.
class Gate {
 public:
  void open() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      open_ = true;
    }
    cv_.notify_all();
  }
  bool wait_for(std::chrono::milliseconds limit) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, limit, [&] { return open_; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool open_ = false;
};

// Forwards to another transport; the first time the allgather of "combine.data" returns (the rank now
// knows where every rank's rows are and reads them next), waits until `gate` opens or `hold` passes.
class DelayingTransport final : public Transport {
 public:
  DelayingTransport(std::unique_ptr<Transport> inner, Gate* gate, std::chrono::milliseconds hold)
      : inner_(std::move(inner)), gate_(gate), hold_(hold) {}
  int rank() const noexcept override { return inner_->rank(); }
  int size() const noexcept override { return inner_->size(); }
  void allgather(const void* in, std::size_t bytes, void* out, std::string_view phase) override {
    inner_->allgather(in, bytes, out, phase);
    if (armed_ && phase == "combine.data") {
      armed_ = false;
      held_ = !gate_->wait_for(hold_);
    }
  }
  void resize_window(std::size_t bytes, std::string_view phase) override { inner_->resize_window(bytes, phase); }
  std::size_t window_size(int r) const noexcept override { return inner_->window_size(r); }
  std::byte* window(int r) noexcept override { return inner_->window(r); }
  int host_count() const noexcept override { return inner_->host_count(); }
  int host_of(int r) const noexcept override { return inner_->host_of(r); }
  void exchange(std::span<const Outgoing> out, std::span<const int> from, std::span<std::vector<std::byte>> in,
                std::string_view phase) override {
    inner_->exchange(out, from, in, phase);
  }
  bool held_the_whole_time() const { return held_; }

 private:
  std::unique_ptr<Transport> inner_;
  Gate* gate_;
  std::chrono::milliseconds hold_;
  bool armed_ = true;
  bool held_ = false;
};

// Two EP ranks, two experts, K = 2: every token goes to both ranks, so each rank reads the other's
// window in combine. Identity experts (the oracle's when no combine_x is given).
casefile::Case two_ranks() {
  std::mt19937_64 rng(13);
  casefile::Case c;
  c.ep_world_size = 2;
  c.moe_expert_num = 2;
  c.dtype = DType::bf16;
  std::normal_distribution<float> value(0.0f, 1.0f);
  for (int g = 0; g < 2; ++g) {
    casefile::RankInputs in;
    in.x = Tensor(c.dtype, 4, 32);
    for (std::int64_t i = 0; i < in.x.numel(); ++i) in.x.data<std::uint16_t>()[i] = to_half_bits(c.dtype, value(rng));
    in.expert_ids = random_ids(rng, 4, 2, 2);
    in.expert_scales = Tensor(DType::fp32, 4, 2);
    for (std::int64_t i = 0; i < in.expert_scales.numel(); ++i) in.expert_scales.data<float>()[i] = value(rng);
    c.ranks.push_back(std::move(in));
  }
  return c;
}

constexpr int kFast = 0, kSlow = 1;

// Where the experts put their outputs: Group::combine_buffer(), or dispatch's expand_x view itself.
enum class Rows { combine_buffer, dispatch_view };

struct RankRun {
  casefile::Case c = two_ranks();
  std::shared_ptr<inproc::InProcHub> hub =
      std::make_shared<inproc::InProcHub>(2, std::chrono::milliseconds(20000), std::chrono::microseconds(-1));
  Gate gate;
  std::vector<oracle::RankOutput> want = oracle::run(to_oracle_case(c));

  std::unique_ptr<Group> join(int g, std::chrono::milliseconds hold, DelayingTransport** delaying) {
    auto inner = std::make_unique<inproc::InProcTransport>(hub, g);
    if (g != kSlow) return std::make_unique<Group>(rank_config(c, g), std::move(inner));
    auto t = std::make_unique<DelayingTransport>(std::move(inner), &gate, hold);
    *delaying = t.get();
    return std::make_unique<Group>(rank_config(c, g), std::move(t));
  }
  DispatchResult dispatch(Group& group, int g) const {
    const casefile::RankInputs& in = c.ranks[static_cast<std::size_t>(g)];
    return group.dispatch(in.x.view(), in.expert_ids.view());
  }
  // The identity experts' outputs where `rows` says; returns the view to pass to combine.
  static TensorView expert_rows(Group& group, const DispatchResult& d, Rows rows) {
    if (rows == Rows::dispatch_view) return d.expand_x;
    const MutableTensorView buffer = group.combine_buffer(DType::bf16);
    if (!buffer.present()) throw std::runtime_error("combine_buffer() is absent after a dispatch");
    for (std::int64_t r = 0; r < d.valid_rows; ++r)
      std::memcpy(buffer.ptr<std::uint16_t>(r, 0), d.expand_x.ptr<std::uint16_t>(r, 0), 32 * 2);
    return buffer;
  }
  Tensor combine(Group& group, int g, const DispatchResult& d, const TensorView& rows) const {
    const casefile::RankInputs& in = c.ranks[static_cast<std::size_t>(g)];
    const TensorView y =
        group.combine(rows, in.expert_ids.view(), d.expand_idx, d.ep_recv_counts, in.expert_scales.view());
    return copy_rows(y, 4);
  }
  bool matches_oracle(int g, const Tensor& y) const {
    const std::vector<std::uint16_t>& w = want[static_cast<std::size_t>(g)].combine_out;
    return y.numel() == static_cast<std::int64_t>(w.size()) &&
           std::memcmp(y.data<std::uint16_t>(), w.data(), w.size() * 2) == 0;
  }
};

// Overwrites the (valid) rows of a view with a pattern no expert produced.
void scribble(const TensorView& rows, std::int64_t valid) {
  for (std::int64_t r = 0; r < valid; ++r) {
    for (std::int64_t col = 0; col < rows.cols(); ++col)
      *const_cast<std::uint16_t*>(rows.ptr<std::uint16_t>(r, col)) = 0x4780;  // bf16 65536
  }
}

// Following the documented lifetime: the fast rank returns from combine while the slow rank has not
// read its rows yet; combine_buffer() is then absent, a second combine from a buffer of the caller's
// own is fine, and the next collective call (that combine, then a dispatch) returns only once the slow
// rank has finished reading. After the dispatch the fast rank overwrites its rows at once (and the
// dispatch itself rewrote dispatch's view); the slow rank's results are the oracle's.
void documented_lifetime(Rows rows) {
  RankRun run;
  std::atomic<bool> slow_done_reading{false};
  std::vector<Tensor> first(2), second(2), third(2);
  bool buffer_after_combine = true, buffer_after_dispatch = false, slow_done_at_next_call = false, slow_held = false;
  run_ranks(2, [&](int g) {
    DelayingTransport* delaying = nullptr;
    std::unique_ptr<Group> group = run.join(g, std::chrono::milliseconds(300), &delaying);
    const DispatchResult d = run.dispatch(*group, g);
    const TensorView in_window = RankRun::expert_rows(*group, d, rows);
    const Tensor own_copy = copy_rows(in_window, d.valid_rows);
    first[static_cast<std::size_t>(g)] = run.combine(*group, g, d, in_window);
    if (g == kSlow) {
      slow_held = delaying->held_the_whole_time();  // nobody opened the gate: it read after the hold
      slow_done_reading = true;
    } else {
      buffer_after_combine = group->combine_buffer(DType::bf16).present();
    }
    second[static_cast<std::size_t>(g)] = run.combine(*group, g, d, own_copy.view());  // the next collective call
    if (g == kFast) slow_done_at_next_call = slow_done_reading.load();
    const DispatchResult d2 = run.dispatch(*group, g);
    if (g == kFast) {
      buffer_after_dispatch = group->combine_buffer(DType::bf16).present();
      // Allowed now: every rank is past the last combine. (Dispatch's view now holds the new dispatch's
      // rows, written by both ranks into this window while the slow rank was still reading before.)
      if (rows == Rows::combine_buffer) scribble(in_window, d.valid_rows);
    }
    third[static_cast<std::size_t>(g)] = run.combine(*group, g, d2, RankRun::expert_rows(*group, d2, rows));
  });
  EXPECT_TRUE(slow_held) << "the slow rank was not held inside combine";
  EXPECT_FALSE(buffer_after_combine) << "combine_buffer() after a combine, before the next dispatch";
  EXPECT_TRUE(slow_done_at_next_call) << "the fast rank's next collective call returned before the slow rank's combine";
  EXPECT_TRUE(buffer_after_dispatch);
  for (int g = 0; g < 2; ++g) {
    EXPECT_TRUE(run.matches_oracle(g, first[static_cast<std::size_t>(g)])) << "first combine, rank " << g;
    EXPECT_TRUE(run.matches_oracle(g, second[static_cast<std::size_t>(g)])) << "second combine, rank " << g;
    EXPECT_TRUE(run.matches_oracle(g, third[static_cast<std::size_t>(g)]))
        << "combine after the next dispatch, rank " << g;
  }
}

TEST(RuntimeCombineLifetime, EndsAtTheNextCollectiveCallCombineBuffer) { documented_lifetime(Rows::combine_buffer); }
TEST(RuntimeCombineLifetime, EndsAtTheNextCollectiveCallDispatchView) { documented_lifetime(Rows::dispatch_view); }

// Breaking it: the fast rank overwrites its in-window rows right after its combine returned, while the
// slow rank is held before reading them (the gate orders the two), and then combines them again. The
// slow rank's first result did read the overwritten rows (this is what the lifetime rule is about);
// the second combine is refused on every rank, naming the fast rank, instead of passing silently; the
// group stays usable.
void overwrite_before_the_next_call(Rows rows) {
  RankRun run;
  std::vector<Tensor> first(2), after(2);
  std::vector<Outcome> again(2);
  bool slow_held = true;
  run_ranks(2, [&](int g) {
    DelayingTransport* delaying = nullptr;
    std::unique_ptr<Group> group = run.join(g, std::chrono::milliseconds(10000), &delaying);
    const DispatchResult d = run.dispatch(*group, g);
    const TensorView in_window = RankRun::expert_rows(*group, d, rows);
    const Tensor own_copy = copy_rows(in_window, d.valid_rows);
    first[static_cast<std::size_t>(g)] = run.combine(*group, g, d, in_window);
    if (g == kFast) {
      scribble(in_window, d.valid_rows);  // too early: the slow rank has not read them
      run.gate.open();
      again[static_cast<std::size_t>(g)] = capture([&] { run.combine(*group, g, d, in_window); });
    } else {
      slow_held = delaying->held_the_whole_time();
      again[static_cast<std::size_t>(g)] = capture([&] { run.combine(*group, g, d, own_copy.view()); });
    }
    const DispatchResult d2 = run.dispatch(*group, g);
    after[static_cast<std::size_t>(g)] = run.combine(*group, g, d2, RankRun::expert_rows(*group, d2, rows));
  });
  EXPECT_FALSE(slow_held) << "the gate did not open: the overwrite was not ordered before the slow rank's reads";
  EXPECT_TRUE(run.matches_oracle(kFast, first[kFast]));
  EXPECT_FALSE(run.matches_oracle(kSlow, first[kSlow]))
      << "the slow rank read its peer's rows before they were overwritten";
  EXPECT_TRUE(validation_error(again[kFast], ErrorCode::invalid_argument, "expand_x", "rows in this rank's window",
                               "were read in place by the previous combine"));
  EXPECT_TRUE(peer_error(again[kSlow], ErrorCode::peer_failed, kFast, "combine.counts",
                         "were read in place by the previous combine"));
  for (int g = 0; g < 2; ++g) EXPECT_TRUE(run.matches_oracle(g, after[static_cast<std::size_t>(g)])) << "rank " << g;
}

TEST(RuntimeCombineLifetime, OverwriteBeforeTheNextCallIsRefusedCombineBuffer) {
  overwrite_before_the_next_call(Rows::combine_buffer);
}
TEST(RuntimeCombineLifetime, OverwriteBeforeTheNextCallIsRefusedDispatchView) {
  overwrite_before_the_next_call(Rows::dispatch_view);
}

// With a TP domain (T = 2) the rows the other ranks read are staged by combine itself, in a region no
// view hands out, so nothing is refused: two combines of dispatch's expand_x view in a row are fine.
TEST(RuntimeCombineLifetime, TpDomainStagesItsOwnRows) {
  std::mt19937_64 rng(5);
  casefile::Case c;
  c.ep_world_size = 2;
  c.tp_world_size = 2;
  c.moe_expert_num = 2;
  CaseLimits lim;
  lim.max_k = 2;
  random_inputs(c, rng, lim, 3);
  c.comm_quant_mode = 0;
  c.quant_mode = 0;
  for (casefile::RankInputs& in : c.ranks) in.combine_x = Tensor(), in.scales = Tensor();
  const auto want = oracle::run(to_oracle_case(c));
  InProcessWorld world(4);
  std::vector<std::string> diffs(4);
  run_ranks(4, [&](int g) {
    std::unique_ptr<Group> group = world.join(rank_config(c, g));
    const casefile::RankInputs& in = c.ranks[static_cast<std::size_t>(g)];
    Tensor ones(DType::fp32, in.x.rows(), in.expert_ids.cols());
    std::fill_n(ones.data<float>(), ones.numel(), 1.0f);
    const TensorView w = in.expert_scales.present() ? in.expert_scales.view() : ones.view();
    DispatchOptions o;
    if (in.expert_scales.present()) o.expert_scales = w;
    const DispatchResult d = group->dispatch(in.x.view(), in.expert_ids.view(), o);
    CombineOptions co;
    co.tp_send_counts = d.tp_recv_counts;
    for (int round = 0; round < 2; ++round) {
      const Tensor y = copy_rows(
          group->combine(d.expand_x, in.expert_ids.view(), d.expand_idx, d.ep_recv_counts, w, co), in.x.rows());
      const auto& out = want[static_cast<std::size_t>(g)].combine_out;
      if (y.numel() != static_cast<std::int64_t>(out.size()) ||
          std::memcmp(y.data<std::uint16_t>(), out.data(), out.size() * 2) != 0)
        diffs[static_cast<std::size_t>(g)] += "round " + std::to_string(round) + " differs; ";
    }
  });
  for (int g = 0; g < 4; ++g) EXPECT_EQ(diffs[static_cast<std::size_t>(g)], "") << "rank " << g << ": " << describe(c);
}

}  // namespace
}  // namespace moedist::testing
