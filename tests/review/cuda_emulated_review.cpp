// Review tests of the CUDA group's host side, run against the CPU emulation (tests/cuda_emulation/:
// the fake CUDA runtime and the kernels compiled for the host). Each case forks its ranks, as a CUDA
// group needs one process per rank.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <stdexcept>
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

// A device copy of n values.
template <class T>
void* to_device(const std::vector<T>& values) {
  void* p = nullptr;
  if (cudaMalloc(&p, values.size() * sizeof(T)) != cudaSuccess) throw std::runtime_error("cudaMalloc");
  cudaMemcpy(p, values.data(), values.size() * sizeof(T), cudaMemcpyHostToDevice);
  return p;
}

// Item 11: the host reads the status the calls copy into the pinned mirror only as of the last
// synchronize() (the copy of a call not yet waited for may still be running). The emulation runs every
// copy at once, so reading the mirror live would show a call's status before synchronize(): check()
// must not throw and last_valid_rows() must not change until synchronize() has waited for the call.
TEST(CudaStatusMirror, ReadOnlyAsOfTheLastSynchronize) {
  const std::string job = job_name("mirror");
  const auto results = run_in_children(2, [&](int g) -> std::string {
    std::unique_ptr<cuda::CudaGroup> group = cuda::CudaGroup::join(config_of(g), job, options_on(0));
    std::string problems;
    std::vector<std::uint16_t> x_host(2 * 8, 0x3f80);  // bf16 1.0
    void* x = to_device(x_host);
    // Call 1: valid ids (every token to expert g): each rank receives rows.
    void* ids = to_device(std::vector<std::int32_t>{g, g});
    const TensorView xv = matrix_view(x, DType::bf16, 2, 8);
    group->dispatch(xv, matrix_view(ids, DType::int32, 2, 1), {}, nullptr);
    if (group->last_valid_rows() != 0)
      problems +=
          "last_valid_rows() = " + std::to_string(group->last_valid_rows()) + " before synchronize() (want 0); ";
    group->synchronize(nullptr);
    if (group->last_valid_rows() != 2)
      problems += "last_valid_rows() = " + std::to_string(group->last_valid_rows()) + " after synchronize() (want 2); ";
    // Call 2: rank 1 passes an expert id out of range; its error is known only after synchronize().
    void* bad = to_device(std::vector<std::int32_t>{g == 1 ? 9 : 0, 0});
    group->dispatch(xv, matrix_view(bad, DType::int32, 2, 1), {}, nullptr);
    try {
      group->check();
    } catch (const Error& e) {
      problems += std::string("check() threw before synchronize(): ") + e.what() + "; ";
    }
    bool thrown = false;
    try {
      group->synchronize(nullptr);
    } catch (const Error&) {
      thrown = true;
    }
    if (!thrown) problems += "synchronize() did not report the bad id; ";
    thrown = false;
    try {
      group->check();
    } catch (const Error&) {
      thrown = true;
    }
    if (!thrown) problems += "check() after synchronize() did not report it; ";
    group.reset();
    cudaFree(x);
    cudaFree(ids);
    cudaFree(bad);
    return problems;
  });
  for (std::size_t g = 0; g < results.size(); ++g) {
    EXPECT_TRUE(results[g].finished) << "rank " << g << " died";
    EXPECT_EQ(results[g].text, "") << "rank " << g;
  }
}

}  // namespace
