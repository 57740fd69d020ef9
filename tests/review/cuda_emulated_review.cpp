// Review tests of the CUDA group's host side, run against the CPU emulation (tests/cuda_emulation/:
// the fake CUDA runtime and the kernels compiled for the host). Each case forks its ranks, as a CUDA
// group needs one process per rank.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "common/child_processes.h"
#include "moedist/cuda.h"
#include "moedist/error.h"

namespace emu {
std::vector<std::string> take_device_log();  // tests/cuda_emulation/fake_runtime.cpp
}

namespace {

using namespace moedist;

GroupConfig config_of(int g) {
  GroupConfig c;
  c.ep_world_size = 2;
  c.moe_expert_num = 2;
  c.ep_rank_id = g;
  return c;
}

cuda::CudaGroupOptions options_on(int device) {
  cuda::CudaGroupOptions o;
  o.device = device;
  o.max_bs = 2;
  o.k = 1;
  o.h = 8;
  o.wait.timeout = std::chrono::milliseconds(20000);
  return o;
}

std::string job_name(const char* what) { return std::string("review-cuda-") + what + "-" + std::to_string(getpid()); }

// Item 4: a group on device 1, joined and destroyed by threads whose current device is 0. join must
// leave the caller's current device as it was, and teardown must wait for the group's device (not the
// destroying thread's) before it frees anything of it.
TEST(CudaTeardown, SynchronizesTheGroupsDeviceAndRestoresTheCallers) {
  const std::string job = job_name("device");
  const auto results = run_in_children(2, [&](int g) -> std::string {
    setenv("MOEDIST_FAKE_CUDA_DEVICES", "2", 1);
    if (cudaSetDevice(0) != cudaSuccess) return "cudaSetDevice(0) failed";
    std::unique_ptr<cuda::CudaGroup> group = cuda::CudaGroup::join(config_of(g), job, options_on(1));
    std::string problems;
    int current = -1;
    cudaGetDevice(&current);
    if (current != 0) problems += "join left device " + std::to_string(current) + " current (the caller's was 0); ";
    cudaSetDevice(0);
    emu::take_device_log();
    // Destroyed from a new thread, whose current device is 0.
    std::thread([&] { group.reset(); }).join();
    const std::vector<std::string> log = emu::take_device_log();
    bool synced = false, freed = false;
    for (const std::string& entry : log) {
      if (entry == "sync device 1") synced = true;
      if (entry == "free device 1") {
        freed = true;
        if (!synced) {
          problems += "memory of device 1 freed before device 1 was synchronized; ";
          break;
        }
      }
    }
    if (!freed) problems += "teardown freed no memory of device 1; ";
    cudaGetDevice(&current);
    if (current != 0) problems += "teardown changed this thread's device to " + std::to_string(current) + "; ";
    return problems;
  });
  for (std::size_t g = 0; g < results.size(); ++g) {
    EXPECT_TRUE(results[g].finished) << "rank " << g << " died";
    EXPECT_EQ(results[g].text, "") << "rank " << g;
  }
}

}  // namespace
