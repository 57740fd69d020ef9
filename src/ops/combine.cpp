// Combine = validate, exchange the row tables, stage this rank's expert-output rows in its window
// (after the TP reduce, optionally int8-quantized), then every source rank reads the rows of its own
// tokens from the expert ranks' windows and reduces them in place (§4.1-§4.5). Group::combine is the
// list of these phases, in the order of docs/architecture.md ("A combine").
#include <algorithm>
#include <cstring>

#include "common/format.h"
#include "contract/checks.h"
#include "contract/record_checks.h"
#include "contract/shared_split.h"
#include "kernels/row_kernels.h"
#include "ops/combine_steps.h"
#include "ops/group_state.h"
#include "ops/host_messages.h"

namespace moedist {

namespace {

using combine_steps::CombineCall;
using combine_steps::PublishedRows;

// Start of block `index` in an inclusive prefix-sum table.
inline std::int64_t block_begin(const std::int32_t* table, int index) { return index == 0 ? 0 : table[index - 1]; }

// A peer's BS must be one the configuration allows (the rule of dispatch's records, which sizes its
// window from it), its row table a prefix sum within its capacity, and TP peers must agree on each
// other's rows.
void check_combine_record(const Group::State& s, int r, const char* phase) {
  const contract::Topology& topo = s.topo;
  const CallHeader& hd = s.header(r);
  const std::int32_t* table = s.counts(r);
  const int ep = r / topo.T;
  const int len = topo.W * topo.local_experts(ep);
  const std::int64_t max_bs = contract::peer_bs_limit(topo.global_bs, topo.W, s.header(s.me()).bs);
  if (hd.bs < 0 || hd.bs > max_bs) {
    throw PeerError(ErrorCode::protocol, r, phase,
                    concat("rank ", s.me(), ": rank ", r, " reports BS ", hd.bs, ", outside [0, ", max_bs, "]"));
  }
  const std::int64_t capacity = topo.receive_rows(ep, hd.bs, hd.k);
  std::int32_t prev = 0;
  for (int i = 0; i < len; ++i) {
    if (table[i] < prev || table[i] > capacity) {
      throw PeerError(ErrorCode::protocol, r, phase,
                      concat("rank ", s.me(), ": the row table of rank ", r, " is not a prefix sum within its capacity ",
                             capacity, " (entry ", i, " = ", table[i], ")"));
    }
    prev = table[i];
  }
  if (hd.own_rows != prev || hd.peer_rows < 0 || hd.peer_rows > capacity) {
    throw PeerError(ErrorCode::protocol, r, phase, concat("rank ", s.me(), ": rank ", r, " reports inconsistent row counts"));
  }
  // Checked for every TP pair on every rank, so that all ranks fail alike.
  if (topo.T == 2) {
    const int peer = topo.global_rank(ep, 1 - r % topo.T);
    const CallHeader& other = s.header(peer);
    if (hd.own_rows != other.peer_rows || hd.peer_rows != other.own_rows) {
      throw PeerError(ErrorCode::config_mismatch, r, phase,
                      concat("rank ", r, " holds ", hd.own_rows, " own and ", hd.peer_rows, " peer rows but its TP peer rank ", peer,
                             " holds ", other.own_rows, " own and ", other.peer_rows, " peer rows: pass each rank its own dispatch outputs"));
    }
  }
}

// The routing this rank passes to combine must be the one it dispatched: every (expert, this rank)
// block at the expert rank must hold exactly as many rows as the active tokens of expert_ids send
// there, and every expand_idx of theirs must point inside its block. Returns normally or throws a
// ValidationError. (A mask other than dispatch's shows here too: it routes other counts.)
void check_routes(Group::State& s, const TensorView& expert_ids, const TensorView& expand_idx, std::int64_t active) {
  const contract::Topology& topo = s.topo;
  const int my_ep = topo.ep_rank;
  // A plan of its own: dispatch's plan backs the expand_idx view dispatch returned.
  s.route_plan.build(topo, expert_ids, my_ep, active);
  for (int e = 0; e < topo.E; ++e) {
    const int d = topo.expert_rank(e);
    const std::int32_t* table = s.counts(topo.global_rank(d, topo.tp_rank));
    const int index = topo.expert_local(e) * topo.W + my_ep;
    const std::int64_t rows = table[index] - block_begin(table, index);
    const std::int32_t sent = s.route_plan.counts[static_cast<std::size_t>(topo.S * topo.L + e)];
    if (rows != sent) {
      fail(ErrorCode::invalid_argument, "expert_ids", concat("(routes ", sent, " tokens to expert ", e, ")"),
           concat("rank ", d, " holds ", rows, " rows of this rank for expert ", e,
                  "; pass combine the expert_ids and x_active_mask given to dispatch, and each rank its own "
                  "ep_send_counts"));
    }
  }
  const std::int64_t n = active * expert_ids.cols();
  for (std::int64_t t = 0; t < n; ++t) {
    const std::int32_t e = expert_ids.at<std::int32_t>(t / expert_ids.cols(), t % expert_ids.cols());
    const std::int32_t slot = expand_idx.flat<std::int32_t>(t);
    const std::int32_t rows = s.route_plan.counts[static_cast<std::size_t>(topo.S * topo.L + e)];
    if (slot >= rows) {
      fail(ErrorCode::invalid_argument, concat("expand_idx[", t, "]"), concat(slot),
           concat("must be < ", rows, ", the rows this rank sent to expert ", e, "; use dispatch's expand_idx"));
    }
  }
  if (topo.S > 0 && !topo.is_shared(my_ep)) {
    for (int sr = 0; sr < topo.S; ++sr) {
      const std::int32_t* table = s.counts(topo.global_rank(sr, topo.tp_rank));
      const std::int64_t rows = table[my_ep] - table[my_ep - 1];
      const std::int64_t want = contract::shared_range_count(my_ep, sr, active, topo.S);
      if (rows != want) {
        fail(ErrorCode::invalid_argument, "expert_ids.shape[0] (BS)", concat(expert_ids.rows()),
             concat("shared-expert rank ", sr, " holds ", rows, " rows of this rank, but ", active,
                    " active tokens assign it ", want,
                    "; pass combine the tensors (and x_active_mask) of the matching dispatch"));
      }
    }
  }
}

// The routing check's failure, if any, for the next barrier to report on every rank.
std::exception_ptr route_failure(Group::State& s, const TensorView& expert_ids, const TensorView& expand_idx,
                                 std::int64_t active) {
  try {
    check_routes(s, expert_ids, expand_idx, active);
  } catch (...) {
    return std::current_exception();
  }
  return nullptr;
}

// Validates locally, then publishes this rank's record with its row table (ep_send_counts, own half),
// or its failure, and learns everyone's. Returns the checked shape; `rows` gets the row counts.
contract::CallShape publish_records(Group::State& s, const TensorView& expand_x, const TensorView& expert_ids,
                                    const TensorView& expand_idx, const TensorView& ep_send_counts,
                                    const TensorView& expert_scales, const CombineOptions& o,
                                    contract::CombineCounts* rows) {
  const contract::Topology& topo = s.topo;
  std::exception_ptr local_error;
  contract::CallShape shape;
  try {
    shape = contract::check_combine(s.config, expand_x, expert_ids, expand_idx, ep_send_counts, expert_scales, o, rows);
    combine_steps::check_window_rows_unused(s, expand_x);
  } catch (...) {
    local_error = std::current_exception();
  }
  s.describe_call(shape, expand_x.dtype, o.comm_quant_mode, false, rows->own_rows, rows->peer_rows);
  std::int32_t* own_table = s.own_counts();
  if (!local_error) {
    for (int i = 0; i < topo.W * topo.local_experts(topo.ep_rank); ++i)
      own_table[i] = ep_send_counts.at<std::int32_t>(i);
  }
  s.exchange(CallKind::combine, local_error, "combine.counts");
  return shape;
}

// Every rank checks every record alike: the same call everywhere, and row tables that fit.
void check_records(const Group::State& s) {
  s.require_same_call("combine.counts", true);
  for (int r = 0; r < s.transport->size(); ++r) check_combine_record(s, r, "combine.counts");
}

// Where a term of token b lives: its EP rank, its row there, and its name for a proxy (host_messages.h).
struct TermPlace {
  int d;
  std::int64_t row;
  RowRequest target;
};

// The places of the terms of each token, for one pass over the tokens in ascending order.
class TermPlaces {
 public:
  TermPlaces(const CombineCall& c, const TensorView& expand_idx) : c_(c), expand_idx_(expand_idx) {}

  TermPlace moe(std::int64_t b, std::int64_t j) const {
    const contract::Topology& topo = c_.topo;
    const std::int32_t e = c_.expert_ids.at<std::int32_t>(b, j);
    const int d = topo.expert_rank(e);
    const std::int32_t* table = c_.s.counts(topo.global_rank(d, topo.tp_rank));
    const std::int32_t slot = expand_idx_.flat<std::int32_t>(b * c_.k + j);
    return TermPlace{d, block_begin(table, topo.expert_local(e) * topo.W + topo.ep_rank) + slot, RowRequest{e, slot}};
  }

  TermPlace shared(std::int64_t b) {  // call with b ascending: the shared split follows from one token to the next
    const contract::Topology& topo = c_.topo;
    const int my_ep = topo.ep_rank;
    if (topo.is_shared(my_ep))
      return TermPlace{my_ep, b, RowRequest{shared_expert_code(my_ep), static_cast<std::int32_t>(b)}};
    while (b >= contract::shared_range_begin(my_ep, shared_target_ + 1, c_.active, topo.S)) ++shared_target_;
    const std::int32_t* table = c_.s.counts(topo.global_rank(shared_target_, topo.tp_rank));
    const std::int64_t slot = b - contract::shared_range_begin(my_ep, shared_target_, c_.active, topo.S);
    return TermPlace{shared_target_, table[my_ep - 1] + slot,
                     RowRequest{shared_expert_code(shared_target_), static_cast<std::int32_t>(slot)}};
  }

 private:
  const CombineCall& c_;
  const TensorView& expand_idx_;
  int shared_target_ = 0;  // shared-expert rank of the current token (MoE source ranks)
};

// Asks this rank's proxy on each other host for the rows there, in reduce order (s.to_host).
void request_rows_from_other_hosts(CombineCall& c, const TensorView& expand_idx) {
  Group::State& s = c.s;
  for (auto& message : s.to_host) message.clear();
  const auto request = [&](const TermPlace& place) {
    const int host = c.host_of_ep(place.d);
    if (host == c.my_host) return;
    std::memcpy(append(s.to_host[static_cast<std::size_t>(host)], sizeof(RowRequest)), &place.target,
                sizeof(RowRequest));
    ++c.rows_from_other_hosts;
  };
  TermPlaces places(c, expand_idx);
  for (std::int64_t b = 0; b < c.active; ++b) {
    for (std::int64_t j = 0; j < c.k; ++j) request(places.moe(b, j));
    if (c.topo.S > 0) request(places.shared(b));
  }
}

// Appends to `answer` the rows carried-for rank r asked this host for, as they sit in the expert ranks'
// windows. Each request must name a row of r's block at an expert rank on this host.
void answer_requests(const CombineCall& c, int r, const std::vector<std::byte>& requests,
                     std::vector<std::byte>& answer) {
  Group::State& s = c.s;
  const contract::Topology& topo = c.topo;
  MessageReader in(requests);
  const auto bad = [&](const std::string& what) {
    throw PeerError(ErrorCode::protocol, r, "combine.requests",
                    concat("rank ", s.me(), ": rank ", r, " asked this host for ", what));
  };
  if (in.left() % sizeof(RowRequest) != 0)
    bad(concat("a request of ", in.left(), " bytes, not a whole number of rows"));
  RowRequest target{};
  while (in.read(&target)) {
    ExpertPlace place;
    if (!decode_expert(topo, target.code, &place)) bad(concat("expert code ", target.code));
    const int d = place.ep;
    if (c.host_of_ep(d) != c.my_host) bad(concat("the rows of EP rank ", d, ", which is not on this host"));
    const std::int32_t* table = s.counts(topo.global_rank(d, topo.tp_rank));
    const int index = place.local * topo.W + s.ep_of(r);
    const std::int64_t begin = block_begin(table, index);
    if (target.slot < 0 || target.slot >= table[index] - begin) {
      bad(concat("slot ", target.slot, " of expert code ", target.code, ", outside its ", table[index] - begin,
                 " rows"));
    }
    const std::byte* row = s.rows_of[static_cast<std::size_t>(d)] +
                           static_cast<std::size_t>(begin + target.slot) * s.row_bytes_of[static_cast<std::size_t>(d)];
    std::memcpy(append(answer, c.answer_stride), row, c.min_row_bytes);
  }
}

// Rows on other hosts: ask this rank's proxy on each for them, in reduce order; serve the ranks this
// rank carries for from its host's windows; then check the answers, which reduce_tokens reads.
void fetch_rows_from_other_hosts(CombineCall& c, const TensorView& expand_idx) {
  Group::State& s = c.s;
  s.traffic.combine_bytes_between_hosts = 0;
  if (!s.routes.multi_host()) return;
  request_rows_from_other_hosts(c, expand_idx);
  s.exchange_with_proxies("combine.requests");
  const std::exception_ptr serve_error = combine_steps::serve_carried_requests(c, answer_requests);
  s.answer_carried("combine.hosts");
  if (serve_error) std::rethrow_exception(serve_error);
  combine_steps::check_answers(c);
}

// Token b's output row from its n terms, added in increasing k, shared expert last. Rows of 16-bit
// floats in one pass (the sums stay in registers across the terms); int8 rows (comm quant) in chunks of
// H, so that the fp32 accumulator stays in L1. Every element adds its terms in the same order either
// way, so the result is bit-identical to a whole-row reduce.
void reduce_token(const CombineCall& c, std::int64_t b, const kernels::ReduceTerm* terms, std::size_t n, float* acc,
                  std::int64_t chunk, const MutableTensorView& out) {
  if (!c.quantized) {
    kernels::reduce_terms(terms, n, c.type, c.h, out.ptr<std::uint16_t>(b, 0), out.strides[1]);
    return;
  }
  for (std::int64_t h0 = 0; h0 < c.h; h0 += chunk) {
    const std::int64_t len = std::min(chunk, c.h - h0);
    std::fill_n(acc, len, 0.0f);
    for (std::size_t i = 0; i < n; ++i) {
      const kernels::ReduceTerm& t = terms[i];
      combine_steps::accumulate_row(c, acc, reinterpret_cast<const std::byte*>(t.row), true, t.weighted, t.weight, h0,
                                    len);
    }
    kernels::store_row(acc, c.type, len, out.ptr<std::uint16_t>(b, h0), out.strides[1]);
  }
}

// Reduces every token from the expert ranks' rows (§4.2), shared expert unweighted (§4.3): rows on
// this host from the windows, rows of other hosts from the proxies' answers, in request order. Where
// each term's row is (an order-dependent walk through the answers) is found first, token by token; the
// sums are then shared by the rank's threads, each token's by one thread, in the same order as alone.
void reduce_tokens(const CombineCall& c, const TensorView& expand_idx, const MutableTensorView& out) {
  Group::State& s = c.s;
  const contract::Topology& topo = c.topo;
  std::vector<std::size_t>& answered = s.answered;  // per host: rows of its answer reduced so far
  answered.assign(static_cast<std::size_t>(s.routes.hosts()), 0);
  const auto term_row = [&](const TermPlace& place) -> const std::byte* {
    const int host = c.host_of_ep(place.d);
    if (host == c.my_host)
      return s.rows_of[static_cast<std::size_t>(place.d)] +
             static_cast<std::size_t>(place.row) * s.row_bytes_of[static_cast<std::size_t>(place.d)];
    return s.from_host[static_cast<std::size_t>(host)].data() + sizeof(std::int64_t) +
           answered[static_cast<std::size_t>(host)]++ * c.answer_stride;
  };
  // Per token its K (+ 1 shared) rows and their weights (the shared expert's is unweighted).
  const std::size_t n = static_cast<std::size_t>(c.k + (topo.S > 0 ? 1 : 0));
  std::vector<kernels::ReduceTerm>& terms = s.terms;
  terms.resize(static_cast<std::size_t>(c.active) * n);
  TermPlaces places(c, expand_idx);
  const auto row = [](const std::byte* p) { return reinterpret_cast<const std::uint16_t*>(p); };
  for (std::int64_t b = 0; b < c.active; ++b) {
    kernels::ReduceTerm* token_terms = terms.data() + static_cast<std::size_t>(b) * n;
    for (std::int64_t j = 0; j < c.k; ++j)
      token_terms[j] = kernels::ReduceTerm{row(term_row(places.moe(b, j))), c.expert_scales.at<float>(b, j), true};
    if (topo.S > 0) token_terms[c.k] = kernels::ReduceTerm{row(term_row(places.shared(b))), 1.0f, false};
  }
  constexpr std::int64_t kChunk = 1024;  // a multiple of the comm-quant group of 8
  for (int t = 0; t < s.pool.size(); ++t) s.row_scratch(t, std::min(c.h, kChunk));  // sized on the calling thread
  const std::int64_t token_bytes = static_cast<std::int64_t>(n * c.min_row_bytes);
  s.pool.parallel_for(0, c.active, s.min_chunk(token_bytes), [&](std::int64_t begin, std::int64_t end, int t) {
    float* acc = s.row_scratch(t, std::min(c.h, kChunk));
    for (std::int64_t b = begin; b < end; ++b)
      reduce_token(c, b, terms.data() + static_cast<std::size_t>(b) * n, n, acc, kChunk, out);
  });
  // Inactive tokens: the NPU leaves their rows unwritten; moedist writes zeros (docs/contract.md).
  for (std::int64_t b = c.active; b < c.bs; ++b) {
    for (std::int64_t i = 0; i < c.h; ++i) *out.ptr<std::uint16_t>(b, i) = 0;
  }
  const std::int64_t rows_read = c.active * c.k + (topo.S > 0 ? c.active : 0);
  s.traffic.combine_rows_read = rows_read;
  s.traffic.combine_bytes_read = rows_read * static_cast<std::int64_t>(c.min_row_bytes);
  s.traffic.combine_bytes_between_hosts_flat = c.rows_from_other_hosts * static_cast<std::int64_t>(c.min_row_bytes);
}

}  // namespace

TensorView Group::combine(const TensorView& expand_x, const TensorView& expert_ids, const TensorView& expand_idx,
                          const TensorView& ep_send_counts, const TensorView& expert_scales, const CombineOptions& o) {
  State& s = *state_;
  const BusyWhileCalling busy(*s.transport);
  ++s.seq;
  contract::CombineCounts rows;
  const contract::CallShape shape =
      publish_records(s, expand_x, expert_ids, expand_idx, ep_send_counts, expert_scales, o, &rows);
  check_records(s);
  s.ensure_windows("combine.window");  // grows them when some rank's layout needs more room
  const std::exception_ptr route_error = route_failure(s, expert_ids, expand_idx, shape.active);
  CombineCall call(s, expand_x, expert_ids, expert_scales, o.out, o.comm_quant_mode, shape, rows);
  const PublishedRows staged = combine_steps::stage_rows(call, route_error);
  // Carries any failure (with T = 2 the routing one was raised at combine.tp) and where each rank's rows are.
  s.step(s.topo.T == 2 ? nullptr : route_error, "combine.data", staged.offset, staged.row_bytes);
  // From here on the other ranks of this host read this rank's rows, possibly after it has returned.
  if (s.topo.T != 2) s.combined_since_dispatch = true;
  const MutableTensorView out = combine_steps::combine_output(call);
  combine_steps::locate_published_rows(call);
  fetch_rows_from_other_hosts(call, expand_idx);
  reduce_tokens(call, expand_idx, out);
  return out;
}

}  // namespace moedist
