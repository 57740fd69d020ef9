// The CUDA backend's protocol, run on the CPU. The kernels (src/cuda/kernels.cu) are thin parallel
// wrappers around the host+device functions of src/cuda/protocol.h; this test drives the same functions
// rank by rank, phase by phase (the order the flags enforce on the GPU), with host memory as the
// windows laid out by window_layout.h and the kernel arguments built by call_args.h, and compares every
// output with the oracle, bit for bit. What it cannot check is the parallel structure itself (thread
// indexing, the block-wide max, fences, waits, vector loads); that needs a GPU (tests/gpu/).
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <vector>

#include "contract/checks.h"
#include "cuda/call_args.h"
#include "cuda_host_group.h"
#include "cuda/protocol.h"
#include "cuda/status_errors.h"
#include "cuda/window_layout.h"
#include "moedist/error.h"
#include "test_support.h"

namespace moedist::cuda {
namespace {

namespace mt = moedist::testing;

// What a hostile rank r may change in what it publishes: its record header and counts.
using Tamper = std::function<void(int, RecordHeader&, std::int32_t*)>;

using testing::HostRank;
using EmuRank = HostRank;

class Emulator {
 public:
  explicit Emulator(const casefile::Case& c) : c_(c) {
    const int world = static_cast<int>(c.ranks.size());
    ranks_.resize(static_cast<std::size_t>(world));
    storage_.resize(static_cast<std::size_t>(world));
    bases_.resize(static_cast<std::size_t>(world));
    off_ = testing::case_window_offsets(c);
    for (int r = 0; r < world; ++r) {
      storage_[static_cast<std::size_t>(r)].assign(off_.total / 8 + 1, 0);
      bases_[static_cast<std::size_t>(r)] = reinterpret_cast<std::byte*>(storage_[static_cast<std::size_t>(r)].data());
    }
    for (int r = 0; r < world; ++r) testing::init_host_rank(rank(r), c, r, off_, bases_.data(), 1);
  }

  EmuRank& rank(int r) { return ranks_[static_cast<std::size_t>(r)]; }
  int world() const { return static_cast<int>(ranks_.size()); }

  // The kernel chain of dispatch (kernels.cu enqueue_dispatch), every rank in step. `tamper(r, header,
  // record)` may change what rank r publishes (a hostile peer).
  void dispatch(const std::vector<DispatchArgs>& args, const Tamper& tamper = {}) {
    for (int r = 0; r < world(); ++r) {
      EmuRank& e = rank(r);
      e.dispatch = args[static_cast<std::size_t>(r)];
      begin(e);
      check_ids_and_sort(e, e.dispatch);
    }
    for (int r = 0; r < world(); ++r) publish(rank(r), r, tamper);
    for (int r = 0; r < world(); ++r) plan(rank(r));
    for (int r = 0; r < world(); ++r) write_rows(rank(r));
  }

  // The kernel chain of combine; expert outputs per rank as (rows, H) 16-bit host views.
  void combine(const std::vector<CombineArgs>& args) {
    for (int r = 0; r < world(); ++r) {
      EmuRank& e = rank(r);
      begin(e);
      const CombineArgs& a = args[static_cast<std::size_t>(r)];
      const bool v2 = a.version == 2;
      std::uint64_t lowest = ~std::uint64_t{0};
      for (std::int64_t t = 0; t < a.bs * a.k && !status_failed(&e.status); ++t) {
        const std::uint64_t mark = v2 ? combine_entry_mark_v2(e.g, a, t) : combine_entry_mark(e.g, a, t);
        if (v2 || mark != 0) lowest = std::min(lowest, mark);  // V1 marks 0 for "agrees", V2 kNoMark
      }
      if (status_failed(&e.status)) continue;
      if (v2) {
        report_combine_args_v2(e.g, a, lowest);
        index_rows_v2(e, a);
      } else {
        report_combine_args(e.g, a, lowest);
      }
    }
    for (int r = 0; r < world(); ++r) {  // TP partials into the peer's inbox
      EmuRank& e = rank(r);
      const CombineArgs& a = args[static_cast<std::size_t>(r)];
      if (e.g.T != 2 || status_failed(&e.status)) continue;
      auto* inbox = reinterpret_cast<std::uint16_t*>(bases_[static_cast<std::size_t>(global_rank(e.g, e.g.ep_rank, 1 - e.g.tp_rank))] + off_.tp_inbox);
      for (std::int64_t row = 0; row < e.status.peer_rows; ++row) {
        for (std::int64_t i = 0; i < a.h; ++i) inbox[row * a.h + i] = a.expand_x[(e.status.own_rows + row) * a.expand_x_row_stride + i * a.expand_x_col_stride];
      }
    }
    for (int r = 0; r < world(); ++r) stage(rank(r), args[static_cast<std::size_t>(r)]);
    std::vector<bool> failed_before(static_cast<std::size_t>(world()));  // the failed bits the ranks signal
    for (int r = 0; r < world(); ++r) failed_before[static_cast<std::size_t>(r)] = status_failed(&rank(r).status);
    for (int r = 0; r < world(); ++r) {  // the combine flags: a failed rank's failure reaches its readers
      EmuRank& e = rank(r);
      for (int d = 0; d < e.g.W && !status_failed(&e.status); ++d) {
        const int holder = global_rank(e.g, d, e.g.tp_rank);
        if (failed_before[static_cast<std::size_t>(holder)])
          record_failure(&e.status, ErrorCode::peer_failed, holder, Phase::combine_rows, Rule::peer_failed);
      }
    }
    for (int r = 0; r < world(); ++r) {
      const CombineArgs& a = args[static_cast<std::size_t>(r)];
      if (a.version == 2)
        reduce_v2(rank(r), a);
      else
        reduce(rank(r), a);
    }
  }

 private:
  void begin(EmuRank& e) {
    e.status.seq += 1;
    e.status.first_bad_entry = ~std::uint64_t{0};
  }

  void check_ids_and_sort(EmuRank& e, const DispatchArgs& a) {
    DeviceGroup& g = e.g;
    if (status_failed(&e.status)) return;
    const std::int64_t n = a.bs * a.k;
    for (std::int64_t b = 0; b < a.bs && a.version == 2; ++b) {
      e.status.first_bad_entry = std::min(e.status.first_bad_entry, classify_token_v2(g, a, b));
    }
    for (std::int64_t t = 0; t < n && a.version != 2; ++t) {
      const std::int64_t b = t / a.k, j = t % a.k;
      const std::int32_t id = a.ids[b * a.ids_row_stride + j * a.ids_col_stride];
      const bool bad = id_is_bad(g, a, b, j);
      if (bad) e.status.first_bad_entry = std::min<std::uint64_t>(e.status.first_bad_entry, static_cast<std::uint64_t>(t));
      g.sort_keys_in[t] = bad ? 0 : id;
      g.sort_vals_in[t] = static_cast<std::int32_t>(t);
      g.dispatch_ids[t] = id;
    }
    // CUB's radix sort is stable: so is this one.
    std::vector<std::int32_t> order(static_cast<std::size_t>(n));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](std::int32_t x, std::int32_t y) { return g.sort_keys_in[x] < g.sort_keys_in[y]; });
    for (std::int64_t p = 0; p < n; ++p) {
      g.sort_keys_out[p] = g.sort_keys_in[order[static_cast<std::size_t>(p)]];
      g.sort_vals_out[p] = g.sort_vals_in[order[static_cast<std::size_t>(p)]];
    }
    if (e.status.first_bad_entry == ~std::uint64_t{0}) {
      for (std::int64_t p = 0; p < n; ++p) {
        if (g.sort_keys_out[p] >= g.E) continue;  // V2: not sent
        g.dispatch_expand_idx[g.sort_vals_out[p]] = static_cast<std::int32_t>(p - lower_bound(g.sort_keys_out, n, g.sort_keys_out[p]));
      }
    }
    for (int ex = 0; ex < g.E; ++ex) {
      g.expert_counts[ex] = static_cast<std::int32_t>(lower_bound(g.sort_keys_out, n, ex + 1) - lower_bound(g.sort_keys_out, n, ex));
    }
    if (a.version == 2) e.status.active_tokens = number_tokens(g.token_slot, 0, a.bs, 0);
  }

  void publish(EmuRank& e, int r_me, const Tamper& tamper) {
    DeviceGroup& g = e.g;
    const DispatchArgs& a = e.dispatch;
    const bool v2 = a.version == 2;
    if (e.status.first_bad_entry != ~std::uint64_t{0}) {
      if (v2)
        report_dispatch_mark_v2(g, a, e.status.first_bad_entry);
      else
        report_bad_id(g, a, e.status.first_bad_entry);
    }
    const bool failed = status_failed(&e.status);
    const std::int64_t active = v2 ? e.status.active_tokens : a.bs;
    for (int i = 0; i < g.W * g.L; ++i)
      g.record[i] = failed ? 0 : v2 ? record_entry_v2(g, active, i) : record_entry(g, a.bs, i);
    RecordHeader header = record_header_of(a, failed, active);
    if (tamper) tamper(r_me, header, g.record);
    for (int r = 0; r < g.world; ++r) {
      std::byte* slot = inbox_slot(g, r, g.me);
      std::memcpy(slot, &header, sizeof(header));
      std::memcpy(slot + sizeof(RecordHeader), g.record, sizeof(std::int32_t) * static_cast<std::size_t>(g.W * g.L));
      *flag_at(g, r, g.off.count_flags, g.me) = flag_word(e.status.seq, failed);
    }
  }

  void plan(EmuRank& e) {
    DeviceGroup& g = e.g;
    const DispatchArgs& a = e.dispatch;
    for (int r = 0; r < g.world && !status_failed(&e.status); ++r) {  // wait_flag, with every rank already arrived
      const std::uint64_t v = *flag_at(g, g.me, g.off.count_flags, r);
      EXPECT_EQ(v >> 1, e.status.seq) << "rank " << r << " did not signal call " << e.status.seq;
      if ((v & 1u) != 0) record_failure(&e.status, ErrorCode::peer_failed, r, Phase::dispatch_counts, Rule::peer_failed);
    }
    for (int r = 0; r < g.world && !status_failed(&e.status); ++r) check_record(g, a, r);
    if (status_failed(&e.status)) return;
    for (int d = 0; d < g.W; ++d) plan_destination(g, a, d);
    if (!status_failed(&e.status)) plan_outputs(g, a);
    if (!status_failed(&e.status) && a.expand_idx != nullptr)
      std::copy_n(g.dispatch_expand_idx, a.bs * a.k, a.expand_idx);
  }

  void write_rows(EmuRank& e) {
    DeviceGroup& g = e.g;
    const DispatchArgs& a = e.dispatch;
    if (status_failed(&e.status)) return;
    std::vector<Target> targets(kMaxTargets);
    const int copies = g.T == 2 ? 2 : 1;
    const bool bf16 = a.bf16 != 0;
    for (std::int64_t b = 0; b < a.bs; ++b) {
      const int n_targets = targets_of(g, a, b, targets.data());
      const std::uint16_t* x = a.x + b * a.x_row_stride;
      for (int i = 0; i < n_targets; ++i) {
        if (a.version == 2 && targets[static_cast<std::size_t>(i)].ep >= 0)
          write_triple(g, targets[static_cast<std::size_t>(i)], b);
      }
      for (int slot = 0; slot < n_targets * copies && a.expert_scales != nullptr; ++slot) {
        if (targets[static_cast<std::size_t>(slot / copies)].ep < 0) continue;
        std::byte* at = target_row(g, targets[static_cast<std::size_t>(slot / copies)], slot % copies, g.off.expand_scales, sizeof(float));
        ASSERT_NE(at, nullptr);
        std::memcpy(at, &targets[static_cast<std::size_t>(slot / copies)].weight, 4);
      }
      const bool per_target = a.quant == 2 && a.scales != nullptr;
      for (int first = 0; first < n_targets; first += per_target ? 1 : n_targets) {
        if (per_target && targets[static_cast<std::size_t>(first)].ep < 0) continue;
        const int last = per_target ? first + 1 : n_targets;
        const float* smooth = per_target ? a.scales + targets[static_cast<std::size_t>(first)].smooth_row * a.scales_row_stride : nullptr;
        float amax = 0.0f, ds = 0.0f;
        if (a.quant == 2) {
          for (std::int64_t i0 = 0; i0 < a.h; i0 += kChunk) amax = chunk_amax(bf16, load(x, a.x_col_stride, i0, a.h).data(), chunk_len(a.h, i0), smooth, i0, amax);
          ds = quant_ds(amax);
        }
        for (int slot = first * copies; slot < last * copies; ++slot) {
          const Target& tg = targets[static_cast<std::size_t>(slot / copies)];
          if (tg.ep < 0) continue;
          if (a.quant == 2) {
            std::byte* at = target_row(g, tg, slot % copies, g.off.dynamic_scales, sizeof(float));
            ASSERT_NE(at, nullptr);
            const float scale = quant_scale_out(ds);
            std::memcpy(at, &scale, 4);
          }
          std::byte* row = target_row(g, tg, slot % copies, g.off.expand_x, static_cast<std::size_t>(a.h) * (a.quant == 2 ? 1 : 2));
          ASSERT_NE(row, nullptr);
          for (std::int64_t i0 = 0; i0 < a.h; i0 += kChunk) {
            const int n = chunk_len(a.h, i0);
            const auto v = load(x, a.x_col_stride, i0, a.h);
            if (a.quant == 2) {
              std::int8_t q[kChunk];
              quantize_chunk(bf16, v.data(), n, smooth, i0, ds, q);
              std::memcpy(row + i0, q, static_cast<std::size_t>(n));
            } else {
              std::memcpy(row + 2 * i0, v.data(), static_cast<std::size_t>(n) * 2);
            }
          }
        }
      }
    }
  }

  static std::array<std::uint16_t, kChunk> load(const std::uint16_t* row, std::int64_t col_stride, std::int64_t i0, std::int64_t h) {
    std::array<std::uint16_t, kChunk> v{};
    for (int u = 0; u < chunk_len(h, i0); ++u) v[static_cast<std::size_t>(u)] = row[(i0 + u) * col_stride];
    return v;
  }

  void stage(EmuRank& e, const CombineArgs& a) {
    DeviceGroup& g = e.g;
    if (status_failed(&e.status) || a.staged_in_place) return;
    if (g.T == 2 && status_failed(&rank(global_rank(g, g.ep_rank, 1 - g.tp_rank)).status)) {
      record_failure(&e.status, ErrorCode::peer_failed, global_rank(g, g.ep_rank, 1 - g.tp_rank), Phase::combine_tp, Rule::peer_failed);
      return;
    }
    const bool bf16 = a.bf16 != 0;
    const auto* inbox = reinterpret_cast<const std::uint16_t*>(bases_[static_cast<std::size_t>(g.me)] + off_.tp_inbox);
    for (std::int64_t row = 0; row < e.status.own_rows; ++row) {
      std::byte* dst = bases_[static_cast<std::size_t>(g.me)] + off_.combine_rows + static_cast<std::size_t>(row) * off_.combine_pitch;
      for (std::int64_t c = 0; c < chunks_of(a.h); ++c) {
        const std::int64_t i0 = c * kChunk;
        const int n = chunk_len(a.h, i0);
        auto y = load(a.expand_x + row * a.expand_x_row_stride, a.expand_x_col_stride, i0, a.h);
        const auto partner = g.T == 2 ? load(inbox + row * a.h, 1, i0, a.h) : std::array<std::uint16_t, kChunk>{};
        std::int8_t q[kChunk];
        stage_chunk(bf16, a.comm_quant == 2, y.data(), g.T == 2 ? partner.data() : nullptr, n, a.h, c, dst, q,
                    a.version == 2);
        if (a.comm_quant == 2) std::memcpy(dst + i0, q, static_cast<std::size_t>(n));
        else std::memcpy(dst + 2 * i0, y.data(), static_cast<std::size_t>(n) * 2);
      }
    }
  }

  void reduce(EmuRank& e, const CombineArgs& a) {
    DeviceGroup& g = e.g;
    if (status_failed(&e.status)) return;
    std::vector<Target> targets(kMaxTargets);
    const bool bf16 = a.bf16 != 0;
    for (std::int64_t b = 0; b < a.bs; ++b) {
      const int n_targets = targets_of(g, a, b, targets.data());
      for (std::int64_t c = 0; c < chunks_of(a.h); ++c) {
        const std::int64_t i0 = c * kChunk;
        const int n = chunk_len(a.h, i0);
        float acc[kChunk] = {};
        for (int i = 0; i < n_targets; ++i) {
          const Target& tg = targets[static_cast<std::size_t>(i)];
          const std::byte* row = bases_[static_cast<std::size_t>(global_rank(g, tg.ep, g.tp_rank))] + off_.combine_rows +
                                 static_cast<std::size_t>(tg.row) * off_.combine_pitch;
          std::uint16_t y[kChunk] = {};
          if (a.comm_quant == 2) {
            std::int8_t q[kChunk] = {};
            std::memcpy(q, row + i0, static_cast<std::size_t>(n));
            std::uint16_t scale = 0;
            std::memcpy(&scale, row + comm_scales_offset(a.h) + 2 * static_cast<std::size_t>(c), 2);
            dequantize_chunk(bf16, q, scale, y);
          } else {
            std::memcpy(y, row + 2 * i0, static_cast<std::size_t>(n) * 2);
          }
          accumulate_chunk(bf16, acc, y, n, i < a.k, tg.weight);
        }
        for (int u = 0; u < n; ++u) a.out[b * a.out_row_stride + (i0 + u) * a.out_col_stride] = f32_to_half_rne(bf16, acc[u]);
      }
    }
  }

  // V2, the expert rank's side before the exchange: its triples checked, its rows indexed, the const
  // experts' gate products of its own tokens.
  void index_rows_v2(EmuRank& e, const CombineArgs& a) {
    DeviceGroup& g = e.g;
    std::fill_n(index_counts_of(g, g.me), g.W, 0);
    std::uint64_t lowest = kNoMark;
    for (std::int64_t i = 0; i < e.status.own_rows && !status_failed(&e.status); ++i)
      lowest = std::min(lowest, triple_mark(g, a, i));
    if (!status_failed(&e.status) && lowest != kNoMark) report_triple_mark(g, a, lowest);
    for (std::int64_t i = 0; i < e.status.own_rows && !status_failed(&e.status); ++i)
      index_row(g, a, i, status_seq(&e.status));
    for (std::int64_t i = 0; i < a.bs * a.k * 2 && !status_failed(&e.status); ++i)
      g.const_logits[i] = const_logit(g, a, i / 2, static_cast<int>(i % 2));
  }

  // V2, the source's side after the exchange: its rows found in the holders' indexes, then each token's
  // terms in order (protocol.h term_of) accumulated chunk by chunk.
  void reduce_v2(EmuRank& e, const CombineArgs& a) {
    DeviceGroup& g = e.g;
    if (status_failed(&e.status)) return;
    std::uint64_t lowest = kNoMark;
    for (std::int64_t i = 0; i < a.bs * g.off.index_slots; ++i)
      lowest = std::min(lowest, find_row(g, a, i / g.off.index_slots, i % g.off.index_slots, status_seq(&e.status)));
    for (int d = 0; d < g.W; ++d) lowest = std::min(lowest, holder_count_mark(g, d));
    if (lowest != kNoMark) return report_find_mark(g, a, lowest);
    const bool bf16 = a.bf16 != 0;
    for (std::int64_t b = 0; b < a.bs; ++b) {
      std::vector<TermV2> terms;
      for (int s = 0; s < term_count(g, a.k); ++s) terms.push_back(term_of(g, a, b, s));
      for (std::int64_t c = 0; c < chunks_of(a.h); ++c) {
        const std::int64_t i0 = c * kChunk;
        const int n = chunk_len(a.h, i0);
        float acc[kChunk] = {};
        for (const TermV2& t : terms) {
          if (t.kind == TermKind::none) continue;
          std::array<std::uint16_t, kChunk> y{}, v{};
          if (t.kind == TermKind::expert_row) {
            const std::byte* row = bases_[static_cast<std::size_t>(global_rank(g, t.ep, g.tp_rank))] +
                                   off_.combine_rows + static_cast<std::size_t>(t.row) * off_.combine_pitch;
            if (a.comm_quant == 2) {
              std::int8_t q[kChunk] = {};
              std::memcpy(q, row + i0, static_cast<std::size_t>(n));
              std::uint16_t scale = 0;
              std::memcpy(&scale, row + comm_scales_offset(a.h) + 2 * static_cast<std::size_t>(c), 2);
              dequantize_chunk(bf16, q, scale, y.data());
            } else {
              std::memcpy(y.data(), row + 2 * i0, static_cast<std::size_t>(n) * 2);
            }
          } else {
            std::int64_t cs = 1;
            const std::uint16_t* row = term_row(a, t, b, &cs);
            y = load(row, cs, i0, a.h);
            if (t.kind == TermKind::constant) {
              const std::uint16_t* vrow = const_vector_row(a, t, &cs);
              v = load(vrow, cs, i0, a.h);
            }
          }
          accumulate_term(bf16, acc, t, y.data(), v.data(), n);
        }
        for (int u = 0; u < n; ++u)
          a.out[b * a.out_row_stride + (i0 + u) * a.out_col_stride] = f32_to_half_rne(bf16, acc[u]);
      }
    }
  }

  const casefile::Case& c_;
  std::vector<EmuRank> ranks_;
  std::vector<std::vector<std::uint64_t>> storage_;  // 8-byte aligned window bytes
  std::vector<std::byte*> bases_;
  WindowOffsets off_;
};

// Runs a case through the emulator as the CUDA group would (arguments from call_args.h, identity experts
// unless the case gives combine_x), returning every rank's outputs; `in_window` feeds the expert outputs
// through the combine buffer (no staging) where the group allows it.
struct EmuRun {
  std::vector<casefile::RankOutputs> outputs;
  std::vector<Status> status;
};

EmuRun run_emulated(const casefile::Case& c, bool in_window, const Tamper& tamper = {},
                    const std::function<void(int, DispatchArgs&)>& edit_dispatch = {},
                    const std::function<void(int, CombineArgs&)>& edit_combine = {}, std::uint64_t permute_seed = 0) {
  std::mt19937_64 permute(permute_seed);
  const int world = static_cast<int>(c.ranks.size());
  Emulator emu(c);
  std::vector<DispatchArgs> dargs;
  for (int r = 0; r < world; ++r) {
    dargs.push_back(testing::rank_dispatch_args(c, r, emu.rank(r)));
    if (edit_dispatch) edit_dispatch(r, dargs.back());
  }
  emu.dispatch(dargs, tamper);
  EmuRun run;
  std::vector<CombineArgs> cargs;
  for (int r = 0; r < world; ++r) {
    run.outputs.push_back(testing::dispatch_outputs(c, r, emu.rank(r)));
    const std::vector<std::int64_t> order =
        permute_seed != 0 ? testing::random_row_order(c, run.outputs.back(), permute) : std::vector<std::int64_t>{};
    cargs.push_back(testing::rank_combine_args(c, r, emu.rank(r), run.outputs.back(), in_window, order));
    if (edit_combine) edit_combine(r, cargs.back());
  }
  emu.combine(cargs);
  for (int r = 0; r < world; ++r) {
    run.outputs[static_cast<std::size_t>(r)].combine_out = testing::combine_output(c, r, emu.rank(r));
    run.status.push_back(emu.rank(r).status);
  }
  return run;
}

TEST(CudaProtocol, RandomCasesMatchTheOracle) {
  std::mt19937_64 rng(20261127);
  int checked = 0;
  for (int iteration = 0; iteration < 300; ++iteration) {
    mt::CaseLimits limits;
    limits.max_ep_world_size = 8;
    limits.max_h = 40;
    limits.max_bs = 6;
    casefile::Case c = mt::random_case(rng, limits);
    const auto want = oracle::run(mt::to_oracle_case(c));
    const EmuRun got = run_emulated(c, iteration % 3 == 0);
    for (int r = 0; r < static_cast<int>(c.ranks.size()); ++r) {
      ASSERT_EQ(got.status[static_cast<std::size_t>(r)].code, 0) << mt::describe(c) << ": rank " << r;
      const std::string diff = mt::compare_rank_with_oracle(c, r, got.outputs[static_cast<std::size_t>(r)], want[static_cast<std::size_t>(r)]);
      ASSERT_EQ(diff, "") << mt::describe(c) << ": rank " << r;
    }
    ++checked;
  }
  EXPECT_EQ(checked, 300);
}

// A case at the benchmark's shape family (H a multiple of 8, several experts per rank) with every mode.
TEST(CudaProtocol, WideRowsEveryMode) {
  std::mt19937_64 rng(7);
  for (int quant : {0, 2}) {
    for (int comm : {0, 2}) {
      mt::CaseLimits limits;
      limits.world_size = 4;
      limits.allow_tp = false;
      limits.max_h = 512;
      limits.max_bs = 8;
      casefile::Case c = mt::random_case(rng, limits);
      c.quant_mode = quant;
      c.comm_quant_mode = comm;
      if (quant == 0) for (auto& r : c.ranks) r.scales = Tensor();
      const auto want = oracle::run(mt::to_oracle_case(c));
      const EmuRun got = run_emulated(c, false);
      for (int r = 0; r < static_cast<int>(c.ranks.size()); ++r) {
        ASSERT_EQ(got.status[static_cast<std::size_t>(r)].code, 0);
        EXPECT_EQ(mt::compare_rank_with_oracle(c, r, got.outputs[static_cast<std::size_t>(r)], want[static_cast<std::size_t>(r)]), "")
            << mt::describe(c) << " rank " << r;
      }
    }
  }
}


TEST(CudaProtocol, BadIdFailsItsRankAndEveryPeerNamesIt) {
  std::mt19937_64 rng(11);
  const casefile::Case c = mt::uniform_case(rng, 4, 16, 3);
  const std::int64_t k = c.ranks[0].expert_ids.cols();
  std::vector<std::int32_t> bad_ids(c.ranks[2].expert_ids.data<std::int32_t>(), c.ranks[2].expert_ids.data<std::int32_t>() + c.ranks[2].expert_ids.numel());
  bad_ids[0] = c.moe_expert_num + 5;
  const EmuRun got = run_emulated(c, false, {}, [&](int r, DispatchArgs& a) {
    if (r == 2) a.ids = bad_ids.data();
  });
  const Status& bad = got.status[2];
  EXPECT_EQ(bad.code, static_cast<int>(ErrorCode::invalid_argument));
  try {
    throw_status_error(bad, 2, k);
    FAIL() << "no error";
  } catch (const ValidationError& e) {
    EXPECT_EQ(e.parameter(), "expert_ids[0, 0]");
    EXPECT_EQ(e.value(), std::to_string(c.moe_expert_num + 5));
    EXPECT_NE(e.rule().find("must be in [0, moe_expert_num = " + std::to_string(c.moe_expert_num) + ")"), std::string::npos);
  }
  for (int r : {0, 1, 3}) {
    const Status& st = got.status[static_cast<std::size_t>(r)];
    EXPECT_EQ(st.code, static_cast<int>(ErrorCode::peer_failed)) << "rank " << r;
    EXPECT_EQ(st.peer, 2);
    try {
      throw_status_error(st, r, k);
      FAIL() << "no error";
    } catch (const PeerError& e) {
      EXPECT_EQ(e.peer(), 2);
      EXPECT_EQ(e.phase(), "dispatch.counts");
    }
    // Nothing was written: the outputs keep their initial zeros.
    for (std::int64_t t = 0; t < got.outputs[static_cast<std::size_t>(r)].expand_idx.numel(); ++t) {
      EXPECT_EQ(got.outputs[static_cast<std::size_t>(r)].expand_idx.data<std::int32_t>()[t], 0);
    }
  }
}

TEST(CudaProtocol, RepeatedIdIsNamed) {
  std::mt19937_64 rng(12);
  casefile::Case c = mt::uniform_case(rng, 2, 16, 3);
  while (c.ranks[0].expert_ids.cols() < 2) c = mt::uniform_case(rng, 2, 16, 3);
  const std::int64_t k = c.ranks[0].expert_ids.cols();
  std::vector<std::int32_t> ids(c.ranks[0].expert_ids.data<std::int32_t>(), c.ranks[0].expert_ids.data<std::int32_t>() + c.ranks[0].expert_ids.numel());
  ids[1] = ids[0];
  const EmuRun got = run_emulated(c, false, {}, [&](int r, DispatchArgs& a) {
    if (r == 0) a.ids = ids.data();
  });
  const std::string text = testing::status_error_text(got.status[0], 0, k);
  EXPECT_NE(text.find("expert_ids[0, 1]"), std::string::npos) << text;
  EXPECT_NE(text.find("must be distinct"), std::string::npos) << text;
}

TEST(CudaProtocol, DisagreeingCallIsAConfigMismatchNamingThePeer) {
  std::mt19937_64 rng(13);
  const casefile::Case c = mt::uniform_case(rng, 3, 16, 3);
  const EmuRun got = run_emulated(c, false, {}, [&](int r, DispatchArgs& a) {
    if (r == 1) a.dtype_code = a.dtype_code == static_cast<int>(DType::bf16) ? static_cast<int>(DType::fp16) : static_cast<int>(DType::bf16);
  });
  for (int r : {0, 2}) {
    EXPECT_EQ(got.status[static_cast<std::size_t>(r)].code, static_cast<int>(ErrorCode::config_mismatch));
    EXPECT_EQ(got.status[static_cast<std::size_t>(r)].peer, 1);
    EXPECT_NE(testing::status_error_text(got.status[static_cast<std::size_t>(r)], r, 1).find("the dtype code"), std::string::npos);
  }
}

TEST(CudaProtocol, MalformedRecordIsAProtocolErrorAndNothingIsWritten) {
  std::mt19937_64 rng(14);
  const casefile::Case c = mt::uniform_case(rng, 4, 16, 3);
  for (int variant = 0; variant < 3; ++variant) {
    const EmuRun got = run_emulated(c, false, [&](int r, RecordHeader&, std::int32_t* record) {
      if (r != 3) return;
      if (variant == 0) record[record[0] > 0 ? 0 : 1] += 1;  // more rows than BS * K
      if (variant == 1) record[0] = -1;                      // negative
      if (variant == 2) record[0] = 1 << 30;                 // far outside [0, BS]
    });
    for (int r = 0; r < 4; ++r) {
      const Status& st = got.status[static_cast<std::size_t>(r)];
      EXPECT_EQ(st.code, static_cast<int>(ErrorCode::protocol)) << "variant " << variant << " rank " << r;
      EXPECT_EQ(st.peer, 3);
      EXPECT_NE(testing::status_error_text(st, r, 1).find("the count record of rank 3 is inconsistent"), std::string::npos);
    }
  }
}

TEST(CudaProtocol, CombineMustPairWithItsDispatch) {
  std::mt19937_64 rng(15);
  const casefile::Case c = mt::uniform_case(rng, 2, 16, 3);
  const std::int64_t k = c.ranks[0].expert_ids.cols();
  std::vector<std::int32_t> wrong_idx;
  const EmuRun got = run_emulated(c, false, {}, {}, [&](int r, CombineArgs& a) {
    if (r != 1) return;
    wrong_idx.assign(a.expand_idx, a.expand_idx + a.bs * a.k);
    wrong_idx.back() += 7;
    a.expand_idx = wrong_idx.data();
  });
  const std::string text = testing::status_error_text(got.status[1], 1, k);
  EXPECT_NE(text.find("expand_idx[" + std::to_string(c.ranks[1].x.rows() * k - 1) + "]"), std::string::npos) << text;
  EXPECT_EQ(got.status[0].code, static_cast<int>(ErrorCode::peer_failed));
  EXPECT_EQ(got.status[0].peer, 1);
}

// Each of combine's other arguments is checked against the dispatch handle too, and named.
TEST(CudaProtocol, CombineCountsAndRowsAreCheckedAgainstDispatch) {
  std::mt19937_64 rng(16);
  const casefile::Case c = mt::uniform_case(rng, 2, 16, 3);
  const std::int64_t k = c.ranks[0].expert_ids.cols();
  std::vector<std::int32_t> counts, ids;
  const auto expect_named = [&](const EmuRun& got, const std::string& parameter) {
    try {
      throw_status_error(got.status[0], 0, k);
      ADD_FAILURE() << "no error for " << parameter;
    } catch (const ValidationError& e) {
      EXPECT_EQ(e.parameter(), parameter) << e.what();
    }
    EXPECT_EQ(got.status[1].code, static_cast<int>(ErrorCode::peer_failed));  // the peer reading rank 0's rows stops too
  };
  expect_named(run_emulated(c, false, {}, {}, [&](int r, CombineArgs& a) {
                 if (r != 0) return;
                 counts.assign(a.ep_send_counts, a.ep_send_counts + contract::Topology(mt::rank_config(c, 0)).ep_recv_counts_len(0));
                 counts[1] += 1;
                 a.ep_send_counts = counts.data();
               }),
               "ep_send_counts[1]");
  expect_named(run_emulated(c, false, {}, {}, [&](int r, CombineArgs& a) {
                 if (r != 0) return;
                 ids.assign(a.ids, a.ids + a.bs * a.k);
                 ids[0] = (ids[0] + 1) % c.moe_expert_num;
                 a.ids = ids.data();
               }),
               "expert_ids[0, 0]");
  expect_named(run_emulated(c, false, {}, {}, [&](int r, CombineArgs& a) {
                 if (r == 0) a.expand_x_rows = 0;
               }),
               "expand_x.shape[0]");
}

// A peer whose record claims more tokens than the group allows is refused before any row moves.
TEST(CudaProtocol, RecordWithTooManyTokensIsRefused) {
  std::mt19937_64 rng(17);
  const casefile::Case c = mt::uniform_case(rng, 3, 16, 3);
  const EmuRun got = run_emulated(c, false, [&](int r, RecordHeader& header, std::int32_t*) {
    if (r == 1) header.bs += 1;  // its header says BS + 1
  });
  for (int r : {0, 2}) {
    EXPECT_EQ(got.status[static_cast<std::size_t>(r)].code, static_cast<int>(ErrorCode::config_mismatch)) << r;  // global_bs = 0: BS must agree
    EXPECT_EQ(got.status[static_cast<std::size_t>(r)].peer, 1);
  }
}

// ---- the V2 operators ----

// Random V2 cases (V2 §3-§4): (BS,) and (BS, K) masks, zero / copy / const experts, Sn 0-4, TP, both
// quant and comm-quant modes, ori_x, shared_expert_x, uneven BS; the experts' rows now and then passed
// back permuted with their triples, or in the combine buffer. Bit for bit against the V2 oracle.
TEST(CudaProtocol, RandomV2CasesMatchTheV2Oracle) {
  std::mt19937_64 rng(20261128);
  int masks_1d = 0, masks_2d = 0, specials = 0, consts = 0, several_shared = 0, tp = 0, permuted = 0;
  for (int iteration = 0; iteration < 300; ++iteration) {
    mt::CaseLimits limits;
    limits.max_ep_world_size = 8;
    limits.max_h = 40;
    limits.max_bs = 6;
    limits.v2 = 1.0;
    limits.token_masks = true;
    const casefile::Case c = mt::random_case(rng, limits);
    const mt::Expected want = mt::expected_outputs(c);
    const std::uint64_t permute = iteration % 2 == 0 ? (rng() | 1) : 0;
    const EmuRun got = run_emulated(c, iteration % 3 == 0, {}, {}, {}, permute);
    for (int r = 0; r < static_cast<int>(c.ranks.size()); ++r) {
      const Status& st = got.status[static_cast<std::size_t>(r)];
      ASSERT_EQ(st.code, 0) << mt::describe(c) << ": rank " << r << ": "
                            << testing::status_error_text(st, r, c.ranks[0].expert_ids.cols());
      ASSERT_EQ(mt::compare_rank(c, r, got.outputs[static_cast<std::size_t>(r)], want), "")
          << mt::describe(c) << ": rank " << r;
    }
    const casefile::RankInputs& r0 = c.ranks[0];
    masks_1d += r0.x_active_mask.ndim() == 1;
    masks_2d += r0.x_active_mask.ndim() == 2;
    specials += c.zero_expert_num + c.copy_expert_num > 0;
    consts += c.const_expert_num > 0;
    several_shared += c.shared_expert_rank_num > 0 && c.shared_expert_num > 1;
    tp += c.tp_world_size == 2;
    permuted += permute != 0 && c.tp_world_size != 2;
  }
  // The draw covers every feature (a change of the generator that lost one would show here).
  EXPECT_GT(masks_1d, 20);
  EXPECT_GT(masks_2d, 20);
  EXPECT_GT(specials, 50);
  EXPECT_GT(consts, 50);
  EXPECT_GT(several_shared, 10);
  EXPECT_GT(tp, 20);
  EXPECT_GT(permuted, 50);
}

// A V2 case of `world` ranks with every rank at `bs` tokens (global_bs 0), no masks, no TP; with
// special experts when `special`.
casefile::Case v2_case(std::mt19937_64& rng, int world, std::int64_t bs, bool special) {
  for (;;) {
    mt::CaseLimits limits;
    limits.world_size = world;
    limits.allow_tp = false;
    limits.max_h = 16;
    limits.max_bs = bs;
    limits.v2 = 1.0;
    casefile::Case c = mt::random_case(rng, limits);
    c.global_bs = 0;
    mt::random_inputs(c, rng, limits, bs);
    const bool has_special = c.zero_expert_num + c.copy_expert_num + c.const_expert_num > 0;
    if (has_special == special && c.ranks[0].expert_ids.cols() >= 2) return c;
  }
}

// A copy of rank r's ids of the case, for a hook to change and pass instead.
std::vector<std::int32_t> ids_of(const casefile::Case& c, int r) {
  const Tensor& ids = c.ranks[static_cast<std::size_t>(r)].expert_ids;
  return std::vector<std::int32_t>(ids.data<std::int32_t>(), ids.data<std::int32_t>() + ids.numel());
}

// Every peer of `bad` reports peer_failed naming it.
void expect_peers_name(const EmuRun& got, int bad) {
  for (std::size_t r = 0; r < got.status.size(); ++r) {
    if (static_cast<int>(r) == bad) continue;
    EXPECT_EQ(got.status[r].code, static_cast<int>(ErrorCode::peer_failed))
        << "rank " << r << ": " << testing::status_error_text(got.status[r], static_cast<int>(r), 1);
    EXPECT_EQ(got.status[r].peer, bad) << "rank " << r;
  }
}

TEST(CudaProtocol, V2IdsAndMasksAreCheckedOnTheGpu) {
  std::mt19937_64 rng(21);
  const casefile::Case c = v2_case(rng, 4, 3, true);
  const std::int64_t k = c.ranks[0].expert_ids.cols();
  const int limit = c.moe_expert_num + c.zero_expert_num + c.copy_expert_num + c.const_expert_num;
  std::vector<std::int32_t> ids = ids_of(c, 2);
  ids[k + 1] = limit;  // expert_ids[1, 1]: past the special experts
  EmuRun got = run_emulated(c, false, {}, [&](int r, DispatchArgs& a) {
    if (r == 2) a.ids = ids.data();
  });
  std::string text = testing::status_error_text(got.status[2], 2, k);
  EXPECT_NE(
      text.find("expert_ids[1, 1] = " + std::to_string(limit) +
                ": must be in [0, moe_expert_num + zero, copy and const experts = " + std::to_string(limit) + ")"),
      std::string::npos)
      << text;
  expect_peers_name(got, 2);

  ids = ids_of(c, 1);
  ids[2 * k + 1] = ids[2 * k];  // row 2 routes one id twice
  got = run_emulated(c, false, {}, [&](int r, DispatchArgs& a) {
    if (r == 1) a.ids = ids.data();
  });
  text = testing::status_error_text(got.status[1], 1, k);
  EXPECT_NE(text.find("expert_ids[2, 1]"), std::string::npos) << text;
  EXPECT_NE(text.find("the ids a row routes must be distinct; row 2 repeats it"), std::string::npos) << text;
  expect_peers_name(got, 1);

  // A (BS,) mask whose trues do not come first.
  const std::vector<std::uint8_t> not_prefix{1, 0, 1};
  got = run_emulated(c, false, {}, [&](int r, DispatchArgs& a) {
    if (r == 0) a.mask = TokenMask{not_prefix.data(), 0, 1, 1};
  });
  text = testing::status_error_text(got.status[0], 0, k);
  EXPECT_NE(text.find("x_active_mask[2] = true: every true must come before every false (x_active_mask[1] is false)"),
            std::string::npos)
      << text;
  expect_peers_name(got, 0);
}

TEST(CudaProtocol, V2CombineIsCheckedAgainstItsDispatchAndTheTriples) {
  std::mt19937_64 rng(22);
  const casefile::Case c = v2_case(rng, 4, 4, false);
  const std::int64_t k = c.ranks[0].expert_ids.cols();
  // expert_ids differing from dispatch's.
  std::vector<std::int32_t> ids = ids_of(c, 1);
  for (std::int32_t v = 0; v < c.moe_expert_num; ++v) {  // an expert row 0 does not route
    if (std::find(ids.begin(), ids.begin() + k, v) == ids.begin() + k) {
      ids[0] = v;
      break;
    }
  }
  {
    const EmuRun got = run_emulated(c, false, {}, {}, [&](int r, CombineArgs& a) {
      if (r == 1) a.ids = ids.data();
    });
    const std::string text = testing::status_error_text(got.status[1], 1, k);
    EXPECT_NE(
        text.find("expert_ids[0, 0] = " + std::to_string(ids[0]) + ": must equal the latest dispatch's expert_ids"),
        std::string::npos)
        << text;
    expect_peers_name(got, 1);
  }
  // A mask dispatch did not have: the last token switched off.
  std::vector<std::uint8_t> mask(4, 1);
  mask[3] = 0;
  EmuRun got = run_emulated(c, false, {}, {}, [&](int r, CombineArgs& a) {
    if (r == 2) a.mask = TokenMask{mask.data(), 0, 1, 1};
  });
  std::string text = testing::status_error_text(got.status[2], 2, k);
  EXPECT_NE(text.find("x_active_mask[3, 0] = off: must switch the entries on and off as the latest dispatch's"),
            std::string::npos)
      << text;
  EXPECT_EQ(got.status[0].code, static_cast<int>(ErrorCode::peer_failed));

  // Triples, on the expert rank holding the most rows: a source outside the group, then two rows with
  // one triple.
  const EmuRun plain = run_emulated(c, false);
  int holder = 0;
  for (int r = 1; r < 4; ++r) {
    if (plain.outputs[static_cast<std::size_t>(r)].assist_info_for_combine.numel() >
        plain.outputs[static_cast<std::size_t>(holder)].assist_info_for_combine.numel())
      holder = r;
  }
  const Tensor& held = plain.outputs[static_cast<std::size_t>(holder)].assist_info_for_combine;
  ASSERT_GE(held.numel(), 6) << mt::describe(c);
  std::vector<std::int32_t> triples;
  const auto edit_triples = [&](const std::function<void(std::vector<std::int32_t>&)>& change) {
    return [&, change](int r, CombineArgs& a) {
      if (r != holder) return;
      triples.assign(a.assist, a.assist + a.assist_len);
      change(triples);
      a.assist = triples.data();
    };
  };
  got = run_emulated(c, false, {}, {}, edit_triples([](std::vector<std::int32_t>& t) { t[0] = 9; }));
  text = testing::status_error_text(got.status[static_cast<std::size_t>(holder)], holder, k);
  EXPECT_NE(text.find("assist_info_for_combine[0] = 9: must be a source EP rank in [0, 4)"), std::string::npos) << text;
  expect_peers_name(got, holder);
  got = run_emulated(c, false, {}, {},
                     edit_triples([](std::vector<std::int32_t>& t) { std::copy_n(t.begin(), 3, t.begin() + 3); }));
  text = testing::status_error_text(got.status[static_cast<std::size_t>(holder)], holder, k);
  EXPECT_NE(text.find("row 1 and row 0 carry the same triple"), std::string::npos) << text;
  expect_peers_name(got, holder);
  // A triple naming another token of its source: the row of the token it named is missing there, and
  // that source (not the expert rank, whose triples are all well-formed) names the expert rank.
  const std::int32_t* t0 = held.data<std::int32_t>();
  std::int32_t other = -1;
  for (std::int32_t b = 0; b < 4 && other < 0; ++b) {
    bool taken = false;
    for (std::int64_t i = 0; i < held.numel(); i += 3)
      taken = taken || (t0[i] == t0[0] && t0[i + 1] == b && t0[i + 2] == t0[2]);
    if (!taken) other = b;
  }
  if (other >= 0) {
    got = run_emulated(c, false, {}, {}, edit_triples([&](std::vector<std::int32_t>& t) { t[1] = other; }));
    const int source = t0[0];
    text = testing::status_error_text(got.status[static_cast<std::size_t>(source)], source, k);
    EXPECT_NE(text.find("assist_info_for_combine = (rank " + std::to_string(holder) + "'s): has no row for token " +
                        std::to_string(t0[1]) + ", k " + std::to_string(t0[2])),
              std::string::npos)
        << text;
  }
}

// A rank making a V1 call while its peers make V2 ones: every rank names the first that differs.
TEST(CudaProtocol, V1AndV2CallsDoNotMix) {
  std::mt19937_64 rng(23);
  casefile::Case c = v2_case(rng, 3, 2, false);
  while (c.shared_expert_rank_num != 0 || c.shared_expert_num > 1) c = v2_case(rng, 3, 2, false);
  const EmuRun got = run_emulated(c, false, {}, [&](int r, DispatchArgs& a) {
    if (r == 1) a.version = 1;
  });
  EXPECT_EQ(got.status[0].code, static_cast<int>(ErrorCode::config_mismatch));
  EXPECT_EQ(got.status[0].peer, 1);
  const std::string text = testing::status_error_text(got.status[0], 0, 1);
  EXPECT_NE(text.find("rank 0 made a V2 call but rank 1 a V1 one"), std::string::npos) << text;
  EXPECT_EQ(got.status[1].peer, 0);
}

TEST(CudaProtocol, StatusErrorsNameTimeoutsAndCapacity) {
  Status st;
  st.code = static_cast<int>(ErrorCode::timeout);
  st.rule = static_cast<int>(Rule::timeout);
  st.phase = static_cast<int>(Phase::dispatch_rows);
  st.peer = 5;
  st.limit = 2000;
  try {
    throw_status_error(st, 1, 1);
    FAIL();
  } catch (const PeerError& e) {
    EXPECT_EQ(e.code(), ErrorCode::timeout);
    EXPECT_EQ(e.peer(), 5);
    EXPECT_EQ(e.phase(), "dispatch.rows");
    EXPECT_NE(std::string(e.what()).find("rank 1: rank 5 did not arrive within 2000 ms"), std::string::npos);
  }
  st = Status{};
  st.code = static_cast<int>(ErrorCode::capacity);
  st.rule = static_cast<int>(Rule::capacity);
  st.phase = static_cast<int>(Phase::dispatch_counts);
  st.peer = 2;
  st.value = 99;
  st.limit = 64;
  EXPECT_NE(testing::status_error_text(st, 0, 1).find("rank 2 would receive 99 rows but can hold at most 64"), std::string::npos);
  EXPECT_EQ(testing::status_error_text(Status{}, 0, 1), "");
}

// The window layout holds what the kernels address: every region ends before the next, and the combine
// rows fit both of their forms.
TEST(CudaProtocol, WindowLayoutRegionsDoNotOverlap) {
  for (int T : {0, 2}) {
    GroupConfig cfg;
    cfg.ep_world_size = 8;
    cfg.moe_expert_num = 28;
    cfg.shared_expert_rank_num = 1;
    cfg.tp_world_size = T;
    const contract::Topology topo(cfg);
    for (std::int64_t h : {1, 7, 8, 7168}) {
      const WindowOffsets o = window_offsets(topo, 5, 3, h);
      const int world = topo.world_size();
      EXPECT_GE(o.rows_flags, o.count_flags + 8u * world);
      EXPECT_GE(o.combine_flags, o.rows_flags + 8u * world);
      EXPECT_GE(o.inbox, o.tp_flag + 8u);
      EXPECT_GE(o.record_stride, sizeof(RecordHeader) + 4u * static_cast<std::size_t>(topo.count_record_len()));
      EXPECT_GE(o.expand_x, o.inbox + o.record_stride * world);
      EXPECT_GE(o.dynamic_scales, o.expand_x + static_cast<std::size_t>(o.dispatch_rows * h * 2));
      EXPECT_GE(o.combine_rows, o.expand_scales + 4u * static_cast<std::size_t>(o.dispatch_rows));
      EXPECT_GE(o.combine_pitch, static_cast<std::size_t>(2 * h));
      EXPECT_GE(o.combine_pitch, comm_scales_offset(h) + 2u * static_cast<std::size_t>(chunks_of(h)));
      EXPECT_GE(o.assist, o.tp_inbox + (topo.T == 2 ? static_cast<std::size_t>(o.receive_rows * h * 2) : 0u));
      EXPECT_GE(o.index, o.assist + 12u * static_cast<std::size_t>(o.dispatch_rows));
      EXPECT_EQ(o.index_slots, 3 + topo.Sn);
      EXPECT_GE(o.index_counts, o.index + 8u * static_cast<std::size_t>(topo.W * o.index_tokens * o.index_slots));
      EXPECT_GE(o.total, o.index_counts + 8u * static_cast<std::size_t>(topo.W));
      EXPECT_GE(o.receive_rows, std::max(topo.receive_rows(0, 5, 3), topo.receive_rows(7, 5, 3)));
    }
  }
}

}  // namespace
}  // namespace moedist::cuda
