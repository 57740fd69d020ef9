// AVX-512 row kernels (compiled with -march=x86-64-v4 -mavx512bf16; used only when the CPU has them).
// Every operation is the scalar kernel's IEEE operation on 16 lanes, so results are bit-identical:
// no FMA, conversions that are exact or round to nearest even, and a scalar fallback for the inputs
// where an instruction's edge behaviour differs (NaN/inf rows in quantization, fp32 subnormals in the
// bf16 conversion instruction, which flushes them).
#include <immintrin.h>

#include <bit>
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

// v = float(x) [* smooth] for 16 lanes; the same operations in both passes give the same bits.
inline __m512 smoothed(const std::uint16_t* x, const float* smooth, Half type, std::int64_t i, __mmask16 m) {
  const __m512 v = load_half(x + i, type, m);
  return smooth != nullptr ? _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, smooth + i)) : v;
}

void quantize_row(const std::uint16_t* x, Half type, const float* smooth, std::int64_t h, std::int8_t* q, float* scale,
                  float* scratch) {
  // Pass 1: max |v| as the unsigned maximum of |v|'s bit patterns: for non-negative floats the bit order
  // is the value order, and every NaN pattern lies above infinity, so one integer max gives the maximum
  // and reveals a NaN at once. Four independent maxima (max is exact in any order). Pass 2 recomputes v
  // from the row, still in L1, instead of storing and reloading an fp32 copy.
  const __m512i magnitude_mask = _mm512_set1_epi32(0x7fffffff);
  __m512i amax0 = _mm512_setzero_si512(), amax1 = _mm512_setzero_si512(), amax2 = _mm512_setzero_si512(),
          amax3 = _mm512_setzero_si512();
  const auto magnitude_bits = [&](__m512 v) { return _mm512_and_si512(_mm512_castps_si512(v), magnitude_mask); };
  std::int64_t i = 0;
  for (; i + 64 <= h; i += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(q + i), _MM_HINT_ET0);  // own the output line before pass 2 writes it
    amax0 = _mm512_max_epu32(amax0, magnitude_bits(smoothed(x, smooth, type, i, 0xffff)));
    amax1 = _mm512_max_epu32(amax1, magnitude_bits(smoothed(x, smooth, type, i + 16, 0xffff)));
    amax2 = _mm512_max_epu32(amax2, magnitude_bits(smoothed(x, smooth, type, i + 32, 0xffff)));
    amax3 = _mm512_max_epu32(amax3, magnitude_bits(smoothed(x, smooth, type, i + 48, 0xffff)));
  }
  for (; i < h; i += 16) {  // masked-off lanes are 0 and do not change the max
    amax0 = _mm512_max_epu32(amax0, magnitude_bits(smoothed(x, smooth, type, i, tail_mask(h - i))));
  }
  const std::uint32_t amax_bits = _mm512_reduce_max_epu32(_mm512_max_epu32(_mm512_max_epu32(amax0, amax1), _mm512_max_epu32(amax2, amax3)));
  const float amax_s = std::bit_cast<float>(amax_bits);
  const float ds = 127.0f / amax_s;
  // NaN or inf inputs (bits >= 0x7f800000), all-zero rows and subnormal maxima make ds or v * ds
  // non-finite; the scalar kernel defines those cases (NaN -> 0, saturation), so let it handle the row.
  if (amax_bits >= 0x7f800000u || !std::isfinite(ds)) {
    scalar::quantize_row(x, 1, type, smooth, h, q, scale, scratch);
    return;
  }
  const __m512 vds = _mm512_set1_ps(ds);
  // While this pass computes from L1, pull in the next row (rows of x are usually adjacent), so that
  // the next call's first pass does not wait on memory. A prefetch never faults.
  const char* next_row = reinterpret_cast<const char*>(x + h);
  for (i = 0; i < h; i += 16) {
    const __mmask16 m = tail_mask(h - i);
    if ((i & 31) == 0) _mm_prefetch(next_row + 2 * i, _MM_HINT_T0);
    const __m512 w = _mm512_mul_ps(smoothed(x, smooth, type, i, m), vds);
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

// Four vectors of 16 elements at a time, their sums in registers across all the terms; the tail one
// masked vector at a time.
void reduce_terms(const ReduceTerm* terms, std::size_t n, Half type, std::int64_t h, std::uint16_t* out) {
  std::int64_t i = 0;
  for (; i + 64 <= h; i += 64) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    for (std::size_t t = 0; t < n; ++t) {
      const std::uint16_t* y = terms[t].row + i;
      __m512 v0 = load_half(y, type, 0xffff), v1 = load_half(y + 16, type, 0xffff),
             v2 = load_half(y + 32, type, 0xffff), v3 = load_half(y + 48, type, 0xffff);
      if (terms[t].weighted) {
        const __m512 s = _mm512_set1_ps(terms[t].weight);
        v0 = _mm512_mul_ps(v0, s);
        v1 = _mm512_mul_ps(v1, s);
        v2 = _mm512_mul_ps(v2, s);
        v3 = _mm512_mul_ps(v3, s);
      }
      a0 = _mm512_add_ps(a0, v0);
      a1 = _mm512_add_ps(a1, v1);
      a2 = _mm512_add_ps(a2, v2);
      a3 = _mm512_add_ps(a3, v3);
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), to_half_rne(a0, type));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i + 16), to_half_rne(a1, type));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i + 32), to_half_rne(a2, type));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i + 48), to_half_rne(a3, type));
  }
  for (; i < h; i += 16) {
    const __mmask16 m = tail_mask(h - i);
    __m512 a = _mm512_setzero_ps();
    for (std::size_t t = 0; t < n; ++t) {
      const __m512 v = load_half(terms[t].row + i, type, m);
      a = _mm512_add_ps(a, terms[t].weighted ? _mm512_mul_ps(v, _mm512_set1_ps(terms[t].weight)) : v);
    }
    _mm256_mask_storeu_epi16(out + i, m, to_half_rne(a, type));
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

const RowKernelTable kTable{Isa::avx512, quantize_row,  accumulate_scaled, accumulate,
                            store_row,   tp_reduce_row, reduce_terms};

}  // namespace moedist::kernels::avx512
