// The scalar row kernels: the reference every vectorized variant must match bit for bit.
#include "kernels/row_kernels_impl.h"

#include <algorithm>
#include <cmath>

namespace moedist::kernels::scalar {

using numeric::f32_to_half_rne;
using numeric::half_to_f32;

void copy_row16(const std::uint16_t* src, std::int64_t col_stride, std::int64_t h, std::uint16_t* dst) {
  if (col_stride == 1) {
    std::copy(src, src + h, dst);
    return;
  }
  for (std::int64_t i = 0; i < h; ++i) dst[i] = src[i * col_stride];
}

void quantize_row(const std::uint16_t* x, std::int64_t col_stride, Half type, const float* smooth, std::int64_t h,
                  std::int8_t* q, float* scale, float* scratch) {
  float amax = 0.0f;
  for (std::int64_t i = 0; i < h; ++i) {
    float v = half_to_f32(type, x[i * col_stride]);
    if (smooth != nullptr) v = v * smooth[i];
    scratch[i] = v;
    amax = std::max(amax, std::fabs(v));
  }
  const float ds = 127.0f / amax;
  for (std::int64_t i = 0; i < h; ++i) {
    const float w = scratch[i] * ds;
    q[i] = numeric::rint_to_int8(w);
  }
  *scale = 1.0f / ds;
}

void dequantize_row(const std::int8_t* q, float scale, Half type, std::int64_t h, std::uint16_t* y) {
  for (std::int64_t i = 0; i < h; ++i) {
    const float v = static_cast<float>(q[i]) * scale;
    y[i] = f32_to_half_rne(type, v);
  }
}

void accumulate_scaled(float* acc, const std::uint16_t* y, Half type, float s, std::int64_t h) {
  for (std::int64_t i = 0; i < h; ++i) {
    const float p = half_to_f32(type, y[i]) * s;
    acc[i] = acc[i] + p;
  }
}

void accumulate(float* acc, const std::uint16_t* y, Half type, std::int64_t h) {
  for (std::int64_t i = 0; i < h; ++i) acc[i] = acc[i] + half_to_f32(type, y[i]);
}

void store_row(const float* acc, Half type, std::int64_t h, std::uint16_t* out, std::int64_t col_stride) {
  for (std::int64_t i = 0; i < h; ++i) out[i * col_stride] = f32_to_half_rne(type, acc[i]);
}

void reduce_terms(const ReduceTerm* terms, std::size_t n, Half type, std::int64_t begin, std::int64_t end,
                  std::uint16_t* out, std::int64_t col_stride) {
  for (std::int64_t i = begin; i < end; ++i) {
    float acc = 0.0f;
    for (std::size_t t = 0; t < n; ++t) {
      const float y = half_to_f32(type, terms[t].row[i]);
      acc = acc + (terms[t].weighted ? y * terms[t].weight : y);
    }
    out[i * col_stride] = f32_to_half_rne(type, acc);
  }
}

void tp_reduce_row(const std::uint16_t* a, std::int64_t a_col_stride, const std::uint16_t* b, Half type,
                   std::int64_t h, std::uint16_t* out) {
  for (std::int64_t i = 0; i < h; ++i) {
    const float sum = half_to_f32(type, a[i * a_col_stride]) + half_to_f32(type, b[i]);
    out[i] = type == Half::bf16 ? numeric::f32_to_bf16_round_away(sum) : numeric::f32_to_fp16_rne(sum);
  }
}

void comm_quantize_row(const std::uint16_t* y, std::int64_t col_stride, Half type, std::int64_t h, std::int8_t* q,
                       std::uint16_t* group_scales) {
  const float inv127 = 1.0f / 127.0f;
  for (std::int64_t g0 = 0, g = 0; g0 < h; g0 += 8, ++g) {
    const std::int64_t g1 = std::min<std::int64_t>(g0 + 8, h);
    float m = 0.0f;
    for (std::int64_t i = g0; i < g1; ++i) m = std::max(m, std::fabs(half_to_f32(type, y[i * col_stride])));
    const float sc = m * inv127;
    group_scales[g] = f32_to_half_rne(type, sc);
    for (std::int64_t i = g0; i < g1; ++i) {
      if (sc == 0.0f) {
        q[i] = 0;
        continue;
      }
      const float ratio = half_to_f32(type, y[i * col_stride]) / sc;
      q[i] = numeric::rint_to_int8(numeric::fp16_to_f32(numeric::f32_to_fp16_rne(ratio)));
    }
  }
}

namespace {
template <bool kWeighted>
void accumulate_comm_quant_impl(float* acc, const std::int8_t* q, const std::uint16_t* group_scales, Half type,
                                float s, std::int64_t h) {
  for (std::int64_t g0 = 0, g = 0; g0 < h; g0 += 8, ++g) {
    const std::int64_t g1 = std::min<std::int64_t>(g0 + 8, h);
    const float sc = half_to_f32(type, group_scales[g]);
    for (std::int64_t i = g0; i < g1; ++i) {
      const float y = half_to_f32(type, f32_to_half_rne(type, static_cast<float>(q[i]) * sc));
      if constexpr (kWeighted) {
        const float p = y * s;
        acc[i] = acc[i] + p;
      } else {
        acc[i] = acc[i] + y;
      }
    }
  }
}
}  // namespace

void accumulate_scaled_comm_quant(float* acc, const std::int8_t* q, const std::uint16_t* group_scales, Half type,
                                  float s, std::int64_t h) {
  accumulate_comm_quant_impl<true>(acc, q, group_scales, type, s, h);
}

void accumulate_comm_quant(float* acc, const std::int8_t* q, const std::uint16_t* group_scales, Half type,
                           std::int64_t h) {
  accumulate_comm_quant_impl<false>(acc, q, group_scales, type, 0.0f, h);
}

}  // namespace moedist::kernels::scalar

namespace moedist::kernels::scalar {
namespace {
void quantize_packed(const std::uint16_t* x, Half type, const float* smooth, std::int64_t h, std::int8_t* q, float* scale,
                     float* scratch) {
  quantize_row(x, 1, type, smooth, h, q, scale, scratch);
}
void store_packed(const float* acc, Half type, std::int64_t h, std::uint16_t* out) { store_row(acc, type, h, out, 1); }
void tp_reduce_packed(const std::uint16_t* a, const std::uint16_t* b, Half type, std::int64_t h, std::uint16_t* out) {
  tp_reduce_row(a, 1, b, type, h, out);
}
void reduce_terms_packed(const ReduceTerm* terms, std::size_t n, Half type, std::int64_t h, std::uint16_t* out) {
  reduce_terms(terms, n, type, 0, h, out, 1);
}
}  // namespace

const RowKernelTable kTable{Isa::scalar,  quantize_packed,  accumulate_scaled,  accumulate,
                            store_packed, tp_reduce_packed, reduce_terms_packed};

}  // namespace moedist::kernels::scalar
