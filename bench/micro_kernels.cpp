// moedist_micro_bench: Google Benchmark micro-benchmarks of the row kernels (src/kernels/row_kernels.h), one per
// ISA variant the CPU supports (kernels::force_isa), each next to a memcpy that moves the same bytes.
//
// Bytes processed = bytes read + bytes written of the buffers a benchmark walks (a row reused from L1 — the fp32
// accumulator of the weighted reduce, the smooth-scale row of quantize — is not counted). BM_Memcpy/same_as:X
// copies half of X's bytes (read once, written once) and reports the same bytes processed, so bytes_per_second
// of X over that of its memcpy is the kernel's speed relative to plain copying.
// Working set: 256 rows of H = 7168 (3.5 MiB of bf16), larger than L2 and inside a typical L3. Quantize is also
// measured streaming from memory: 8192 rows (112 MiB of bf16 in, 56 MiB of int8 out), beyond any L3, which is
// where dispatch of a large batch runs.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels/row_kernels.h"
#include "numeric/convert.h"

namespace {

using moedist::kernels::Isa;
using moedist::numeric::Half;

constexpr std::int64_t kH = 7168;
constexpr std::int64_t kRows = 256;
constexpr std::int64_t kStreamRows = 8192;
constexpr int kTopK = 8;

const char* half_name(Half h) { return h == Half::fp16 ? "fp16" : "bf16"; }

std::vector<std::uint16_t> random_rows(Half type, std::int64_t rows) {
  std::mt19937 g(7);
  std::uniform_real_distribution<float> value(-2.0f, 2.0f);
  std::vector<std::uint16_t> out(static_cast<std::size_t>(rows * kH));
  for (std::uint16_t& v : out) v = moedist::numeric::f32_to_half_rne(type, value(g));
  return out;
}

std::vector<float> random_floats(std::size_t n, float lo, float hi) {
  std::mt19937 g(11);
  std::uniform_real_distribution<float> value(lo, hi);
  std::vector<float> out(n);
  for (float& v : out) v = value(g);
  return out;
}

void select(benchmark::State& state, Isa isa) {
  if (!moedist::kernels::force_isa(isa)) state.SkipWithError("the CPU lacks this ISA");
}

void finish(benchmark::State& state, std::int64_t bytes_per_iteration, std::int64_t rows_per_iteration) {
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * bytes_per_iteration);
  if (rows_per_iteration > 0) state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()) * rows_per_iteration);
}

// ---- the kernels ----

// Dispatch's per-(token, expert) dynamic int8 quantization with smooth scales: reads a 16-bit row, writes int8
// and one fp32 scale.
std::int64_t quantize_bytes(std::int64_t rows = kRows) { return rows * (2 * kH + kH + 4); }
void BM_Quantize(benchmark::State& state, Isa isa, Half type, std::int64_t rows) {
  select(state, isa);
  const std::vector<std::uint16_t> x = random_rows(type, rows);
  const std::vector<float> smooth = random_floats(kH, 0.5f, 2.0f);
  std::vector<std::int8_t> q(static_cast<std::size_t>(rows * kH));
  std::vector<float> scales(static_cast<std::size_t>(rows)), scratch(kH);
  for (auto _ : state) {
    for (std::int64_t r = 0; r < rows; ++r) {
      moedist::kernels::quantize_row(x.data() + r * kH, 1, type, smooth.data(), kH, q.data() + r * kH, &scales[static_cast<std::size_t>(r)],
                                     scratch.data());
    }
    benchmark::DoNotOptimize(q.data());
    benchmark::ClobberMemory();
  }
  finish(state, quantize_bytes(rows), rows);
}

// 16-bit rows to fp32 (accumulate with weight 1 into fp32 rows): reads the row and the accumulator, writes it.
std::int64_t to_f32_bytes() { return kRows * (2 * kH + 4 * kH + 4 * kH); }
void BM_ToF32(benchmark::State& state, Isa isa, Half type) {
  select(state, isa);
  const std::vector<std::uint16_t> y = random_rows(type, kRows);
  std::vector<float> acc(static_cast<std::size_t>(kRows * kH), 0.0f);
  for (auto _ : state) {
    for (std::int64_t r = 0; r < kRows; ++r) moedist::kernels::accumulate(acc.data() + r * kH, y.data() + r * kH, type, kH);
    benchmark::DoNotOptimize(acc.data());
    benchmark::ClobberMemory();
  }
  finish(state, to_f32_bytes(), kRows);
}

// fp32 rows to 16-bit, rounded half to even: combine's final store.
std::int64_t store_row_bytes() { return kRows * (4 * kH + 2 * kH); }
void BM_StoreRow(benchmark::State& state, Isa isa, Half type) {
  select(state, isa);
  const std::vector<float> acc = random_floats(static_cast<std::size_t>(kRows * kH), -4.0f, 4.0f);
  std::vector<std::uint16_t> out(static_cast<std::size_t>(kRows * kH));
  for (auto _ : state) {
    for (std::int64_t r = 0; r < kRows; ++r) moedist::kernels::store_row(acc.data() + r * kH, type, kH, out.data() + r * kH, 1);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  finish(state, store_row_bytes(), kRows);
}

// Combine's weighted reduce: per token K expert-output rows accumulated in increasing k (fp32), then stored.
std::int64_t weighted_reduce_bytes() { return kRows * 2 * kH + (kRows / kTopK) * 2 * kH; }
void BM_WeightedReduce(benchmark::State& state, Isa isa, Half type) {
  select(state, isa);
  const std::vector<std::uint16_t> y = random_rows(type, kRows);
  const std::vector<float> weights = random_floats(kRows, 0.05f, 0.3f);
  std::vector<float> acc(kH);
  std::vector<std::uint16_t> out(static_cast<std::size_t>(kRows / kTopK * kH));
  for (auto _ : state) {
    for (std::int64_t t = 0; t < kRows / kTopK; ++t) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int k = 0; k < kTopK; ++k) {
        const std::int64_t r = t * kTopK + k;
        moedist::kernels::accumulate_scaled(acc.data(), y.data() + r * kH, type, weights[static_cast<std::size_t>(r)], kH);
      }
      moedist::kernels::store_row(acc.data(), type, kH, out.data() + t * kH, 1);
    }
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  finish(state, weighted_reduce_bytes(), kRows);
}

// The same reduce as combine does it: one reduce_terms per token, its sums in registers across the K rows.
void BM_ReduceTerms(benchmark::State& state, Isa isa, Half type) {
  select(state, isa);
  const std::vector<std::uint16_t> y = random_rows(type, kRows);
  const std::vector<float> weights = random_floats(kRows, 0.05f, 0.3f);
  std::vector<moedist::kernels::ReduceTerm> terms(kTopK);
  std::vector<std::uint16_t> out(static_cast<std::size_t>(kRows / kTopK * kH));
  for (auto _ : state) {
    for (std::int64_t t = 0; t < kRows / kTopK; ++t) {
      for (int k = 0; k < kTopK; ++k) {
        const std::int64_t r = t * kTopK + k;
        terms[static_cast<std::size_t>(k)] = {y.data() + r * kH, weights[static_cast<std::size_t>(r)], true};
      }
      moedist::kernels::reduce_terms(terms.data(), terms.size(), type, kH, out.data() + t * kH, 1);
    }
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  finish(state, weighted_reduce_bytes(), kRows);
}

// Rows copied to scattered destinations (copy_row16, what quant_mode 0 dispatch does per row).
std::int64_t row_gather_bytes() { return kRows * (2 * kH + 2 * kH); }
void BM_RowGather(benchmark::State& state) {
  const std::vector<std::uint16_t> x = random_rows(Half::bf16, kRows);
  std::vector<std::uint16_t> dst(static_cast<std::size_t>(kRows * kH));
  std::vector<std::int64_t> order(kRows);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), std::mt19937(3));
  for (auto _ : state) {
    for (std::int64_t r = 0; r < kRows; ++r)
      moedist::kernels::copy_row16(x.data() + r * kH, 1, kH, dst.data() + order[static_cast<std::size_t>(r)] * kH);
    benchmark::DoNotOptimize(dst.data());
    benchmark::ClobberMemory();
  }
  finish(state, row_gather_bytes(), kRows);
}

// The reference: memcpy of half of `bytes` (so that read + write = bytes).
void BM_Memcpy(benchmark::State& state, std::int64_t bytes) {
  const auto n = static_cast<std::size_t>(bytes / 2);
  std::vector<unsigned char> src(n, 1), dst(n, 2);
  for (auto _ : state) {
    std::memcpy(dst.data(), src.data(), n);
    benchmark::DoNotOptimize(dst.data());
    benchmark::ClobberMemory();
  }
  finish(state, static_cast<std::int64_t>(2 * n), 0);
}

void register_all() {
  const std::string h = "/H:" + std::to_string(kH);
  for (Isa isa : {Isa::scalar, Isa::avx2, Isa::avx512}) {
    if (!moedist::kernels::isa_supported(isa)) continue;
    const std::string name = moedist::kernels::isa_name(isa);
    for (Half type : {Half::bf16, Half::fp16}) {
      const std::string suffix = "/" + name + "/" + half_name(type) + h;
      benchmark::RegisterBenchmark(("BM_Quantize" + suffix).c_str(), BM_Quantize, isa, type, kRows);
      benchmark::RegisterBenchmark(("BM_Quantize" + suffix + "/stream").c_str(), BM_Quantize, isa, type, kStreamRows);
      benchmark::RegisterBenchmark(("BM_ToF32" + suffix).c_str(), BM_ToF32, isa, type);
      benchmark::RegisterBenchmark(("BM_StoreRow" + suffix).c_str(), BM_StoreRow, isa, type);
      benchmark::RegisterBenchmark(("BM_WeightedReduce" + suffix + "/K:" + std::to_string(kTopK)).c_str(), BM_WeightedReduce,
                                   isa, type);
      benchmark::RegisterBenchmark(("BM_ReduceTerms" + suffix + "/K:" + std::to_string(kTopK)).c_str(), BM_ReduceTerms,
                                   isa, type);
    }
  }
  // copy_row16 has no ISA variants (a memcpy per contiguous row), so it is measured once.
  benchmark::RegisterBenchmark(("BM_RowGather" + h).c_str(), BM_RowGather);
  const std::pair<const char*, std::int64_t> references[] = {{"Quantize", quantize_bytes()},
                                                             {"ToF32", to_f32_bytes()},
                                                             {"StoreRow", store_row_bytes()},
                                                             {"WeightedReduce", weighted_reduce_bytes()},
                                                             {"RowGather", row_gather_bytes()}};
  for (const auto& [kernel, bytes] : references)
    benchmark::RegisterBenchmark((std::string("BM_Memcpy/same_as:") + kernel + h).c_str(), BM_Memcpy, bytes);
  benchmark::RegisterBenchmark(("BM_Memcpy/same_as:Quantize" + h + "/stream").c_str(), BM_Memcpy, quantize_bytes(kStreamRows));
}

}  // namespace

int main(int argc, char** argv) {
  register_all();
  std::string supported;
  for (Isa isa : {Isa::scalar, Isa::avx2, Isa::avx512}) {
    if (moedist::kernels::isa_supported(isa)) supported += std::string(supported.empty() ? "" : " ") + moedist::kernels::isa_name(isa);
  }
  benchmark::AddCustomContext("moedist_isas_supported", supported);
  benchmark::AddCustomContext("moedist_rows_x_hidden", std::to_string(kRows) + " x " + std::to_string(kH));
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
