// Host-side helpers of the CUDA runtime that the CUDA group (cuda_group.cpp) and the Python binding of it
// (python/src/cuda_binding.cpp) share: a CUDA error as a moedist Error, and the current device for a scope.
#pragma once

#include <cuda_runtime_api.h>

#include "common/format.h"
#include "moedist/error.h"

namespace moedist::cuda {

// Throws ErrorCode::internal naming `what` and the CUDA error, unless `err` is cudaSuccess.
inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw Error(ErrorCode::internal,
                concat("CUDA error in ", what, ": ", cudaGetErrorName(err), " (", cudaGetErrorString(err), ")"));
  }
}

// Makes a device current for a scope and restores the caller's afterwards (the CUDA group's host steps run
// on the group's device from any thread).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) : device_(device) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device_) check_cuda(cudaSetDevice(device_), "cudaSetDevice");
  }
  ~DeviceGuard() {
    if (previous_ != device_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int device_;
  int previous_ = 0;
};

}  // namespace moedist::cuda
