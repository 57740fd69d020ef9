// Review tests of the CUDA group's host side, run against the CPU emulation (tests/cuda_emulation/:
// the fake CUDA runtime and the kernels compiled for the host). Each case forks its ranks, as a CUDA
// group needs one process per rank.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <functional>
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

// Issue 19: the CUDA backend does not implement x_active_mask yet, so a mask is refused by name on
// dispatch and combine (never silently ignored); a (BS, K) expand_idx flat in memory gives the same
// combine as the 1-D one, and one with gaps between its rows is refused by name.
TEST(CudaIssue19, MaskRefusedAndExpandIdxOfShapeBsByK) {
  const std::string job = job_name("issue19");
  const auto results = run_in_children(2, [&](int g) -> std::string {
    std::unique_ptr<cuda::CudaGroup> group = cuda::CudaGroup::join(config_of(g), job, options_on(0));
    std::string problems;
    const std::vector<std::uint16_t> x_host{0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0x40c0, 0x40e0, 0x4100,
                                            0xbf80, 0xc000, 0xc040, 0xc080, 0xc0a0, 0xc0c0, 0xc0e0, 0xc100};
    void* x = to_device(x_host);
    void* ids = to_device(std::vector<std::int32_t>{g, 1 - g});
    void* weights = to_device(std::vector<float>{0.5f, 2.0f});
    void* mask = to_device(std::vector<std::uint8_t>{1, 0});
    const TensorView xv = matrix_view(x, DType::bf16, 2, 8);
    const TensorView idv = matrix_view(ids, DType::int32, 2, 1);
    const TensorView wv = matrix_view(weights, DType::fp32, 2, 1);
    const auto refused = [&](const char* what, const std::function<void()>& call, const std::string& parameter) {
      try {
        call();
        problems += std::string(what) + " was not refused; ";
      } catch (const ValidationError& e) {
        if (e.code() != ErrorCode::unsupported || e.parameter() != parameter)
          problems += std::string(what) + ": " + e.what() + "; ";
      }
    };
    DispatchOptions masked;
    masked.x_active_mask = vector_view(mask, DType::boolean, 2);
    refused(
        "a masked dispatch", [&] { group->dispatch(xv, idv, masked, nullptr); }, "x_active_mask");
    std::vector<std::vector<std::uint16_t>> outputs;
    for (int round = 0; round < 2; ++round) {
      const cuda::CudaDispatchResult d = group->dispatch(xv, idv, {}, nullptr);
      CombineOptions combine_masked;
      combine_masked.x_active_mask = masked.x_active_mask;
      refused(
          "a masked combine",
          [&] { group->combine(d.expand_x, idv, d.expand_idx, d.ep_recv_counts, wv, combine_masked, nullptr); },
          "x_active_mask");
      // (2, 1) with a row stride of 2: rows with gaps.
      refused(
          "a (BS, K) expand_idx with gaps",
          [&] {
            group->combine(d.expand_x, idv, matrix_view(d.expand_idx.data, DType::int32, 2, 1, 2), d.ep_recv_counts, wv,
                           {}, nullptr);
          },
          "expand_idx.stride()");
      const TensorView idx = round == 0 ? d.expand_idx : matrix_view(d.expand_idx.data, DType::int32, 2, 1);
      const TensorView y = group->combine(d.expand_x, idv, idx, d.ep_recv_counts, wv, {}, nullptr);
      group->synchronize(nullptr);
      std::vector<std::uint16_t> host(16);
      cudaMemcpy(host.data(), y.data, 32, cudaMemcpyDeviceToHost);
      outputs.push_back(host);
    }
    if (outputs[0] != outputs[1]) problems += "combine with a (2, 1) expand_idx differs from the 1-D one; ";
    group.reset();
    for (void* p : {x, ids, weights, mask}) cudaFree(p);
    return problems;
  });
  for (std::size_t g = 0; g < results.size(); ++g) {
    EXPECT_TRUE(results[g].finished) << "rank " << g << " died";
    EXPECT_EQ(results[g].text, "") << "rank " << g;
  }
}

}  // namespace
