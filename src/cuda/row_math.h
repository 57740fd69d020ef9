// The per-element arithmetic of the CUDA kernels, compiled for both the GPU (nvcc) and the host (the
// CPU test tests/cuda_row_math_test.cpp checks it against the oracle's formulas). Every fp32 multiply,
// add and divide is an explicit round-to-nearest-even operation (__fmul_rn, __fadd_rn, __fdiv_rn on the
// GPU), so neither FMA contraction nor fast-math flags can change a bit: the contract fixes the order
// and the rounding of each step (§2.2, §4.2, §4.4, §4.5). The scalar conversions are
// numeric/convert.h's, the same functions the CPU path runs.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/hd.h"
#include "numeric/convert.h"

namespace moedist::cuda {

// Round-to-nearest-even fp32 operations that no compiler may fuse or reorder.
MOEDIST_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  volatile float r = a * b;  // volatile: the host build must not contract either (it has -ffp-contract=off too)
  return r;
#endif
}
MOEDIST_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  volatile float r = a + b;
  return r;
#endif
}
MOEDIST_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  volatile float r = a / b;
  return r;
#endif
}

// Conversions are numeric/convert.h's, the CPU path's own, compiled for the device. The wrappers take
// the kernels' `bool bf16` for the element type instead of numeric::Half.
using numeric::bf16_to_f32;
using numeric::f32_to_bf16_rne;
using numeric::f32_to_bf16_round_away;
using numeric::f32_to_fp16_rne;
using numeric::fp16_to_f32;
using numeric::rint_to_int8;

MOEDIST_HD float half_to_f32(bool bf16, std::uint16_t h) { return bf16 ? bf16_to_f32(h) : fp16_to_f32(h); }
MOEDIST_HD std::uint16_t f32_to_half_rne(bool bf16, float f) { return bf16 ? f32_to_bf16_rne(f) : f32_to_fp16_rne(f); }

MOEDIST_HD float abs_f(float f) { return numeric::float_of(numeric::bits_of(f) & 0x7fffffffu); }
// max that ignores a NaN operand, as std::max(acc, v) does for a NaN v in the CPU paths.
MOEDIST_HD float max_ignoring_nan(float acc, float v) { return v > acc ? v : acc; }

// ---- dispatch quantization (§2.2) ----
// v = float(x) [* smooth]
MOEDIST_HD float quant_input(bool bf16, std::uint16_t x, const float* smooth, std::int64_t i) {
  const float v = half_to_f32(bf16, x);
  return smooth != nullptr ? mul_rn(v, smooth[i]) : v;
}
// ds = 127 / amax (an all-zero row gives +inf, then q = rint(NaN) = 0 and scale 1/inf = 0)
MOEDIST_HD float quant_ds(float amax) { return div_rn(127.0f, amax); }
MOEDIST_HD float quant_scale_out(float ds) { return div_rn(1.0f, ds); }
MOEDIST_HD std::int8_t quantize(float v, float ds) { return rint_to_int8(mul_rn(v, ds)); }

// ---- combine (§4.2) ----
MOEDIST_HD float accumulate_weighted(float acc, bool bf16, std::uint16_t y, float weight) {
  return add_rn(acc, mul_rn(half_to_f32(bf16, y), weight));
}
MOEDIST_HD float accumulate_unweighted(float acc, bool bf16, std::uint16_t y) { return add_rn(acc, half_to_f32(bf16, y)); }

// ---- TP reduce (§4.4, V1): bf16 rounds the fp32 sum half away from zero, fp16 to even ----
MOEDIST_HD std::uint16_t tp_add(bool bf16, std::uint16_t a, std::uint16_t b) {
  const float sum = add_rn(half_to_f32(bf16, a), half_to_f32(bf16, b));
  return bf16 ? f32_to_bf16_round_away(sum) : f32_to_fp16_rne(sum);
}

// ---- TP reduce of the V2 operators (V2 §3.8): the fp32 sum rounded half to even for bf16 too ----
MOEDIST_HD std::uint16_t tp_add_even(bool bf16, std::uint16_t a, std::uint16_t b) {
  return f32_to_half_rne(bf16, add_rn(half_to_f32(bf16, a), half_to_f32(bf16, b)));
}

// ---- const experts (V2 §4.4; docs/contract.md "Const experts") ----
// One term of <alpha, x>: the products are added in increasing h, one fp32 add at a time from 0.
MOEDIST_HD float dot_step(float sum, bool bf16, std::uint16_t alpha, std::uint16_t x) {
  return add_rn(sum, mul_rn(half_to_f32(bf16, alpha), half_to_f32(bf16, x)));
}
// e^x. The host's is the C library's expf, the oracle's and the CPU paths' own. The GPU's is CUDA's
// double-precision exp rounded to float, which is the correctly rounded expf except where the exact
// value lies within about 2^-28 ulp of a rounding boundary (CUDA's float expf is up to 2 ulp off).
// The C library's expf is not guaranteed correctly rounded either, so the two can differ by one ulp
// for rare inputs: docs/cuda.md, "Bit-exactness".
MOEDIST_HD float exp_f(float x) {
#if defined(__CUDA_ARCH__)
  return static_cast<float>(::exp(static_cast<double>(x)));
#else
  return std::exp(x);
#endif
}
// The gate (a1, a2) = softmax(l1, l2) of a const expert: m = max(l1, l2), e_i = exp(l_i - m),
// a_i = e_i / (e1 + e2).
struct ConstGate {
  float a1 = 0.0f, a2 = 0.0f;
};
MOEDIST_HD ConstGate const_gate(float l1, float l2) {
  const float m = l1 < l2 ? l2 : l1;  // std::max(l1, l2)
  const float e1 = exp_f(add_rn(l1, -m)), e2 = exp_f(add_rn(l2, -m));
  const float sum = add_rn(e1, e2);
  return ConstGate{div_rn(e1, sum), div_rn(e2, sum)};
}
// acc + fl32(CONST[h] * w), CONST[h] = fl32(fl32(x * a1) + fl32(v * a2)).
MOEDIST_HD float accumulate_const(float acc, bool bf16, std::uint16_t x, std::uint16_t v, ConstGate gate,
                                  float weight) {
  const float value = add_rn(mul_rn(half_to_f32(bf16, x), gate.a1), mul_rn(half_to_f32(bf16, v), gate.a2));
  return add_rn(acc, mul_rn(value, weight));
}

// ---- communication quantization (§4.5): groups of 8, scale sent in x's dtype ----
constexpr int kCommQuantGroup = 8;
// Quantizes y[0..n) (n <= 8); writes q[0..n) and returns the scale's bits in x's dtype.
MOEDIST_HD std::uint16_t comm_quantize_group(bool bf16, const std::uint16_t* y, int n, std::int8_t* q) {
  float group_max = 0.0f;
  for (int i = 0; i < n; ++i) group_max = max_ignoring_nan(group_max, abs_f(half_to_f32(bf16, y[i])));
  const float scale = mul_rn(group_max, div_rn(1.0f, 127.0f));
  for (int i = 0; i < n; ++i) {
    std::int8_t v = 0;
    if (scale != 0.0f) {
      const float ratio = div_rn(half_to_f32(bf16, y[i]), scale);  // the unrounded scale divides
      v = rint_to_int8(fp16_to_f32(f32_to_fp16_rne(ratio)));
    }
    q[i] = v;
  }
  return f32_to_half_rne(bf16, scale);
}
// Receiver: y' = to_T_rint(float(q) * float(scale_T)).
MOEDIST_HD std::uint16_t comm_dequantize(bool bf16, std::int8_t q, std::uint16_t scale_bits) {
  return f32_to_half_rne(bf16, mul_rn(static_cast<float>(q), half_to_f32(bf16, scale_bits)));
}

// ---- identity expert on a quantized row (tests, benchmarks): y = to_T_rint(float(q) * scale) ----
MOEDIST_HD std::uint16_t dequantize(bool bf16, std::int8_t q, float scale) {
  return f32_to_half_rne(bf16, mul_rn(static_cast<float>(q), scale));
}

}  // namespace moedist::cuda
