// Bit-exact scalar conversions between bf16 / fp16 / fp32 / int8, with the rounding each step of the
// contract names. This is the only code the reference oracle shares with the fast path.
//
// A NaN converted to bf16 / fp16 becomes the canonical quiet NaN (0x7fc0 / 0x7e00). NaN payloads and
// signs are not stable through arithmetic (compilers may swap the operands of a commutative multiply,
// and x86 returns the first NaN operand), so storing one canonical NaN keeps every result bit-exact.
//
// Host+device (common/hd.h): the CUDA kernels convert with these same functions. nvcc compiles them as
// C++17 and device code has no std::bit_cast or std::nearbyint, hence the two helpers below. No step
// here multiplies and adds, so FMA contraction cannot change a bit; the multiplies are by powers of two
// and exact.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/hd.h"

namespace moedist::numeric {

MOEDIST_HD std::uint32_t bits_of(float f) noexcept {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);  // what std::bit_cast does, in C++17 and in device code
  return u;
}
MOEDIST_HD float float_of(std::uint32_t u) noexcept {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
MOEDIST_HD bool is_nan(float f) noexcept { return (bits_of(f) & 0x7fffffffu) > 0x7f800000u; }

// Round half to even to an integral float: nearbyint in the host's default rounding mode; rintf on the
// GPU, which always rounds to even.
MOEDIST_HD float round_half_even(float f) noexcept {
#if defined(__CUDA_ARCH__)
  return rintf(f);
#else
  return std::nearbyint(f);
#endif
}

MOEDIST_HD float bf16_to_f32(std::uint16_t h) noexcept { return float_of(std::uint32_t{h} << 16); }

constexpr std::uint16_t kBf16CanonicalNan = 0x7fc0;
constexpr std::uint16_t kFp16CanonicalNan = 0x7e00;

// fp32 -> bf16, round half to even (CAST_RINT). NaN becomes the canonical NaN.
MOEDIST_HD std::uint16_t f32_to_bf16_rne(float f) noexcept {
  std::uint32_t x = bits_of(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return kBf16CanonicalNan;
  x += 0x7fffu + ((x >> 16) & 1u);
  return static_cast<std::uint16_t>(x >> 16);
}

// fp32 -> bf16, round half away from zero (CAST_ROUND, used by the V1 TP reduce).
MOEDIST_HD std::uint16_t f32_to_bf16_round_away(float f) noexcept {
  std::uint32_t x = bits_of(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return kBf16CanonicalNan;
  x += 0x8000u;  // sign-magnitude: adding half an ulp to the magnitude rounds ties away from zero
  return static_cast<std::uint16_t>(x >> 16);
}

MOEDIST_HD float fp16_to_f32(std::uint16_t h) noexcept {
  const std::uint32_t sign = std::uint32_t{h & 0x8000u} << 16;
  const std::uint32_t exp = (h >> 10) & 0x1fu;
  const std::uint32_t mant = h & 0x3ffu;
  if (exp == 0) {
    // zero or subnormal: mant * 2^-24, exact in fp32
    const float mag = static_cast<float>(mant) * 0x1p-24f;
    return float_of(sign | bits_of(mag));
  }
  if (exp == 31) return float_of(sign | 0x7f800000u | (mant << 13));
  return float_of(sign | ((exp + 112u) << 23) | (mant << 13));
}

// fp32 -> fp16, round half to even (CAST_RINT), overflow to infinity, NaN becomes the canonical NaN.
MOEDIST_HD std::uint16_t f32_to_fp16_rne(float f) noexcept {
  const std::uint32_t x = bits_of(f);
  const std::uint32_t sign = (x >> 16) & 0x8000u;
  const std::uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return kFp16CanonicalNan;
  if (ax == 0x7f800000u) return static_cast<std::uint16_t>(sign | 0x7c00u);
  if (ax >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // >= 65520: rounds to inf
  if (ax < 0x38800000u) {
    // below the smallest normal 2^-14: the result is round(|f| * 2^24) units of 2^-24 (exact scaling)
    const float scaled = float_of(ax) * 0x1p24f;
    const auto units = static_cast<std::uint32_t>(round_half_even(scaled));  // default mode: ties to even
    return static_cast<std::uint16_t>(sign | units);  // units == 1024 is the smallest normal, as it should be
  }
  std::uint32_t h = (((ax >> 23) - 112u) << 10) | ((ax >> 13) & 0x3ffu);
  const std::uint32_t rem = ax & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // a carry into the exponent is correct rounding
  return static_cast<std::uint16_t>(sign | h);
}

// Round half to even, then convert to int8 saturating to [-128, 127]; NaN gives 0. (The contract's
// CAST_RINT to int32 followed by the exact int32 -> fp16 -> int8 steps; saturation and NaN only arise
// for non-finite inputs, which the contract leaves open.)
MOEDIST_HD std::int8_t rint_to_int8(float w) noexcept {
  if (is_nan(w)) return 0;
  const float r = round_half_even(w);
  if (r >= 127.0f) return 127;
  if (r <= -128.0f) return -128;
  return static_cast<std::int8_t>(r);
}

// The element type of x / expand_x as one of the two 16-bit float formats.
enum class Half : std::uint8_t { bf16, fp16 };

MOEDIST_HD float half_to_f32(Half t, std::uint16_t h) noexcept {
  return t == Half::bf16 ? bf16_to_f32(h) : fp16_to_f32(h);
}
MOEDIST_HD std::uint16_t f32_to_half_rne(Half t, float f) noexcept {
  return t == Half::bf16 ? f32_to_bf16_rne(f) : f32_to_fp16_rne(f);
}

}  // namespace moedist::numeric
