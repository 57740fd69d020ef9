// The CUDA kernels themselves, run on the CPU. src/cuda/kernels.cu is compiled here unchanged, under a
// small host stand-in for CUDA (tests/cuda_emulation/host_cuda.h: a block is blockDim.x fibers that meet
// at a barrier for __syncthreads, in a new order after each; atomics are std::atomic_ref; CUB's stable
// radix sort is std::stable_sort; ThreadSanitizer sees the fibers as threads, so a barrier the kernels
// lack is a reported race).
// Every rank is its own process, the windows are one shared mapping, and the ranks meet through the
// kernels' own flag words and waits. So this runs what cuda_protocol_test cannot: the enqueue functions
// (launch configurations, the vector paths), the kernels' thread indexing, the block-wide max and the
// barriers, the flags, the timeouts and the failure signals between concurrent ranks. What it cannot
// show is GPU-specific: the memory model of real hardware, IPC, warps diverging, timing.
#include <gtest/gtest.h>
#include <sys/mman.h>

#include <atomic>
#include <chrono>
#include <new>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "common/child_processes.h"
#include "cuda/status_errors.h"
#include "cuda/window_layout.h"
#include "cuda_host_group.h"
#include "moedist/error.h"
#include "oracle/oracle.h"
#include "test_support.h"

#define MOEDIST_CUDA_EMULATION 1
#include "cuda_emulation/host_cuda.h"
// The kernels and their enqueue functions, as built for the GPU.
#include "cuda/kernels.cu"

namespace moedist::cuda {
namespace {

namespace mt = moedist::testing;

// Every rank's window in one shared mapping, made before the ranks fork, so the addresses agree.
class SharedWindows {
 public:
  SharedWindows(int world, std::size_t window_bytes) : stride_((window_bytes + 4095) / 4096 * 4096), bytes_(stride_ * static_cast<std::size_t>(world)) {
    base_ = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (base_ == MAP_FAILED) throw std::runtime_error("mmap of the shared windows failed");
    for (int r = 0; r < world; ++r) bases_.push_back(static_cast<std::byte*>(base_) + stride_ * static_cast<std::size_t>(r));
  }
  ~SharedWindows() { munmap(base_, bytes_); }
  SharedWindows(const SharedWindows&) = delete;
  SharedWindows& operator=(const SharedWindows&) = delete;
  std::byte* const* bases() const { return bases_.data(); }

 private:
  std::size_t stride_, bytes_;
  void* base_ = nullptr;
  std::vector<std::byte*> bases_;
};

int key_bits_for(int experts) {
  int bits = 1;
  while (bits < 31 && (std::int64_t{1} << bits) <= experts - 1) ++bits;
  return bits;
}


// What one rank does to its inputs before a call: nothing, or a change that must fail.
using Sabotage = std::function<void(int rank, int call, DispatchArgs&)>;

// How a run passes the experts' rows back: from other memory, or through the combine buffer (read in
// place); and (V2) with each rank's own rows in a random order, with their triples.
struct RunMode {
  bool in_window = false;
  bool permute = false;
  // Before each call a rank may wait (a late rank) or look at its performance_info afterwards.
  std::function<void(int rank, int call)> before_call;
  std::function<std::string(int rank, const std::vector<std::int64_t>& performance_info)> check_performance;
};

// Runs every call of `calls` on one group whose ranks are processes running the kernels; each rank
// compares its outputs with the oracle's (or, with `sabotage`, returns its status' error text).
std::vector<std::string> run_kernels(const std::vector<casefile::Case>& calls, const RunMode& mode,
                                     std::chrono::milliseconds timeout, const Sabotage& sabotage = {}) {
  const casefile::Case& c0 = calls[0];
  const int world = static_cast<int>(c0.ranks.size());
  std::vector<mt::Expected> wants;
  if (!sabotage) {
    for (const auto& call : calls) wants.push_back(mt::expected_outputs(call));
  }
  const WindowOffsets off = testing::case_window_offsets(c0);
  const SharedWindows windows(world, off.total);
  std::vector<std::string> out;
  for (const ChildResult& r : run_in_children(world, [&](int rank) -> std::string {
         testing::HostRank e;
         testing::init_host_rank(e, c0, rank, off, windows.bases(), static_cast<std::int64_t>(timeout.count()) * 1000000);
         const SortScratch sort{nullptr, 0, key_bits_for(c0.moe_expert_num + 1)};
         Status mirror;
         std::string first;
         std::mt19937_64 order_rng(static_cast<std::uint64_t>(rank) * 7919 + 17);
         for (std::size_t call = 0; call < calls.size(); ++call) {
           const casefile::Case& c = calls[call];
           if (mode.before_call) mode.before_call(rank, static_cast<int>(call));
           DispatchArgs a = testing::rank_dispatch_args(c, rank, e);
           if (sabotage) sabotage(rank, static_cast<int>(call), a);
           if (enqueue_dispatch(e.g, a, sort, &mirror, nullptr) != cudaSuccess) return "enqueue_dispatch failed";
           casefile::RankOutputs o = testing::dispatch_outputs(c, rank, e);
           const std::vector<std::int64_t> order =
               mode.permute ? testing::random_row_order(c, o, order_rng) : std::vector<std::int64_t>{};
           const CombineArgs ca = testing::rank_combine_args(c, rank, e, o, mode.in_window, order);
           if (enqueue_combine(e.g, ca, &mirror, nullptr) != cudaSuccess) return "enqueue_combine failed";
           if (mirror.code != 0) return testing::status_error_text(mirror, rank, c.ranks[0].expert_ids.cols());
           o.combine_out = testing::combine_output(c, rank, e);
           const std::string diff = mt::compare_rank(c, rank, o, wants[call]);
           if (!diff.empty() && first.empty()) first = "call " + std::to_string(call) + ": " + diff;
         }
         if (mode.check_performance && first.empty()) first = mode.check_performance(rank, e.performance_info);
         return first;
       })) {
    out.push_back(r.finished ? r.text : "the rank's process died (wait status " + std::to_string(r.wait_status) + ")");
  }
  return out;
}

// ThreadSanitizer builds run fewer cases: it multiplies the cost of every fiber switch.
#ifdef MOEDIST_EMU_TSAN
constexpr int kRandomCases = 16;
#else
constexpr int kRandomCases = 64;
#endif

TEST(CudaKernelsEmulated, RandomCasesMatchTheOracleOverSeveralCalls) {
  std::mt19937_64 rng(8128);
  for (int i = 0; i < kRandomCases; ++i) {
    mt::CaseLimits limits;
    limits.max_ep_world_size = 6;
    limits.world_size = 1 + static_cast<int>(rng() % 6);
    limits.max_bs = 5;
    limits.max_h = i % 2 == 0 ? 48 : 23;  // multiples of 8 take the vector path, others the element path
    casefile::Case c = mt::random_case(rng, limits);
    std::vector<casefile::Case> calls;
    calls.push_back(mt::next_call(c, rng));
    calls.insert(calls.begin(), std::move(c));
    RunMode mode;
    mode.in_window = i % 3 == 0;
    const auto results = run_kernels(calls, mode, std::chrono::milliseconds(60000));
    for (std::size_t r = 0; r < results.size(); ++r) EXPECT_EQ(results[r], "") << "case " << i << " (" << mt::describe(calls[0]) << ") rank " << r;
  }
}

// The V2 operators (masks of both kinds, special experts, Sn 0-4, TP, ...), two calls per group, the
// experts' rows now and then permuted with their triples or in the combine buffer.
TEST(CudaKernelsEmulated, RandomV2CasesMatchTheV2OracleOverSeveralCalls) {
  std::mt19937_64 rng(8129);
  for (int i = 0; i < kRandomCases; ++i) {
    mt::CaseLimits limits;
    limits.max_ep_world_size = 6;
    limits.world_size = 1 + static_cast<int>(rng() % 6);
    limits.max_bs = 5;
    limits.max_h = i % 2 == 0 ? 48 : 23;
    limits.v2 = 1.0;
    limits.token_masks = true;
    casefile::Case c = mt::random_case(rng, limits);
    std::vector<casefile::Case> calls;
    calls.push_back(testing::next_call_v2(c, rng));
    calls.insert(calls.begin(), std::move(c));
    RunMode mode;
    mode.in_window = i % 3 == 0;
    mode.permute = i % 2 == 1;
    const auto results = run_kernels(calls, mode, std::chrono::milliseconds(60000));
    for (std::size_t r = 0; r < results.size(); ++r)
      EXPECT_EQ(results[r], "") << "case " << i << " (" << mt::describe(calls[0]) << ") rank " << r;
  }
}

// V1 and V2 calls in turn on one group (a configuration both accept): each leaves the window, the
// handle and the flags as the other expects them.
TEST(CudaKernelsEmulated, V1AndV2CallsInTurnOnOneGroup) {
  std::mt19937_64 rng(8130);
  int runs = 0;
  while (runs < 6) {
    mt::CaseLimits limits;
    limits.max_ep_world_size = 4;
    limits.world_size = 2 + static_cast<int>(rng() % 3);
    limits.max_bs = 4;
    limits.max_h = 24;
    limits.v2 = 1.0;
    casefile::Case c = mt::random_case(rng, limits);
    if (!mt::v1_compatible(c) || c.ranks[0].expert_ids.cols() > c.moe_expert_num) continue;
    std::vector<casefile::Case> calls;
    calls.push_back(mt::next_call(c, rng));  // a V1 call
    calls.push_back(testing::next_call_v2(c, rng));
    calls.insert(calls.begin(), std::move(c));
    const auto results = run_kernels(calls, RunMode{}, std::chrono::milliseconds(60000));
    for (std::size_t r = 0; r < results.size(); ++r)
      EXPECT_EQ(results[r], "") << mt::describe(calls[0]) << " rank " << r;
    ++runs;
  }
}

// A V2 case of 3 EP ranks (no TP) with 3 tokens each.
casefile::Case three_rank_v2_case(std::mt19937_64& rng) {
  for (;;) {
    mt::CaseLimits limits;
    limits.world_size = 3;
    limits.allow_tp = false;
    limits.max_bs = 3;
    limits.max_h = 16;
    limits.v2 = 1.0;
    casefile::Case c = mt::random_case(rng, limits);
    c.global_bs = 0;
    mt::random_inputs(c, rng, limits, 3);
    if (c.ep_world_size == 3) return c;
  }
}

// A count of the ranks that reached their call, in memory the forked ranks share.
class SharedCount {
 public:
  SharedCount() {
    void* p = mmap(nullptr, sizeof(std::atomic<int>), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("mmap of the shared count failed");
    count_ = new (p) std::atomic<int>(0);
  }
  ~SharedCount() { munmap(count_, sizeof(std::atomic<int>)); }
  SharedCount(const SharedCount&) = delete;
  SharedCount& operator=(const SharedCount&) = delete;
  std::atomic<int>& operator*() const { return *count_; }

 private:
  std::atomic<int>* count_ = nullptr;
};

// performance_info (V2 §5.1): a rank that starts its call 1 s after its peers started theirs shows in
// their entry for it as a wait of about that long, measured by the waits on the (here emulated)
// global timer. The late rank first waits for the others to arrive: the ranks are processes that may
// start far apart on a loaded machine. What a peer does in its call before it waits (emulated
// kernels, slow under a sanitizer) shortens the wait, hence the margin: half the lateness must show.
TEST(CudaKernelsEmulated, PerformanceInfoRecordsTheWaitForALateRank) {
  std::mt19937_64 rng(8131);
  casefile::Case c = three_rank_v2_case(rng);
  std::vector<casefile::Case> calls;
  calls.push_back(std::move(c));
  const SharedCount arrived;
  RunMode mode;
  mode.before_call = [&arrived](int rank, int) {
    if (rank != 2) {
      (*arrived).fetch_add(1);
      return;
    }
    // Bounded: a peer that died before its call must fail the test, not hang it.
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while ((*arrived).load() < 2 && std::chrono::steady_clock::now() < give_up)
      std::this_thread::sleep_for(std::chrono::microseconds(100));
    std::this_thread::sleep_for(std::chrono::milliseconds(1000));
  };
  mode.check_performance = [](int rank, const std::vector<std::int64_t>& perf) -> std::string {
    std::string text;
    for (const std::int64_t us : perf) text += " " + std::to_string(us);
    for (const std::int64_t us : perf) {
      if (us < 0 || us > 60000000) return "performance_info out of range:" + text;
    }
    if (rank != 2 && perf[2] < 500000) return "the late rank's wait is missing:" + text;
    if (rank == 2 && perf[2] >= 500000) return "the late rank waited for itself:" + text;
    return "";
  };
  const auto results = run_kernels(calls, mode, std::chrono::milliseconds(60000));
  for (std::size_t r = 0; r < results.size(); ++r) EXPECT_EQ(results[r], "") << "rank " << r;
}

// A V2 (BS,) mask whose trues do not come first, on one rank: it names the entry, every other rank,
// running concurrently, stops with peer_failed naming it.
TEST(CudaKernelsEmulated, AV2MaskThatIsNoPrefixStopsEveryRank) {
  std::mt19937_64 rng(8132);
  casefile::Case c = three_rank_v2_case(rng);
  const std::vector<std::uint8_t> mask{0, 1, 1};
  std::vector<casefile::Case> calls;
  calls.push_back(std::move(c));
  const auto results =
      run_kernels(calls, RunMode{}, std::chrono::milliseconds(20000), [&](int rank, int, DispatchArgs& a) {
        if (rank == 1) a.mask = TokenMask{mask.data(), 0, 1, 1};
      });
  EXPECT_NE(results[1].find("x_active_mask[1] = true: every true must come before every false"), std::string::npos)
      << results[1];
  for (int r : {0, 2})
    EXPECT_NE(results[static_cast<std::size_t>(r)].find("peer_failed: rank " + std::to_string(r) + ": rank 1 failed"),
              std::string::npos)
        << results[static_cast<std::size_t>(r)];
}

// Rows wider than a block's 1024 threads x 8 elements: each thread loops over several chunks (and
// re-reads x between the max and the quantization), H not a multiple of 8 (the element path).
TEST(CudaKernelsEmulated, RowsWiderThanABlock) {
  std::mt19937_64 rng(6);
  for (int quant : {2, 0}) {
    mt::CaseLimits limits;
    limits.world_size = 2;
    limits.allow_tp = false;
    limits.max_h = 16;
    limits.max_bs = 2;
    casefile::Case c = mt::random_case(rng, limits);
    c.quant_mode = quant;
    c.comm_quant_mode = quant;  // comm quantization too, on the wide rows
    for (auto& r : c.ranks) {
      Tensor x(c.dtype, r.x.rows(), 8200);
      for (std::int64_t i = 0; i < x.numel(); ++i) x.data<std::uint16_t>()[i] = mt::to_half_bits(c.dtype, static_cast<float>(static_cast<int>(rng() % 201) - 100) / 16.0f);
      r.x = std::move(x);
      r.scales = Tensor();
      if (quant == 2 && rng() % 2 == 0) {
        r.scales = Tensor(DType::fp32, c.moe_expert_num + (c.shared_expert_rank_num > 0 ? 1 : 0), 8200);
        for (std::int64_t i = 0; i < r.scales.numel(); ++i) r.scales.data<float>()[i] = 0.5f + static_cast<float>(rng() % 100) / 100.0f;
      }
      r.combine_x = Tensor();
    }
    std::vector<casefile::Case> calls;
    calls.push_back(std::move(c));
    const auto results = run_kernels(calls, RunMode{}, std::chrono::milliseconds(60000));
    for (std::size_t r = 0; r < results.size(); ++r) EXPECT_EQ(results[r], "") << "quant " << quant << " rank " << r;
  }
}

// An id out of range on one rank: it names the id; every other rank, running concurrently, stops with
// peer_failed naming it (the failed bit in the flags), and nobody waits for a timeout.
TEST(CudaKernelsEmulated, ABadIdStopsEveryRankWithoutATimeout) {
  std::mt19937_64 rng(4);
  casefile::Case c = mt::uniform_case(rng, 4, 16, 3);
  std::vector<std::int32_t> bad(static_cast<std::size_t>(c.ranks[1].expert_ids.numel()));
  std::vector<casefile::Case> calls;
  calls.push_back(std::move(c));
  const auto start = std::chrono::steady_clock::now();
  const auto results =
      run_kernels(calls, RunMode{}, std::chrono::milliseconds(20000), [&](int rank, int, DispatchArgs& a) {
        if (rank != 1) return;
        std::copy(a.ids, a.ids + bad.size(), bad.begin());
        bad[0] = 9999;
        a.ids = bad.data();
      });
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), 15.0);
  EXPECT_NE(results[1].find("invalid_argument"), std::string::npos) << results[1];
  EXPECT_NE(results[1].find("expert_ids[0, 0]"), std::string::npos) << results[1];
  for (int r : {0, 2, 3}) EXPECT_NE(results[static_cast<std::size_t>(r)].find("peer_failed"), std::string::npos) << r << ": " << results[static_cast<std::size_t>(r)];
}

// A rank that never calls: the others time out naming it, after about the timeout.
TEST(CudaKernelsEmulated, AnAbsentRankIsATimeoutNamingIt) {
  std::mt19937_64 rng(5);
  const casefile::Case c = mt::uniform_case(rng, 3, 16, 2);
  const int world = 3;
  const WindowOffsets off = testing::case_window_offsets(c);
  const SharedWindows windows(world, off.total);
  const auto results = run_in_children(world, [&](int rank) -> std::string {
    if (rank == 2) return "absent";
    testing::HostRank e;
    testing::init_host_rank(e, c, rank, off, windows.bases(), 1500LL * 1000000);
    Status mirror;
    const auto start = std::chrono::steady_clock::now();
    enqueue_dispatch(e.g, testing::rank_dispatch_args(c, rank, e),
                     SortScratch{nullptr, 0, key_bits_for(c.moe_expert_num + 1)}, &mirror, nullptr);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    return testing::status_error_text(mirror, rank, c.ranks[0].expert_ids.cols()) + (seconds >= 1.4 && seconds < 6.0 ? " [in time]" : " [after " + std::to_string(seconds) + " s]");
  });
  for (int r : {0, 1}) {
    const std::string& text = results[static_cast<std::size_t>(r)].text;
    EXPECT_NE(text.find("timeout: rank " + std::to_string(r) + ": rank 2 did not arrive within 1500 ms in dispatch.counts"), std::string::npos) << text;
    EXPECT_NE(text.find("[in time]"), std::string::npos) << text;
  }
}

}  // namespace
}  // namespace moedist::cuda
