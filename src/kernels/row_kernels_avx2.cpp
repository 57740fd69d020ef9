// AVX2 + F16C row kernels (compiled with -march=x86-64-v3; used only when the CPU has them). Bit-identical
// to the scalar kernels for the same reasons as the AVX-512 ones; tails shorter than 8 use the scalar code.
#include <immintrin.h>

#include <cmath>

#include "kernels/row_kernels_impl.h"

namespace moedist::kernels::avx2 {
namespace {

inline __m256 load_half(const std::uint16_t* p, Half type) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if (type == Half::bf16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
  return _mm256_cvtph_ps(raw);
}

inline __m256 abs_ps(__m256 v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v); }

inline __m128i pack_low16(__m256i r) {  // eight 32-bit lanes holding 16-bit values -> eight uint16
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

// NaN lanes become the canonical NaN of the format (numeric/convert.h).
inline __m128i canonical_nans(__m128i halves, __m256 v, Half type) {
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  if (_mm256_movemask_ps(nan) == 0) return halves;
  const __m128i nan16 = _mm_packs_epi32(_mm256_castsi256_si128(_mm256_castps_si256(nan)), _mm256_extracti128_si256(_mm256_castps_si256(nan), 1));
  const short canonical = static_cast<short>(type == Half::bf16 ? numeric::kBf16CanonicalNan : numeric::kFp16CanonicalNan);
  return _mm_blendv_epi8(halves, _mm_set1_epi16(canonical), nan16);
}

inline __m128i to_bf16(__m256 v, bool round_away) {
  const __m256i bits = _mm256_castps_si256(v);
  __m256i bias = _mm256_set1_epi32(0x8000);
  if (!round_away) bias = _mm256_add_epi32(_mm256_set1_epi32(0x7fff), _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1)));
  return canonical_nans(pack_low16(_mm256_srli_epi32(_mm256_add_epi32(bits, bias), 16)), v, Half::bf16);
}

inline __m128i to_fp16_rne(__m256 v) {
  return canonical_nans(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), v, Half::fp16);
}

inline __m128i to_half_rne(__m256 v, Half type) { return type == Half::bf16 ? to_bf16(v, false) : to_fp16_rne(v); }

inline __m256 smoothed(const std::uint16_t* x, const float* smooth, Half type, std::int64_t i) {
  const __m256 v = load_half(x + i, type);
  return smooth != nullptr ? _mm256_mul_ps(v, _mm256_loadu_ps(smooth + i)) : v;
}

void quantize_row(const std::uint16_t* x, Half type, const float* smooth, std::int64_t h, std::int8_t* q, float* scale,
                  float* scratch) {
  // Pass 1: max |v| with two independent maxima (exact in any order); pass 2 recomputes v from the row,
  // still in L1, rather than storing and reloading an fp32 copy.
  const std::int64_t full = h / 8 * 8;
  __m256 amax0 = _mm256_setzero_ps(), amax1 = _mm256_setzero_ps();
  __m256 unordered = _mm256_setzero_ps();
  std::int64_t i = 0;
  for (; i + 16 <= full; i += 16) {
    const __m256 v0 = smoothed(x, smooth, type, i), v1 = smoothed(x, smooth, type, i + 8);
    unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v0, v1, _CMP_UNORD_Q));
    amax0 = _mm256_max_ps(amax0, abs_ps(v0));
    amax1 = _mm256_max_ps(amax1, abs_ps(v1));
  }
  for (; i < full; i += 8) {
    const __m256 v = smoothed(x, smooth, type, i);
    unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    amax0 = _mm256_max_ps(amax0, abs_ps(v));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_max_ps(amax0, amax1));
  float amax_s = 0.0f;
  for (float lane : lanes) amax_s = std::max(amax_s, lane);
  bool has_nan = _mm256_movemask_ps(unordered) != 0;
  for (i = full; i < h; ++i) {
    float v = numeric::half_to_f32(type, x[i]);
    if (smooth != nullptr) v = v * smooth[i];
    has_nan = has_nan || std::isnan(v);
    amax_s = std::max(amax_s, std::fabs(v));
  }
  const float ds = 127.0f / amax_s;
  if (has_nan || !std::isfinite(amax_s) || !std::isfinite(ds)) {  // the scalar kernel defines these rows
    scalar::quantize_row(x, 1, type, smooth, h, q, scale, scratch);
    return;
  }
  const __m256 vds = _mm256_set1_ps(ds);
  for (i = 0; i < full; i += 8) {
    const __m256i r = _mm256_cvtps_epi32(_mm256_mul_ps(smoothed(x, smooth, type, i), vds));
    const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + i), _mm_packs_epi16(w16, w16));
  }
  for (i = full; i < h; ++i) {
    float v = numeric::half_to_f32(type, x[i]);
    if (smooth != nullptr) v = v * smooth[i];
    q[i] = numeric::rint_to_int8(v * ds);
  }
  *scale = 1.0f / ds;
}

void accumulate_scaled(float* acc, const std::uint16_t* y, Half type, float s, std::int64_t h) {
  const std::int64_t full = h / 8 * 8;
  const __m256 vs = _mm256_set1_ps(s);
  for (std::int64_t i = 0; i < full; i += 8) {
    _mm256_storeu_ps(acc + i, _mm256_add_ps(_mm256_loadu_ps(acc + i), _mm256_mul_ps(load_half(y + i, type), vs)));
  }
  scalar::accumulate_scaled(acc + full, y + full, type, s, h - full);
}

void accumulate(float* acc, const std::uint16_t* y, Half type, std::int64_t h) {
  const std::int64_t full = h / 8 * 8;
  for (std::int64_t i = 0; i < full; i += 8) {
    _mm256_storeu_ps(acc + i, _mm256_add_ps(_mm256_loadu_ps(acc + i), load_half(y + i, type)));
  }
  scalar::accumulate(acc + full, y + full, type, h - full);
}

void store_row(const float* acc, Half type, std::int64_t h, std::uint16_t* out) {
  const std::int64_t full = h / 8 * 8;
  for (std::int64_t i = 0; i < full; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), to_half_rne(_mm256_loadu_ps(acc + i), type));
  }
  scalar::store_row(acc + full, type, h - full, out + full, 1);
}

void tp_reduce_row(const std::uint16_t* a, const std::uint16_t* b, Half type, std::int64_t h, std::uint16_t* out) {
  const std::int64_t full = h / 8 * 8;
  for (std::int64_t i = 0; i < full; i += 8) {
    const __m256 sum = _mm256_add_ps(load_half(a + i, type), load_half(b + i, type));
    const __m128i r = type == Half::bf16 ? to_bf16(sum, true) : to_fp16_rne(sum);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), r);
  }
  scalar::tp_reduce_row(a + full, 1, b + full, type, h - full, out + full);
}

// bf16 rounded half to even, left in the upper 16 bits of each 32-bit lane (the lower ones zero); NaN
// lanes become the canonical NaN.
inline __m256i bf16_in_upper_half(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_and_si256(_mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)),
                                           _mm256_set1_epi32(static_cast<int>(0xffff0000u)));
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  const __m256i canonical = _mm256_set1_epi32(static_cast<int>(std::uint32_t{numeric::kBf16CanonicalNan} << 16));
  return _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(rounded), _mm256_castsi256_ps(canonical), nan));
}

// bf16 rows: 16 elements of a row are one 256-bit load whose 32-bit lanes hold an even element in
// their lower half and an odd one in the upper half, so masking and shifting give the odd and the even
// elements as fp32 without any shuffle; the two sums are rounded into their halves and merged back in
// element order.
void reduce_terms_bf16(const ReduceTerm* terms, std::size_t n, std::int64_t h, std::uint16_t* out) {
  const __m256i upper = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  std::int64_t i = 0;
  for (; i + 32 <= h; i += 32) {
    __m256 even0 = _mm256_setzero_ps(), odd0 = _mm256_setzero_ps(), even1 = _mm256_setzero_ps(),
           odd1 = _mm256_setzero_ps();
    for (std::size_t t = 0; t < n; ++t) {
      const __m256i r0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(terms[t].row + i));
      const __m256i r1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(terms[t].row + i + 16));
      __m256 e0 = _mm256_castsi256_ps(_mm256_slli_epi32(r0, 16)), o0 = _mm256_castsi256_ps(_mm256_and_si256(r0, upper));
      __m256 e1 = _mm256_castsi256_ps(_mm256_slli_epi32(r1, 16)), o1 = _mm256_castsi256_ps(_mm256_and_si256(r1, upper));
      if (terms[t].weighted) {
        const __m256 s = _mm256_set1_ps(terms[t].weight);
        e0 = _mm256_mul_ps(e0, s);
        o0 = _mm256_mul_ps(o0, s);
        e1 = _mm256_mul_ps(e1, s);
        o1 = _mm256_mul_ps(o1, s);
      }
      even0 = _mm256_add_ps(even0, e0);
      odd0 = _mm256_add_ps(odd0, o0);
      even1 = _mm256_add_ps(even1, e1);
      odd1 = _mm256_add_ps(odd1, o1);
    }
    const __m256i merged0 = _mm256_or_si256(_mm256_srli_epi32(bf16_in_upper_half(even0), 16), bf16_in_upper_half(odd0));
    const __m256i merged1 = _mm256_or_si256(_mm256_srli_epi32(bf16_in_upper_half(even1), 16), bf16_in_upper_half(odd1));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), merged0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i + 16), merged1);
  }
  scalar::reduce_terms(terms, n, Half::bf16, i, h, out, 1);
}

// Four vectors of 8 elements at a time, their sums in registers across all the terms.
void reduce_terms(const ReduceTerm* terms, std::size_t n, Half type, std::int64_t h, std::uint16_t* out) {
  if (type == Half::bf16) {
    reduce_terms_bf16(terms, n, h, out);
    return;
  }
  std::int64_t i = 0;
  for (; i + 32 <= h; i += 32) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (std::size_t t = 0; t < n; ++t) {
      const std::uint16_t* y = terms[t].row + i;
      __m256 v0 = load_half(y, type), v1 = load_half(y + 8, type), v2 = load_half(y + 16, type),
             v3 = load_half(y + 24, type);
      if (terms[t].weighted) {
        const __m256 s = _mm256_set1_ps(terms[t].weight);
        v0 = _mm256_mul_ps(v0, s);
        v1 = _mm256_mul_ps(v1, s);
        v2 = _mm256_mul_ps(v2, s);
        v3 = _mm256_mul_ps(v3, s);
      }
      a0 = _mm256_add_ps(a0, v0);
      a1 = _mm256_add_ps(a1, v1);
      a2 = _mm256_add_ps(a2, v2);
      a3 = _mm256_add_ps(a3, v3);
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), to_half_rne(a0, type));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i + 8), to_half_rne(a1, type));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i + 16), to_half_rne(a2, type));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i + 24), to_half_rne(a3, type));
  }
  scalar::reduce_terms(terms, n, type, i, h, out, 1);
}

}  // namespace

const RowKernelTable kTable{Isa::avx2, quantize_row,  accumulate_scaled, accumulate,
                            store_row, tp_reduce_row, reduce_terms};

}  // namespace moedist::kernels::avx2
