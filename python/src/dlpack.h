// The DLPack ABI (dlpack.h, v0.5-v0.8; the layout every producer since 2017 uses), declared here because
// Debian ships no dlpack header. dlpack_view.cpp reads tensors through it; torch_fast.cpp hands results
// to torch through it.
#pragma once

#include <cstdint>

#include "moedist/tensor.h"

namespace moedist::python::dlpack {

struct DLDevice {
  std::int32_t device_type;  // kDLCPU, kDLCUDA, ...
  std::int32_t device_id;
};
struct DLDataType {
  std::uint8_t code;  // 0 int, 1 uint, 2 float, 4 bfloat
  std::uint8_t bits;
  std::uint16_t lanes;
};
struct DLTensor {
  void* data;
  DLDevice device;
  std::int32_t ndim;
  DLDataType dtype;
  std::int64_t* shape;
  std::int64_t* strides;  // in elements; nullptr = compact row-major
  std::uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor*);
};

constexpr std::int32_t kDLCPU = 1;
constexpr std::int32_t kDLCUDA = 2;          // device memory of CUDA device device_id
constexpr std::int32_t kDLCUDAManaged = 13;  // CUDA managed (unified) memory
// DLPack type codes (dlpack.h's DLDataTypeCode).
constexpr std::uint8_t kDLInt = 0, kDLUInt = 1, kDLFloat = 2, kDLBfloat = 4, kDLComplex = 5, kDLBool = 6;

// The capsule names of the DLPack exchange: a consumer renames "dltensor" to "used_dltensor" when it
// takes the tensor (and with it the duty to call the deleter).
constexpr const char* kCapsuleName = "dltensor";
constexpr const char* kUsedCapsuleName = "used_dltensor";

// The shape and strides (in elements) of a DLPack tensor the caller found 1- or 2-dimensional into `v`
// (clamped to 2 dimensions all the same); a producer may leave strides out for a compact row-major one.
inline void copy_layout(const DLTensor& t, Layout& v) {
  v.ndim = t.ndim < 0 ? 0 : (t.ndim > 2 ? 2 : t.ndim);
  std::int64_t compact = 1;
  for (int i = v.ndim - 1; i >= 0; --i) {
    v.shape[i] = t.shape[i];
    v.strides[i] = t.strides != nullptr ? t.strides[i] : compact;
    compact *= t.shape[i];
  }
}

}  // namespace moedist::python::dlpack
