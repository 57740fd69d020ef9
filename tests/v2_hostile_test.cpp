// What a peer publishes or sends in a V2 call is not trusted. check_send_counts_v2
// (contract/record_checks.h, the CPU's and the GPU's rule for a V2 dispatch record) on its own, each
// RecordFault at its bounds and near the int32 limits; then records rewritten in the allgather and
// messages corrupted on their way to another host (virtual hosts of the in-process runtime), as
// review/peer_records_test and hosts_test do for V1. Every rank must refuse alike with a protocol error
// naming the rank at fault, nothing may crash or hang, and a clean round afterwards matches the oracle.
#include <gtest/gtest.h>

#include <chrono>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "contract/record_checks.h"
#include "moedist/inproc.h"
#include "ops/group_state.h"
#include "ops/host_messages.h"
#include "outcome.h"
#include "test_support.h"
#include "transport/inproc/inproc_transport.h"
#include "v2_world.h"

namespace moedist::testing::v2 {
namespace {

using contract::RecordCheck;
using contract::RecordFault;

// ---- check_send_counts_v2 ---------------------------------------------------------------------------

constexpr std::int64_t kInt64Max = INT64_MAX;

// A record of W ranks (S shared-expert ranks, each a single entry l = 0 of L, holding Sn = S / R shared
// experts) from `source`; the defaults are the record of W = 4, S = 2, L = 2, R = 1 (Sn = 2) from MoE
// rank 2 with 3 active tokens of 4 and K = 2: 3 rows to each shared-expert rank, 5 routed rows.
struct Record {
  std::vector<std::int32_t> counts{3, 0, 3, 0, 2, 1, 0, 2};
  int W = 4, S = 2, L = 2, R = 1, source = 2;
  std::int64_t bs = 4, active = 3, k = 2, max_bs = 4;

  RecordCheck check() const {
    return contract::check_send_counts_v2(counts.data(), W, S, L, R, source, bs, active, k, max_bs);
  }
};

// A change to the default record and what check_send_counts_v2 must find in it.
struct RecordCase {
  std::string name;
  std::function<void(Record&)> change;
  RecordFault fault = RecordFault::none;
  std::int32_t entry = 0;
  std::int64_t value = 0, bound = 0;
};

void PrintTo(const RecordCase& c, std::ostream* os) { *os << c.name; }

// 2^31 - 1 tokens, all active, none beyond the limit: the int32 limit of every count.
void at_int32_limits(Record& r) { r.bs = r.active = r.max_bs = INT32_MAX; }

std::vector<RecordCase> record_cases() {
  const std::int64_t past_int32 = std::int64_t{INT32_MAX} + 1;
  return {
      // Consistent records.
      {"Consistent", [](Record&) {}},
      {"EveryActiveEntryRouted", [](Record& r) { r.counts = {3, 0, 3, 0, 3, 1, 0, 2}; }},
      {"NoActiveToken",
       [](Record& r) {
         r.active = 0;
         r.counts.assign(8, 0);
       }},
      {"FromASharedExpertRank", [](Record& r) { r.source = 0; }},  // it sends to every shared expert, itself included
      {"OneSharedExpertOnTwoRanks",
       [](Record& r) {
         r.R = 2;
         r.source = 3;
         r.counts = {0, 0, 3, 0, 1, 1, 1, 1};
       }},
      {"AtTheInt32Limits",
       [](Record& r) {
         at_int32_limits(r);
         r.k = 16;
         r.counts = {INT32_MAX, 0, INT32_MAX, 0, INT32_MAX, INT32_MAX, INT32_MAX, INT32_MAX};
       }},
      {"ActiveTimesKPastInt64",  // saturates instead of wrapping
       [](Record& r) {
         at_int32_limits(r);
         r.k = kInt64Max / 2;
         r.counts = {INT32_MAX, 0, INT32_MAX, 0, INT32_MAX, INT32_MAX, INT32_MAX, INT32_MAX};
       }},
      // BS in [0, max_bs].
      {"BsNegative", [](Record& r) { r.bs = -1; }, RecordFault::bs_range, -1, -1, 4},
      {"BsAboveLimit", [](Record& r) { r.bs = 5; }, RecordFault::bs_range, -1, 5, 4},
      {"BsInt64Max",
       [](Record& r) {
         r.bs = kInt64Max;
         r.max_bs = INT32_MAX;
       },
       RecordFault::bs_range, -1, kInt64Max, INT32_MAX},
      {"BsJustPastInt32",
       [=](Record& r) {
         r.bs = past_int32;
         r.max_bs = INT32_MAX;
       },
       RecordFault::bs_range, -1, past_int32, INT32_MAX},
      // Active tokens in [0, BS].
      {"ActiveNegative", [](Record& r) { r.active = -1; }, RecordFault::active_range, -1, -1, 4},
      {"ActiveAboveBs", [](Record& r) { r.active = 5; }, RecordFault::active_range, -1, 5, 4},
      {"ActiveInt64Min", [](Record& r) { r.active = INT64_MIN; }, RecordFault::active_range, -1, INT64_MIN, 4},
      {"ActiveJustPastInt32",
       [=](Record& r) {
         at_int32_limits(r);
         r.active = past_int32;
       },
       RecordFault::active_range, -1, past_int32, INT32_MAX},
      // Every entry in [0, active tokens], the first bad one in index order reported.
      {"EntryAboveActive", [](Record& r) { r.counts[5] = 4; }, RecordFault::entry_range, 5, 4, 3},
      {"EntryInt32Min", [](Record& r) { r.counts[5] = INT32_MIN; }, RecordFault::entry_range, 5, INT32_MIN, 3},
      {"FirstBadEntry",
       [](Record& r) {
         r.counts[5] = INT32_MAX;
         r.counts[2] = -1;
       },
       RecordFault::entry_range, 2, -1, 3},
      {"SharedEntryAboveActive", [](Record& r) { r.counts[0] = 4; }, RecordFault::entry_range, 0, 4, 3},
      {"EntryInt32MaxForOneLess",
       [](Record& r) {
         at_int32_limits(r);
         r.active = INT32_MAX - 1;
         r.counts = {INT32_MAX - 1, 0, INT32_MAX - 1, 0, 0, INT32_MAX, 0, 0};
       },
       RecordFault::entry_range, 5, INT32_MAX, INT32_MAX - 1},
      // A shared-expert rank has one local expert: entries d * L + l, l > 0, stay 0.
      {"SharedRanksSecondLocalExpert", [](Record& r) { r.counts[1] = 1; }, RecordFault::entry_shared_local, 1, 1, 3},
      {"SecondSharedRanksSecondLocalExpert", [](Record& r) { r.counts[3] = 3; }, RecordFault::entry_shared_local, 3, 3,
       3},
      // A shared-expert rank gets the active tokens from each source it serves, nothing from the others.
      {"SharedRankShort", [](Record& r) { r.counts[2] = 2; }, RecordFault::shared_rows, 2, 2, 3},
      {"SharedRankEmpty", [](Record& r) { r.counts[0] = 0; }, RecordFault::shared_rows, 0, 0, 3},
      {"SharedRankNotServed",
       [](Record& r) {
         r.R = 2;
         r.source = 3;
         r.counts = {3, 0, 3, 0, 1, 1, 1, 1};
       },
       RecordFault::shared_rows, 0, 3, 0},
      {"ServedSharedRankEmpty",
       [](Record& r) {
         r.R = 2;
         r.source = 3;
         r.counts = {0, 0, 0, 0, 1, 1, 1, 1};
       },
       RecordFault::shared_rows, 2, 0, 3},
      {"SharedRankOneShortAtTheInt32Limit",
       [](Record& r) {
         at_int32_limits(r);
         r.counts = {INT32_MAX, 0, INT32_MAX - 1, 0, 0, 0, 0, 0};
       },
       RecordFault::shared_rows, 2, INT32_MAX - 1, INT32_MAX},
      // The routed entries add up to at most active * K (masked entries and special experts send nothing).
      {"RoutedRowsAboveActiveTimesK", [](Record& r) { r.counts = {3, 0, 3, 0, 3, 3, 1, 0}; }, RecordFault::moe_rows, 0,
       7, 6},
      {"RoutedRowsPastInt32",  // three entries of 2^31 - 1 for 2^31 - 1 tokens of K = 2: a 64-bit sum
       [](Record& r) {
         at_int32_limits(r);
         r.W = 3;
         r.S = 0;
         r.L = 1;
         r.R = 0;
         r.source = 1;
         r.counts = {INT32_MAX, INT32_MAX, INT32_MAX};
       },
       RecordFault::moe_rows, 0, 3 * std::int64_t{INT32_MAX}, 2 * std::int64_t{INT32_MAX}},
      {"RoutedRowsPastInt32WithinK",
       [](Record& r) {
         at_int32_limits(r);
         r.W = 3;
         r.S = 0;
         r.L = 1;
         r.R = 0;
         r.source = 1;
         r.k = 3;
         r.counts = {INT32_MAX, INT32_MAX, INT32_MAX};
       }},
  };
}

class CheckSendCountsV2 : public ::testing::TestWithParam<RecordCase> {};

TEST_P(CheckSendCountsV2, FindsTheFirstFault) {
  Record r;
  GetParam().change(r);
  const RecordCheck got = r.check();
  const RecordCase& want = GetParam();
  EXPECT_EQ(got.fault, want.fault);
  if (want.fault == RecordFault::none) return;
  EXPECT_EQ(got.entry, want.entry);
  EXPECT_EQ(got.value, want.value);
  EXPECT_EQ(got.bound, want.bound);
}

std::string record_case_name(const ::testing::TestParamInfo<RecordCase>& info) { return info.param.name; }

INSTANTIATE_TEST_SUITE_P(All, CheckSendCountsV2, ::testing::ValuesIn(record_cases()), record_case_name);

// ---- a transport that lies for one rank -------------------------------------------------------------

// Rewrites a record: its header and the count_record_len() int32 entries that follow it.
using Rewrite = std::function<void(CallHeader& header, std::int32_t* counts)>;
// Rewrites a message to a proxy on another host.
using Corrupt = std::function<void(std::vector<std::byte>& message)>;

// Forwards to another transport, once lying in one phase: with a Rewrite, as every rank's allgather of
// `phase` returns, rank `victim`'s record in what this rank received (so every rank, the victim too,
// sees the record the victim would have published); with a Corrupt, the first non-empty message this
// rank sends in an exchange of `phase`.
class LyingTransport final : public Transport {
 public:
  LyingTransport(std::unique_ptr<Transport> inner, std::string phase, int victim, Rewrite rewrite, Corrupt corrupt)
      : inner_(std::move(inner)),
        phase_(std::move(phase)),
        victim_(victim),
        rewrite_(std::move(rewrite)),
        corrupt_(std::move(corrupt)) {}
  int rank() const noexcept override { return inner_->rank(); }
  int size() const noexcept override { return inner_->size(); }
  void allgather(const void* in, std::size_t bytes, void* out, std::string_view phase) override {
    inner_->allgather(in, bytes, out, phase);
    if (!rewrite_ || !armed_ || phase != phase_) return;
    armed_ = false;
    std::byte* record = static_cast<std::byte*>(out) + static_cast<std::size_t>(victim_) * bytes;
    CallHeader header;
    std::memcpy(&header, record, sizeof header);
    rewrite_(header, reinterpret_cast<std::int32_t*>(record + sizeof(CallHeader)));
    std::memcpy(record, &header, sizeof header);
  }
  void last_allgather_waits(std::span<std::int64_t> out) const override { inner_->last_allgather_waits(out); }
  void resize_window(std::size_t bytes, std::string_view phase) override { inner_->resize_window(bytes, phase); }
  std::size_t window_size(int r) const noexcept override { return inner_->window_size(r); }
  std::byte* window(int r) noexcept override { return inner_->window(r); }
  int host_count() const noexcept override { return inner_->host_count(); }
  int host_of(int r) const noexcept override { return inner_->host_of(r); }
  std::string host_name(int host) const override { return inner_->host_name(host); }
  void exchange(std::span<const Outgoing> out, std::span<const int> from, std::span<std::vector<std::byte>> in,
                std::string_view phase) override {
    std::vector<Outgoing> copy(out.begin(), out.end());
    for (Outgoing& m : copy) {
      if (!corrupt_ || !armed_ || phase != phase_ || m.bytes == 0) continue;
      armed_ = false;
      bad_.assign(m.data, m.data + m.bytes);
      corrupt_(bad_);
      m.data = bad_.data();
      m.bytes = bad_.size();
    }
    inner_->exchange(copy, from, in, phase);
  }

 private:
  std::unique_ptr<Transport> inner_;
  std::string phase_;
  int victim_;
  Rewrite rewrite_;
  Corrupt corrupt_;
  bool armed_ = true;
  std::vector<std::byte> bad_;
};

struct LiedRounds {
  std::vector<Outcome> lied;                   // per rank: the round with the lie
  std::vector<Outcome> clean;                  // per rank: the round after it
  std::vector<casefile::RankOutputs> outputs;  // per rank: the clean round's outputs
};

// Every rank runs a V2 round of `c` with the lie, then one more on the same group. `liar`: the rank whose
// transport corrupts its messages (Corrupt), or -1 for every rank's (Rewrite).
LiedRounds run_with_lie(const World& w, const casefile::Case& c, int ranks_per_host, const std::string& phase,
                        int victim, const Rewrite& rewrite, const Corrupt& corrupt, int liar = -1) {
  auto hub = std::make_shared<inproc::InProcHub>(w.size(), std::chrono::milliseconds(20000),
                                                 std::chrono::microseconds(-1), ranks_per_host);
  LiedRounds run;
  run.lied.resize(static_cast<std::size_t>(w.size()));
  run.clean.resize(run.lied.size());
  run.outputs.resize(run.lied.size());
  run_ranks(w.size(), [&](int g) {
    const auto i = static_cast<std::size_t>(g);
    std::unique_ptr<Transport> t = std::make_unique<inproc::InProcTransport>(hub, g);
    if (liar < 0 || g == liar) t = std::make_unique<LyingTransport>(std::move(t), phase, victim, rewrite, corrupt);
    Group group(w.rank_config(g), std::move(t));
    run.lied[i] = capture([&] { run_rank(group, c, g, round_options()); });
    run.clean[i] = capture([&] { run.outputs[i] = run_rank(group, c, g, round_options()); });
  });
  return run;
}

void expect_clean_round_after(const casefile::Case& c, const LiedRounds& run) {
  for (std::size_t g = 0; g < run.clean.size(); ++g)
    ASSERT_EQ(run.clean[g].kind, Outcome::Kind::none) << "rank " << g << ": " << describe(run.clean[g]);
  EXPECT_EQ(oracle_diff(c, run.outputs), "");
}

// ---- hostile V2 records -----------------------------------------------------------------------------

// W = 4: shared-expert ranks 0 and 1 hold Sn = 1 shared expert (R = 2: ranks r send to r % 2), MoE ranks
// 2 and 3 hold E = 4 experts (L = 2); BS = 4 (global_bs = 16), K = 2. The victim, EP rank 3, has 4
// active tokens: its record sends 4 rows to shared-expert rank 1 (entry 2), none to 0 (entry 0), and at
// most 8 routed rows (entries 4-7).
World record_world() {
  World w = world(4, 4, 2, 1);
  w.config.global_bs = 16;
  w.bs = 4;
  return w;
}

struct HostileRecord {
  std::string name;
  std::string phase;
  Rewrite rewrite;
  std::string fragment;  // of the protocol error every rank raises
};

void PrintTo(const HostileRecord& r, std::ostream* os) { *os << r.name; }

std::vector<HostileRecord> hostile_records() {
  const auto dispatch = [](std::string name, Rewrite rewrite, std::string fragment) {
    return HostileRecord{std::move(name), "dispatch.counts", std::move(rewrite), std::move(fragment)};
  };
  return {
      dispatch(
          "BsAboveGlobalBsOverW", [](CallHeader& h, std::int32_t*) { h.bs = h.active = 5; },
          "BS 5 is outside [0, 4] (global_bs / ep_world_size = 16 / 4)"),
      dispatch(
          "BsNearInt32Max",
          [](CallHeader& h, std::int32_t* counts) {
            h.bs = h.active = INT32_MAX;
            counts[2] = counts[4] = counts[5] = INT32_MAX;
          },
          "BS 2147483647 is outside [0, 4]"),
      dispatch(
          "ActiveAboveBs", [](CallHeader& h, std::int32_t*) { h.active = 5; }, "5 active tokens, outside [0, BS = 4]"),
      dispatch(
          "ActiveBelowTheCounts", [](CallHeader& h, std::int32_t*) { h.active = 1; },
          "is outside [0, active tokens = 1]"),
      dispatch(
          "EntryAboveActive", [](CallHeader&, std::int32_t* counts) { counts[4] = 5; },
          "entry 4 = 5 is outside [0, active tokens = 4]"),
      dispatch(
          "EntryInt32Min", [](CallHeader&, std::int32_t* counts) { counts[6] = INT32_MIN; },
          "entry 6 = -2147483648 is outside [0, active tokens = 4]"),
      dispatch(
          "EntryOfASharedRanksOtherLocalExpert", [](CallHeader&, std::int32_t* counts) { counts[1] = 1; },
          "entry 1 addresses a shared-expert rank's local expert 1"),
      dispatch(
          "SharedRankShortOfTheActiveTokens", [](CallHeader&, std::int32_t* counts) { counts[2] = 3; },
          "entry 2 sends 3 rows to shared-expert rank 1, not 4"),
      dispatch(
          "SharedRankItDoesNotServe", [](CallHeader&, std::int32_t* counts) { counts[0] = 4; },
          "entry 0 sends 4 rows to shared-expert rank 0, not 0"),
      dispatch(
          "MoreRoutedRowsThanActiveTimesK",
          [](CallHeader&, std::int32_t* counts) { counts[4] = counts[5] = counts[6] = counts[7] = 4; },
          "it sends 16 rows to MoE experts, more than active tokens * K = 8"),
      HostileRecord{"CombineBsAboveGlobalBsOverW", "combine.counts", [](CallHeader& h, std::int32_t*) { h.bs = 1000; },
                    "reports BS 1000, outside [0, 4]"},
      HostileRecord{"CombineRowsAboveCapacity", "combine.counts",
                    [](CallHeader& h, std::int32_t*) { h.own_rows = INT32_MAX; },
                    "reports 2147483647 own and 0 TP peer rows, outside its capacity 32"},
  };
}

class HostileRecordsV2 : public ::testing::TestWithParam<HostileRecord> {};

TEST_P(HostileRecordsV2, EveryRankRefusesNamingTheSenderThenWorks) {
  const HostileRecord& r = GetParam();
  const World w = record_world();
  const casefile::Case c = make_case(w, 21);
  const int victim = 3;
  for (const int per_host : {0, 2}) {
    const LiedRounds run = run_with_lie(w, c, per_host, r.phase, victim, r.rewrite, {});
    for (std::size_t g = 0; g < run.lied.size(); ++g) {
      EXPECT_TRUE(peer_error(run.lied[g], ErrorCode::protocol, victim, r.phase, r.fragment))
          << "rank " << g << ", ranks_per_host " << per_host;
    }
    expect_clean_round_after(c, run);
  }
}

std::string hostile_record_name(const ::testing::TestParamInfo<HostileRecord>& info) { return info.param.name; }

INSTANTIATE_TEST_SUITE_P(All, HostileRecordsV2, ::testing::ValuesIn(hostile_records()), hostile_record_name);

// ---- hostile V2 messages between hosts --------------------------------------------------------------

// record_world() with Sn = 2 shared experts (R = 1: every token to both shared-expert ranks), on virtual
// hosts of two ranks: host 0 holds the shared-expert ranks, host 1 the MoE ranks. Rank 0's message to
// host 1 carries routed rows (k < K = 2); rank 2's to host 0 shared rows only (k = K + j on rank j).
World message_world() {
  World w = record_world();
  w.config.shared_expert_num = 2;
  return w;
}

// The first dispatch entry's token and first target (host_messages.h).
constexpr std::size_t kToken = offsetof(RemoteEntry, token);
constexpr std::size_t kFirstTarget = sizeof(RemoteEntry);

void write_i32(std::vector<std::byte>& m, std::size_t at, std::int32_t v) { std::memcpy(m.data() + at, &v, 4); }

// `sender` corrupts its first message to the other host in dispatch: the proxy there raises a protocol
// error naming it, and every other rank fails naming the proxy, quoting that error.
void expect_dispatch_message_refused(int sender, const Corrupt& corrupt, const std::string& fragment) {
  const World w = message_world();
  const casefile::Case c = make_case(w, 22);
  const LiedRounds run = run_with_lie(w, c, 2, "dispatch.hosts", -1, {}, corrupt, sender);
  const std::string malformed =
      "the rows rank " + std::to_string(sender) + " sent for this host are malformed: " + fragment;
  int proxy = -1;
  for (std::size_t g = 0; g < run.lied.size(); ++g) {
    if (run.lied[g].code == ErrorCode::protocol) proxy = static_cast<int>(g);
  }
  ASSERT_GE(proxy, 0) << "no rank refused the message: " << describe(run.lied[0]);
  EXPECT_NE(proxy / 2, sender / 2) << "the proxy is on the other host";
  for (std::size_t g = 0; g < run.lied.size(); ++g) {
    if (static_cast<int>(g) == proxy) {
      EXPECT_TRUE(peer_error(run.lied[g], ErrorCode::protocol, sender, "dispatch.hosts", malformed)) << "rank " << g;
    } else {
      EXPECT_TRUE(peer_error(run.lied[g], ErrorCode::peer_failed, proxy, "dispatch.data", malformed)) << "rank " << g;
    }
  }
  expect_clean_round_after(c, run);
}

TEST(HostMessagesV2, DispatchTokenAtBs) {
  expect_dispatch_message_refused(
      0, [](auto& m) { write_i32(m, kToken, 4); }, "token 4 is outside its BS 4");
}
TEST(HostMessagesV2, DispatchTokenNegative) {
  expect_dispatch_message_refused(
      3, [](auto& m) { write_i32(m, kToken, -1); }, "token -1 is outside its BS 4");
}
TEST(HostMessagesV2, DispatchRoutedKEqualToK) {
  expect_dispatch_message_refused(
      1, [](auto& m) { write_i32(m, kFirstTarget + offsetof(RemoteTarget, k), 2); }, "k 2 does not fit expert code");
}
TEST(HostMessagesV2, DispatchRoutedKNegative) {
  expect_dispatch_message_refused(
      0, [](auto& m) { write_i32(m, kFirstTarget + offsetof(RemoteTarget, k), -1); }, "k -1 does not fit expert code");
}
// Rank 2's first target is shared-expert rank 0 (code -1), which holds shared expert 0: k must be K + 0.
TEST(HostMessagesV2, DispatchSharedKOfAnotherSharedExpert) {
  expect_dispatch_message_refused(
      2, [](auto& m) { write_i32(m, kFirstTarget + offsetof(RemoteTarget, k), 3); },
      "k 3 does not fit expert code -1 (K = 2)");
}
TEST(HostMessagesV2, DispatchSharedKOfARoutedEntry) {
  expect_dispatch_message_refused(
      2, [](auto& m) { write_i32(m, kFirstTarget + offsetof(RemoteTarget, k), 0); },
      "k 0 does not fit expert code -1 (K = 2)");
}

// In combine a corrupted request fails the requester and the proxy that serves it (its answer carries
// the error); the ranks whose rows it does not touch combine.
void expect_combine_request_refused(const Corrupt& corrupt, const std::string& fragment) {
  const World w = message_world();
  const casefile::Case c = make_case(w, 23);
  const int sender = 0;
  const LiedRounds run = run_with_lie(w, c, 2, "combine.requests", -1, {}, corrupt, sender);
  int proxy = -1;
  for (std::size_t g = 0; g < run.lied.size(); ++g) {
    if (run.lied[g].code == ErrorCode::protocol) proxy = static_cast<int>(g);
  }
  ASSERT_GE(proxy, 0) << "no rank refused the request: " << describe(run.lied[0]);
  EXPECT_TRUE(
      peer_error(run.lied[static_cast<std::size_t>(proxy)], ErrorCode::protocol, sender, "combine.requests", fragment));
  EXPECT_TRUE(
      peer_error(run.lied[static_cast<std::size_t>(sender)], ErrorCode::peer_failed, proxy, "combine.hosts", fragment));
  for (std::size_t g = 0; g < run.lied.size(); ++g) {
    if (static_cast<int>(g) != proxy && static_cast<int>(g) != sender) {
      EXPECT_EQ(run.lied[g].kind, Outcome::Kind::none) << "rank " << g << ": " << describe(run.lied[g]);
    }
  }
  expect_clean_round_after(c, run);
}

TEST(HostMessagesV2, CombineRequestForARankOnAnotherHost) {
  expect_combine_request_refused([](auto& m) { write_i32(m, offsetof(RowRequest, code), 0); },
                                 "asked this host for the rows of EP rank 0, which is not on this host");
}
TEST(HostMessagesV2, CombineRequestNegativeSlot) {
  expect_combine_request_refused([](auto& m) { write_i32(m, offsetof(RowRequest, slot), -5); },
                                 "asked this host for slot -5");
}
TEST(HostMessagesV2, CombineRequestTorn) {
  expect_combine_request_refused([](auto& m) { m.resize(m.size() - 3); }, "not a whole number of rows");
}

}  // namespace
}  // namespace moedist::testing::v2
