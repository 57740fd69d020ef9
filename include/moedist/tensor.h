// Strided, non-owning tensor views (1-D or 2-D) tagged with a dtype, and a small owning Tensor.
//
// Strides are in elements, like torch's. A view with ndim == 0 is "absent" (the None of torch_npu's
// optional parameters).
#pragma once

#include <cstdint>
#include <memory>

#include "moedist/dtype.h"

namespace moedist {

struct Layout {
  int ndim = 0;                    // 0 = absent, 1 = vector, 2 = matrix
  std::int64_t shape[2] = {0, 0};
  std::int64_t strides[2] = {0, 0};

  bool present() const noexcept { return ndim != 0; }
  std::int64_t rows() const noexcept { return ndim >= 1 ? shape[0] : 0; }
  std::int64_t cols() const noexcept { return ndim == 2 ? shape[1] : 1; }
  std::int64_t numel() const noexcept { return ndim == 0 ? 0 : (ndim == 1 ? shape[0] : shape[0] * shape[1]); }
  // Offset in elements of (i, j); for a vector j must be 0.
  std::int64_t offset(std::int64_t i, std::int64_t j = 0) const noexcept {
    return i * strides[0] + (ndim == 2 ? j * strides[1] : 0);
  }
  // Offset in elements of the t-th element in row-major order (a 1-D or 2-D view read as flat).
  std::int64_t flat_offset(std::int64_t t) const noexcept {
    return ndim == 2 ? offset(t / shape[1], t % shape[1]) : offset(t);
  }
  bool contiguous() const noexcept;
};

struct TensorView : Layout {
  const void* data = nullptr;
  DType dtype = DType::fp32;

  template <class T>
  const T* ptr(std::int64_t i = 0, std::int64_t j = 0) const noexcept {
    return static_cast<const T*>(data) + offset(i, j);
  }
  template <class T>
  T at(std::int64_t i, std::int64_t j = 0) const noexcept { return *ptr<T>(i, j); }
  template <class T>
  T flat(std::int64_t t) const noexcept {
    return static_cast<const T*>(data)[flat_offset(t)];
  }
};

struct MutableTensorView : Layout {
  void* data = nullptr;
  DType dtype = DType::fp32;

  template <class T>
  T* ptr(std::int64_t i = 0, std::int64_t j = 0) const noexcept {
    return static_cast<T*>(data) + offset(i, j);
  }
  operator TensorView() const noexcept {  // NOLINT: a mutable view is usable wherever a read-only one is
    TensorView v;
    static_cast<Layout&>(v) = *this;
    v.data = data;
    v.dtype = dtype;
    return v;
  }
};

// Row-major views. row_stride < 0 means "cols" (packed rows).
TensorView matrix_view(const void* data, DType dtype, std::int64_t rows, std::int64_t cols,
                       std::int64_t row_stride = -1, std::int64_t col_stride = 1) noexcept;
MutableTensorView matrix_view(void* data, DType dtype, std::int64_t rows, std::int64_t cols,
                              std::int64_t row_stride = -1, std::int64_t col_stride = 1) noexcept;
TensorView vector_view(const void* data, DType dtype, std::int64_t n, std::int64_t stride = 1) noexcept;
MutableTensorView vector_view(void* data, DType dtype, std::int64_t n, std::int64_t stride = 1) noexcept;

// An owning, contiguous, 64-byte aligned tensor (1-D or 2-D). Zero-initialized.
class Tensor {
 public:
  Tensor() = default;
  Tensor(DType dtype, std::int64_t rows);                     // 1-D
  Tensor(DType dtype, std::int64_t rows, std::int64_t cols);  // 2-D

  DType dtype() const noexcept { return view_.dtype; }
  int ndim() const noexcept { return view_.ndim; }
  std::int64_t rows() const noexcept { return view_.rows(); }
  std::int64_t cols() const noexcept { return view_.cols(); }
  std::int64_t numel() const noexcept { return view_.numel(); }
  std::size_t nbytes() const noexcept { return static_cast<std::size_t>(numel()) * dtype_size(dtype()); }
  bool present() const noexcept { return view_.present(); }

  template <class T> T* data() noexcept { return static_cast<T*>(view_.data); }
  template <class T> const T* data() const noexcept { return static_cast<const T*>(view_.data); }
  void* raw() noexcept { return view_.data; }
  const void* raw() const noexcept { return view_.data; }

  TensorView view() const noexcept { return view_; }
  MutableTensorView mutable_view() noexcept { return view_; }
  operator TensorView() const noexcept { return view_; }  // NOLINT

 private:
  struct Free { void operator()(void* p) const noexcept; };
  std::unique_ptr<void, Free> storage_;
  MutableTensorView view_;
};

}  // namespace moedist
