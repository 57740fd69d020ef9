// The layer behind `moedist demo` on small shapes: it must match its dense reference in every mode, and its checker
// must catch each planted bug, over the in-process runtime and over shared memory.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

#include "demo_layer.h"
#include "moedist/error.h"
#include "moedist/launch.h"
#include "moedist/shm.h"

namespace {

using moedist::DType;
using moedist::demo::DemoOptions;
using moedist::demo::DemoReport;
using moedist::demo::Fault;
using moedist::demo::RankRecord;

// W 4, BS 3, H 64, K 2 and no shared expert; cases change what they test.
DemoOptions small() {
  DemoOptions o;
  o.ep_world_size = 4;
  o.tp_world_size = 0;
  o.shared_expert_rank_num = 0;
  o.moe_expert_num = 8;
  o.bs = 3;
  o.hidden = 64;
  o.topk = 2;
  o.quant_mode = 0;
  o.intermediate = 16;
  o.seed = 7;
  o.timeout_ms = 20000;
  return o;
}

struct Case {
  const char* name;
  DemoOptions options;
};

std::vector<Case> passing_cases() {
  std::vector<Case> cases;
  cases.push_back({"S0_quant0_bf16_L2", small()});
  {
    DemoOptions o = small();
    o.quant_mode = 2;
    cases.push_back({"S0_quant2_scales_L2", o});
  }
  {
    DemoOptions o = small();
    o.quant_mode = 2;
    o.smooth_scales = false;
    o.dtype = DType::fp16;
    cases.push_back({"S0_quant2_noscales_fp16", o});
  }
  {
    DemoOptions o = small();
    o.shared_expert_rank_num = 2;
    o.moe_expert_num = 4;
    o.quant_mode = 2;
    cases.push_back({"S2_quant2_scales_L2", o});
  }
  {
    DemoOptions o = small();
    o.shared_expert_rank_num = 2;
    o.moe_expert_num = 4;
    o.dtype = DType::fp16;
    cases.push_back({"S2_quant0_fp16", o});
  }
  {
    DemoOptions o = small();
    o.tp_world_size = 2;
    o.moe_expert_num = 4;
    cases.push_back({"T2_S0_quant0", o});
  }
  {
    DemoOptions o = small();
    o.tp_world_size = 2;
    o.shared_expert_rank_num = 2;
    o.moe_expert_num = 2;
    o.quant_mode = 2;
    cases.push_back({"T2_S2_quant2_scales", o});
  }
  {
    DemoOptions o = small();
    o.shared_expert_rank_num = 2;
    o.moe_expert_num = 4;
    o.quant_mode = 2;
    o.comm_quant_mode = 2;
    cases.push_back({"S2_quant2_commquant2", o});
  }
  {
    DemoOptions o = small();
    o.expert_token_nums_type = 0;
    o.global_bs = 2 * o.bs * o.ep_world_size;
    cases.push_back({"prefix_token_nums_larger_global_bs", o});
  }
  return cases;
}

// --op v2 on W 4: BS 8 of which the last 2 are padding, a zero and a copy expert among the router's 4 + 2 choices,
// 2 shared experts on the 2 shared-expert ranks (one each); cases change what they test.
DemoOptions small_v2() {
  DemoOptions o = small();
  o.op = 2;
  o.bs = 8;
  o.shared_expert_rank_num = 2;
  o.shared_expert_num = 2;
  o.moe_expert_num = 4;
  o.zero_expert_num = 1;
  o.copy_expert_num = 1;
  return o;
}

std::vector<Case> v2_cases() {
  std::vector<Case> cases;
  cases.push_back({"V2_S2_Sn2_quant0", small_v2()});
  {
    DemoOptions o = small_v2();
    o.quant_mode = 2;
    o.topk = 3;
    cases.push_back({"V2_S2_Sn2_quant2_scales_K3", o});
  }
  {
    DemoOptions o = small_v2();
    o.ep_world_size = 6;
    o.shared_expert_rank_num = 4;  // 2 shared experts on 2 ranks each
    o.quant_mode = 2;
    o.comm_quant_mode = 2;
    o.expert_token_nums_type = 0;
    cases.push_back({"V2_S4_Sn2_quant2_commquant2", o});
  }
  {
    DemoOptions o = small_v2();
    o.shared_expert_num = 1;  // one shared expert on both shared-expert ranks
    o.zero_expert_num = 2;
    o.padding_tokens = 3;
    o.dtype = DType::fp16;
    cases.push_back({"V2_S2_Sn1_Z2_fp16_padding3", o});
  }
  {
    DemoOptions o = small_v2();
    o.shared_expert_rank_num = 0;
    o.shared_expert_num = 0;
    o.moe_expert_num = 8;
    o.copy_expert_num = 2;
    cases.push_back({"V2_S0_C2", o});
  }
  {
    DemoOptions o = small_v2();
    o.tp_world_size = 2;
    o.moe_expert_num = 2;
    o.quant_mode = 2;
    cases.push_back({"V2_T2_S2_Sn2_quant2", o});
  }
  return cases;
}

// Names the case in test listings instead of dumping its bytes.
void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

class DemoPasses : public ::testing::TestWithParam<Case> {};

TEST_P(DemoPasses, MatchesDenseReference) {
  const DemoOptions& o = GetParam().options;
  std::ostringstream out;
  const DemoReport report = moedist::demo::run_demo(o, out);
  SCOPED_TRACE(out.str());
  EXPECT_TRUE(report.passed);
  EXPECT_TRUE(report.all_finite);
  EXPECT_LE(report.max_rel_error, report.tolerance);
  EXPECT_EQ(report.tolerance, moedist::demo::effective_tolerance(o));
  EXPECT_GT(report.max_abs_reference, 0.0);
  const int tp = o.tp_world_size == 2 ? 2 : 1;
  EXPECT_EQ(report.world_size, o.ep_world_size * tp);
  EXPECT_EQ(report.tokens, o.ep_world_size * tp * o.bs);
  // Every token goes to K experts, plus the shared expert when there is one; with TP both ranks of a pair see it.
  const std::int64_t expected_rows = report.tokens * (o.topk + (o.shared_expert_rank_num > 0 ? 1 : 0)) * tp;
  EXPECT_EQ(report.expert_rows, expected_rows);
  EXPECT_NE(out.str().find("PASS"), std::string::npos);
  if (o.quant_mode == 2) {
    EXPECT_GE(report.unquantized_rel_diff, 0.0);
  } else {
    EXPECT_LT(report.unquantized_rel_diff, 0.0);
  }
}

INSTANTIATE_TEST_SUITE_P(SmallShapes, DemoPasses, ::testing::ValuesIn(passing_cases()),
                         [](const ::testing::TestParamInfo<Case>& param_info) { return std::string(param_info.param.name); });

class DemoV2Passes : public ::testing::TestWithParam<Case> {};

// --op v2 matches the dense reference with its V2 terms; the padding tokens' rows are zero; the router sent some
// entries to the zero and the copy experts, which no expert rank processed.
TEST_P(DemoV2Passes, MatchesDenseReference) {
  const DemoOptions& o = GetParam().options;
  std::ostringstream out;
  const DemoReport report = moedist::demo::run_demo(o, out);
  SCOPED_TRACE(out.str());
  EXPECT_TRUE(report.passed);
  EXPECT_TRUE(report.all_finite);
  EXPECT_TRUE(report.padding_rows_zero);
  EXPECT_LE(report.max_rel_error, report.tolerance);
  EXPECT_GT(report.max_abs_reference, 0.0);
  const int tp = o.tp_world_size == 2 ? 2 : 1;
  const std::int64_t padding = moedist::demo::padding_tokens(o);
  EXPECT_EQ(padding, o.padding_tokens == -1 ? o.bs / 4 : o.padding_tokens);
  EXPECT_GT(padding, 0);
  EXPECT_EQ(report.padding_tokens, o.ep_world_size * tp * padding);
  const std::int64_t active = report.tokens - report.padding_tokens;
  EXPECT_GT(report.zero_expert_entries, 0);
  EXPECT_GT(report.copy_expert_entries, 0);
  // Active tokens' entries to MoE experts, plus one row per shared expert, on both ranks of a TP pair.
  const int shared = o.shared_expert_rank_num > 0 ? o.shared_expert_num : 0;
  const std::int64_t routed = active * o.topk - report.zero_expert_entries - report.copy_expert_entries;
  EXPECT_EQ(report.expert_rows, (routed + active * shared) * tp);
  EXPECT_NE(out.str().find("dispatch_v2 / combine_v2"), std::string::npos);
  EXPECT_NE(out.str().find("PASS"), std::string::npos);
}

INSTANTIATE_TEST_SUITE_P(SmallShapes, DemoV2Passes, ::testing::ValuesIn(v2_cases()),
                         [](const ::testing::TestParamInfo<Case>& param_info) {
                           return std::string(param_info.param.name);
                         });

// The checker's self-test: each planted bug must be reported as a mismatch, in a plain and a shared/quantized setup.
TEST(DemoChecker, CatchesEveryPlantedFault) {
  DemoOptions shared_quant = small();
  shared_quant.shared_expert_rank_num = 2;
  shared_quant.moe_expert_num = 4;
  shared_quant.quant_mode = 2;
  DemoOptions tp_pair = small();
  tp_pair.tp_world_size = 2;
  tp_pair.moe_expert_num = 4;
  for (const DemoOptions& base : {small(), shared_quant, tp_pair, small_v2()}) {
    for (Fault fault : {Fault::drop_expert, Fault::swap_rows, Fault::swap_weights}) {
      DemoOptions o = base;
      o.fault = fault;
      std::ostringstream out;
      const DemoReport report = moedist::demo::run_demo(o, out);
      SCOPED_TRACE(out.str());
      EXPECT_FALSE(report.passed) << moedist::demo::fault_name(fault);
      EXPECT_GT(report.max_rel_error, report.tolerance);
      EXPECT_NE(out.str().find("MISMATCH"), std::string::npos);
    }
  }
}

// The tolerance is what decides: far below the rounding the layer does, a correct run must fail.
TEST(DemoChecker, AppliesAnExplicitTolerance) {
  DemoOptions o = small();
  o.tolerance = 1e-9;
  std::ostringstream out;
  const DemoReport report = moedist::demo::run_demo(o, out);
  EXPECT_FALSE(report.passed) << out.str();
  EXPECT_EQ(report.tolerance, 1e-9);
}

TEST(DemoChecker, AutomaticToleranceFollowsTheRounding) {
  DemoOptions o;
  EXPECT_DOUBLE_EQ(moedist::demo::effective_tolerance(o), 4 * 0x1p-8);
  o.dtype = DType::fp16;
  EXPECT_DOUBLE_EQ(moedist::demo::effective_tolerance(o), 4 * 0x1p-11);
  o.comm_quant_mode = 2;
  EXPECT_DOUBLE_EQ(moedist::demo::effective_tolerance(o), 4 * 0x1p-11 + 1.0 / 127);
  o.tolerance = 0.25;
  EXPECT_DOUBLE_EQ(moedist::demo::effective_tolerance(o), 0.25);
}

TEST(DemoChecker, FaultNamesRoundTrip) {
  for (Fault fault : {Fault::none, Fault::drop_expert, Fault::swap_rows, Fault::swap_weights}) {
    Fault parsed = Fault::none;
    ASSERT_TRUE(moedist::demo::fault_from_name(moedist::demo::fault_name(fault), &parsed));
    EXPECT_EQ(parsed, fault);
  }
  Fault parsed = Fault::none;
  EXPECT_FALSE(moedist::demo::fault_from_name("flip-bits", &parsed));
}

// ---- over shared memory ----

// The shm transport with every rank a thread of this test, all joined to one fresh job: the layer's code path over
// shared memory. The ctest tests cli.demo_shm, cli.demo_tp_shm, cli.demo_shm_detects_planted_bug and
// cli.demo_defaults_shm (tools/CMakeLists.txt) run the same with a process per rank.
std::vector<RankRecord> run_shm_threads(const DemoOptions& o) {
  const std::string job = moedist::new_job_name();
  moedist::ShmOptions shm;
  shm.wait.timeout = std::chrono::milliseconds(o.timeout_ms);
  return moedist::demo::run_rank_threads(
      o, [&](const moedist::GroupConfig& config) { return moedist::join_shm(config, job, shm); });
}

// Three of passing_cases(): a shared expert with int8 dispatch and smooth scales, and TP pairs with and without;
// and two of v2_cases(): 2 shared experts with int8 dispatch, and --op v2 with TP pairs.
std::vector<Case> shm_cases() {
  std::vector<Case> cases;
  for (const Case& c : passing_cases()) {
    const std::string name = c.name;
    if (name == "S2_quant2_scales_L2" || name == "T2_S0_quant0" || name == "T2_S2_quant2_scales") cases.push_back(c);
  }
  for (const Case& c : v2_cases()) {
    const std::string name = c.name;
    if (name == "V2_S2_Sn2_quant2_scales_K3" || name == "V2_T2_S2_Sn2_quant2") cases.push_back(c);
  }
  return cases;
}

class DemoOverShm : public ::testing::TestWithParam<Case> {};

// The transports move the same bytes, so every rank's combine output equals the in-process run's, bit for bit, and
// the check passes.
TEST_P(DemoOverShm, MatchesTheInProcessRunBitForBit) {
  DemoOptions o = GetParam().options;
  const std::vector<RankRecord> inproc = moedist::demo::run_inproc_ranks(o);
  const std::vector<RankRecord> shm = run_shm_threads(o);
  ASSERT_EQ(shm.size(), inproc.size());
  for (std::size_t g = 0; g < shm.size(); ++g) {
    ASSERT_EQ(shm[g].out.nbytes(), inproc[g].out.nbytes()) << "rank " << g;
    EXPECT_EQ(std::memcmp(shm[g].out.raw(), inproc[g].out.raw(), shm[g].out.nbytes()), 0) << "rank " << g;
    EXPECT_EQ(shm[g].valid_rows, inproc[g].valid_rows) << "rank " << g;
    EXPECT_EQ(shm[g].rows_sent, inproc[g].rows_sent) << "rank " << g;
  }

  o.transport = "shm";
  std::ostringstream out;
  const DemoReport report = moedist::demo::run_demo(o, out, run_shm_threads);
  SCOPED_TRACE(out.str());
  EXPECT_TRUE(report.passed);
  EXPECT_NE(out.str().find("transport shm"), std::string::npos);
}

INSTANTIATE_TEST_SUITE_P(SmallShapes, DemoOverShm, ::testing::ValuesIn(shm_cases()),
                         [](const ::testing::TestParamInfo<Case>& param_info) { return std::string(param_info.param.name); });

TEST(DemoOverShmChecker, CatchesPlantedFaults) {
  for (const Case& c : shm_cases()) {
    for (Fault fault : {Fault::drop_expert, Fault::swap_weights}) {
      DemoOptions o = c.options;
      o.transport = "shm";
      o.fault = fault;
      std::ostringstream out;
      const DemoReport report = moedist::demo::run_demo(o, out, run_shm_threads);
      SCOPED_TRACE(out.str());
      EXPECT_FALSE(report.passed) << c.name << " " << moedist::demo::fault_name(fault);
      EXPECT_NE(out.str().find("MISMATCH"), std::string::npos);
    }
  }
}

// ---- options ----

void expect_rejected(const DemoOptions& o, const std::string& parameter) {
  try {
    moedist::demo::validate_options(o);
    ADD_FAILURE() << "accepted options that break a rule of " << parameter;
  } catch (const moedist::ValidationError& e) {
    EXPECT_EQ(e.parameter(), parameter) << e.what();
  }
}

TEST(DemoOptions, RejectsBadCombinations) {
  DemoOptions o = small();
  o.transport = "tcp";
  expect_rejected(o, "transport");
  o.transport = "shm";
  EXPECT_NO_THROW(moedist::demo::validate_options(o));

  o = small();
  o.tp_world_size = 2;
  o.moe_expert_num = 4;
  o.intermediate = 15;
  expect_rejected(o, "intermediate");

  o = small();
  o.topk = 9;
  expect_rejected(o, "topk");

  o = small();
  o.bs = 0;
  expect_rejected(o, "bs");

  o = small();
  o.quant_mode = 1;
  expect_rejected(o, "quant_mode");

  o = small();
  o.topk = 1;
  o.fault = Fault::swap_weights;
  expect_rejected(o, "topk");

  o = small();
  o.tolerance = -1e-3;
  expect_rejected(o, "tolerance");

  // The contract's own rule, reported by the library: E must be a multiple of W - S.
  o = small();
  o.moe_expert_num = 6;
  o.shared_expert_rank_num = 0;
  EXPECT_THROW(moedist::demo::validate_options(o), moedist::ValidationError);
}

TEST(DemoOptions, RejectsBadV2Combinations) {
  DemoOptions o = small_v2();
  EXPECT_NO_THROW(moedist::demo::validate_options(o));
  o.op = 3;
  expect_rejected(o, "op");

  // The router picks among E + Z + C experts: K may exceed E, not E + Z + C.
  o = small_v2();
  o.topk = 6;
  EXPECT_NO_THROW(moedist::demo::validate_options(o));
  o.topk = 7;
  expect_rejected(o, "topk");

  o = small_v2();
  o.zero_expert_num = -1;
  expect_rejected(o, "zero_expert_num");
  o = small_v2();
  o.copy_expert_num = -1;
  expect_rejected(o, "copy_expert_num");

  o = small_v2();
  o.padding_tokens = o.bs;  // no active token left
  expect_rejected(o, "padding_tokens");
  o.padding_tokens = -2;
  expect_rejected(o, "padding_tokens");

  // A mask with a larger global_bs is refused by V2 (§3.9); without padding tokens it is fine.
  o = small_v2();
  o.global_bs = 2 * o.bs * o.ep_world_size;
  expect_rejected(o, "global_bs");
  o.padding_tokens = 0;
  EXPECT_NO_THROW(moedist::demo::validate_options(o));

  // The library's rule: shared_expert_num divides S.
  o = small_v2();
  o.shared_expert_num = 3;
  expect_rejected(o, "shared_expert_num");

  // padding_tokens is BS / 4 by default, and 0 with op 1.
  o = small_v2();
  EXPECT_EQ(moedist::demo::padding_tokens(o), 2);
  o.op = 1;
  EXPECT_EQ(moedist::demo::padding_tokens(o), 0);
}

TEST(DemoOptions, DefaultsAreTheOperatorPageExample) {
  const DemoOptions o;
  EXPECT_EQ(o.ep_world_size, 16);
  EXPECT_EQ(o.shared_expert_rank_num, 2);
  EXPECT_EQ(o.moe_expert_num, 14);
  EXPECT_EQ(o.bs, 8);
  EXPECT_EQ(o.hidden, 7168);
  EXPECT_EQ(o.topk, 8);
  EXPECT_EQ(o.quant_mode, 2);
  EXPECT_TRUE(o.smooth_scales);
  EXPECT_EQ(o.dtype, DType::bf16);
  EXPECT_NO_THROW(moedist::demo::validate_options(o));
}

}  // namespace
