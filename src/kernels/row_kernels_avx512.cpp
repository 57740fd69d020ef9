// AVX-512 row kernels (compiled with -march=x86-64-v4 -mavx512bf16; used only when the CPU has them).
// Every operation is the scalar kernel's IEEE operation on 16 lanes, so results are bit-identical:
// no FMA, conversions that are exact or round to nearest even, and a scalar fallback for the inputs
// where an instruction's edge behaviour differs (NaN/inf rows in quantization, fp32 subnormals in the
// bf16 conversion instruction, which flushes them).
#include <immintrin.h>

#include <cmath>

#include "kernels/row_kernels_impl.h"

namespace moedist::kernels::avx512 {
namespace {

inline __mmask16 tail_mask(std::int64_t n) { return n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1u); }

inline __m512 load_half(const std::uint16_t* p, Half type, __mmask16 m) {
  const __m256i raw = _mm256_maskz_loadu_epi16(m, p);
  if (type == Half::bf16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  return _mm512_cvtph_ps(raw);
}

// NaN lanes become the canonical NaN of the format (numeric/convert.h).
inline __m256i canonical_nans(__m256i halves, __m512 v, Half type) {
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  if (nan == 0) return halves;
  const short canonical = static_cast<short>(type == Half::bf16 ? numeric::kBf16CanonicalNan : numeric::kFp16CanonicalNan);
  return _mm256_mask_mov_epi16(halves, nan, _mm256_set1_epi16(canonical));
}

// fp32 -> bf16, round half to even. The avx512_bf16 instruction is exact for normal numbers, zeros and
// infinities; it flushes fp32 subnormals, so a vector holding one takes the integer path.
inline __m256i to_bf16_rne(__m512 v) {
  const __m512 magnitude = _mm512_abs_ps(v);
  const __mmask16 subnormal = _mm512_cmp_ps_mask(magnitude, _mm512_set1_ps(0x1p-126f), _CMP_LT_OQ) &
                              _mm512_cmp_ps_mask(magnitude, _mm512_setzero_ps(), _CMP_NEQ_OQ);
  if (subnormal == 0) return canonical_nans(reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)), v, Half::bf16);
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb)), 16);
  return canonical_nans(_mm512_cvtepi32_epi16(r), v, Half::bf16);
}

// fp32 -> bf16, round half away from zero (the V1 TP reduce).
inline __m256i to_bf16_round_away(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x8000)), 16);
  return canonical_nans(_mm512_cvtepi32_epi16(r), v, Half::bf16);
}

inline __m256i to_fp16_rne(__m512 v) {
  return canonical_nans(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), v, Half::fp16);
}

inline __m256i to_half_rne(__m512 v, Half type) { return type == Half::bf16 ? to_bf16_rne(v) : to_fp16_rne(v); }

void quantize_row(const std::uint16_t* x, Half type, const float* smooth, std::int64_t h, std::int8_t* q, float* scale,
                  float* scratch) {
  __m512 amax = _mm512_setzero_ps();
  __mmask16 unordered = 0;
  for (std::int64_t i = 0; i < h; i += 16) {
    const __mmask16 m = tail_mask(h - i);
    __m512 v = load_half(x + i, type, m);
    if (smooth != nullptr) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, smooth + i));
    _mm512_mask_storeu_ps(scratch + i, m, v);
    unordered |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    amax = _mm512_max_ps(amax, _mm512_abs_ps(v));  // masked-off lanes are 0 and do not change the max
  }
  const float amax_s = _mm512_reduce_max_ps(amax);
  const float ds = 127.0f / amax_s;
  // NaN or inf inputs, all-zero rows and subnormal maxima make ds or v * ds non-finite; the scalar
  // kernel defines those cases (NaN -> 0, saturation), so let it handle the row.
  if (unordered != 0 || !std::isfinite(amax_s) || !std::isfinite(ds)) {
    scalar::quantize_row(x, 1, type, smooth, h, q, scale, scratch);
    return;
  }
  const __m512 vds = _mm512_set1_ps(ds);
  for (std::int64_t i = 0; i < h; i += 16) {
    const __mmask16 m = tail_mask(h - i);
    const __m512 w = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, scratch + i), vds);
    const __m512i r = _mm512_cvtps_epi32(w);  // MXCSR default: round half to even, |w| <= 127 so no overflow
    _mm_mask_storeu_epi8(q + i, m, _mm512_cvtsepi32_epi8(r));
  }
  *scale = 1.0f / ds;
}

void accumulate_scaled(float* acc, const std::uint16_t* y, Half type, float s, std::int64_t h) {
  const __m512 vs = _mm512_set1_ps(s);
  for (std::int64_t i = 0; i < h; i += 16) {
    const __mmask16 m = tail_mask(h - i);
    const __m512 p = _mm512_mul_ps(load_half(y + i, type, m), vs);
    _mm512_mask_storeu_ps(acc + i, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, acc + i), p));
  }
}

void accumulate(float* acc, const std::uint16_t* y, Half type, std::int64_t h) {
  for (std::int64_t i = 0; i < h; i += 16) {
    const __mmask16 m = tail_mask(h - i);
    _mm512_mask_storeu_ps(acc + i, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, acc + i), load_half(y + i, type, m)));
  }
}

void store_row(const float* acc, Half type, std::int64_t h, std::uint16_t* out) {
  for (std::int64_t i = 0; i < h; i += 16) {
    const __mmask16 m = tail_mask(h - i);
    _mm256_mask_storeu_epi16(out + i, m, to_half_rne(_mm512_maskz_loadu_ps(m, acc + i), type));
  }
}

void tp_reduce_row(const std::uint16_t* a, const std::uint16_t* b, Half type, std::int64_t h, std::uint16_t* out) {
  for (std::int64_t i = 0; i < h; i += 16) {
    const __mmask16 m = tail_mask(h - i);
    const __m512 sum = _mm512_add_ps(load_half(a + i, type, m), load_half(b + i, type, m));
    const __m256i r = type == Half::bf16 ? to_bf16_round_away(sum) : to_fp16_rne(sum);
    _mm256_mask_storeu_epi16(out + i, m, r);
  }
}

}  // namespace

const RowKernelTable kTable{Isa::avx512, quantize_row, accumulate_scaled, accumulate, store_row, tp_reduce_row};

}  // namespace moedist::kernels::avx512
