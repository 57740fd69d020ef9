// src/cuda/row_math.h, the per-element arithmetic of the CUDA kernels, compiled for the host and checked
// bit for bit against the CPU reference: the conversions of src/numeric/convert.h, the scalar row kernels
// (src/kernels/row_kernels.h) and the oracle's formulas (src/oracle/oracle.cpp, transcribed here with
// numeric:: calls). Row-level checks rebuild, from cuda:: calls, the loop a kernel runs over one row.
// Needs no CUDA: row_math.h compiles with the host compiler.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "cuda/row_math.h"
#include "kernels/row_kernels.h"
#include "numeric/convert.h"
#include "oracle/oracle_common.h"

namespace moedist {
namespace {

using numeric::Half;

class CudaRowMath : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_TRUE(kernels::force_isa(kernels::Isa::scalar)); }
};

std::uint32_t fbits(float f) { return std::bit_cast<std::uint32_t>(f); }
float from_bits(std::uint32_t u) { return std::bit_cast<float>(u); }

std::string hex(std::uint64_t v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}
std::string describe(float f) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.9g (%s)", static_cast<double>(f), hex(fbits(f)).c_str());
  return buf;
}

// fp32 results of arithmetic: equal bits, or both NaN (a NaN's payload is not stable through arithmetic;
// every 16-bit result is canonicalized and compared strictly).
bool same_f32(float a, float b) { return fbits(a) == fbits(b) || (std::isnan(a) && std::isnan(b)); }

// Counts mismatches and reports the first few in full, so an exhaustive loop cannot flood the log.
class Mismatches {
 public:
  explicit Mismatches(std::string what) : what_(std::move(what)) {}
  ~Mismatches() { EXPECT_EQ(count_, 0u) << what_ << ": " << count_ << " mismatches"; }
  void add(const std::string& detail) {
    if (++count_ <= 10) ADD_FAILURE() << what_ << ": " << detail;
  }
  std::uint64_t count() const { return count_; }

 private:
  std::string what_;
  std::uint64_t count_ = 0;
};

// ---------------------------------------------------------------------------------------------
// Conversions

TEST_F(CudaRowMath, HalfToF32ExhaustiveBitEqual) {
  Mismatches bad("16-bit -> fp32");
  for (std::uint32_t u = 0; u <= 0xffff; ++u) {
    const auto h = static_cast<std::uint16_t>(u);
    const std::uint32_t bf_gpu = fbits(cuda::bf16_to_f32(h)), bf_ref = fbits(numeric::bf16_to_f32(h));
    const std::uint32_t fp_gpu = fbits(cuda::fp16_to_f32(h)), fp_ref = fbits(numeric::fp16_to_f32(h));
    if (bf_gpu != bf_ref) bad.add("bf16_to_f32(" + hex(h) + "): gpu " + hex(bf_gpu) + " numeric " + hex(bf_ref));
    if (fp_gpu != fp_ref) bad.add("fp16_to_f32(" + hex(h) + "): gpu " + hex(fp_gpu) + " numeric " + hex(fp_ref));
    if (fbits(cuda::half_to_f32(true, h)) != bf_ref) bad.add("half_to_f32(bf16, " + hex(h) + ")");
    if (fbits(cuda::half_to_f32(false, h)) != fp_ref) bad.add("half_to_f32(fp16, " + hex(h) + ")");
  }
}

// Independent of numeric: every non-NaN 16-bit value survives 16 -> 32 -> 16, and the exact midpoint of
// two neighbouring finite values rounds to the one with the even last bit (or away from zero for bf16's
// round-away).
TEST_F(CudaRowMath, HalfRoundTripAndMidpointsIndependent) {
  Mismatches bad("round trip / midpoints");
  for (std::uint32_t u = 0; u <= 0xffff; ++u) {
    const auto h = static_cast<std::uint16_t>(u);
    if ((h & 0x7fff) <= 0x7f80 && cuda::f32_to_bf16_rne(cuda::bf16_to_f32(h)) != h)
      bad.add("bf16 rne round trip " + hex(h));
    if ((h & 0x7fff) <= 0x7f80 && cuda::f32_to_bf16_round_away(cuda::bf16_to_f32(h)) != h)
      bad.add("bf16 round-away round trip " + hex(h));
    if ((h & 0x7fff) <= 0x7c00 && cuda::f32_to_fp16_rne(cuda::fp16_to_f32(h)) != h)
      bad.add("fp16 round trip " + hex(h));
    // Midpoints between h and h + 1 (same sign, both finite). fp32 holds them exactly.
    if ((h & 0x7fff) < 0x7f7f) {
      const auto next = static_cast<std::uint16_t>(h + 1);
      const float lo = cuda::bf16_to_f32(h),
                  mid = lo + (cuda::bf16_to_f32(next) - lo) * 0.5f;  // no overflow at the top
      const std::uint16_t even = (h & 1u) == 0 ? h : next;
      if (cuda::f32_to_bf16_rne(mid) != even) bad.add("bf16 rne midpoint above " + hex(h));
      if (cuda::f32_to_bf16_round_away(mid) != next) bad.add("bf16 round-away midpoint above " + hex(h));
    }
    if ((h & 0x7fff) < 0x7bff) {
      const auto next = static_cast<std::uint16_t>(h + 1);
      const float mid = (cuda::fp16_to_f32(h) + cuda::fp16_to_f32(next)) * 0.5f;
      const std::uint16_t even = (h & 1u) == 0 ? h : next;
      if (cuda::f32_to_fp16_rne(mid) != even)
        bad.add("fp16 midpoint above " + hex(h) + ": " + hex(cuda::f32_to_fp16_rne(mid)));
      // Just off the midpoint the rounding is no longer a tie.
      if (mid != 0.0f) {
        const float below = std::nextafter(mid, 0.0f), above = std::nextafter(mid, mid * 2.0f);
        if (cuda::f32_to_fp16_rne(below) != h) bad.add("fp16 just below midpoint above " + hex(h));
        if (cuda::f32_to_fp16_rne(above) != next) bad.add("fp16 just above midpoint above " + hex(h));
      }
    }
  }
}

void check_f32_to_half(float f, Mismatches& bad) {
  const std::uint16_t rne_gpu = cuda::f32_to_bf16_rne(f), rne_ref = numeric::f32_to_bf16_rne(f);
  const std::uint16_t away_gpu = cuda::f32_to_bf16_round_away(f), away_ref = numeric::f32_to_bf16_round_away(f);
  const std::uint16_t fp_gpu = cuda::f32_to_fp16_rne(f), fp_ref = numeric::f32_to_fp16_rne(f);
  if (rne_gpu != rne_ref)
    bad.add("f32_to_bf16_rne(" + describe(f) + "): gpu " + hex(rne_gpu) + " numeric " + hex(rne_ref));
  if (away_gpu != away_ref)
    bad.add("f32_to_bf16_round_away(" + describe(f) + "): gpu " + hex(away_gpu) + " numeric " + hex(away_ref));
  if (fp_gpu != fp_ref) bad.add("f32_to_fp16_rne(" + describe(f) + "): gpu " + hex(fp_gpu) + " numeric " + hex(fp_ref));
  if (cuda::f32_to_half_rne(true, f) != rne_ref) bad.add("f32_to_half_rne(bf16, " + describe(f) + ")");
  if (cuda::f32_to_half_rne(false, f) != fp_ref) bad.add("f32_to_half_rne(fp16, " + describe(f) + ")");
}

// Every sign / exponent / top-10 mantissa bit pattern (the upper 19 bits), with the low 13 bits (those
// fp16 drops in its normal range) set to zero, one ulp, just below / at / just above half, and all ones.
TEST_F(CudaRowMath, F32ToHalfUpperBitsExhaustive) {
  Mismatches bad("fp32 -> 16-bit (upper bits exhaustive)");
  constexpr std::uint32_t kLow[] = {0x0, 0x1, 0xfff, 0x1000, 0x1001, 0x1fff};
  for (std::uint32_t upper = 0; upper < (1u << 19); ++upper) {
    for (const std::uint32_t low : kLow) check_f32_to_half(from_bits((upper << 13) | low), bad);
  }
}

TEST_F(CudaRowMath, F32ToHalfRandom) {
  Mismatches bad("fp32 -> 16-bit (random)");
  std::mt19937 rng(20240611);
  for (int n = 0; n < 1'000'000; ++n) check_f32_to_half(from_bits(static_cast<std::uint32_t>(rng())), bad);
  // The bf16 rounding point sits in the low 16 bits: ties and near-ties there, with random upper bits.
  constexpr std::uint32_t kLow16[] = {0x0, 0x1, 0x7fff, 0x8000, 0x8001, 0xffff};
  for (int n = 0; n < 100'000; ++n) {
    const std::uint32_t upper = static_cast<std::uint32_t>(rng()) & 0xffff0000u;
    for (const std::uint32_t low : kLow16) check_f32_to_half(from_bits(upper | low), bad);
  }
}

TEST_F(CudaRowMath, F32ToHalfSpecials) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  const float below_65520 = std::nextafter(65520.0f, 0.0f);  // 65519.996
  const float above_2m25 = std::nextafter(0x1p-25f, 1.0f);   // 2^-25 * (1 + 2^-23)
  const std::vector<float> specials = {
      0.0f, -0.0f, kInf, -kInf, std::numeric_limits<float>::quiet_NaN(), -std::numeric_limits<float>::quiet_NaN(),
      from_bits(0x7f800001u), from_bits(0xff800001u), from_bits(0x7fffffffu), from_bits(0x7fc00000u),
      65504.0f, -65504.0f, 65520.0f, -65520.0f, 65519.99f, below_65520, 65505.0f, 65535.0f, 1e10f,
      0x1p-24f, -0x1p-24f, 0x1p-25f, -0x1p-25f, 0x1p-25f * 1.0000001f, above_2m25, std::nextafter(0x1p-25f, 0.0f),
      0x1p-14f, std::nextafter(0x1p-14f, 0.0f), 3 * 0x1p-25f, 5 * 0x1p-25f, 0x1p-26f,
      std::numeric_limits<float>::denorm_min(), -std::numeric_limits<float>::denorm_min(),
      std::numeric_limits<float>::min(), std::numeric_limits<float>::max(), -std::numeric_limits<float>::max(),
      from_bits(0x7f7f8000u), from_bits(0x7f7f7fffu), from_bits(0x7f7effffu), 1.0f, -1.0f,
      from_bits(0x3f808000u), from_bits(0x3f818000u), from_bits(0xbf808000u)};
  Mismatches bad("fp32 -> 16-bit (specials)");
  for (const float f : specials) check_f32_to_half(f, bad);

  // Expected values from IEEE 754 alone (not from either implementation).
  EXPECT_EQ(cuda::f32_to_fp16_rne(65504.0f), 0x7bff);
  EXPECT_EQ(cuda::f32_to_fp16_rne(65519.99f), 0x7bff);
  EXPECT_EQ(cuda::f32_to_fp16_rne(below_65520), 0x7bff);
  EXPECT_EQ(cuda::f32_to_fp16_rne(65520.0f), 0x7c00);  // the tie above the largest finite rounds to inf
  EXPECT_EQ(cuda::f32_to_fp16_rne(-65520.0f), 0xfc00);
  EXPECT_EQ(cuda::f32_to_fp16_rne(std::numeric_limits<float>::max()), 0x7c00);
  EXPECT_EQ(cuda::f32_to_fp16_rne(kInf), 0x7c00);
  EXPECT_EQ(cuda::f32_to_fp16_rne(-kInf), 0xfc00);
  EXPECT_EQ(cuda::f32_to_fp16_rne(std::numeric_limits<float>::quiet_NaN()), 0x7e00);
  EXPECT_EQ(cuda::f32_to_fp16_rne(from_bits(0xff800001u)), 0x7e00);
  EXPECT_EQ(cuda::f32_to_fp16_rne(0.0f), 0x0000);
  EXPECT_EQ(cuda::f32_to_fp16_rne(-0.0f), 0x8000);
  EXPECT_EQ(cuda::f32_to_fp16_rne(1.0f), 0x3c00);
  EXPECT_EQ(cuda::f32_to_fp16_rne(0x1p-14f), 0x0400);
  EXPECT_EQ(cuda::f32_to_fp16_rne(std::nextafter(0x1p-14f, 0.0f)), 0x0400);  // rounds up into the normals
  EXPECT_EQ(cuda::f32_to_fp16_rne(0x1p-24f), 0x0001);
  EXPECT_EQ(cuda::f32_to_fp16_rne(-0x1p-24f), 0x8001);
  EXPECT_EQ(cuda::f32_to_fp16_rne(0x1p-25f), 0x0000);  // tie between 0 and 2^-24: even is 0
  EXPECT_EQ(cuda::f32_to_fp16_rne(-0x1p-25f), 0x8000);
  EXPECT_EQ(cuda::f32_to_fp16_rne(above_2m25), 0x0001);
  EXPECT_EQ(cuda::f32_to_fp16_rne(0x1p-25f * 1.0000001f), 0x0001);
  EXPECT_EQ(cuda::f32_to_fp16_rne(3 * 0x1p-25f), 0x0002);  // 1.5 units: tie to 2
  EXPECT_EQ(cuda::f32_to_fp16_rne(5 * 0x1p-25f), 0x0002);  // 2.5 units: tie to 2
  EXPECT_EQ(cuda::f32_to_fp16_rne(0x1p-26f), 0x0000);
  EXPECT_EQ(cuda::f32_to_fp16_rne(std::numeric_limits<float>::denorm_min()), 0x0000);
  EXPECT_EQ(cuda::f32_to_fp16_rne(-std::numeric_limits<float>::denorm_min()), 0x8000);

  EXPECT_EQ(cuda::f32_to_bf16_rne(1.0f), 0x3f80);
  EXPECT_EQ(cuda::f32_to_bf16_rne(from_bits(0x3f808000u)), 0x3f80);  // tie, even below
  EXPECT_EQ(cuda::f32_to_bf16_rne(from_bits(0x3f818000u)), 0x3f82);  // tie, even above
  EXPECT_EQ(cuda::f32_to_bf16_rne(from_bits(0x3f808001u)), 0x3f81);
  EXPECT_EQ(cuda::f32_to_bf16_rne(std::numeric_limits<float>::max()), 0x7f80);
  EXPECT_EQ(cuda::f32_to_bf16_rne(from_bits(0x7f7f7fffu)), 0x7f7f);
  EXPECT_EQ(cuda::f32_to_bf16_rne(-kInf), 0xff80);
  EXPECT_EQ(cuda::f32_to_bf16_rne(-std::numeric_limits<float>::quiet_NaN()), 0x7fc0);
  EXPECT_EQ(cuda::f32_to_bf16_rne(from_bits(0x7f800001u)), 0x7fc0);
  EXPECT_EQ(cuda::f32_to_bf16_rne(-0.0f), 0x8000);
  EXPECT_EQ(cuda::f32_to_bf16_round_away(from_bits(0x3f808000u)), 0x3f81);
  EXPECT_EQ(cuda::f32_to_bf16_round_away(from_bits(0xbf808000u)), 0xbf81);
  EXPECT_EQ(cuda::f32_to_bf16_round_away(from_bits(0x3f807fffu)), 0x3f80);
  EXPECT_EQ(cuda::f32_to_bf16_round_away(from_bits(0x7f7f8000u)), 0x7f80);
  EXPECT_EQ(cuda::f32_to_bf16_round_away(std::numeric_limits<float>::quiet_NaN()), 0x7fc0);
}

TEST_F(CudaRowMath, RintToInt8) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  std::vector<float> inputs;
  for (int twice = -257; twice <= 255; ++twice) inputs.push_back(static_cast<float>(twice) * 0.5f);  // -128.5 .. 127.5
  for (int v = -300; v <= 300; ++v) inputs.push_back(static_cast<float>(v) + 0.25f);
  for (const float f : {128.0f, 128.5f, 129.0f, 200.0f, 1e9f, 3e38f, -129.0f, -128.49f, 127.49f, 127.51f, -128.51f,
                        -1e9f, -3e38f, 2147483648.0f, -2147483904.0f, 0.0f, -0.0f, 0.49999997f, -0.49999997f, 1e-45f,
                        kInf, -kInf, std::numeric_limits<float>::quiet_NaN(), -std::numeric_limits<float>::quiet_NaN(),
                        from_bits(0x7f800001u), from_bits(0xffffffffu)})
    inputs.push_back(f);
  Mismatches bad("rint_to_int8");
  for (const float f : inputs) {
    const int g = cuda::rint_to_int8(f), r = numeric::rint_to_int8(f);
    if (g != r) bad.add(describe(f) + ": gpu " + std::to_string(g) + " numeric " + std::to_string(r));
  }
  // Independent expectations: ties to even, saturation, NaN to 0.
  EXPECT_EQ(cuda::rint_to_int8(0.5f), 0);
  EXPECT_EQ(cuda::rint_to_int8(1.5f), 2);
  EXPECT_EQ(cuda::rint_to_int8(2.5f), 2);
  EXPECT_EQ(cuda::rint_to_int8(-0.5f), 0);
  EXPECT_EQ(cuda::rint_to_int8(-1.5f), -2);
  EXPECT_EQ(cuda::rint_to_int8(-2.5f), -2);
  EXPECT_EQ(cuda::rint_to_int8(126.5f), 126);
  EXPECT_EQ(cuda::rint_to_int8(127.5f), 127);
  EXPECT_EQ(cuda::rint_to_int8(-127.5f), -128);
  EXPECT_EQ(cuda::rint_to_int8(-128.5f), -128);
  EXPECT_EQ(cuda::rint_to_int8(1e9f), 127);
  EXPECT_EQ(cuda::rint_to_int8(-1e9f), -128);
  EXPECT_EQ(cuda::rint_to_int8(kInf), 127);
  EXPECT_EQ(cuda::rint_to_int8(-kInf), -128);
  EXPECT_EQ(cuda::rint_to_int8(std::numeric_limits<float>::quiet_NaN()), 0);
  EXPECT_EQ(cuda::rint_to_int8(-std::numeric_limits<float>::quiet_NaN()), 0);
}

// ---------------------------------------------------------------------------------------------
// Rows

constexpr std::int64_t kWidths[] = {1, 7, 8, 9, 64, 7168};
constexpr Half kTypes[] = {Half::bf16, Half::fp16};

enum class RowKind { normal, wide, zero, signed_zero, huge, tiny, one_hot, hostile };
constexpr RowKind kKinds[] = {RowKind::normal, RowKind::wide,    RowKind::zero,    RowKind::signed_zero,
                              RowKind::huge,   RowKind::tiny,    RowKind::one_hot, RowKind::hostile};
const char* kind_name(RowKind k) {
  switch (k) {
    case RowKind::normal: return "normal";
    case RowKind::wide: return "wide";
    case RowKind::zero: return "zero";
    case RowKind::signed_zero: return "signed_zero";
    case RowKind::huge: return "huge";
    case RowKind::tiny: return "tiny";
    case RowKind::one_hot: return "one_hot";
    case RowKind::hostile: return "hostile";
  }
  return "?";
}

std::vector<std::uint16_t> make_row(std::mt19937& rng, Half type, RowKind kind, std::int64_t h) {
  const bool bf16 = type == Half::bf16;
  std::vector<std::uint16_t> row(static_cast<std::size_t>(h), 0);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> wide_exp(bf16 ? -60 : -22, bf16 ? 60 : 14);
  std::uniform_int_distribution<std::uint32_t> bits(0, 0xffff);
  const auto sign = [&] { return static_cast<std::uint16_t>(bits(rng) & 0x8000u); };
  for (auto& x : row) {
    switch (kind) {
      case RowKind::normal: x = numeric::f32_to_half_rne(type, normal(rng)); break;
      case RowKind::wide: x = numeric::f32_to_half_rne(type, std::ldexp(normal(rng), wide_exp(rng))); break;
      case RowKind::zero: x = 0; break;
      case RowKind::signed_zero: x = sign(); break;
      case RowKind::huge:  // the top finite binade
        x = static_cast<std::uint16_t>(sign() | (bf16 ? 0x7f00u | (bits(rng) & 0x7fu) : 0x7800u | (bits(rng) & 0x3ffu)));
        break;
      case RowKind::tiny:  // subnormals and zeros
        x = static_cast<std::uint16_t>(bits(rng) & (bf16 ? 0x807fu : 0x83ffu));
        break;
      case RowKind::one_hot: x = 0; break;
      case RowKind::hostile: {
        const std::uint32_t pick = bits(rng) % 8;
        if (pick == 0) x = bf16 ? 0x7f80 : 0x7c00;                       // +inf
        else if (pick == 1) x = bf16 ? 0xff80 : 0xfc00;                  // -inf
        else if (pick == 2) x = static_cast<std::uint16_t>(bf16 ? 0x7fc1 : 0x7e01);  // NaN, odd payload
        else if (pick == 3) x = static_cast<std::uint16_t>(bits(rng));  // any pattern
        else x = numeric::f32_to_half_rne(type, std::ldexp(normal(rng), wide_exp(rng)));
        break;
      }
    }
  }
  if (kind == RowKind::one_hot) {
    std::uniform_int_distribution<std::int64_t> at(0, h - 1);
    row[static_cast<std::size_t>(at(rng))] = numeric::f32_to_half_rne(type, 1.0f + std::fabs(normal(rng)));
  }
  return row;
}

std::vector<float> make_smooth(std::mt19937& rng, std::int64_t h) {
  std::uniform_real_distribution<float> scale(0.25f, 4.0f);
  std::vector<float> s(static_cast<std::size_t>(h));
  for (auto& v : s) v = scale(rng);
  return s;
}

std::string where(Half type, RowKind kind, std::int64_t h, std::int64_t i) {
  return std::string(type == Half::bf16 ? "bf16" : "fp16") + " " + kind_name(kind) + " h=" + std::to_string(h) +
         " i=" + std::to_string(i);
}

// One row quantized as a kernel does it: per-element v, a max fold, ds, q, scale.
struct GpuQuant {
  std::vector<float> v;
  float amax = 0.0f;
  std::vector<std::int8_t> q;
  float scale = 0.0f;
};
GpuQuant gpu_quantize(bool bf16, const std::vector<std::uint16_t>& x, const float* smooth) {
  GpuQuant out;
  const auto h = static_cast<std::int64_t>(x.size());
  out.v.resize(x.size());
  for (std::int64_t i = 0; i < h; ++i) out.v[i] = cuda::quant_input(bf16, x[i], smooth, i);
  float amax = 0.0f;
  for (const float v : out.v) amax = cuda::max_ignoring_nan(amax, cuda::abs_f(v));
  out.amax = amax;
  const float ds = cuda::quant_ds(amax);
  out.q.resize(x.size());
  for (std::int64_t i = 0; i < h; ++i) out.q[i] = cuda::quantize(out.v[i], ds);
  out.scale = cuda::quant_scale_out(ds);
  return out;
}

TEST_F(CudaRowMath, QuantizeRowMatchesScalarKernelAndOracle) {
  std::mt19937 rng(7001);
  Mismatches bad("quantize");
  int rows = 0;
  for (const Half type : kTypes) {
    const bool bf16 = type == Half::bf16;
    for (const std::int64_t h : kWidths) {
      for (const RowKind kind : kKinds) {
        for (const bool with_smooth : {false, true}) {
          const std::vector<std::uint16_t> x = make_row(rng, type, kind, h);
          const std::vector<float> smooth_v = make_smooth(rng, h);
          const float* smooth = with_smooth ? smooth_v.data() : nullptr;
          const GpuQuant g = gpu_quantize(bf16, x, smooth);

          std::vector<std::int8_t> q_ref(static_cast<std::size_t>(h));
          std::vector<float> scratch(static_cast<std::size_t>(h));
          float scale_ref = -1.0f;
          kernels::quantize_row(x.data(), 1, type, smooth, h, q_ref.data(), &scale_ref, scratch.data());
          // The oracle's own quantization (make_row, quant_mode 2).
          const oracle::common::RowPayload oracle_row = oracle::common::make_payload(type, 2, x.data(), smooth, h);
          const std::vector<std::int8_t>& q_oracle = oracle_row.q;
          const float scale_oracle = oracle_row.dynamic_scale;
          ++rows;

          const std::string at = where(type, kind, h, -1) + (with_smooth ? " smooth" : "");
          if (fbits(g.scale) != fbits(scale_ref))
            bad.add(at + ": scale gpu " + describe(g.scale) + " kernel " + describe(scale_ref));
          if (fbits(g.scale) != fbits(scale_oracle))
            bad.add(at + ": scale gpu " + describe(g.scale) + " oracle " + describe(scale_oracle));
          for (std::int64_t i = 0; i < h; ++i) {
            if (g.q[i] != q_ref[i] || g.q[i] != q_oracle[i])
              bad.add(where(type, kind, h, i) + (with_smooth ? " smooth" : "") + ": x " + hex(x[i]) + " v " +
                      describe(g.v[i]) + " q gpu " + std::to_string(g.q[i]) + " kernel " + std::to_string(q_ref[i]) +
                      " oracle " + std::to_string(q_oracle[i]));
          }
          if (kind == RowKind::zero || kind == RowKind::signed_zero) {  // defined result of an all-zero row
            EXPECT_EQ(fbits(g.scale), 0u) << at;
            for (const std::int8_t qi : g.q) EXPECT_EQ(qi, 0) << at;
          }
        }
      }
    }
  }
  EXPECT_EQ(rows, 2 * 6 * 8 * 2);
}

// A GPU block folds the row in a different order (per-thread strided partial maxima, then a tree); the
// maximum of non-negative, NaN-free partials must not depend on it.
float amax_tree(const std::vector<float>& v, std::size_t threads) {
  std::vector<float> part(threads, 0.0f);
  for (std::size_t t = 0; t < threads; ++t)
    for (std::size_t i = t; i < v.size(); i += threads) part[t] = cuda::max_ignoring_nan(part[t], cuda::abs_f(v[i]));
  for (std::size_t s = threads / 2; s > 0; s /= 2)
    for (std::size_t t = 0; t < s; ++t) part[t] = cuda::max_ignoring_nan(part[t], part[t + s]);
  return part[0];
}

TEST_F(CudaRowMath, AmaxIsOrderIndependent) {
  std::mt19937 rng(7002);
  Mismatches bad("amax order");
  for (const Half type : kTypes) {
    const bool bf16 = type == Half::bf16;
    for (const std::int64_t h : kWidths) {
      for (const RowKind kind : kKinds) {
        for (const bool with_smooth : {false, true}) {
          const std::vector<std::uint16_t> x = make_row(rng, type, kind, h);
          const std::vector<float> smooth_v = make_smooth(rng, h);
          const GpuQuant g = gpu_quantize(bf16, x, with_smooth ? smooth_v.data() : nullptr);
          const std::string at = where(type, kind, h, -1) + (with_smooth ? " smooth" : "");

          float reversed = 0.0f;
          for (auto it = g.v.rbegin(); it != g.v.rend(); ++it)
            reversed = cuda::max_ignoring_nan(reversed, cuda::abs_f(*it));
          // Independent: the largest |v| among the non-NaN values (fmax ignores a NaN operand).
          float expected = 0.0f;
          for (const float v : g.v) expected = std::fmax(expected, std::fabs(v));
          if (fbits(reversed) != fbits(g.amax)) bad.add(at + ": reversed " + describe(reversed) + " sequential " + describe(g.amax));
          if (fbits(expected) != fbits(g.amax)) bad.add(at + ": fmax " + describe(expected) + " sequential " + describe(g.amax));
          for (const std::size_t threads : {std::size_t{2}, std::size_t{32}, std::size_t{256}, std::size_t{1024}}) {
            const float tree = amax_tree(g.v, threads);
            if (fbits(tree) != fbits(g.amax))
              bad.add(at + ": tree(" + std::to_string(threads) + ") " + describe(tree) + " sequential " + describe(g.amax));
          }
        }
      }
    }
  }
}

std::vector<float> make_weights(std::mt19937& rng, std::size_t k) {
  std::normal_distribution<float> normal(0.0f, 0.5f);
  std::uniform_int_distribution<int> pick(0, 9);
  std::vector<float> w(k);
  for (auto& x : w) {
    switch (pick(rng)) {
      case 0: x = 1.0f; break;
      case 1: x = 0.0f; break;
      case 2: x = -1.0f; break;
      case 3: x = 1e-30f; break;
      case 4: x = 3e30f; break;
      default: x = normal(rng); break;
    }
  }
  return w;
}

TEST_F(CudaRowMath, CombineMatchesScalarKernelsAndOracle) {
  std::mt19937 rng(7003);
  Mismatches bad("combine");
  for (const Half type : kTypes) {
    const bool bf16 = type == Half::bf16;
    for (const std::int64_t h : kWidths) {
      for (const RowKind kind : kKinds) {
        for (const std::size_t k : {std::size_t{1}, std::size_t{3}, std::size_t{8}}) {
          for (const bool shared : {false, true}) {
            // Each term's row is of this kind, mixed with normal rows so sums are not all of one magnitude.
            std::vector<std::vector<std::uint16_t>> y;
            for (std::size_t j = 0; j < k; ++j) y.push_back(make_row(rng, type, j % 2 == 0 ? kind : RowKind::normal, h));
            const std::vector<std::uint16_t> s_row = make_row(rng, type, kind, h);
            const std::vector<float> w = make_weights(rng, k);

            std::vector<float> acc_ref(static_cast<std::size_t>(h), 0.0f);
            for (std::size_t j = 0; j < k; ++j) kernels::accumulate_scaled(acc_ref.data(), y[j].data(), type, w[j], h);
            if (shared) kernels::accumulate(acc_ref.data(), s_row.data(), type, h);
            std::vector<std::uint16_t> out_ref(static_cast<std::size_t>(h), 0xdead);
            kernels::store_row(acc_ref.data(), type, h, out_ref.data(), 1);

            for (std::int64_t i = 0; i < h; ++i) {
              float acc = 0.0f, oracle = 0.0f;
              for (std::size_t j = 0; j < k; ++j) {
                acc = cuda::accumulate_weighted(acc, bf16, y[j][i], w[j]);
                const float weighted = numeric::half_to_f32(type, y[j][i]) * w[j];
                oracle = oracle + weighted;
              }
              if (shared) {
                acc = cuda::accumulate_unweighted(acc, bf16, s_row[i]);
                oracle = oracle + numeric::half_to_f32(type, s_row[i]);
              }
              const std::uint16_t out = cuda::f32_to_half_rne(bf16, acc);
              const std::uint16_t out_oracle = numeric::f32_to_half_rne(type, oracle);
              const std::string at = where(type, kind, h, i) + " k=" + std::to_string(k) + (shared ? " shared" : "");
              if (!same_f32(acc, acc_ref[i]) || !same_f32(acc, oracle))
                bad.add(at + ": acc gpu " + describe(acc) + " kernel " + describe(acc_ref[i]) + " oracle " + describe(oracle));
              if (out != out_ref[i] || out != out_oracle)
                bad.add(at + ": out gpu " + hex(out) + " kernel " + hex(out_ref[i]) + " oracle " + hex(out_oracle));
            }
          }
        }
      }
    }
  }
}

TEST_F(CudaRowMath, TpAddMatchesScalarKernelAndOracle) {
  std::mt19937 rng(7004);
  Mismatches bad("tp_add");
  for (const Half type : kTypes) {
    const bool bf16 = type == Half::bf16;
    for (const std::int64_t h : kWidths) {
      for (const RowKind kind : kKinds) {
        for (const RowKind other : {kind, RowKind::normal, RowKind::hostile}) {
          const std::vector<std::uint16_t> a = make_row(rng, type, kind, h);
          const std::vector<std::uint16_t> b = make_row(rng, type, other, h);
          // The kernel reads a with a column stride of 2 (as out of a wider buffer); b packed.
          std::vector<std::uint16_t> a_strided(static_cast<std::size_t>(2 * h), 0xffff);
          for (std::int64_t i = 0; i < h; ++i) a_strided[2 * i] = a[i];
          std::vector<std::uint16_t> out_ref(static_cast<std::size_t>(h), 0xdead);
          kernels::tp_reduce_row(a_strided.data(), 2, b.data(), type, h, out_ref.data());
          for (std::int64_t i = 0; i < h; ++i) {
            const std::uint16_t out = cuda::tp_add(bf16, a[i], b[i]);
            const float sum = numeric::half_to_f32(type, a[i]) + numeric::half_to_f32(type, b[i]);
            const std::uint16_t oracle = bf16 ? numeric::f32_to_bf16_round_away(sum) : numeric::f32_to_fp16_rne(sum);
            if (out != out_ref[i] || out != oracle)
              bad.add(where(type, kind, h, i) + ": a " + hex(a[i]) + " b " + hex(b[i]) + " gpu " + hex(out) + " kernel " +
                      hex(out_ref[i]) + " oracle " + hex(oracle));
          }
        }
      }
    }
  }
  // Independent: bf16 1 + 2^-8 (exactly half an ulp of 1.0 in bf16) rounds away to 0x3f81; fp16 1 + 2^-11
  // ties to even 0x3c00.
  EXPECT_EQ(cuda::tp_add(true, 0x3f80, 0x3b80), 0x3f81);   // 1 + 2^-8
  EXPECT_EQ(cuda::tp_add(true, 0xbf80, 0xbb80), 0xbf81);   // -(1 + 2^-8)
  EXPECT_EQ(cuda::tp_add(false, 0x3c00, 0x1000), 0x3c00);  // 1 + 2^-11
  EXPECT_EQ(cuda::tp_add(false, 0x3c01, 0x1000), 0x3c02);  // (1 + 2^-10) + 2^-11
}

// V2's TP add (V2 §3.8) rounds the sum half to even for bf16 too.
TEST_F(CudaRowMath, TpAddEvenMatchesScalarKernelAndOracle) {
  std::mt19937 rng(7005);
  Mismatches bad("tp_add_even");
  for (const Half type : kTypes) {
    const bool bf16 = type == Half::bf16;
    for (const std::int64_t h : kWidths) {
      for (const RowKind kind : kKinds) {
        const std::vector<std::uint16_t> a = make_row(rng, type, kind, h);
        const std::vector<std::uint16_t> b = make_row(rng, type, RowKind::normal, h);
        std::vector<std::uint16_t> out_ref(static_cast<std::size_t>(h), 0xdead);
        kernels::tp_reduce_row_even(a.data(), 1, b.data(), type, h, out_ref.data());
        for (std::int64_t i = 0; i < h; ++i) {
          const std::uint16_t out = cuda::tp_add_even(bf16, a[i], b[i]);
          const std::uint16_t oracle =
              numeric::f32_to_half_rne(type, numeric::half_to_f32(type, a[i]) + numeric::half_to_f32(type, b[i]));
          if (out != out_ref[i] || out != oracle)
            bad.add(where(type, kind, h, i) + ": gpu " + hex(out) + " kernel " + hex(out_ref[i]) + " oracle " +
                    hex(oracle));
        }
      }
    }
  }
  EXPECT_EQ(cuda::tp_add_even(true, 0x3f80, 0x3b80), 0x3f80);  // 1 + 2^-8 ties to even (V1: 0x3f81)
}

// The same float: the same bits, or both NaN (hostile rows make NaNs, whose payload depends on which
// operand of a commutative add the compiler puts first, not on the arithmetic).
bool same_float(float a, float b) { return fbits(a) == fbits(b) || (std::isnan(a) && std::isnan(b)); }

// The const expert (V2 §4.4): the dot products in increasing h, the softmax gate, and each element's
// term, against the CPU path's scalar kernels (dot_row, accumulate_const_expert) and the oracle's loop.
TEST_F(CudaRowMath, ConstExpertMatchesScalarKernelsAndOracle) {
  std::mt19937 rng(7006);
  Mismatches bad("const expert");
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (const Half type : kTypes) {
    const bool bf16 = type == Half::bf16;
    for (const std::int64_t h : kWidths) {
      for (const RowKind kind : kKinds) {
        const std::vector<std::uint16_t> x = make_row(rng, type, kind, h);
        const std::vector<std::uint16_t> a1 = make_row(rng, type, RowKind::normal, h),
                                         a2 = make_row(rng, type, kind, h);
        const std::vector<std::uint16_t> v = make_row(rng, type, RowKind::normal, h);
        float l1 = 0.0f, l2 = 0.0f;
        for (std::int64_t i = 0; i < h; ++i) {
          l1 = cuda::dot_step(l1, bf16, a1[static_cast<std::size_t>(i)], x[static_cast<std::size_t>(i)]);
          l2 = cuda::dot_step(l2, bf16, a2[static_cast<std::size_t>(i)], x[static_cast<std::size_t>(i)]);
        }
        const float k1 = kernels::dot_row(a1.data(), x.data(), type, h),
                    k2 = kernels::dot_row(a2.data(), x.data(), type, h);
        if (!same_float(l1, k1) || !same_float(l2, k2)) bad.add(where(type, kind, h, 0) + ": dot products differ");
        const cuda::ConstGate gate = cuda::const_gate(l1, l2);
        const float m = std::max(k1, k2), e1 = std::exp(k1 - m), e2 = std::exp(k2 - m);  // the oracle's, transcribed
        if (!same_float(gate.a1, e1 / (e1 + e2)) || !same_float(gate.a2, e2 / (e1 + e2)))
          bad.add(where(type, kind, h, 0) + ": gate differs");
        const float weight = normal(rng);
        std::vector<float> acc(static_cast<std::size_t>(h)), ref(static_cast<std::size_t>(h));
        for (std::int64_t i = 0; i < h; ++i)
          acc[static_cast<std::size_t>(i)] = ref[static_cast<std::size_t>(i)] = normal(rng);
        kernels::accumulate_const_expert(ref.data(), x.data(), v.data(), type, gate.a1, gate.a2, weight, h);
        for (std::int64_t i = 0; i < h; ++i) {
          const auto u = static_cast<std::size_t>(i);
          const float got = cuda::accumulate_const(acc[u], bf16, x[u], v[u], gate, weight);
          if (!same_float(got, ref[u]))
            bad.add(where(type, kind, h, i) + ": gpu " + hex(fbits(got)) + " kernel " + hex(fbits(ref[u])));
        }
      }
    }
  }
}

// The oracle's comm_quant_round_trip, transcribed: the row after quantization and dequantization.
std::vector<std::uint16_t> oracle_comm_round_trip(Half dtype, std::vector<std::uint16_t> row) {
  const auto h = static_cast<std::int64_t>(row.size());
  const float inv127 = 1.0f / 127.0f;
  for (std::int64_t begin = 0; begin < h; begin += 8) {
    const std::int64_t end = std::min<std::int64_t>(begin + 8, h);
    float group_max = 0.0f;
    for (std::int64_t i = begin; i < end; ++i) group_max = std::max(group_max, std::fabs(numeric::half_to_f32(dtype, row[i])));
    const float scale = group_max * inv127;
    const float received_scale = numeric::half_to_f32(dtype, numeric::f32_to_half_rne(dtype, scale));
    for (std::int64_t i = begin; i < end; ++i) {
      std::int8_t q = 0;
      if (scale != 0.0f) {
        const float ratio = numeric::half_to_f32(dtype, row[i]) / scale;
        q = numeric::rint_to_int8(numeric::fp16_to_f32(numeric::f32_to_fp16_rne(ratio)));
      }
      const float dequantized = static_cast<float>(q) * received_scale;
      row[i] = numeric::f32_to_half_rne(dtype, dequantized);
    }
  }
  return row;
}

TEST_F(CudaRowMath, CommQuantMatchesScalarKernelsAndOracle) {
  std::mt19937 rng(7005);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  Mismatches bad("comm quant");
  for (const Half type : kTypes) {
    const bool bf16 = type == Half::bf16;
    for (const std::int64_t h : kWidths) {
      for (const RowKind kind : kKinds) {
        const std::vector<std::uint16_t> y = make_row(rng, type, kind, h);
        const std::int64_t groups = (h + 7) / 8;
        const std::string at = where(type, kind, h, -1);

        // The kernel side: quantize in groups of 8 (the last shorter).
        std::vector<std::int8_t> q(static_cast<std::size_t>(h), 99);
        std::vector<std::uint16_t> scales(static_cast<std::size_t>(groups), 0xdead);
        for (std::int64_t g = 0; g < groups; ++g) {
          const std::int64_t g0 = g * cuda::kCommQuantGroup;
          const int n = static_cast<int>(std::min<std::int64_t>(cuda::kCommQuantGroup, h - g0));
          scales[g] = cuda::comm_quantize_group(bf16, y.data() + g0, n, q.data() + g0);
        }
        std::vector<std::int8_t> q_ref(static_cast<std::size_t>(h), 99);
        std::vector<std::uint16_t> scales_ref(static_cast<std::size_t>(groups), 0xbeef);
        kernels::comm_quantize_row(y.data(), 1, type, h, q_ref.data(), scales_ref.data());
        for (std::int64_t g = 0; g < groups; ++g)
          if (scales[g] != scales_ref[g])
            bad.add(at + " group " + std::to_string(g) + ": scale gpu " + hex(scales[g]) + " kernel " + hex(scales_ref[g]));
        for (std::int64_t i = 0; i < h; ++i)
          if (q[i] != q_ref[i])
            bad.add(where(type, kind, h, i) + ": y " + hex(y[i]) + " q gpu " + std::to_string(q[i]) + " kernel " +
                    std::to_string(q_ref[i]));

        // The receiver: dequantize, then a weighted and an unweighted accumulation onto random partial sums.
        const std::vector<std::uint16_t> y_oracle = oracle_comm_round_trip(type, y);
        std::vector<float> acc0(static_cast<std::size_t>(h));
        for (auto& a : acc0) a = normal(rng);
        const float s = make_weights(rng, 1)[0];
        std::vector<float> acc_w_ref = acc0, acc_u_ref = acc0;
        kernels::accumulate_scaled_comm_quant(acc_w_ref.data(), q_ref.data(), scales_ref.data(), type, s, h);
        kernels::accumulate_comm_quant(acc_u_ref.data(), q_ref.data(), scales_ref.data(), type, h);
        for (std::int64_t i = 0; i < h; ++i) {
          const std::uint16_t yd = cuda::comm_dequantize(bf16, q[i], scales[i / cuda::kCommQuantGroup]);
          if (yd != y_oracle[i])
            bad.add(where(type, kind, h, i) + ": y " + hex(y[i]) + " round trip gpu " + hex(yd) + " oracle " + hex(y_oracle[i]));
          const float acc_w = cuda::accumulate_weighted(acc0[i], bf16, yd, s);
          const float acc_u = cuda::accumulate_unweighted(acc0[i], bf16, yd);
          if (!same_f32(acc_w, acc_w_ref[i]))
            bad.add(where(type, kind, h, i) + ": weighted acc gpu " + describe(acc_w) + " kernel " + describe(acc_w_ref[i]));
          if (!same_f32(acc_u, acc_u_ref[i]))
            bad.add(where(type, kind, h, i) + ": unweighted acc gpu " + describe(acc_u) + " kernel " + describe(acc_u_ref[i]));
        }
      }
    }
  }
}

TEST_F(CudaRowMath, DequantizeMatchesScalarKernel) {
  std::mt19937 rng(7006);
  constexpr float kInf = std::numeric_limits<float>::infinity();
  std::vector<float> scales = {0.0f,   -0.0f, 1.0f,   1.0f / 127.0f, 1e-30f, std::numeric_limits<float>::denorm_min(),
                               3e38f,  1e36f, 516.0f, kInf,          -1.0f,  std::numeric_limits<float>::quiet_NaN()};
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  for (int n = 0; n < 20; ++n) scales.push_back(std::ldexp(u(rng), static_cast<int>(rng() % 80) - 60));
  // Scales with short mantissas, [1, 2) in bf16 and in fp16 steps: q * scale then lands on rounding ties.
  for (std::uint16_t m = 0; m < 128; ++m) scales.push_back(numeric::bf16_to_f32(static_cast<std::uint16_t>(0x3f80 + m)));
  for (std::uint16_t m = 0; m < 1024; ++m) scales.push_back(numeric::fp16_to_f32(static_cast<std::uint16_t>(0x3c00 + m)));
  Mismatches bad("dequantize");
  std::vector<std::int8_t> q(256);
  for (int v = -128; v <= 127; ++v) q[static_cast<std::size_t>(v + 128)] = static_cast<std::int8_t>(v);
  for (const Half type : kTypes) {
    const bool bf16 = type == Half::bf16;
    for (const float scale : scales) {
      std::vector<std::uint16_t> y_ref(q.size(), 0xdead);
      kernels::dequantize_row(q.data(), scale, type, static_cast<std::int64_t>(q.size()), y_ref.data());
      for (std::size_t i = 0; i < q.size(); ++i) {
        const std::uint16_t y = cuda::dequantize(bf16, q[i], scale);
        if (y != y_ref[i])
          bad.add(std::string(bf16 ? "bf16" : "fp16") + " q " + std::to_string(q[i]) + " scale " + describe(scale) + ": gpu " +
                  hex(y) + " kernel " + hex(y_ref[i]));
      }
    }
  }
  // Quantize then dequantize a row: the same on both sides, for every row width.
  for (const Half type : kTypes) {
    const bool bf16 = type == Half::bf16;
    for (const std::int64_t h : kWidths) {
      const std::vector<std::uint16_t> x = make_row(rng, type, RowKind::wide, h);
      const GpuQuant g = gpu_quantize(bf16, x, nullptr);
      std::vector<std::uint16_t> y_ref(static_cast<std::size_t>(h), 0xdead);
      kernels::dequantize_row(g.q.data(), g.scale, type, h, y_ref.data());
      for (std::int64_t i = 0; i < h; ++i)
        if (cuda::dequantize(bf16, g.q[i], g.scale) != y_ref[i])
          bad.add(where(type, RowKind::wide, h, i) + ": row round trip");
    }
  }
  // Independent: 127 * (1/127) rounds back to 1.0 in both formats, 0 * inf is a canonical NaN.
  EXPECT_EQ(cuda::dequantize(true, 127, 1.0f / 127.0f), 0x3f80);
  EXPECT_EQ(cuda::dequantize(false, 127, 1.0f / 127.0f), 0x3c00);
  EXPECT_EQ(cuda::dequantize(true, 0, kInf), 0x7fc0);
  EXPECT_EQ(cuda::dequantize(false, 0, kInf), 0x7e00);
  EXPECT_EQ(cuda::dequantize(false, -2, 65504.0f), 0xfc00);
}

}  // namespace
}  // namespace moedist
