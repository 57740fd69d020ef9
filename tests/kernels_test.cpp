// Every vectorized row-kernel variant against the scalar reference, bit for bit, on every tail length
// and on hostile values: subnormals, NaN, infinities, signed zeros, rounding ties, random bit patterns.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/row_kernels_impl.h"

namespace moedist::kernels {
namespace {

using numeric::Half;

std::vector<const RowKernelTable*> vector_tables() {
  std::vector<const RowKernelTable*> out;
  if (isa_supported(Isa::avx2)) out.push_back(&avx2::kTable);
  if (isa_supported(Isa::avx512)) out.push_back(&avx512::kTable);
  return out;
}

// Random 16-bit float bits, salted with the values where conversions and rounding differ.
std::vector<std::uint16_t> hostile_halves(std::mt19937& rng, std::size_t n, Half type, bool finite_only) {
  std::vector<std::uint16_t> v(n);
  std::uniform_int_distribution<int> kind(0, 9);
  std::uniform_int_distribution<std::uint32_t> bits(0, 0xffff);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  for (auto& x : v) {
    switch (kind(rng)) {
      case 0: x = static_cast<std::uint16_t>(bits(rng) & (type == Half::bf16 ? 0x807f : 0x83ff)); break;  // subnormal or zero
      case 1: x = static_cast<std::uint16_t>(bits(rng)); break;                                           // any pattern
      default: x = numeric::f32_to_half_rne(type, normal(rng)); break;
    }
    if (finite_only) {
      const std::uint16_t exp_mask = type == Half::bf16 ? 0x7f80 : 0x7c00;
      if ((x & exp_mask) == exp_mask) x = static_cast<std::uint16_t>(x & ~0x4000);  // clear the top exponent bit
    }
  }
  return v;
}

std::vector<float> hostile_floats(std::mt19937& rng, std::size_t n) {
  std::vector<float> v(n);
  std::uniform_int_distribution<int> kind(0, 7);
  std::uniform_int_distribution<std::uint32_t> bits;
  std::normal_distribution<float> normal(0.0f, 100.0f);
  for (auto& x : v) {
    switch (kind(rng)) {
      case 0: x = std::bit_cast<float>(bits(rng) & 0x807fffffu); break;                       // subnormal
      case 1: x = std::bit_cast<float>(bits(rng)); break;                                     // NaN, inf, anything
      case 2: x = std::bit_cast<float>((bits(rng) & 0xffff0000u) | 0x8000u); break;           // bf16 tie
      case 3: x = std::bit_cast<float>((bits(rng) & 0xffffe000u) | 0x1000u); break;           // fp16 tie
      default: x = normal(rng); break;
    }
  }
  return v;
}

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

// fp32 accumulators: equal bits, except that any NaN equals any NaN. Payloads are not stable through
// arithmetic; what is stored (store_row) is the canonical NaN, and that is compared bit for bit.
bool same_values(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (std::isnan(a[i]) && std::isnan(b[i])) continue;
    if (std::bit_cast<std::uint32_t>(a[i]) != std::bit_cast<std::uint32_t>(b[i])) return false;
  }
  return true;
}

class KernelVariants : public ::testing::TestWithParam<Half> {};

TEST_P(KernelVariants, QuantizeMatchesScalar) {
  const Half type = GetParam();
  std::mt19937 rng(1);
  for (const RowKernelTable* t : vector_tables()) {
    for (std::int64_t h = 1; h <= 70; ++h) {
      for (int round = 0; round < 40; ++round) {
        const bool finite = round % 4 != 0;
        std::vector<std::uint16_t> x = hostile_halves(rng, static_cast<std::size_t>(h), type, finite);
        if (round % 10 == 5) std::fill(x.begin(), x.end(), std::uint16_t{0});  // all-zero row
        std::vector<float> smooth(static_cast<std::size_t>(h));
        std::uniform_real_distribution<float> u(0.01f, 8.0f);
        for (auto& s : smooth) s = u(rng);
        const float* sm = round % 2 == 0 ? smooth.data() : nullptr;
        std::vector<std::int8_t> q_ref(static_cast<std::size_t>(h)), q(static_cast<std::size_t>(h));
        std::vector<float> scratch(static_cast<std::size_t>(h));
        float scale_ref = 0, scale = 0;
        scalar::quantize_row(x.data(), 1, type, sm, h, q_ref.data(), &scale_ref, scratch.data());
        t->quantize_row(x.data(), type, sm, h, q.data(), &scale, scratch.data());
        ASSERT_TRUE(same_bits(q, q_ref)) << isa_name(t->isa) << " h=" << h << " round=" << round;
        ASSERT_EQ(std::bit_cast<std::uint32_t>(scale), std::bit_cast<std::uint32_t>(scale_ref)) << isa_name(t->isa) << " h=" << h;
      }
    }
  }
}

TEST_P(KernelVariants, AccumulateAndStoreMatchScalar) {
  const Half type = GetParam();
  std::mt19937 rng(2);
  for (const RowKernelTable* t : vector_tables()) {
    for (std::int64_t h = 1; h <= 70; ++h) {
      for (int round = 0; round < 20; ++round) {
        const std::vector<std::uint16_t> y = hostile_halves(rng, static_cast<std::size_t>(h), type, false);
        std::vector<float> acc_ref = hostile_floats(rng, static_cast<std::size_t>(h));
        std::vector<float> acc = acc_ref;
        const float s = hostile_floats(rng, 1)[0];
        scalar::accumulate_scaled(acc_ref.data(), y.data(), type, s, h);
        t->accumulate_scaled(acc.data(), y.data(), type, s, h);
        ASSERT_TRUE(same_values(acc, acc_ref)) << isa_name(t->isa) << " accumulate_scaled h=" << h;
        scalar::accumulate(acc_ref.data(), y.data(), type, h);
        t->accumulate(acc.data(), y.data(), type, h);
        ASSERT_TRUE(same_values(acc, acc_ref)) << isa_name(t->isa) << " accumulate h=" << h;
        std::vector<std::uint16_t> out_ref(static_cast<std::size_t>(h)), out(static_cast<std::size_t>(h));
        scalar::store_row(acc_ref.data(), type, h, out_ref.data(), 1);
        t->store_row(acc.data(), type, h, out.data());
        ASSERT_TRUE(same_bits(out, out_ref)) << isa_name(t->isa) << " store_row h=" << h;
      }
    }
  }
}

TEST_P(KernelVariants, StoreMatchesScalarOnRandomBitPatterns) {
  const Half type = GetParam();
  std::mt19937 rng(3);
  std::uniform_int_distribution<std::uint32_t> bits;
  std::vector<float> acc(1 << 20);
  for (auto& a : acc) a = std::bit_cast<float>(bits(rng));
  std::vector<std::uint16_t> ref(acc.size()), out(acc.size());
  scalar::store_row(acc.data(), type, static_cast<std::int64_t>(acc.size()), ref.data(), 1);
  for (const RowKernelTable* t : vector_tables()) {
    t->store_row(acc.data(), type, static_cast<std::int64_t>(acc.size()), out.data());
    EXPECT_TRUE(same_bits(out, ref)) << isa_name(t->isa);
  }
}

TEST_P(KernelVariants, TpReduceMatchesScalar) {
  const Half type = GetParam();
  std::mt19937 rng(4);
  for (const RowKernelTable* t : vector_tables()) {
    for (std::int64_t h = 1; h <= 70; ++h) {
      for (int round = 0; round < 20; ++round) {
        const auto a = hostile_halves(rng, static_cast<std::size_t>(h), type, false);
        const auto b = hostile_halves(rng, static_cast<std::size_t>(h), type, false);
        std::vector<std::uint16_t> out_ref(static_cast<std::size_t>(h)), out(static_cast<std::size_t>(h));
        scalar::tp_reduce_row(a.data(), 1, b.data(), type, h, out_ref.data());
        t->tp_reduce_row(a.data(), b.data(), type, h, out.data());
        ASSERT_TRUE(same_bits(out, out_ref)) << isa_name(t->isa) << " h=" << h;
      }
    }
  }
}

// n terms over rows of h hostile halves, some weighted with hostile weights, some not.
struct Terms {
  std::vector<std::vector<std::uint16_t>> rows;
  std::vector<ReduceTerm> terms;
};
Terms hostile_terms(std::mt19937& rng, std::size_t n, std::int64_t h, Half type) {
  Terms t;
  for (std::size_t i = 0; i < n; ++i)
    t.rows.push_back(hostile_halves(rng, static_cast<std::size_t>(h), type, rng() % 3 != 0));
  for (std::size_t i = 0; i < n; ++i) {
    const bool weighted = rng() % 4 != 0;
    const float w = rng() % 3 == 0 ? hostile_floats(rng, 1)[0] : std::uniform_real_distribution<float>(0.0f, 1.0f)(rng);
    t.terms.push_back(ReduceTerm{t.rows[i].data(), w, weighted});
  }
  return t;
}

// The scalar reduce_terms is the per-term path it replaces in combine: a zeroed accumulator,
// accumulate_scaled / accumulate term by term, store_row.
TEST_P(KernelVariants, ReduceTermsIsAccumulateThenStore) {
  const Half type = GetParam();
  std::mt19937 rng(5);
  for (std::int64_t h = 1; h <= 90; h += 7) {
    for (std::size_t n = 1; n <= 17; n += 2) {
      const Terms t = hostile_terms(rng, n, h, type);
      std::vector<float> acc(static_cast<std::size_t>(h), 0.0f);
      for (const ReduceTerm& term : t.terms) {
        if (term.weighted)
          scalar::accumulate_scaled(acc.data(), term.row, type, term.weight, h);
        else
          scalar::accumulate(acc.data(), term.row, type, h);
      }
      std::vector<std::uint16_t> want(static_cast<std::size_t>(h)), got(static_cast<std::size_t>(2 * h), 0x5555);
      scalar::store_row(acc.data(), type, h, want.data(), 1);
      scalar::reduce_terms(t.terms.data(), n, type, 0, h, got.data(), 2);  // strided output
      for (std::int64_t i = 0; i < h; ++i) {
        ASSERT_EQ(got[static_cast<std::size_t>(2 * i)], want[static_cast<std::size_t>(i)])
            << "h=" << h << " n=" << n << " i=" << i;
        ASSERT_EQ(got[static_cast<std::size_t>(2 * i + 1)], 0x5555) << "wrote between the strided elements";
      }
    }
  }
}

TEST_P(KernelVariants, ReduceTermsMatchesScalar) {
  const Half type = GetParam();
  std::mt19937 rng(6);
  for (const RowKernelTable* table : vector_tables()) {
    for (std::int64_t h = 1; h <= 200; ++h) {
      for (std::size_t n : {std::size_t{1}, std::size_t{2}, std::size_t{9}}) {
        const Terms t = hostile_terms(rng, n, h, type);
        std::vector<std::uint16_t> want(static_cast<std::size_t>(h)), got(static_cast<std::size_t>(h) + 1, 0x5555);
        scalar::reduce_terms(t.terms.data(), n, type, 0, h, want.data(), 1);
        table->reduce_terms(t.terms.data(), n, type, h, got.data());
        ASSERT_EQ(got.back(), 0x5555) << isa_name(table->isa) << " wrote past the row, h=" << h;
        got.pop_back();
        ASSERT_TRUE(same_bits(got, want)) << isa_name(table->isa) << " h=" << h << " n=" << n;
      }
    }
  }
}

std::string type_name(const ::testing::TestParamInfo<Half>& param) { return param.param == Half::bf16 ? "bf16" : "fp16"; }
INSTANTIATE_TEST_SUITE_P(Types, KernelVariants, ::testing::Values(Half::bf16, Half::fp16), type_name);

TEST(KernelSelection, BestSupportedVariantIsActiveAndCanBeForced) {
  const Isa best = isa_supported(Isa::avx512) ? Isa::avx512 : isa_supported(Isa::avx2) ? Isa::avx2 : Isa::scalar;
  if (std::getenv("MOEDIST_KERNELS") == nullptr) {
    EXPECT_EQ(active_isa(), best);
  }
  EXPECT_TRUE(force_isa(Isa::scalar));
  EXPECT_EQ(active_isa(), Isa::scalar);
  EXPECT_TRUE(force_isa(best));
  EXPECT_EQ(active_isa(), best);
}

}  // namespace
}  // namespace moedist::kernels
