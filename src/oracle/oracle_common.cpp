// The arithmetic both reference oracles share, written straight from the contract. Every fp32 multiply
// and add is its own statement (moedist_flags compiles with -ffp-contract=off, so none becomes an FMA).
#include "oracle/oracle_common.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace moedist::oracle::common {

using numeric::Half;

// V1 §2.2 for quant_mode 2, §2.4 for quant_mode 0.
RowPayload make_payload(Half dtype, int quant_mode, const std::uint16_t* source, const float* smooth, std::int64_t h) {
  RowPayload row;
  if (quant_mode == 0) {
    row.x.assign(source, source + h);
    return row;
  }
  std::vector<float> v(static_cast<std::size_t>(h));
  for (std::int64_t i = 0; i < h; ++i) {
    v[i] = numeric::half_to_f32(dtype, source[i]);
    if (smooth != nullptr) {
      const float smoothed = v[i] * smooth[i];
      v[i] = smoothed;
    }
  }
  float amax = 0.0f;
  for (const float value : v) amax = std::max(amax, std::fabs(value));
  // An all-zero row gives ds = +inf, w = 0 * inf = NaN -> q = 0 (rint_to_int8), and 1/inf = 0 as its scale.
  const float ds = 127.0f / amax;
  row.q.resize(static_cast<std::size_t>(h));
  for (std::int64_t i = 0; i < h; ++i) {
    const float w = v[i] * ds;
    row.q[i] = numeric::rint_to_int8(w);
  }
  row.dynamic_scale = 1.0f / ds;
  return row;
}

std::vector<std::uint16_t> identity_expert_output(Half dtype, int quant_mode,
                                                  const std::vector<std::uint16_t>& expand_x,
                                                  const std::vector<std::int8_t>& expand_x_int8,
                                                  const std::vector<float>& dynamic_scales, std::int64_t valid_rows,
                                                  std::int64_t h) {
  if (quant_mode == 0) return expand_x;
  // Identity expert on a quantized row: its dequantized value.
  std::vector<std::uint16_t> y(static_cast<std::size_t>(valid_rows * h));
  for (std::int64_t row = 0; row < valid_rows; ++row) {
    for (std::int64_t i = 0; i < h; ++i) {
      const float dequantized = static_cast<float>(expand_x_int8[row * h + i]) * dynamic_scales[row];
      y[row * h + i] = numeric::f32_to_half_rne(dtype, dequantized);
    }
  }
  return y;
}

// V1 §4.5, unchanged in V2 §2.6.
void comm_quant_round_trip(Half dtype, std::uint16_t* row, std::int64_t h) {
  constexpr std::int64_t kGroupSize = 8;
  const float inv127 = 1.0f / 127.0f;
  for (std::int64_t begin = 0; begin < h; begin += kGroupSize) {
    const std::int64_t end = std::min(begin + kGroupSize, h);
    float group_max = 0.0f;
    for (std::int64_t i = begin; i < end; ++i)
      group_max = std::max(group_max, std::fabs(numeric::half_to_f32(dtype, row[i])));
    const float scale = group_max * inv127;
    // The receiver only sees the scale after it travelled in x's dtype.
    const float received_scale = numeric::half_to_f32(dtype, numeric::f32_to_half_rne(dtype, scale));
    for (std::int64_t i = begin; i < end; ++i) {
      std::int8_t q = 0;
      if (scale != 0.0f) {
        const float ratio = numeric::half_to_f32(dtype, row[i]) / scale;  // divides by the unrounded scale
        const float ratio_via_fp16 = numeric::fp16_to_f32(numeric::f32_to_fp16_rne(ratio));
        q = numeric::rint_to_int8(ratio_via_fp16);
      }
      const float dequantized = static_cast<float>(q) * received_scale;
      row[i] = numeric::f32_to_half_rne(dtype, dequantized);
    }
  }
}

}  // namespace moedist::oracle::common
