// Row kernels: the per-row arithmetic of dispatch and combine, bit-exact to the contract
// (§2.2 quantization, §4.2 weighted reduce, §4.4 TP reduce, §4.5 communication quantization).
// Rows of 16-bit floats are passed as raw bits with their format (numeric::Half).
//
// Each kernel has a scalar variant (the reference) and, where it pays, AVX2 and AVX-512 variants
// (avx512_bf16 where present) that give bit-identical results. The best variant the CPU supports is
// chosen once at run time; MOEDIST_KERNELS=scalar|avx2|avx512 or force_isa() overrides the choice.
#pragma once

#include <cstddef>
#include <cstdint>

#include "numeric/convert.h"

namespace moedist::kernels {

using numeric::Half;

enum class Isa : std::uint8_t { scalar, avx2, avx512 };
const char* isa_name(Isa isa) noexcept;
bool isa_supported(Isa isa) noexcept;
Isa active_isa() noexcept;
// Selects the variants to use from now on (tests and benchmarks); returns false if the CPU lacks it.
bool force_isa(Isa isa) noexcept;

// Copies h 16-bit elements read with col_stride (elements) into a packed row.
void copy_row16(const std::uint16_t* src, std::int64_t col_stride, std::int64_t h, std::uint16_t* dst);

// Dynamic per-token int8 quantization (§2.2): v = float(x) [* smooth], amax = max|v|, ds = 127/amax,
// q = rint(v * ds), *scale = 1/ds. scratch holds h floats.
void quantize_row(const std::uint16_t* x, std::int64_t col_stride, Half type, const float* smooth, std::int64_t h,
                  std::int8_t* q, float* scale, float* scratch);

// Identity-expert dequantization: y = to_T_rint(fl32(float(q) * scale)).
void dequantize_row(const std::int8_t* q, float scale, Half type, std::int64_t h, std::uint16_t* y);

// acc[i] = fl32(acc[i] + fl32(float(y[i]) * s)): one weighted term of §4.2 (no fused multiply-add).
void accumulate_scaled(float* acc, const std::uint16_t* y, Half type, float s, std::int64_t h);
// acc[i] = fl32(acc[i] + float(y[i])): the unweighted shared-expert term of §4.2.
void accumulate(float* acc, const std::uint16_t* y, Half type, std::int64_t h);
// out[i] = to_T_rint(acc[i]), written with col_stride (elements).
void store_row(const float* acc, Half type, std::int64_t h, std::uint16_t* out, std::int64_t col_stride);

// One term of a token's weighted reduce (§4.2): a contiguous row of expert output and its weight.
struct ReduceTerm {
  const std::uint16_t* row;
  float weight;   // the term's expert_scales entry where weighted
  bool weighted;  // false: the shared expert's unweighted term
};
// A token's whole output row from its n terms (§4.2): per element, acc = 0, then term by term in the
// given order acc = fl32(acc + fl32(float(y[i]) * s)) (fl32(acc + float(y[i])) unweighted), and
// out[i] = to_T_rint(acc), written with col_stride (elements). The same bits as accumulate_scaled /
// accumulate into a zeroed accumulator and store_row; the vector variants keep the sums in registers
// across the terms, so no accumulator goes through memory once per term.
void reduce_terms(const ReduceTerm* terms, std::size_t n, Half type, std::int64_t h, std::uint16_t* out,
                  std::int64_t col_stride);

// TP reduce of two partial rows (§4.4, V1): bf16 rounds the fp32 sum half away from zero, fp16 to even.
void tp_reduce_row(const std::uint16_t* a, std::int64_t a_col_stride, const std::uint16_t* b, Half type,
                   std::int64_t h, std::uint16_t* out);

// Communication quantization of an expert-output row (§4.5): groups of 8 elements, each with scale
// sc = fl32(m * fl32(1/127)) sent as to_T_rint(sc); q = rint(to_fp16_rint(fl32(y / sc))); q = 0 where sc == 0.
// group_scales has ceil(h / 8) entries.
void comm_quantize_row(const std::uint16_t* y, std::int64_t col_stride, Half type, std::int64_t h, std::int8_t* q,
                       std::uint16_t* group_scales);
// Receiver side: y'[i] = to_T_rint(fl32(float(q[i]) * float(sc_T))) added with weight s:
// acc[i] = fl32(acc[i] + fl32(float(y'[i]) * s)).
void accumulate_scaled_comm_quant(float* acc, const std::int8_t* q, const std::uint16_t* group_scales, Half type,
                                  float s, std::int64_t h);
// The same with weight 1 (shared expert): acc[i] = fl32(acc[i] + float(y'[i])).
void accumulate_comm_quant(float* acc, const std::int8_t* q, const std::uint16_t* group_scales, Half type,
                           std::int64_t h);

// TP reduce of the V2 operators (V1 §4.4): out[i] = to_T_rint(fl32(a[i] + b[i])), half to even for
// bf16 too (one variant, the scalar one).
void tp_reduce_row_even(const std::uint16_t* a, std::int64_t a_col_stride, const std::uint16_t* b, Half type,
                        std::int64_t h, std::uint16_t* out);

// The V2 const expert (V2 §4.4; one variant, the scalar one). dot_row: l = sum over i = 0..h-1, in
// increasing i, of fl32(float(a[i]) * float(b[i])), one fp32 add at a time from 0 (moedist's fixed order).
float dot_row(const std::uint16_t* a, const std::uint16_t* b, Half type, std::int64_t h);
// Its term of combine: acc[i] = fl32(acc[i] + fl32(fl32(fl32(float(x[i]) * a1) + fl32(float(v[i]) * a2)) * s)).
void accumulate_const_expert(float* acc, const std::uint16_t* x, const std::uint16_t* v, Half type, float a1, float a2,
                             float s, std::int64_t h);

}  // namespace moedist::kernels
