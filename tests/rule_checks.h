// What the rule tests of the V1 and V2 operators (validation_test, v2_validation_test) assert about a
// refused call: the typed ValidationError of the rank with the bad input, the PeerError of the others,
// caller output buffers filled with a sentinel pattern that must still hold it afterwards, and a
// correct round on the same groups afterwards that matches the oracle.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <exception>
#include <functional>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

#include "moedist/inproc.h"
#include "moedist/tensor.h"
#include "outcome.h"
#include "test_support.h"

namespace moedist::testing::rules {

// The ValidationError a rule must raise. `rule` is a distinctive part of ValidationError::rule().
struct Expected {
  ErrorCode code;
  std::string parameter;
  std::string value;
  std::string rule;
};

inline Expected expect(ErrorCode code, std::string parameter, std::string value, std::string rule) {
  return Expected{code, std::move(parameter), std::move(value), std::move(rule)};
}
inline Expected invalid(std::string parameter, std::string value, std::string rule) {
  return expect(ErrorCode::invalid_argument, std::move(parameter), std::move(value), std::move(rule));
}
inline Expected bad_dtype(std::string parameter, std::string value, std::string rule) {
  return expect(ErrorCode::invalid_dtype, std::move(parameter), std::move(value), std::move(rule));
}
inline Expected bad_shape(std::string parameter, std::string value, std::string rule) {
  return expect(ErrorCode::invalid_shape, std::move(parameter), std::move(value), std::move(rule));
}

// The error, its parts, and its message "<parameter> = <value>: <rule>".
inline ::testing::AssertionResult raised(const Outcome& got, const Expected& want) {
  if (got.kind != Outcome::Kind::validation || got.code != want.code || got.parameter != want.parameter ||
      got.value != want.value || !contains(got.rule, want.rule) ||
      got.what != want.parameter + " = " + want.value + ": " + got.rule) {
    return ::testing::AssertionFailure() << "expected ValidationError(" << error_code_name(want.code) << ", parameter '"
                                         << want.parameter << "', value '" << want.value << "', rule containing '"
                                         << want.rule << "'), got " << describe(got);
  }
  return ::testing::AssertionSuccess();
}

// A rank whose peer `peer` failed in `phase`: the PeerError quotes the peer's own message.
inline ::testing::AssertionResult peer_failed(const Outcome& got, int peer, const std::string& phase,
                                              const std::string& cause) {
  if (got.kind != Outcome::Kind::peer || got.code != ErrorCode::peer_failed || got.peer != peer || got.phase != phase ||
      cause.empty() || !contains(got.what, cause)) {
    return ::testing::AssertionFailure() << "expected PeerError(peer_failed, peer " << peer << ", phase '" << phase
                                         << "') quoting '" << cause << "', got " << describe(got);
  }
  return ::testing::AssertionSuccess();
}

// The capacity a call's caller buffers are sized by: a global_bs below BS * W is a rule under test, not a
// reason to fail here.
inline CapacityReport buffer_capacity(GroupConfig config, const CapacityQuery& q) {
  if (config.global_bs != 0) config.global_bs = std::max<std::int64_t>(config.global_bs, q.bs * config.ep_world_size);
  return capacity(config, q);
}

// A caller buffer filled with a sentinel pattern: views of it stay valid for its lifetime, and
// untouched() says whether anything wrote to it.
class SentinelBuffer {
 public:
  static constexpr std::uint8_t kPattern = 0xA5;

  // A buffer for rows x cols elements, generously sized so that a rule may describe it with another
  // shape or dtype.
  MutableTensorView matrix(DType dtype, std::int64_t rows, std::int64_t cols) {
    allocate(rows * cols);
    return matrix_view(bytes_.data(), dtype, rows, cols);
  }
  MutableTensorView vector(DType dtype, std::int64_t n) {
    allocate(n);
    return vector_view(bytes_.data(), dtype, n);
  }
  bool untouched() const {
    return std::all_of(bytes_.begin(), bytes_.end(), [](std::uint8_t b) { return b == kPattern; });
  }

 private:
  void allocate(std::int64_t elements) {
    bytes_.assign(static_cast<std::size_t>(std::max<std::int64_t>(elements + 8, 8)) * 8, kPattern);
  }
  std::vector<std::uint8_t> bytes_;
};

// A rule of one rank's call: `corrupt` makes rank `bad_rank`'s arguments (a Call) break it.
template <class World, class Call>
struct CallRule {
  std::string name;
  World world;
  int bad_rank = 0;
  std::function<void(Call&)> corrupt;
  Expected want;
};

template <class World, class Call>
void PrintTo(const CallRule<World, Call>& rule, std::ostream* os) {
  *os << rule.name;
}

template <class World, class Call>
std::string rule_name(const ::testing::TestParamInfo<CallRule<World, Call>>& info) {
  return info.param.name;
}

// The rules of x and expert_ids as tensors, which dispatch and dispatch_v2 share (one check each in
// src/contract/checks.cpp, the same messages). `make(name, corrupt, want)` makes the version's rule for a
// call of BS = 3, H = 16, K = 2 and bfloat16 x; a Call has views x and expert_ids, and own(Tensor).
template <class Call, class Make>
auto x_and_expert_ids_rules(Make make) {
  using Rule = decltype(make(std::string(), std::function<void(Call&)>(), Expected{}));
  return std::vector<Rule>{
      // x
      make(
          "XAbsent", [](Call& c) { c.x = TensorView{}; }, invalid("x", "None", "is required")),
      make(
          "XOneDimensional", [](Call& c) { c.x = vector_view(c.x.data, DType::bf16, 48); },
          bad_shape("x.shape", "(48,)", "must be 2-D")),
      make(
          "XFloat32", [](Call& c) { c.x.dtype = DType::fp32; },
          bad_dtype("x.dtype", "float32", "must be bfloat16 or float16")),
      make(
          "XInt8", [](Call& c) { c.x.dtype = DType::int8; },
          bad_dtype("x.dtype", "int8", "must be bfloat16 or float16")),
      make(
          "XNullData", [](Call& c) { c.x.data = nullptr; },
          invalid("x.data", "nullptr", "a tensor of shape (3, 16) needs data")),
      make(
          "XNegativeRows", [](Call& c) { c.x.shape[0] = -1; },
          bad_shape("x.shape", "(-1, 16)", "extents must be >= 0")),
      make(
          "XZeroHidden", [](Call& c) { c.x = matrix_view(c.x.data, DType::bf16, 3, 0); },
          bad_shape("x.shape[1] (H)", "0", "must be >= 1")),
      // expert_ids
      make(
          "IdsAbsent", [](Call& c) { c.expert_ids = TensorView{}; }, invalid("expert_ids", "None", "is required")),
      make(
          "IdsOneDimensional", [](Call& c) { c.expert_ids = vector_view(c.expert_ids.data, DType::int32, 6); },
          bad_shape("expert_ids.shape", "(6,)", "must be 2-D")),
      make(
          "IdsRowsDifferFromBs", [](Call& c) { c.expert_ids.shape[0] = 2; },
          bad_shape("expert_ids.shape", "(2, 2)", "must have BS = x.shape[0] = 3 rows")),
      make(
          "IdsInt64", [](Call& c) { c.expert_ids = c.own(Tensor(DType::int64, 3, 2)); },
          bad_dtype("expert_ids.dtype", "int64", "must be int32")),
      make(
          "IdsNullData", [](Call& c) { c.expert_ids.data = nullptr; },
          invalid("expert_ids.data", "nullptr", "a tensor of shape (3, 2) needs data")),
      make(
          "IdsNegativeK", [](Call& c) { c.expert_ids.shape[1] = -1; },
          bad_shape("expert_ids.shape", "(3, -1)", "extents must be >= 0")),
  };
}

// What one rank saw: the refused call, whether its caller buffers are untouched, and the round after.
struct RankReport {
  Outcome outcome;
  bool outputs_untouched = false;
  std::string recovery_error;
  casefile::RankOutputs recovered;
};

inline RuntimeOptions generous_timeout() { return RuntimeOptions{{std::chrono::milliseconds(20000)}}; }

// Runs fn(rank) for every rank: in the test thread for a single-rank world, else on one thread per rank.
inline void on_ranks(int n, const std::function<void(int)>& fn) {
  if (n == 1) {
    fn(0);
  } else {
    run_ranks(n, fn);
  }
}

// The correct round after the refused call: dispatch and combine of `recovery` on the same group.
inline void run_recovery(Group& group, const casefile::Case& recovery, int g, RankReport& report,
                         const RunOptions& options = {}) {
  try {
    report.recovered = run_rank(group, recovery, g, options);
  } catch (const std::exception& e) {
    report.recovery_error = e.what();
  }
}

// Checks the outcome of a rule on every rank, the sentinel buffers and the recovery round.
inline void expect_rule_enforced(std::vector<RankReport>& reports, int bad_rank, const Expected& want,
                                 const std::string& phase, const casefile::Case& recovery) {
  const Outcome& bad = reports[static_cast<std::size_t>(bad_rank)].outcome;
  EXPECT_TRUE(raised(bad, want)) << "rank " << bad_rank << " (the rank with the bad input)";
  bool recovered = true;
  for (std::size_t g = 0; g < reports.size(); ++g) {
    if (static_cast<int>(g) != bad_rank) {
      EXPECT_TRUE(peer_failed(reports[g].outcome, bad_rank, phase, bad.what)) << "rank " << g;
    }
    EXPECT_TRUE(reports[g].outputs_untouched)
        << "rank " << g << ": a caller output buffer was written before the error";
    EXPECT_EQ(reports[g].recovery_error, "") << "rank " << g << ": the correct call after the error failed";
    recovered = recovered && reports[g].recovery_error.empty();
  }
  if (recovered) {
    std::vector<casefile::RankOutputs> outputs;
    for (RankReport& r : reports) outputs.push_back(std::move(r.recovered));
    EXPECT_EQ(oracle_diff(recovery, outputs), "") << "the correct call after the error differs from the oracle";
  }
}

}  // namespace moedist::testing::rules
