// Run-time choice of the row-kernel variants, and the entry points that route each call.
#include <cpuid.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "kernels/row_kernels_impl.h"

namespace moedist::kernels {
namespace {

// F16C from CPUID leaf 1 (ECX bit 29): clang's __builtin_cpu_supports does not know "f16c".
bool cpu_has_f16c() noexcept {
  unsigned a = 0, b = 0, c = 0, d = 0;
  return __get_cpuid(1, &a, &b, &c, &d) != 0 && (c & (1u << 29)) != 0;
}

bool cpu_has(Isa isa) noexcept {
  __builtin_cpu_init();
  switch (isa) {
    case Isa::scalar: return true;
    case Isa::avx2: return __builtin_cpu_supports("avx2") && cpu_has_f16c() && __builtin_cpu_supports("fma");
    case Isa::avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bf16");
  }
  return false;
}

const RowKernelTable* table_of(Isa isa) noexcept {
  switch (isa) {
    case Isa::avx512: return &avx512::kTable;
    case Isa::avx2: return &avx2::kTable;
    case Isa::scalar: break;
  }
  return &scalar::kTable;
}

const RowKernelTable* initial_table() noexcept {
  if (const char* forced = std::getenv("MOEDIST_KERNELS")) {
    for (Isa isa : {Isa::scalar, Isa::avx2, Isa::avx512}) {
      if (std::strcmp(forced, isa_name(isa)) == 0 && cpu_has(isa)) return table_of(isa);
    }
  }
  for (Isa isa : {Isa::avx512, Isa::avx2}) {
    if (cpu_has(isa)) return table_of(isa);
  }
  return &scalar::kTable;
}

std::atomic<const RowKernelTable*> g_table{initial_table()};

inline const RowKernelTable& active() noexcept { return *g_table.load(std::memory_order_relaxed); }

}  // namespace

const char* isa_name(Isa isa) noexcept {
  switch (isa) {
    case Isa::scalar: return "scalar";
    case Isa::avx2: return "avx2";
    case Isa::avx512: return "avx512";
  }
  return "unknown";
}

bool isa_supported(Isa isa) noexcept { return cpu_has(isa); }
Isa active_isa() noexcept { return active().isa; }

bool force_isa(Isa isa) noexcept {
  if (!cpu_has(isa)) return false;
  g_table.store(table_of(isa));
  return true;
}

void copy_row16(const std::uint16_t* src, std::int64_t col_stride, std::int64_t h, std::uint16_t* dst) {
  scalar::copy_row16(src, col_stride, h, dst);  // a memcpy when contiguous: nothing to vectorize by hand
}

void quantize_row(const std::uint16_t* x, std::int64_t col_stride, Half type, const float* smooth, std::int64_t h,
                  std::int8_t* q, float* scale, float* scratch) {
  if (col_stride == 1) active().quantize_row(x, type, smooth, h, q, scale, scratch);
  else scalar::quantize_row(x, col_stride, type, smooth, h, q, scale, scratch);
}

void dequantize_row(const std::int8_t* q, float scale, Half type, std::int64_t h, std::uint16_t* y) {
  scalar::dequantize_row(q, scale, type, h, y);
}

void accumulate_scaled(float* acc, const std::uint16_t* y, Half type, float s, std::int64_t h) {
  active().accumulate_scaled(acc, y, type, s, h);
}

void accumulate(float* acc, const std::uint16_t* y, Half type, std::int64_t h) { active().accumulate(acc, y, type, h); }

void store_row(const float* acc, Half type, std::int64_t h, std::uint16_t* out, std::int64_t col_stride) {
  if (col_stride == 1) active().store_row(acc, type, h, out);
  else scalar::store_row(acc, type, h, out, col_stride);
}

void reduce_terms(const ReduceTerm* terms, std::size_t n, Half type, std::int64_t h, std::uint16_t* out,
                  std::int64_t col_stride) {
  if (col_stride == 1)
    active().reduce_terms(terms, n, type, h, out);
  else
    scalar::reduce_terms(terms, n, type, 0, h, out, col_stride);
}

void tp_reduce_row(const std::uint16_t* a, std::int64_t a_col_stride, const std::uint16_t* b, Half type, std::int64_t h,
                   std::uint16_t* out) {
  if (a_col_stride == 1) active().tp_reduce_row(a, b, type, h, out);
  else scalar::tp_reduce_row(a, a_col_stride, b, type, h, out);
}

void comm_quantize_row(const std::uint16_t* y, std::int64_t col_stride, Half type, std::int64_t h, std::int8_t* q,
                       std::uint16_t* group_scales) {
  scalar::comm_quantize_row(y, col_stride, type, h, q, group_scales);
}

void accumulate_scaled_comm_quant(float* acc, const std::int8_t* q, const std::uint16_t* group_scales, Half type,
                                  float s, std::int64_t h) {
  scalar::accumulate_scaled_comm_quant(acc, q, group_scales, type, s, h);
}

void accumulate_comm_quant(float* acc, const std::int8_t* q, const std::uint16_t* group_scales, Half type,
                           std::int64_t h) {
  scalar::accumulate_comm_quant(acc, q, group_scales, type, h);
}

void tp_reduce_row_even(const std::uint16_t* a, std::int64_t a_col_stride, const std::uint16_t* b, Half type,
                        std::int64_t h, std::uint16_t* out) {
  for (std::int64_t i = 0; i < h; ++i) {
    const float sum = numeric::half_to_f32(type, a[i * a_col_stride]) + numeric::half_to_f32(type, b[i]);
    out[i] = numeric::f32_to_half_rne(type, sum);
  }
}

float dot_row(const std::uint16_t* a, const std::uint16_t* b, Half type, std::int64_t h) {
  float sum = 0.0f;
  for (std::int64_t i = 0; i < h; ++i) sum = sum + numeric::half_to_f32(type, a[i]) * numeric::half_to_f32(type, b[i]);
  return sum;
}

void accumulate_const_expert(float* acc, const std::uint16_t* x, const std::uint16_t* v, Half type, float a1, float a2,
                             float s, std::int64_t h) {
  for (std::int64_t i = 0; i < h; ++i) {
    const float value = numeric::half_to_f32(type, x[i]) * a1 + numeric::half_to_f32(type, v[i]) * a2;
    acc[i] = acc[i] + value * s;
  }
}

}  // namespace moedist::kernels
