// The operators' fast path for torch tensors, without a compile-time dependency on torch: a plain CPU
// tensor is read through a handful of attribute reads (no DLPack capsule), and results are made as
// torch tensors by importing one DLPack capsule each (no numpy array, no torch.from_numpy). Anything
// that is not plain -- another kind of tensor, a torch mode that must see the call, an unknown dtype --
// is left to the package's general path, which reads it or names what is wrong with it.
#pragma once

#include <Python.h>

#include <cstddef>
#include <cstdint>
#include <memory>

#include "moedist/tensor.h"

namespace moedist::python {

struct TorchApi;

// What the fast path uses of torch, looked up once torch is imported; nullptr before that (or when this
// torch lacks one of them: every call then takes the general path). Needs the GIL.
const TorchApi* torch_api();

// Whether a call may skip the dispatcher: no torch dispatch mode (fake tensors, make_fx, ...) and no
// torch function mode (e.g. `with torch.device("meta")`) is active, so that nothing would see the
// difference. A Python error is cleared (and false returned).
bool plain_eager(const TorchApi& torch);

// Reads `obj` into `view` when it is None (an absent view) or a plain torch tensor: exactly torch.Tensor
// (no subclass), strided, on the CPU, of a dtype moedist knows, 1-D or 2-D, with non-negative strides.
// The view is of the tensor's memory in place, as DLPack exports it (torch >= 2 reads it through one
// DLPack export, torch 1.13 through its attributes, whichever is faster there); the caller keeps `obj`
// alive while the view is used. False (and no Python error) for anything else.
bool read_plain_tensor(const TorchApi& torch, PyObject* obj, TensorView* view);

// An uninitialized, 64-byte aligned, C-contiguous (rows,) or (rows, cols) result, written in C++ and then
// handed to torch without a copy. Allocation failure throws std::bad_alloc.
class TorchResult {
 public:
  TorchResult() = default;
  TorchResult(DType dtype, std::int64_t rows, std::int64_t cols, bool matrix);
  TorchResult(const TorchResult&) = delete;
  TorchResult& operator=(const TorchResult&) = delete;
  TorchResult(TorchResult&&) noexcept = default;
  TorchResult& operator=(TorchResult&&) noexcept = default;

  MutableTensorView view() const noexcept { return view_; }
  // Zeroes rows [from, rows) (all of them for from = 0).
  void zero_rows_from(std::int64_t from) noexcept;
  // The torch tensor (a new reference), which owns the memory from then on; nullptr with a Python error
  // set on failure (the memory is freed). Leaves this object empty.
  PyObject* release_to_torch(const TorchApi& torch);

 private:
  struct Free {
    void operator()(void* p) const noexcept;
  };
  std::unique_ptr<void, Free> block_;  // the DLPack header and the elements after it
  MutableTensorView view_;
  std::size_t row_bytes_ = 0;
};

}  // namespace moedist::python
