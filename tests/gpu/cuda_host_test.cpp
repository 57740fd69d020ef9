// The CUDA group's host side, in every build with the CUDA backend and on every machine: the options a
// join refuses (before any device is touched), and what a join does without a usable device (a typed
// error that says why) or with one (a working single-rank group).
#include <gtest/gtest.h>
#include <unistd.h>

#include <string>

#include "moedist/cuda.h"
#include "moedist/error.h"

namespace moedist::cuda {
namespace {

GroupConfig config(int w = 2, int e = 4) {
  GroupConfig c;
  c.ep_world_size = w;
  c.moe_expert_num = e;
  return c;
}

CudaGroupOptions options(std::int64_t k = 2, std::int64_t h = 16, std::int64_t max_bs = 4) {
  CudaGroupOptions o;
  o.wait.timeout = std::chrono::milliseconds(10000);  // the old CudaGroupOptions default these tests were written for
  o.k = k;
  o.h = h;
  o.max_bs = max_bs;
  return o;
}

std::string job() { return "cuda-host-" + std::to_string(getpid()); }

void expect_refused(const GroupConfig& c, const CudaGroupOptions& o, const std::string& parameter, ErrorCode code) {
  try {
    CudaGroup::join(c, job(), o);
    ADD_FAILURE() << "join accepted " << parameter;
  } catch (const ValidationError& e) {
    EXPECT_EQ(e.parameter(), parameter) << e.what();
    EXPECT_EQ(e.code(), code) << e.what();
  }
}

TEST(CudaHost, JoinRefusesBadOptionsNamingThem) {
  expect_refused(config(), options(0), "CudaGroupOptions::k", ErrorCode::invalid_argument);
  expect_refused(config(), options(1025), "CudaGroupOptions::k",
                 ErrorCode::invalid_argument);  // K > 1024 (V2 allows K > E)
  expect_refused(config(), options(2, 0), "CudaGroupOptions::h", ErrorCode::invalid_argument);
  expect_refused(config(), options(2, 16, -1), "CudaGroupOptions::max_bs", ErrorCode::invalid_argument);
  GroupConfig with_global = config();
  with_global.global_bs = 8;  // at most 8 / 2 = 4 tokens per rank
  expect_refused(with_global, options(2, 16, 5), "CudaGroupOptions::max_bs", ErrorCode::invalid_argument);
  CudaGroupOptions no_time = options();
  no_time.wait.timeout = std::chrono::milliseconds(0);
  expect_refused(config(), no_time, "CudaGroupOptions::timeout (ms)", ErrorCode::invalid_argument);
  expect_refused(config(2048, 2048), options(), "ep_world_size * max(tp_world_size, 1)", ErrorCode::unsupported);
  expect_refused(config(1, 4), options(2, 16, std::int64_t{1} << 30), "CudaGroupOptions::max_bs * k", ErrorCode::invalid_argument);
  GroupConfig bad = config();
  bad.moe_expert_num = 3;  // not a multiple of W - S = 2: the contract's own rule, checked first
  EXPECT_THROW(CudaGroup::join(bad, job(), options()), ValidationError);
}

// Without a device the join says so; with one, a single-rank group joins and reports its device.
TEST(CudaHost, JoinWithoutADeviceSaysWhyAndWithOneWorks) {
  std::string reason;
  if (!available(&reason)) {
    EXPECT_FALSE(reason.empty());
    try {
      CudaGroup::join(config(1, 4), job(), options());
      ADD_FAILURE() << "join succeeded without a device";
    } catch (const ValidationError& e) {
      EXPECT_EQ(e.code(), ErrorCode::unsupported);
      EXPECT_EQ(e.parameter(), "CUDA device");
      EXPECT_NE(std::string(e.what()).find(reason), std::string::npos) << e.what();
    }
  } else {
    auto group = CudaGroup::join(config(1, 4), job(), options());
    EXPECT_GE(group->device(), 0);
    EXPECT_EQ(group->config().ep_world_size, 1);
  }
}

}  // namespace
}  // namespace moedist::cuda
