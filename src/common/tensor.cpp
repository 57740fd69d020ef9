#include "moedist/tensor.h"

#include <cstdlib>
#include <cstring>
#include <new>

namespace moedist {

bool Layout::contiguous() const noexcept {
  if (ndim == 0) return true;
  if (ndim == 1) return shape[0] <= 1 || strides[0] == 1;
  return (shape[1] <= 1 || strides[1] == 1) && (shape[0] <= 1 || strides[0] == shape[1]);
}

namespace {
template <class View, class Ptr>
View make_matrix(Ptr data, DType dtype, std::int64_t rows, std::int64_t cols, std::int64_t row_stride,
                 std::int64_t col_stride) {
  View v;
  v.data = data;
  v.dtype = dtype;
  v.ndim = 2;
  v.shape[0] = rows;
  v.shape[1] = cols;
  v.strides[0] = row_stride < 0 ? cols : row_stride;
  v.strides[1] = col_stride;
  return v;
}
template <class View, class Ptr>
View make_vector(Ptr data, DType dtype, std::int64_t n, std::int64_t stride) {
  View v;
  v.data = data;
  v.dtype = dtype;
  v.ndim = 1;
  v.shape[0] = n;
  v.strides[0] = stride;
  return v;
}
}  // namespace

TensorView matrix_view(const void* data, DType dtype, std::int64_t rows, std::int64_t cols, std::int64_t row_stride,
                       std::int64_t col_stride) noexcept {
  return make_matrix<TensorView>(data, dtype, rows, cols, row_stride, col_stride);
}
MutableTensorView matrix_view(void* data, DType dtype, std::int64_t rows, std::int64_t cols, std::int64_t row_stride,
                              std::int64_t col_stride) noexcept {
  return make_matrix<MutableTensorView>(data, dtype, rows, cols, row_stride, col_stride);
}
TensorView vector_view(const void* data, DType dtype, std::int64_t n, std::int64_t stride) noexcept {
  return make_vector<TensorView>(data, dtype, n, stride);
}
MutableTensorView vector_view(void* data, DType dtype, std::int64_t n, std::int64_t stride) noexcept {
  return make_vector<MutableTensorView>(data, dtype, n, stride);
}

void Tensor::Free::operator()(void* p) const noexcept { std::free(p); }

namespace {
void* allocate_zeroed(std::size_t bytes) {
  const std::size_t rounded = (bytes + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, rounded == 0 ? 64 : rounded);
  if (p == nullptr) throw std::bad_alloc();
  std::memset(p, 0, rounded == 0 ? 64 : rounded);
  return p;
}
}  // namespace

Tensor::Tensor(DType dtype, std::int64_t rows) {
  storage_.reset(allocate_zeroed(static_cast<std::size_t>(rows) * dtype_size(dtype)));
  view_ = vector_view(storage_.get(), dtype, rows);
}

Tensor::Tensor(DType dtype, std::int64_t rows, std::int64_t cols) {
  storage_.reset(allocate_zeroed(static_cast<std::size_t>(rows * cols) * dtype_size(dtype)));
  view_ = matrix_view(storage_.get(), dtype, rows, cols);
}

}  // namespace moedist
