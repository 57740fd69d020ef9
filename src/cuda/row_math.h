// The per-element arithmetic of the CUDA kernels, compiled for both the GPU (nvcc) and the host (the
// CPU test tests/cuda_row_math_test.cpp checks it against src/numeric/convert.h and the oracle's
// formulas). Every fp32 multiply, add and divide is an explicit round-to-nearest-even operation
// (__fmul_rn, __fadd_rn, __fdiv_rn on the GPU), so neither FMA contraction nor fast-math flags can
// change a bit: the contract fixes the order and the rounding of each step (§2.2, §4.2, §4.4, §4.5).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/hd.h"

namespace moedist::cuda {

MOEDIST_HD std::uint32_t bits_of(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
MOEDIST_HD float float_of(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

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
// Round half to even to an integral float (rint in the default rounding mode; the GPU's rintf is RNE).
MOEDIST_HD float rint_even(float f) {
#if defined(__CUDA_ARCH__)
  return rintf(f);
#else
  return std::nearbyint(f);
#endif
}
MOEDIST_HD bool is_nan(float f) { return (bits_of(f) & 0x7fffffffu) > 0x7f800000u; }
MOEDIST_HD float abs_f(float f) { return float_of(bits_of(f) & 0x7fffffffu); }
// max that ignores a NaN operand, as std::max(acc, v) does for a NaN v in the CPU paths.
MOEDIST_HD float max_ignoring_nan(float acc, float v) { return v > acc ? v : acc; }

constexpr std::uint16_t kBf16Nan = 0x7fc0;
constexpr std::uint16_t kFp16Nan = 0x7e00;

MOEDIST_HD float bf16_to_f32(std::uint16_t h) { return float_of(std::uint32_t{h} << 16); }

MOEDIST_HD std::uint16_t f32_to_bf16_rne(float f) {
  std::uint32_t x = bits_of(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return kBf16Nan;
  x += 0x7fffu + ((x >> 16) & 1u);
  return static_cast<std::uint16_t>(x >> 16);
}

MOEDIST_HD std::uint16_t f32_to_bf16_round_away(float f) {
  std::uint32_t x = bits_of(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return kBf16Nan;
  x += 0x8000u;
  return static_cast<std::uint16_t>(x >> 16);
}

MOEDIST_HD float fp16_to_f32(std::uint16_t h) {
  const std::uint32_t sign = std::uint32_t{h & 0x8000u} << 16;
  const std::uint32_t exp = (h >> 10) & 0x1fu;
  const std::uint32_t mant = h & 0x3ffu;
  if (exp == 0) return float_of(sign | bits_of(mul_rn(static_cast<float>(mant), 0x1p-24f)));  // exact
  if (exp == 31) return float_of(sign | 0x7f800000u | (mant << 13));
  return float_of(sign | ((exp + 112u) << 23) | (mant << 13));
}

// fp32 -> fp16, round half to even, overflow to infinity; integer arithmetic only, so host and GPU
// agree without relying on a rounding mode.
MOEDIST_HD std::uint16_t f32_to_fp16_rne(float f) {
  const std::uint32_t x = bits_of(f);
  const std::uint32_t sign = (x >> 16) & 0x8000u;
  const std::uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return kFp16Nan;
  if (ax >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // >= 65520 (and inf)
  if (ax < 0x38800000u) {
    // Below 2^-14 the result counts units of 2^-24: |f| = m * 2^(e - 150) with m the 24-bit mantissa
    // (implicit bit set), so |f| / 2^-24 = m / 2^(126 - e), rounded half to even.
    const std::uint32_t e = ax >> 23;
    if (e < 102) return static_cast<std::uint16_t>(sign);  // < 2^-25: rounds to zero (2^-25 itself ties to 0)
    const std::uint32_t m = (ax & 0x7fffffu) | 0x800000u;
    const std::uint32_t shift = 126u - e;  // |f| / 2^-24 = m >> shift, with shift in [14, 24]
    std::uint32_t units = m >> shift;
    const std::uint32_t rem = m & ((1u << shift) - 1u);
    const std::uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (units & 1u))) ++units;
    return static_cast<std::uint16_t>(sign | units);
  }
  std::uint32_t h = (((ax >> 23) - 112u) << 10) | ((ax >> 13) & 0x3ffu);
  const std::uint32_t rem = ax & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return static_cast<std::uint16_t>(sign | h);
}

MOEDIST_HD float half_to_f32(bool bf16, std::uint16_t h) { return bf16 ? bf16_to_f32(h) : fp16_to_f32(h); }
MOEDIST_HD std::uint16_t f32_to_half_rne(bool bf16, float f) { return bf16 ? f32_to_bf16_rne(f) : f32_to_fp16_rne(f); }

// rint to int8, saturating; NaN gives 0 (numeric::rint_to_int8).
MOEDIST_HD std::int8_t rint_to_int8(float w) {
  if (is_nan(w)) return 0;
  const float r = rint_even(w);
  if (r >= 127.0f) return 127;
  if (r <= -128.0f) return -128;
  return static_cast<std::int8_t>(r);
}

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
