#include "torch_fast.h"

#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>

#include "dlpack.h"

namespace moedist::python {
namespace py = pybind11;

struct TorchApi {
  PyTypeObject* tensor = nullptr;  // torch.Tensor (exactly: subclasses take the general path)
  PyObject* strided = nullptr;     // torch.strided
  struct Known {
    PyObject* dtype;  // torch.bfloat16, ...
    DType as;
  };
  Known dtypes[7] = {};
  PyObject* from_dlpack = nullptr;  // torch._C._from_dlpack(capsule)
  // torch._C._to_dlpack(tensor) where it reads a tensor faster than its attributes do (torch >= 2, where it
  // also exports bool and keeps every stride as it is), else nullptr.
  PyObject* to_dlpack = nullptr;
  PyObject* dispatch_stack_len = nullptr;     // torch._C._len_torch_dispatch_stack()
  PyObject* function_mode_enabled = nullptr;  // torch._C._is_torch_function_mode_enabled()
  // Interned attribute names.
  PyObject* layout = nullptr;
  PyObject* is_cpu = nullptr;
  PyObject* dtype = nullptr;
  PyObject* shape = nullptr;
  PyObject* stride = nullptr;
  PyObject* data_ptr = nullptr;
};

namespace {

// A new reference to `owner.name` (nullptr with the error cleared when it is missing).
PyObject* lookup(PyObject* owner, const char* name) {
  PyObject* value = PyObject_GetAttrString(owner, name);
  if (value == nullptr) PyErr_Clear();
  return value;
}

// The API of an imported torch, or nullptr when it lacks a part (its references are kept for the life
// of the process: the fast path may run until the interpreter's end).
const TorchApi* make_api(PyObject* torch) {
  auto api = std::make_unique<TorchApi>();
  const py::object C = py::reinterpret_steal<py::object>(lookup(torch, "_C"));
  const py::object tensor = py::reinterpret_steal<py::object>(lookup(torch, "Tensor"));
  if (!C || !tensor || !PyType_Check(tensor.ptr())) return nullptr;
  api->tensor = reinterpret_cast<PyTypeObject*>(tensor.inc_ref().ptr());
  api->strided = lookup(torch, "strided");
  const std::pair<const char*, DType> dtypes[7] = {
      {"bfloat16", DType::bf16}, {"float16", DType::fp16}, {"float32", DType::fp32}, {"int8", DType::int8},
      {"int32", DType::int32},   {"int64", DType::int64},  {"bool", DType::boolean}};
  for (std::size_t i = 0; i < 7; ++i) {
    api->dtypes[i] = TorchApi::Known{lookup(torch, dtypes[i].first), dtypes[i].second};
    if (api->dtypes[i].dtype == nullptr) return nullptr;
  }
  api->from_dlpack = lookup(C.ptr(), "_from_dlpack");
  const py::object version = py::reinterpret_steal<py::object>(lookup(torch, "__version__"));
  const char* text = version && PyUnicode_Check(version.ptr()) ? PyUnicode_AsUTF8(version.ptr()) : nullptr;
  if (text == nullptr) PyErr_Clear();
  if (text != nullptr && text[0] >= '2' && text[0] <= '9' && text[1] == '.')
    api->to_dlpack = lookup(C.ptr(), "_to_dlpack");
  api->dispatch_stack_len = lookup(C.ptr(), "_len_torch_dispatch_stack");
  api->function_mode_enabled = lookup(C.ptr(), "_is_torch_function_mode_enabled");
  api->layout = PyUnicode_InternFromString("layout");
  api->is_cpu = PyUnicode_InternFromString("is_cpu");
  api->dtype = PyUnicode_InternFromString("dtype");
  api->shape = PyUnicode_InternFromString("shape");
  api->stride = PyUnicode_InternFromString("stride");
  api->data_ptr = PyUnicode_InternFromString("data_ptr");
  for (PyObject* needed : {api->strided, api->from_dlpack, api->dispatch_stack_len, api->function_mode_enabled,
                           api->layout, api->is_cpu, api->dtype, api->shape, api->stride, api->data_ptr}) {
    if (needed == nullptr) {
      PyErr_Clear();
      return nullptr;
    }
  }
  return api.release();
}

// An int64 from a Python int, or false (error cleared).
bool int64_of(PyObject* value, std::int64_t* out) {
  const long long v = PyLong_AsLongLong(value);
  if (v == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    return false;
  }
  *out = v;
  return true;
}

// A tuple of 1 or 2 ints (torch.Size or stride()'s tuple) into `out`; false for anything else.
bool dims_of(PyObject* tuple, std::int64_t* out, int* ndim) {
  if (tuple == nullptr || !PyTuple_Check(tuple)) {
    PyErr_Clear();
    return false;
  }
  const Py_ssize_t n = PyTuple_GET_SIZE(tuple);
  if (n < 1 || n > 2) return false;
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!int64_of(PyTuple_GET_ITEM(tuple, i), &out[i])) return false;
  }
  *ndim = static_cast<int>(n);
  return true;
}

dlpack::DLDataType dl_type(DType dtype) {
  switch (dtype) {
    case DType::bf16:
      return {dlpack::kDLBfloat, 16, 1};
    case DType::fp16:
      return {dlpack::kDLFloat, 16, 1};
    case DType::fp32:
      return {dlpack::kDLFloat, 32, 1};
    case DType::int8:
      return {dlpack::kDLInt, 8, 1};
    case DType::int32:
      return {dlpack::kDLInt, 32, 1};
    case DType::int64:
      return {dlpack::kDLInt, 64, 1};
    case DType::boolean:
      return {dlpack::kDLBool, 8, 1};
  }
  return {dlpack::kDLUInt, 8, 1};
}

// The block of a TorchResult: the DLPack header (and its shape and strides), then the elements from the
// next multiple of 64 bytes on.
struct Header {
  dlpack::DLManagedTensor managed;
  std::int64_t shape[2];
  std::int64_t strides[2];
};
constexpr std::size_t kAlign = 64;
constexpr std::size_t kHeaderBytes = sizeof(Header);

void delete_block(dlpack::DLManagedTensor* managed) { std::free(managed->manager_ctx); }

// A capsule that no consumer took (still named "dltensor") frees its tensor, as DLPack's producers do.
void destroy_capsule(PyObject* capsule) {
  if (!PyCapsule_IsValid(capsule, dlpack::kCapsuleName)) return;  // taken: renamed "used_dltensor"
  auto* managed = static_cast<dlpack::DLManagedTensor*>(PyCapsule_GetPointer(capsule, dlpack::kCapsuleName));
  if (managed != nullptr && managed->deleter != nullptr) managed->deleter(managed);
}

}  // namespace

const TorchApi* torch_api() {
  static const TorchApi* api = nullptr;
  static bool unusable = false;
  if (api != nullptr || unusable) return api;
  PyObject* torch = PyImport_GetModule(py::str("torch").ptr());
  if (torch == nullptr) {  // not imported (yet): no torch tensor can be passed
    PyErr_Clear();
    return nullptr;
  }
  api = make_api(torch);
  Py_DECREF(torch);
  unusable = api == nullptr;
  return api;
}

bool plain_eager(const TorchApi& torch) {
  const py::object modes = py::reinterpret_steal<py::object>(PyObject_CallNoArgs(torch.dispatch_stack_len));
  std::int64_t depth = 0;
  if (!modes || !int64_of(modes.ptr(), &depth) || depth != 0) {
    PyErr_Clear();
    return false;
  }
  const py::object enabled = py::reinterpret_steal<py::object>(PyObject_CallNoArgs(torch.function_mode_enabled));
  if (!enabled) {
    PyErr_Clear();
    return false;
  }
  return enabled.ptr() == Py_False;
}

namespace {

// A plain tensor read through one DLPack export (torch >= 2): the capsule is released at once (torch's
// destructor frees what it allocated) and the view is of the tensor's memory, which `obj` holds.
bool read_through_dlpack(const TorchApi& torch, PyObject* obj, TensorView* view) {
  const py::object capsule = py::reinterpret_steal<py::object>(PyObject_CallOneArg(torch.to_dlpack, obj));
  auto* managed = capsule
                      ? static_cast<dlpack::DLManagedTensor*>(PyCapsule_GetPointer(capsule.ptr(), dlpack::kCapsuleName))
                      : nullptr;
  if (managed == nullptr) {  // e.g. sparse or meta tensors, which DLPack does not export
    PyErr_Clear();
    return false;
  }
  const dlpack::DLTensor& t = managed->dl_tensor;
  if (t.device.device_type != dlpack::kDLCPU || t.ndim < 1 || t.ndim > 2 || t.dtype.lanes != 1) return false;
  TensorView v;
  const auto is = [&](std::uint8_t code, std::uint8_t bits) { return t.dtype.code == code && t.dtype.bits == bits; };
  if (is(dlpack::kDLBfloat, 16)) {
    v.dtype = DType::bf16;
  } else if (is(dlpack::kDLFloat, 16)) {
    v.dtype = DType::fp16;
  } else if (is(dlpack::kDLFloat, 32)) {
    v.dtype = DType::fp32;
  } else if (is(dlpack::kDLInt, 8)) {
    v.dtype = DType::int8;
  } else if (is(dlpack::kDLInt, 32)) {
    v.dtype = DType::int32;
  } else if (is(dlpack::kDLInt, 64)) {
    v.dtype = DType::int64;
  } else if (is(dlpack::kDLBool, 8)) {
    v.dtype = DType::boolean;
  } else {
    return false;
  }
  dlpack::copy_layout(t, v);
  for (int i = 0; i < t.ndim; ++i) {
    if (v.strides[i] < 0) return false;
  }
  v.data = static_cast<const char*>(t.data) + t.byte_offset;
  *view = v;
  return true;
}

}  // namespace

bool read_plain_tensor(const TorchApi& torch, PyObject* obj, TensorView* view) {
  *view = TensorView{};
  if (obj == Py_None) return true;
  if (Py_TYPE(obj) != torch.tensor) return false;
  if (torch.to_dlpack != nullptr) return read_through_dlpack(torch, obj, view);
  const auto attr = [&](PyObject* name) { return py::reinterpret_steal<py::object>(PyObject_GetAttr(obj, name)); };
  const auto call = [&](PyObject* name) {
    return py::reinterpret_steal<py::object>(PyObject_CallMethodNoArgs(obj, name));
  };
  const py::object layout = attr(torch.layout);
  const py::object cpu = attr(torch.is_cpu);
  const py::object dtype = attr(torch.dtype);
  if (layout.ptr() != torch.strided || cpu.ptr() != Py_True || !dtype) {
    PyErr_Clear();
    return false;
  }
  const TorchApi::Known* known = nullptr;
  for (const TorchApi::Known& k : torch.dtypes) {
    if (k.dtype == dtype.ptr()) known = &k;
  }
  if (known == nullptr) return false;
  TensorView v;
  v.dtype = known->as;
  int strides_ndim = 0;
  if (!dims_of(attr(torch.shape).ptr(), v.shape, &v.ndim) ||
      !dims_of(call(torch.stride).ptr(), v.strides, &strides_ndim) || strides_ndim != v.ndim) {
    return false;
  }
  for (int i = 0; i < v.ndim; ++i) {
    if (v.strides[i] < 0) return false;
  }
  const py::object address = call(torch.data_ptr);
  if (!address) {
    PyErr_Clear();
    return false;
  }
  v.data = PyLong_AsVoidPtr(address.ptr());
  if (v.data == nullptr && PyErr_Occurred()) {
    PyErr_Clear();
    return false;
  }
  *view = v;
  return true;
}

void TorchResult::Free::operator()(void* p) const noexcept { std::free(p); }

TorchResult::TorchResult(DType dtype, std::int64_t rows, std::int64_t cols, bool matrix) {
  const std::int64_t width = matrix ? cols : 1;
  const auto element = static_cast<std::int64_t>(dtype_size(dtype));
  constexpr std::int64_t kMost = std::int64_t{1} << 50;  // no product below can overflow
  if (rows < 0 || width < 0 || rows > kMost || width > kMost || (width > 0 && rows > kMost / width / element)) {
    throw std::bad_alloc();
  }
  const auto bytes = static_cast<std::size_t>(rows * width * element);
  // malloc, aligned by hand: aligned_alloc takes twice as long for these sizes, and this is per result.
  void* block = std::malloc(kHeaderBytes + bytes + kAlign);
  if (block == nullptr) throw std::bad_alloc();
  block_.reset(block);
  void* start = static_cast<std::byte*>(block) + kHeaderBytes;
  std::size_t room = bytes + kAlign;
  auto* data = static_cast<std::byte*>(std::align(kAlign, bytes, start, room));
  view_ = matrix ? matrix_view(static_cast<void*>(data), dtype, rows, cols)
                 : vector_view(static_cast<void*>(data), dtype, rows);
  row_bytes_ = static_cast<std::size_t>(width * element);
  auto* header = new (block) Header{};
  header->shape[0] = view_.shape[0];
  header->shape[1] = view_.shape[1];
  header->strides[0] = view_.strides[0];
  header->strides[1] = view_.strides[1];
  dlpack::DLTensor& t = header->managed.dl_tensor;
  t.data = data;
  t.device = {dlpack::kDLCPU, 0};
  t.ndim = matrix ? 2 : 1;
  t.dtype = dl_type(dtype);
  t.shape = header->shape;
  t.strides = header->strides;
  t.byte_offset = 0;
  header->managed.manager_ctx = block;
  header->managed.deleter = &delete_block;
}

void TorchResult::zero_rows_from(std::int64_t from) noexcept {
  const std::int64_t rows = view_.rows();
  if (block_ == nullptr || from >= rows) return;
  from = std::max<std::int64_t>(from, 0);
  std::memset(static_cast<std::byte*>(view_.data) + static_cast<std::size_t>(from) * row_bytes_, 0,
              static_cast<std::size_t>(rows - from) * row_bytes_);
}

PyObject* TorchResult::release_to_torch(const TorchApi& torch) {
  auto* header = static_cast<Header*>(block_.get());
  PyObject* capsule = PyCapsule_New(&header->managed, dlpack::kCapsuleName, &destroy_capsule);
  if (capsule == nullptr) return nullptr;  // the block is freed with this object
  block_.release();                        // NOLINT(bugprone-unused-return-value): the capsule owns it now
  view_ = MutableTensorView{};
  PyObject* tensor = PyObject_CallOneArg(torch.from_dlpack, capsule);
  Py_DECREF(capsule);  // taken by torch (renamed), or freed by destroy_capsule when torch failed
  return tensor;
}

}  // namespace moedist::python
