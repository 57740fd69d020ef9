// Bit-exact scalar conversions between bf16 / fp16 / fp32 / int8, with the rounding each step of the
// contract names. This is the only code the reference oracle shares with the fast path.
//
// A NaN converted to bf16 / fp16 becomes the canonical quiet NaN (0x7fc0 / 0x7e00). NaN payloads and
// signs are not stable through arithmetic (compilers may swap the operands of a commutative multiply,
// and x86 returns the first NaN operand), so storing one canonical NaN keeps every result bit-exact.
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>

namespace moedist::numeric {

inline float bf16_to_f32(std::uint16_t h) noexcept { return std::bit_cast<float>(std::uint32_t{h} << 16); }

constexpr std::uint16_t kBf16CanonicalNan = 0x7fc0;
constexpr std::uint16_t kFp16CanonicalNan = 0x7e00;

// fp32 -> bf16, round half to even (CAST_RINT). NaN becomes the canonical NaN.
inline std::uint16_t f32_to_bf16_rne(float f) noexcept {
  std::uint32_t x = std::bit_cast<std::uint32_t>(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return kBf16CanonicalNan;
  x += 0x7fffu + ((x >> 16) & 1u);
  return static_cast<std::uint16_t>(x >> 16);
}

// fp32 -> bf16, round half away from zero (CAST_ROUND, used by the V1 TP reduce).
inline std::uint16_t f32_to_bf16_round_away(float f) noexcept {
  std::uint32_t x = std::bit_cast<std::uint32_t>(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return kBf16CanonicalNan;
  x += 0x8000u;  // sign-magnitude: adding half an ulp to the magnitude rounds ties away from zero
  return static_cast<std::uint16_t>(x >> 16);
}

inline float fp16_to_f32(std::uint16_t h) noexcept {
  const std::uint32_t sign = std::uint32_t{h & 0x8000u} << 16;
  const std::uint32_t exp = (h >> 10) & 0x1fu;
  const std::uint32_t mant = h & 0x3ffu;
  if (exp == 0) {
    // zero or subnormal: mant * 2^-24, exact in fp32
    const float mag = static_cast<float>(mant) * 0x1p-24f;
    return std::bit_cast<float>(sign | std::bit_cast<std::uint32_t>(mag));
  }
  if (exp == 31) return std::bit_cast<float>(sign | 0x7f800000u | (mant << 13));
  return std::bit_cast<float>(sign | ((exp + 112u) << 23) | (mant << 13));
}

// fp32 -> fp16, round half to even (CAST_RINT), overflow to infinity, NaN becomes the canonical NaN.
inline std::uint16_t f32_to_fp16_rne(float f) noexcept {
  const std::uint32_t x = std::bit_cast<std::uint32_t>(f);
  const std::uint32_t sign = (x >> 16) & 0x8000u;
  const std::uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return kFp16CanonicalNan;
  if (ax == 0x7f800000u) return static_cast<std::uint16_t>(sign | 0x7c00u);
  if (ax >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // >= 65520: rounds to inf
  if (ax < 0x38800000u) {
    // below the smallest normal 2^-14: the result is round(|f| * 2^24) units of 2^-24 (exact scaling)
    const float scaled = std::bit_cast<float>(ax) * 0x1p24f;
    const auto units = static_cast<std::uint32_t>(std::nearbyint(scaled));  // default mode: ties to even
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
inline std::int8_t rint_to_int8(float w) noexcept {
  if (std::isnan(w)) return 0;
  const float r = std::nearbyint(w);
  if (r >= 127.0f) return 127;
  if (r <= -128.0f) return -128;
  return static_cast<std::int8_t>(r);
}

// The element type of x / expand_x as one of the two 16-bit float formats.
enum class Half : std::uint8_t { bf16, fp16 };

inline float half_to_f32(Half t, std::uint16_t h) noexcept { return t == Half::bf16 ? bf16_to_f32(h) : fp16_to_f32(h); }
inline std::uint16_t f32_to_half_rne(Half t, float f) noexcept {
  return t == Half::bf16 ? f32_to_bf16_rne(f) : f32_to_fp16_rne(f);
}

}  // namespace moedist::numeric
