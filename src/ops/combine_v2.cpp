// The V2 combine (V2 §4): validate, exchange the records, stage this rank's expert-output rows as V1
// does and index them by their triples (assist_info_for_combine: who sent row i, for which token and
// k), then every source rank finds the rows of its tokens through the expert ranks' indexes and
// reduces them with its special experts, shared experts and shared_expert_x in the kernel's order
// (V2 §4.3). The index makes expand_x's row order free, as on the NPU, and lets every source check that
// each row it expects is there exactly once.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "common/format.h"
#include "contract/checks.h"
#include "contract/record_checks.h"
#include "contract/v2_routing.h"
#include "kernels/row_kernels.h"
#include "ops/combine_steps.h"
#include "ops/group_state.h"
#include "ops/host_messages.h"

namespace moedist {

namespace {

using combine_steps::CombineCall;
using combine_steps::PublishedRows;

// An index entry or a per-source count of this call: the call's number in the high half, so that what
// an earlier call left in the window never passes for this call's.
std::int64_t tagged(std::int64_t seq, std::int64_t value) {
  return static_cast<std::int64_t>(static_cast<std::uint64_t>(seq & 0xffffffff) << 32 |
                                   static_cast<std::uint32_t>(value));
}
bool tag_matches(std::int64_t entry, std::int64_t seq) {
  return static_cast<std::uint64_t>(entry) >> 32 == static_cast<std::uint64_t>(seq & 0xffffffff);
}
std::int64_t untagged(std::int64_t entry) { return static_cast<std::int64_t>(static_cast<std::uint32_t>(entry)); }

// A peer's BS must be one the configuration allows, and its row counts within its capacity; TP peers
// must agree on each other's rows. Checked on every rank for every rank, so that all fail alike.
void check_combine_record(const Group::State& s, int r, const char* phase) {
  const contract::Topology& topo = s.topo;
  const CallHeader& hd = s.header(r);
  const int ep = r / topo.T;
  const std::int64_t max_bs = contract::peer_bs_limit(topo.global_bs, topo.W, s.header(s.me()).bs);
  if (hd.bs < 0 || hd.bs > max_bs) {
    throw PeerError(ErrorCode::protocol, r, phase,
                    concat("rank ", s.me(), ": rank ", r, " reports BS ", hd.bs, ", outside [0, ", max_bs, "]"));
  }
  const std::int64_t capacity = topo.receive_rows(ep, hd.bs, hd.k, 2);
  if (hd.own_rows < 0 || hd.own_rows > capacity || hd.peer_rows < 0 || hd.peer_rows > capacity) {
    throw PeerError(ErrorCode::protocol, r, phase,
                    concat("rank ", s.me(), ": rank ", r, " reports ", hd.own_rows, " own and ", hd.peer_rows,
                           " TP peer rows, outside its capacity ", capacity));
  }
  if (topo.T == 2) {
    const int peer = topo.global_rank(ep, 1 - r % topo.T);
    const CallHeader& other = s.header(peer);
    if (hd.own_rows != other.peer_rows || hd.peer_rows != other.own_rows) {
      throw PeerError(ErrorCode::config_mismatch, r, phase,
                      concat("rank ", r, " holds ", hd.own_rows, " own and ", hd.peer_rows,
                             " peer rows but its TP peer rank ", peer, " holds ", other.own_rows, " own and ",
                             other.peer_rows, " peer rows: pass each rank its own dispatch outputs"));
    }
  }
}

// What the phases after the record exchange need besides the shared CombineCall.
struct CallV2 {
  const TensorView& assist;
  const CombineV2Options& o;
  const contract::EntryMask& mask;
  const contract::SpecialExperts& experts;
  std::int64_t slots = 0;  // (token, k) slots per token: K + Sn
};

// Validates and plans locally (what this rank expects back from each expert rank), then publishes
// this rank's record and learns everyone's.
contract::CallShape publish_records(Group::State& s, const TensorView& expand_x, const TensorView& expert_ids,
                                    const TensorView& assist, const TensorView& ep_send_counts,
                                    const TensorView& expert_scales, const CombineV2Options& o,
                                    contract::CombineCounts* rows, contract::EntryMask* mask,
                                    contract::SpecialExperts* experts) {
  std::exception_ptr local_error;
  contract::CallShape shape;
  shape.version = 2;
  try {
    shape = contract::check_combine_v2(s.config, expand_x, expert_ids, assist, ep_send_counts, expert_scales, o, rows,
                                       mask, experts);
    combine_steps::check_window_rows_unused(s, expand_x);
    s.plan_v2.build(s.topo, expert_ids, *mask, *experts, s.topo.ep_rank);
  } catch (...) {
    local_error = std::current_exception();
  }
  s.describe_call(shape, expand_x.dtype, o.comm_quant_mode, false, rows->own_rows, rows->peer_rows);
  s.exchange(CallKind::combine, local_error, "combine.counts");
  return shape;
}

void check_records(const Group::State& s) {
  s.require_same_call("combine.counts", true);
  for (int r = 0; r < s.transport->size(); ++r) check_combine_record(s, r, "combine.counts");
}

// This rank's index in its window: for every own row i, the entry of its triple's (source, token, k)
// names i, and each source's count says how many rows it has here. Each triple is checked first: a
// source of this EP group, a token inside that source's BS, a k this rank can hold (a routed k < K on a
// MoE rank, K + j on shared expert j's rank), and no triple twice. A failure is returned for the
// barrier that follows to raise on every rank.
std::exception_ptr index_rows(const CombineCall& c, const CallV2& v) {
  Group::State& s = c.s;
  const contract::Topology& topo = c.topo;
  const contract::WindowLayout& mine = c.my_layout;
  std::byte* window = s.transport->window(s.me());
  auto* index = reinterpret_cast<std::int64_t*>(window + mine.lookup_offset);
  auto* counts = reinterpret_cast<std::int64_t*>(window + mine.lookup_counts_offset);
  if (!s.index_clean) {  // its bytes may be rows or another layout's: clear them once (group_state.h)
    std::memset(index, 0, mine.lookup_counts_offset + static_cast<std::size_t>(topo.W) * 8 - mine.lookup_offset);
    s.index_clean = true;
    s.index_shape = s.shape_of(s.me());
    s.index_generation = s.window_generation;
  }
  std::vector<std::int64_t>& per_source = s.scratch_prefix;
  per_source.assign(static_cast<std::size_t>(topo.W), 0);
  const bool shared = topo.is_shared(topo.ep_rank);
  const std::int64_t shared_k = shared ? c.k + topo.v2_shared_expert_of(topo.ep_rank) : -1;
  try {
    for (std::int64_t i = 0; i < c.rows.own_rows; ++i) {
      const std::int32_t source = v.assist.at<std::int32_t>(3 * i);
      const std::int32_t b = v.assist.at<std::int32_t>(3 * i + 1);
      const std::int32_t k = v.assist.at<std::int32_t>(3 * i + 2);
      const auto bad = [&](std::int64_t at, std::int32_t value, const std::string& rule) {
        fail(ErrorCode::invalid_argument, concat("assist_info_for_combine[", at, "]"), concat(value),
             concat(rule, " (row ", i, "'s triple; use dispatch's assist_info_for_combine)"));
      };
      if (source < 0 || source >= topo.W) bad(3 * i, source, concat("must be a source EP rank in [0, ", topo.W, ")"));
      const std::int64_t source_bs = s.header(topo.global_rank(source, topo.tp_rank)).bs;
      if (b < 0 || b >= source_bs)
        bad(3 * i + 1, b, concat("must be a token of EP rank ", source, ", in [0, ", source_bs, ")"));
      if (shared ? k != shared_k : (k < 0 || k >= c.k))
        bad(3 * i + 2, k,
            shared ? concat("must be K + the shared expert of this rank = ", shared_k)
                   : concat("must be in [0, K = ", c.k, ")"));
      std::int64_t& entry =
          index[(static_cast<std::size_t>(source) * mine.lookup_tokens + static_cast<std::size_t>(b)) *
                    mine.lookup_slots +
                static_cast<std::size_t>(k)];
      if (tag_matches(entry, s.seq))
        bad(3 * i, source,
            concat("row ", untagged(entry), " already carries the triple (", source, ", ", b, ", ", k, ")"));
      entry = tagged(s.seq, i);
      ++per_source[static_cast<std::size_t>(source)];
    }
  } catch (...) {
    return std::current_exception();
  }
  for (int r = 0; r < topo.W; ++r) counts[r] = tagged(s.seq, per_source[static_cast<std::size_t>(r)]);
  return nullptr;
}

// Where the expert ranks' indexes are (every rank of this host's window holds one at its layout's
// offset), checked against their windows like the rows.
struct PeerIndex {
  const std::int64_t* index = nullptr;  // nullptr on another host
  const std::int64_t* counts = nullptr;
  std::size_t tokens = 0, slots = 0;
};

std::vector<PeerIndex> locate_indexes(const CombineCall& c) {
  const contract::Topology& topo = c.topo;
  std::vector<PeerIndex> out(static_cast<std::size_t>(topo.W));
  for (int d = 0; d < topo.W; ++d) {
    const int gd = topo.global_rank(d, topo.tp_rank);
    const contract::WindowLayout layout(topo, c.s.shape_of(gd), d);
    if (layout.total_bytes > c.s.transport->window_size(gd)) {
      throw PeerError(ErrorCode::protocol, gd, "combine.data",
                      concat("rank ", c.s.me(), ": the window of rank ", gd, " is too small for its row index"));
    }
    std::byte* window = c.s.transport->window(gd);
    PeerIndex& p = out[static_cast<std::size_t>(d)];
    p.tokens = layout.lookup_tokens;
    p.slots = layout.lookup_slots;
    if (window == nullptr) continue;
    p.index = reinterpret_cast<const std::int64_t*>(window + layout.lookup_offset);
    p.counts = reinterpret_cast<const std::int64_t*>(window + layout.lookup_counts_offset);
  }
  return out;
}

// The row of (source, b, k) in an expert rank's index, or -1. Checked against the rows it holds.
std::int64_t find_row(const PeerIndex& p, std::int64_t seq, int source, std::int64_t b, std::int64_t k,
                      std::int64_t held) {
  if (static_cast<std::size_t>(b) >= p.tokens || static_cast<std::size_t>(k) >= p.slots) return -1;
  const std::int64_t entry =
      p.index[(static_cast<std::size_t>(source) * p.tokens + static_cast<std::size_t>(b)) * p.slots +
              static_cast<std::size_t>(k)];
  if (!tag_matches(entry, seq)) return -1;
  const std::int64_t row = untagged(entry);
  return row < held ? row : -1;
}

// Each routed (token, k) entry of this rank and each shared slot, in reduce order, with the EP rank
// that holds its row; `visit(d, b, slot)` for every one.
template <class Visit>
void for_each_expected_row(const CombineCall& c, const CallV2& v, Visit&& visit) {
  const contract::Topology& topo = c.topo;
  for (std::int64_t b = 0; b < c.bs; ++b) {
    if (!v.mask.token_on(b)) continue;
    for (std::int64_t j = 0; j < c.k; ++j) {
      if (!v.mask.entry_on(b, j)) continue;
      const std::int32_t e = c.expert_ids.at<std::int32_t>(b, j);
      if (e < topo.E) visit(topo.expert_rank(e), b, j);
    }
    for (int j = 0; j < topo.Sn; ++j) visit(topo.v2_shared_target(topo.ep_rank, j), b, c.k + j);
  }
}

// Every expert rank on this host must hold exactly the rows this rank expects from it: as many as
// its index counts for this rank (so none extra), each found (so none missing). Rows on other hosts
// are checked by the proxy there (answer_requests).
void check_local_rows(const CombineCall& c, const CallV2& v, const std::vector<PeerIndex>& indexes) {
  Group::State& s = c.s;
  const contract::Topology& topo = c.topo;
  const int my_ep = topo.ep_rank;
  for (int d = 0; d < topo.W; ++d) {
    const PeerIndex& p = indexes[static_cast<std::size_t>(d)];
    if (p.index == nullptr) continue;
    std::int64_t expected = 0;
    for (int l = 0; l < topo.local_experts(d); ++l)
      expected += s.plan_v2.counts[static_cast<std::size_t>(d * topo.L + l)];
    const std::int64_t count = p.counts[my_ep];
    if (!tag_matches(count, s.seq) || untagged(count) != expected) {
      fail(ErrorCode::invalid_argument, "assist_info_for_combine",
           concat("(rank ", topo.global_rank(d, topo.tp_rank), "'s)"),
           concat("holds ", tag_matches(count, s.seq) ? untagged(count) : 0,
                  " rows of this rank, but expert_ids and x_active_mask send it ", expected,
                  ": pass combine the expert_ids, x_active_mask and special-expert counts given to dispatch, and each "
                  "rank its own dispatch outputs"));
    }
  }
  for_each_expected_row(c, v, [&](int d, std::int64_t b, std::int64_t slot) {
    const PeerIndex& p = indexes[static_cast<std::size_t>(d)];
    if (p.index == nullptr) return;
    if (find_row(p, s.seq, my_ep, b, slot, s.header(topo.global_rank(d, topo.tp_rank)).own_rows) < 0) {
      fail(ErrorCode::invalid_argument, "assist_info_for_combine",
           concat("(rank ", topo.global_rank(d, topo.tp_rank), "'s)"),
           concat("has no row for token ", b, ", k ", slot,
                  " of this rank: pass combine each rank's own dispatch outputs"));
    }
  });
}

// Rows on other hosts: one RowRequest per row, (EP rank, b * (K + Sn) + k), in reduce order.
void request_rows_from_other_hosts(CombineCall& c, const CallV2& v) {
  Group::State& s = c.s;
  for (auto& message : s.to_host) message.clear();
  for_each_expected_row(c, v, [&](int d, std::int64_t b, std::int64_t slot) {
    const int host = c.host_of_ep(d);
    if (host == c.my_host) return;
    const RowRequest request{d, static_cast<std::int32_t>(b * v.slots + slot)};
    std::memcpy(append(s.to_host[static_cast<std::size_t>(host)], sizeof request), &request, sizeof request);
    ++c.rows_from_other_hosts;
  });
}

// A proxy answers carried-for rank r from its host's indexes: each request must name an expert rank on
// this host and a (token, k) it holds a row of for r, and r must ask each such rank for all its rows.
void answer_requests(const CombineCall& c, int r, const std::vector<std::byte>& requests,
                     std::vector<std::byte>& answer) {
  Group::State& s = c.s;
  const contract::Topology& topo = c.topo;
  const int r_ep = s.ep_of(r);
  const std::int64_t slots = topo.K_slots(c.k);
  MessageReader in(requests);
  const auto bad = [&](const std::string& what) {
    throw PeerError(ErrorCode::protocol, r, "combine.requests",
                    concat("rank ", s.me(), ": rank ", r, " asked this host for ", what));
  };
  if (in.left() % sizeof(RowRequest) != 0)
    bad(concat("a request of ", in.left(), " bytes, not a whole number of rows"));
  const std::vector<PeerIndex> indexes = locate_indexes(c);
  std::vector<std::int64_t>& asked = s.scratch_prefix;
  asked.assign(static_cast<std::size_t>(topo.W), 0);
  RowRequest request{};
  while (in.read(&request)) {
    const int d = request.code;
    if (d < 0 || d >= topo.W || c.host_of_ep(d) != c.my_host)
      bad(concat("the rows of EP rank ", d, ", which is not on this host"));
    if (request.slot < 0) bad(concat("slot ", request.slot));
    const std::int64_t b = request.slot / slots, k = request.slot % slots;
    const int gd = topo.global_rank(d, topo.tp_rank);
    const std::int64_t row = find_row(indexes[static_cast<std::size_t>(d)], s.seq, r_ep, b, k, s.header(gd).own_rows);
    if (row < 0) {
      fail(ErrorCode::invalid_argument, "assist_info_for_combine", concat("(rank ", gd, "'s)"),
           concat("has no row for token ", b, ", k ", k, " of rank ", r,
                  ": pass combine each rank's own dispatch outputs"));
    }
    ++asked[static_cast<std::size_t>(d)];
    const std::byte* src = s.rows_of[static_cast<std::size_t>(d)] +
                           static_cast<std::size_t>(row) * s.row_bytes_of[static_cast<std::size_t>(d)];
    std::memcpy(append(answer, c.answer_stride), src, c.min_row_bytes);
  }
  for (int d = 0; d < topo.W; ++d) {
    const PeerIndex& p = indexes[static_cast<std::size_t>(d)];
    if (p.index == nullptr) continue;
    const std::int64_t count = p.counts[r_ep];
    const std::int64_t held = tag_matches(count, s.seq) ? untagged(count) : 0;
    if (held != asked[static_cast<std::size_t>(d)]) {
      fail(ErrorCode::invalid_argument, "assist_info_for_combine",
           concat("(rank ", topo.global_rank(d, topo.tp_rank), "'s)"),
           concat("holds ", held, " rows of rank ", r, ", which expects ", asked[static_cast<std::size_t>(d)],
                  ": pass combine the expert_ids, x_active_mask and special-expert counts given to dispatch, and each "
                  "rank its own dispatch outputs"));
    }
  }
}

void fetch_rows_from_other_hosts(CombineCall& c, const CallV2& v) {
  Group::State& s = c.s;
  s.traffic.combine_bytes_between_hosts = 0;
  if (!s.routes.multi_host()) return;
  request_rows_from_other_hosts(c, v);
  s.exchange_with_proxies("combine.requests");
  const std::exception_ptr serve_error = combine_steps::serve_carried_requests(c, answer_requests);
  s.answer_carried("combine.hosts");
  if (serve_error) std::rethrow_exception(serve_error);
  combine_steps::check_answers(c);
}

// One term of a token's sum (V2 §4.3), in the order it is added.
struct TermV2 {
  enum class Kind : std::uint8_t { expert_row, plain_row, const_expert };
  Kind kind;
  bool weighted;
  float weight;
  const std::byte* row;              // expert_row: as published (int8 groups with comm quant); plain_row: 16-bit
  const std::uint16_t* v = nullptr;  // const_expert: its vector row
  float a1 = 0.0f, a2 = 0.0f;        // const_expert: the softmax of its two gate products
};

// The packed 16-bit row of a (BS, H) view: itself when its columns are contiguous, else copied.
const std::uint16_t* packed_row(const TensorView& t, std::int64_t b, std::int64_t h, std::uint16_t* scratch) {
  if (t.strides[1] == 1) return t.ptr<std::uint16_t>(b, 0);
  kernels::copy_row16(t.ptr<std::uint16_t>(b, 0), t.strides[1], h, scratch);
  return scratch;
}

// Reduces every active token in the kernel's order: k = 0..K-1 (routed rows and copy and const experts
// weighted, zero experts and masked entries nothing), then shared experts j = 0..Sn-1 and
// shared_expert_x unweighted, one RINT cast (V2 §4.3). Inactive tokens' rows are written as zeros.
// Where each expert row is (an order-dependent walk through the proxies' answers) is found first, in
// reduce order; the sums are then shared by the rank's threads, each token's by one thread.
void reduce_tokens(const CombineCall& c, const CallV2& v, const MutableTensorView& out) {
  Group::State& s = c.s;
  const contract::Topology& topo = c.topo;
  const int my_ep = topo.ep_rank;
  const std::vector<PeerIndex> indexes = locate_indexes(c);
  std::vector<std::size_t>& answered = s.answered;
  answered.assign(static_cast<std::size_t>(s.routes.hosts()), 0);
  const auto expert_row = [&](int d, std::int64_t b, std::int64_t slot) -> const std::byte* {
    const int host = c.host_of_ep(d);
    if (host != c.my_host) {
      return s.from_host[static_cast<std::size_t>(host)].data() + sizeof(std::int64_t) +
             answered[static_cast<std::size_t>(host)]++ * c.answer_stride;
    }
    const std::int64_t row = find_row(indexes[static_cast<std::size_t>(d)], s.seq, my_ep, b, slot,
                                      s.header(topo.global_rank(d, topo.tp_rank)).own_rows);
    return s.rows_of[static_cast<std::size_t>(d)] +
           static_cast<std::size_t>(row) * s.row_bytes_of[static_cast<std::size_t>(d)];
  };
  // The row of every (token, slot) an expert rank holds, in reduce order (routed k, then shared j).
  std::vector<const std::byte*>& term_rows = s.term_rows;
  term_rows.assign(static_cast<std::size_t>(c.bs * v.slots), nullptr);
  std::int64_t rows_read = 0;
  for_each_expected_row(c, v, [&](int d, std::int64_t b, std::int64_t slot) {
    term_rows[static_cast<std::size_t>(b * v.slots + slot)] = expert_row(d, b, slot);
    ++rows_read;
  });
  const auto weight_of = [&](std::int64_t b, std::int64_t j) {
    return c.expert_scales.present() ? c.expert_scales.at<float>(b, j) : 1.0f;
  };
  constexpr std::int64_t kChunk = 1024;  // a multiple of the comm-quant group of 8
  const std::int64_t token_bytes = static_cast<std::int64_t>(v.slots) * static_cast<std::int64_t>(c.min_row_bytes);
  s.pool.parallel_for(0, c.bs, s.min_chunk(token_bytes), [&](std::int64_t begin, std::int64_t end, int) {
    std::vector<TermV2> terms;
    terms.reserve(static_cast<std::size_t>(c.k + topo.Sn + 1));
    std::vector<kernels::ReduceTerm> row_terms;
    row_terms.reserve(terms.capacity());
    // Packed copies of strided rows: ori_x, shared_expert_x, an alpha row, and one const vector per k.
    std::vector<std::uint16_t> rows16(static_cast<std::size_t>(3 * c.h));
    std::vector<std::uint16_t> const_rows(v.experts.constant > 0 ? static_cast<std::size_t>(c.k * c.h) : 0);
    std::vector<float> accumulator(static_cast<std::size_t>(std::min(c.h, kChunk)));
    float* acc = accumulator.data();
    for (std::int64_t b = begin; b < end; ++b) {
      if (!v.mask.token_on(b)) {
        for (std::int64_t i = 0; i < c.h; ++i) *out.ptr<std::uint16_t>(b, i) = 0;
        continue;
      }
      const std::byte* const* token_rows = term_rows.data() + b * v.slots;
      terms.clear();
      const std::uint16_t* ori = nullptr;
      for (std::int64_t j = 0; j < c.k; ++j) {
        if (!v.mask.entry_on(b, j)) continue;
        const std::int32_t e = c.expert_ids.at<std::int32_t>(b, j);
        switch (v.experts.kind(e)) {
          case contract::ExpertKind::routed:
            terms.push_back(TermV2{TermV2::Kind::expert_row, true, weight_of(b, j), token_rows[j]});
            break;
          case contract::ExpertKind::zero:
            break;
          case contract::ExpertKind::copy:
            if (ori == nullptr) ori = packed_row(v.o.ori_x, b, c.h, rows16.data());
            terms.push_back(
                TermV2{TermV2::Kind::plain_row, true, weight_of(b, j), reinterpret_cast<const std::byte*>(ori)});
            break;
          case contract::ExpertKind::constant: {
            if (ori == nullptr) ori = packed_row(v.o.ori_x, b, c.h, rows16.data());
            const std::int64_t q = v.experts.const_index(e);
            // The gate: the softmax of <alpha_1[q], x> and <alpha_2[q], x> (V2 §4.4, moedist's summation order).
            const auto dot = [&](const TensorView& alpha) {
              return kernels::dot_row(packed_row(alpha, q, c.h, rows16.data() + 2 * c.h), ori, c.type, c.h);
            };
            const float l1 = dot(v.o.const_expert_alpha_1), l2 = dot(v.o.const_expert_alpha_2);
            const float m = std::max(l1, l2);
            const float e1 = std::exp(l1 - m), e2 = std::exp(l2 - m);
            const float sum = e1 + e2;
            TermV2 t{TermV2::Kind::const_expert, true, weight_of(b, j), reinterpret_cast<const std::byte*>(ori)};
            t.v = packed_row(v.o.const_expert_v, q, c.h, const_rows.data() + j * c.h);
            t.a1 = e1 / sum;
            t.a2 = e2 / sum;
            terms.push_back(t);
            break;
          }
        }
      }
      for (int j = 0; j < topo.Sn; ++j)
        terms.push_back(TermV2{TermV2::Kind::expert_row, false, 1.0f, token_rows[c.k + j]});
      if (v.o.shared_expert_x.present()) {
        const std::uint16_t* sx = packed_row(v.o.shared_expert_x, b, c.h, rows16.data() + c.h);
        terms.push_back(TermV2{TermV2::Kind::plain_row, false, 1.0f, reinterpret_cast<const std::byte*>(sx)});
      }
      // Rows of 16-bit floats only (no comm quant, no const expert): one pass, the sums in registers.
      const auto is_const = [](const TermV2& t) { return t.kind == TermV2::Kind::const_expert; };
      if (!c.quantized && std::none_of(terms.begin(), terms.end(), is_const)) {
        row_terms.clear();
        for (const TermV2& t : terms)
          row_terms.push_back(kernels::ReduceTerm{reinterpret_cast<const std::uint16_t*>(t.row), t.weight, t.weighted});
        kernels::reduce_terms(row_terms.data(), row_terms.size(), c.type, c.h, out.ptr<std::uint16_t>(b, 0),
                              out.strides[1]);
        continue;
      }
      for (std::int64_t h0 = 0; h0 < c.h; h0 += kChunk) {
        const std::int64_t len = std::min(kChunk, c.h - h0);
        std::fill_n(acc, len, 0.0f);
        for (const TermV2& t : terms) {
          if (t.kind == TermV2::Kind::const_expert) {
            kernels::accumulate_const_expert(acc, reinterpret_cast<const std::uint16_t*>(t.row) + h0, t.v + h0, c.type,
                                             t.a1, t.a2, t.weight, len);
          } else {
            const bool int8_groups = t.kind == TermV2::Kind::expert_row && c.quantized;
            combine_steps::accumulate_row(c, acc, t.row, int8_groups, t.weighted, t.weight, h0, len);
          }
        }
        kernels::store_row(acc, c.type, len, out.ptr<std::uint16_t>(b, h0), out.strides[1]);
      }
    }
  });
  s.traffic.combine_rows_read = rows_read;
  s.traffic.combine_bytes_read = rows_read * static_cast<std::int64_t>(c.min_row_bytes);
  s.traffic.combine_bytes_between_hosts_flat = c.rows_from_other_hosts * static_cast<std::int64_t>(c.min_row_bytes);
}

}  // namespace

TensorView Group::combine_v2(const TensorView& expand_x, const TensorView& expert_ids, const TensorView& assist,
                             const TensorView& ep_send_counts, const TensorView& expert_scales,
                             const CombineV2Options& o) {
  State& s = *state_;
  const BusyWhileCalling busy(*s.transport);
  ++s.seq;
  const WaitClock clock(s, o.performance_info);
  contract::CombineCounts rows;
  contract::EntryMask mask;
  contract::SpecialExperts experts;
  const contract::CallShape shape =
      publish_records(s, expand_x, expert_ids, assist, ep_send_counts, expert_scales, o, &rows, &mask, &experts);
  check_records(s);
  s.ensure_windows("combine.window");
  CombineCall call(s, expand_x, expert_ids, expert_scales, o.out, o.comm_quant_mode, shape, rows);
  const CallV2 v{assist, o, mask, experts, s.topo.K_slots(shape.k)};
  const std::exception_ptr index_error = index_rows(call, v);
  // With T = 2 the TP reduce's barrier (combine.tp) reports an index failure on both TP ranks.
  const PublishedRows staged = combine_steps::stage_rows(call, index_error);
  s.step(s.topo.T == 2 ? nullptr : index_error, "combine.data", staged.offset, staged.row_bytes);
  if (s.topo.T != 2) s.combined_since_dispatch = true;
  const MutableTensorView out = combine_steps::combine_output(call);
  combine_steps::locate_published_rows(call);
  // A missing or extra row on this host fails this rank, after it has taken part in the exchange with
  // the other hosts (which would otherwise wait for its requests).
  std::exception_ptr rows_error;
  try {
    check_local_rows(call, v, locate_indexes(call));
  } catch (...) {
    rows_error = std::current_exception();
  }
  fetch_rows_from_other_hosts(call, v);
  if (rows_error) std::rethrow_exception(rows_error);
  reduce_tokens(call, v, out);
  clock.record();
  return out;
}

}  // namespace moedist
