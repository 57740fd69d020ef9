// The variants behind the row kernels of row_kernels.h: one table of functions per instruction set.
// The vectorized variants handle contiguous rows; the dispatcher sends strided rows to the scalar ones.
#pragma once

#include <cstdint>

#include "kernels/row_kernels.h"

namespace moedist::kernels {

struct RowKernelTable {
  Isa isa;
  void (*quantize_row)(const std::uint16_t* x, Half type, const float* smooth, std::int64_t h, std::int8_t* q,
                       float* scale, float* scratch);
  void (*accumulate_scaled)(float* acc, const std::uint16_t* y, Half type, float s, std::int64_t h);
  void (*accumulate)(float* acc, const std::uint16_t* y, Half type, std::int64_t h);
  void (*store_row)(const float* acc, Half type, std::int64_t h, std::uint16_t* out);
  void (*tp_reduce_row)(const std::uint16_t* a, const std::uint16_t* b, Half type, std::int64_t h, std::uint16_t* out);
  void (*reduce_terms)(const ReduceTerm* terms, std::size_t n, Half type, std::int64_t h, std::uint16_t* out);
};

namespace scalar {
void copy_row16(const std::uint16_t* src, std::int64_t col_stride, std::int64_t h, std::uint16_t* dst);
void quantize_row(const std::uint16_t* x, std::int64_t col_stride, Half type, const float* smooth, std::int64_t h,
                  std::int8_t* q, float* scale, float* scratch);
void dequantize_row(const std::int8_t* q, float scale, Half type, std::int64_t h, std::uint16_t* y);
void accumulate_scaled(float* acc, const std::uint16_t* y, Half type, float s, std::int64_t h);
void accumulate(float* acc, const std::uint16_t* y, Half type, std::int64_t h);
void store_row(const float* acc, Half type, std::int64_t h, std::uint16_t* out, std::int64_t col_stride);
// reduce_terms for the elements [begin, end) of the rows (the vector variants' tails).
void reduce_terms(const ReduceTerm* terms, std::size_t n, Half type, std::int64_t begin, std::int64_t end,
                  std::uint16_t* out, std::int64_t col_stride);
void tp_reduce_row(const std::uint16_t* a, std::int64_t a_col_stride, const std::uint16_t* b, Half type, std::int64_t h,
                   std::uint16_t* out);
void comm_quantize_row(const std::uint16_t* y, std::int64_t col_stride, Half type, std::int64_t h, std::int8_t* q,
                       std::uint16_t* group_scales);
void accumulate_scaled_comm_quant(float* acc, const std::int8_t* q, const std::uint16_t* group_scales, Half type,
                                  float s, std::int64_t h);
void accumulate_comm_quant(float* acc, const std::int8_t* q, const std::uint16_t* group_scales, Half type, std::int64_t h);
extern const RowKernelTable kTable;
}  // namespace scalar

namespace avx2 {
extern const RowKernelTable kTable;
}
namespace avx512 {
extern const RowKernelTable kTable;
}

}  // namespace moedist::kernels
