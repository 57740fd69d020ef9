#include "dlpack_view.h"

#include <pybind11/numpy.h>

#include <cstdint>

#include "dlpack.h"
#include "moedist/error.h"

namespace moedist::python {
namespace py = pybind11;

namespace {

using namespace dlpack;  // the ABI's names, as dlpack.h spells them

[[noreturn]] void reject(ErrorCode code, const std::string& name, const std::string& value, const std::string& rule) {
  throw ValidationError(code, name, value, rule);
}

// The dtype as torch names it, for error messages ("float64", "uint8", "bool").
std::string dl_type_name(const DLDataType& t) {
  const std::string bits = std::to_string(t.bits);
  switch (t.code) {
    case kDLInt:
      return "int" + bits;
    case kDLUInt:
      return "uint" + bits;
    case kDLFloat:
      return "float" + bits;
    case kDLBfloat:
      return "bfloat" + bits;
    case kDLComplex:
      return "complex" + bits;
    case kDLBool:
      return "bool";
    default:
      return "DLPack type code " + std::to_string(t.code) + " of " + bits + " bits";
  }
}

DType dtype_of(const DLDataType& t, ViewAs as, const std::string& name) {
  const std::string text = dl_type_name(t);
  if (t.lanes != 1)
    reject(ErrorCode::invalid_dtype, name + ".dtype", text + " x " + std::to_string(t.lanes) + " lanes",
           "must be a scalar type");
  const bool integer = t.code == kDLInt || t.code == kDLUInt;
  switch (as) {
    case ViewAs::bfloat16:
      if (integer && t.bits == 16) return DType::bf16;
      reject(ErrorCode::invalid_dtype, name + ".dtype", text,
             "a tensor marked bfloat16 must hold 16-bit integers (the bit patterns)");
    case ViewAs::boolean:
      if ((integer || t.code == kDLBool) && t.bits == 8) return DType::boolean;
      reject(ErrorCode::invalid_dtype, name + ".dtype", text, "a tensor marked bool must hold bytes");
    case ViewAs::native:
      break;
  }
  switch (t.code) {
    case kDLInt:
      if (t.bits == 8) return DType::int8;
      if (t.bits == 32) return DType::int32;
      if (t.bits == 64) return DType::int64;
      break;
    case kDLFloat:
      if (t.bits == 16) return DType::fp16;
      if (t.bits == 32) return DType::fp32;
      break;
    case kDLBfloat:
      if (t.bits == 16) return DType::bf16;
      break;
    case kDLBool:  // producers whose DLPack exports bool (kDLBool, DLPack >= 0.8); numpy bool_ arrays
      if (t.bits == 8) return DType::boolean;
      break;
    default:
      break;
  }
  reject(ErrorCode::invalid_dtype, name + ".dtype", text,
         "must be bfloat16, float16, float32, int8, int32, int64 or bool (a numpy bfloat16 tensor is a uint16 array "
         "passed "
         "through moedist.bfloat16())");
}

// numpy arrays through the buffer protocol, which (unlike numpy's __dlpack__) also serves read-only arrays.
Borrowed borrow_buffer(const py::array& a, const std::string& name, ViewAs as) {
  Borrowed b;
  b.capsule = a;
  const py::dtype dtype = a.dtype();
  if (dtype.attr("byteorder").cast<std::string>() == ">") {
    reject(ErrorCode::invalid_dtype, name + ".dtype", std::string(py::str(static_cast<py::handle>(dtype))),
           "must be in the machine's byte order");
  }
  const py::buffer_info info = a.request();
  if (info.ndim < 1 || info.ndim > 2)
    reject(ErrorCode::invalid_shape, name + ".dim()", std::to_string(info.ndim), "must be 1 or 2");
  const char kind = dtype.kind();
  DLDataType t{255, static_cast<std::uint8_t>(info.itemsize * 8), 1};
  if (kind == 'i')
    t.code = kDLInt;
  else if (kind == 'u')
    t.code = kDLUInt;
  else if (kind == 'f')
    t.code = kDLFloat;
  else if (kind == 'c')
    t.code = kDLComplex;
  else if (kind == 'b')
    t.code = kDLBool;
  if (t.code == 255) {
    reject(ErrorCode::invalid_dtype, name + ".dtype", std::string(py::str(static_cast<py::handle>(dtype))),
           "must be float16, float32, int8, int32, int64 or bool (a numpy bfloat16 tensor is a uint16 array passed "
           "through "
           "moedist.bfloat16())");
  }
  MutableTensorView& v = b.view;
  v.ndim = static_cast<int>(info.ndim);
  v.dtype = dtype_of(t, as, name);
  v.data = info.ptr;
  for (int i = 0; i < v.ndim; ++i) {
    v.shape[i] = info.shape[static_cast<std::size_t>(i)];
    const auto stride = info.strides[static_cast<std::size_t>(i)];
    if (stride < 0 || stride % info.itemsize != 0) {
      reject(ErrorCode::invalid_shape, name + ".strides", std::to_string(stride) + " bytes",
             "must be non-negative multiples of the element size");
    }
    v.strides[i] = stride / info.itemsize;
  }
  return b;
}

std::string device_name(const DLDevice& d) {
  switch (d.device_type) {
    case kDLCPU:
      return "cpu";
    case kDLCUDA:
    case kDLCUDAManaged:
      return "cuda:" + std::to_string(d.device_id);
    default:
      return "DLPack device type " + std::to_string(d.device_type);
  }
}

}  // namespace

Borrowed borrow(py::handle obj, const std::string& name, ViewAs as, Memory where) {
  Borrowed b;
  if (obj.is_none()) return b;
  if (py::isinstance<py::array>(obj)) {
    if (where == Memory::cuda)
      reject(ErrorCode::invalid_argument, name + ".device", "cpu (a numpy array)",
             "must be on the CUDA device of the call's x");
    return borrow_buffer(py::reinterpret_borrow<py::array>(obj), name, as);
  }
  if (!py::hasattr(obj, "__dlpack__")) {
    reject(ErrorCode::invalid_argument, name, std::string(py::str(py::type::of(obj).attr("__name__"))),
           "must be a torch tensor, a numpy array or None");
  }
  try {
    b.capsule = obj.attr("__dlpack__")();
  } catch (const py::error_already_set& e) {  // e.g. a quantized torch tensor
    const std::string why = std::string(py::str(e.type().attr("__name__"))) + ": " + std::string(py::str(e.value()));
    reject(ErrorCode::invalid_argument, name, std::string(py::str(py::type::of(obj).attr("__name__"))),
           "must be a dense tensor that DLPack can export (" + why + ")");
  }
  auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(b.capsule.ptr(), kCapsuleName));
  if (managed == nullptr) throw py::error_already_set();
  const DLTensor& t = managed->dl_tensor;
  if (where == Memory::host && t.device.device_type != kDLCPU) {
    reject(ErrorCode::invalid_argument, name + ".device", device_name(t.device),
           "must be the CPU, as the call's x (or a CUDA device for every tensor of the call)");
  }
  if (where == Memory::cuda) {
    if (t.device.device_type != kDLCUDA && t.device.device_type != kDLCUDAManaged)
      reject(ErrorCode::invalid_argument, name + ".device", device_name(t.device),
             "must be on the CUDA device of the call's x");
    b.device = t.device.device_id;
  }
  if (t.ndim < 1 || t.ndim > 2) {
    reject(ErrorCode::invalid_shape, name + ".dim()", std::to_string(t.ndim), "must be 1 or 2");
  }
  MutableTensorView& v = b.view;
  v.dtype = dtype_of(t.dtype, as, name);
  v.data = static_cast<char*>(t.data) + t.byte_offset;
  dlpack::copy_layout(t, v);
  for (int i = 0; i < t.ndim; ++i) {
    if (v.strides[i] < 0)
      reject(ErrorCode::invalid_shape, name + ".stride()", std::to_string(v.strides[i]),
             "negative strides are not supported");
  }
  return b;
}

}  // namespace moedist::python
