// Combine = validate, exchange the row tables, stage this rank's expert-output rows in its window
// (after the TP reduce, optionally int8-quantized), then every source rank reads the rows of its own
// tokens from the expert ranks' windows and reduces them in place (§4.1-§4.5).
#include <algorithm>
#include <cstring>

#include "contract/checks.h"
#include "common/format.h"
#include "contract/shared_split.h"
#include "kernels/row_kernels.h"
#include "ops/group_state.h"
#include "ops/host_messages.h"

namespace moedist {

using numeric::Half;

namespace {

// Start of block `index` in an inclusive prefix-sum table.
inline std::int64_t block_begin(const std::int32_t* table, int index) { return index == 0 ? 0 : table[index - 1]; }

// A peer's row table must be a prefix sum within its capacity, and TP peers must agree on each other's rows.
void check_combine_record(const Group::State& s, int r, const char* phase) {
  const contract::Topology& topo = s.topo;
  const CallHeader& hd = s.header(r);
  const std::int32_t* table = s.counts(r);
  const int ep = r / topo.T;
  const int len = topo.W * topo.local_experts(ep);
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
// block at the expert rank must hold exactly as many rows as expert_ids sends there, and every
// expand_idx must point inside its block. Returns normally or throws a ValidationError.
void check_routes(Group::State& s, const TensorView& expert_ids, const TensorView& expand_idx) {
  const contract::Topology& topo = s.topo;
  const int my_ep = topo.ep_rank;
  // A plan of its own: dispatch's plan backs the expand_idx view dispatch returned.
  s.route_plan.build(topo, expert_ids, my_ep);
  for (int e = 0; e < topo.E; ++e) {
    const int d = topo.expert_rank(e);
    const std::int32_t* table = s.counts(topo.global_rank(d, topo.tp_rank));
    const int index = topo.expert_local(e) * topo.W + my_ep;
    const std::int64_t rows = table[index] - block_begin(table, index);
    const std::int32_t sent = s.route_plan.counts[static_cast<std::size_t>(topo.S * topo.L + e)];
    if (rows != sent) {
      fail(ErrorCode::invalid_argument, "expert_ids", concat("(routes ", sent, " tokens to expert ", e, ")"),
           concat("rank ", d, " holds ", rows, " rows of this rank for expert ", e,
                  "; pass combine the expert_ids given to dispatch, and each rank its own ep_send_counts"));
    }
  }
  const std::int64_t n = expand_idx.rows();
  for (std::int64_t t = 0; t < n; ++t) {
    const std::int32_t e = expert_ids.at<std::int32_t>(t / expert_ids.cols(), t % expert_ids.cols());
    const std::int32_t slot = expand_idx.at<std::int32_t>(t);
    const std::int32_t rows = s.route_plan.counts[static_cast<std::size_t>(topo.S * topo.L + e)];
    if (slot >= rows) {
      fail(ErrorCode::invalid_argument, concat("expand_idx[", t, "]"), concat(slot),
           concat("must be < ", rows, ", the rows this rank sent to expert ", e, "; use dispatch's expand_idx"));
    }
  }
  if (topo.S > 0 && !topo.is_shared(my_ep)) {
    const std::int64_t bs = expert_ids.rows();
    for (int sr = 0; sr < topo.S; ++sr) {
      const std::int32_t* table = s.counts(topo.global_rank(sr, topo.tp_rank));
      const std::int64_t rows = table[my_ep] - table[my_ep - 1];
      const std::int64_t want = contract::shared_range_count(my_ep, sr, bs, topo.S);
      if (rows != want) {
        fail(ErrorCode::invalid_argument, "expert_ids.shape[0] (BS)", concat(bs),
             concat("shared-expert rank ", sr, " holds ", rows, " rows of this rank, but BS = ", bs, " assigns it ",
                    want, "; pass combine the tensors of the matching dispatch"));
      }
    }
  }
}

}  // namespace

TensorView Group::combine(const TensorView& expand_x, const TensorView& expert_ids, const TensorView& expand_idx,
                          const TensorView& ep_send_counts, const TensorView& expert_scales, const CombineOptions& o) {
  State& s = *state_;
  const contract::Topology& topo = s.topo;
  const int me = s.me();
  const int my_ep = topo.ep_rank, my_tp = topo.tp_rank;
  ++s.seq;

  // 1. Validate locally; publish this rank's row table (ep_send_counts, own half).
  std::exception_ptr local_error;
  contract::CallShape shape;
  contract::CombineCounts rows;
  try {
    shape = contract::check_combine(s.config, expand_x, expert_ids, expand_idx, ep_send_counts, expert_scales, o, &rows);
  } catch (...) {
    local_error = std::current_exception();
  }
  s.describe_call(shape, expand_x.dtype, o.comm_quant_mode, false, rows.own_rows, rows.peer_rows);
  std::int32_t* own_table = s.own_counts();
  if (!local_error) {
    for (int i = 0; i < topo.W * topo.local_experts(my_ep); ++i) own_table[i] = ep_send_counts.at<std::int32_t>(i);
  }
  s.exchange(CallKind::combine, local_error, "combine.counts");
  s.require_same_call("combine.counts", true);
  for (int r = 0; r < s.transport->size(); ++r) check_combine_record(s, r, "combine.counts");
  s.ensure_windows("combine.window");

  std::exception_ptr route_error;
  try {
    check_routes(s, expert_ids, expand_idx);
  } catch (...) {
    route_error = std::current_exception();
  }

  // 2. Make this rank's rows readable by the source ranks: TP reduce first (§4.4), else optional int8
  //    quantization (§4.5). Rows that already sit in this rank's window (dispatch's expand_x view passed
  //    back, or combine_buffer()) are read in place: no copy at all.
  const std::int64_t h = shape.h, k = shape.k, bs = shape.bs;
  const Half type = expand_x.dtype == DType::bf16 ? Half::bf16 : Half::fp16;
  const contract::WindowLayout my_layout(topo, shape, my_ep);
  std::byte* my_window = s.transport->window(me);
  std::byte* my_stage = my_window + my_layout.combine_rows_offset;
  const std::size_t stage_row_bytes = my_layout.combine_row_bytes;
  const std::size_t groups = my_layout.comm_quant_groups;
  const std::int64_t x_cs = expand_x.strides[1];
  const auto* x_base = static_cast<const std::byte*>(expand_x.data);
  const bool in_stage = x_base == my_stage && x_cs == 1 && static_cast<std::size_t>(expand_x.strides[0]) * 2 == stage_row_bytes;
  const bool in_dispatch_region = x_base == my_window + my_layout.expand_x_offset && x_cs == 1 && expand_x.strides[0] == h;
  std::size_t rows_offset = my_layout.combine_rows_offset;
  std::size_t row_bytes = stage_row_bytes;
  if (topo.T == 2) {
    const int peer = topo.global_rank(my_ep, 1 - my_tp);
    if (!route_error) {
      // The peer's tokens' rows of this rank's partial result go to the peer's inbox.
      const contract::WindowLayout peer_layout(topo, s.shape_of(peer), my_ep);
      auto* inbox = reinterpret_cast<std::uint16_t*>(s.transport->window(peer) + peer_layout.tp_inbox_offset);
      for (std::int64_t i = 0; i < rows.peer_rows; ++i) {
        kernels::copy_row16(expand_x.ptr<std::uint16_t>(rows.own_rows + i, 0), x_cs, h, inbox + i * h);
      }
    }
    s.step(route_error, "combine.tp");
    const auto* inbox = reinterpret_cast<const std::uint16_t*>(my_window + my_layout.tp_inbox_offset);
    for (std::int64_t i = 0; i < rows.own_rows; ++i) {  // row by row, so reducing in place is safe
      kernels::tp_reduce_row(expand_x.ptr<std::uint16_t>(i, 0), x_cs, inbox + i * h, type, h,
                             reinterpret_cast<std::uint16_t*>(my_stage + static_cast<std::size_t>(i) * stage_row_bytes));
    }
  } else if (!route_error) {
    if (o.comm_quant_mode == 2) {
      // Quantize through a scratch row: the source row may be the very slot it is written to.
      auto* packed = reinterpret_cast<std::byte*>(s.row_scratch(h + static_cast<std::int64_t>(stage_row_bytes) / 4 + 1));
      for (std::int64_t i = 0; i < rows.own_rows; ++i) {
        kernels::comm_quantize_row(expand_x.ptr<std::uint16_t>(i, 0), x_cs, type, h, reinterpret_cast<std::int8_t*>(packed + groups * 2),
                                   reinterpret_cast<std::uint16_t*>(packed));
        std::memcpy(my_stage + static_cast<std::size_t>(i) * stage_row_bytes, packed, groups * 2 + static_cast<std::size_t>(h));
      }
    } else if (in_dispatch_region) {
      rows_offset = my_layout.expand_x_offset;
      row_bytes = static_cast<std::size_t>(h) * 2;
    } else if (!in_stage) {
      for (std::int64_t i = 0; i < rows.own_rows; ++i) {
        kernels::copy_row16(expand_x.ptr<std::uint16_t>(i, 0), x_cs, h,
                            reinterpret_cast<std::uint16_t*>(my_stage + static_cast<std::size_t>(i) * stage_row_bytes));
      }
    }
  }
  s.step(topo.T == 2 ? nullptr : route_error, "combine.data", rows_offset, row_bytes);

  // 3. Reduce every token from the expert ranks' rows (§4.2), shared expert unweighted (§4.3).
  MutableTensorView out = o.out;
  if (!out.present()) {
    if (s.combine_out.dtype() != expand_x.dtype || s.combine_out.rows() != bs || s.combine_out.cols() != h) {
      s.combine_out = Tensor(expand_x.dtype, bs, h);
    }
    out = s.combine_out.mutable_view();
  }
  const bool quantized = o.comm_quant_mode == 2;
  const std::size_t min_row_bytes = quantized ? groups * 2 + static_cast<std::size_t>(h) : static_cast<std::size_t>(h) * 2;
  std::vector<const std::byte*>& rows_of = s.rows_of;
  std::vector<std::size_t>& row_bytes_of = s.row_bytes_of;
  rows_of.resize(static_cast<std::size_t>(topo.W));
  row_bytes_of.resize(static_cast<std::size_t>(topo.W));
  for (int d = 0; d < topo.W; ++d) {
    // Where rank d published its rows; checked against its window before any address is formed.
    const int gd = topo.global_rank(d, my_tp);
    const StepRecord& published = s.steps[static_cast<std::size_t>(gd)];
    const std::int64_t held = s.header(gd).own_rows;
    // Without a product that could overflow: offset and row size within the window, and room for the rows.
    const std::size_t window_bytes = s.transport->window_size(gd);
    if (published.row_bytes < static_cast<std::int64_t>(min_row_bytes) || published.rows_offset < 0 ||
        static_cast<std::uint64_t>(published.rows_offset) > window_bytes || static_cast<std::uint64_t>(published.row_bytes) > window_bytes ||
        (held > 0 && (window_bytes - static_cast<std::size_t>(published.rows_offset)) / static_cast<std::size_t>(published.row_bytes) <
                         static_cast<std::size_t>(held))) {
      throw PeerError(ErrorCode::protocol, gd, "combine.data",
                      concat("rank ", me, ": rank ", gd, " published its rows at offset ", published.rows_offset, " with ",
                             published.row_bytes, "-byte rows, outside its window"));
    }
    std::byte* window = s.transport->window(gd);  // nullptr on another host: its rows come through the proxy there
    rows_of[static_cast<std::size_t>(d)] = window == nullptr ? nullptr : window + published.rows_offset;
    row_bytes_of[static_cast<std::size_t>(d)] = static_cast<std::size_t>(published.row_bytes);
  }
  // Where a term of token b lives: its EP rank, its row there, and its name for a proxy (host_messages.h).
  struct TermPlace {
    int d;
    std::int64_t row;
    RowRequest target;
  };
  int shared_target = 0;
  const auto moe_place = [&](std::int64_t b, std::int64_t j) {
    const std::int32_t e = expert_ids.at<std::int32_t>(b, j);
    const int d = topo.expert_rank(e);
    const std::int32_t* table = s.counts(topo.global_rank(d, my_tp));
    const std::int32_t slot = expand_idx.at<std::int32_t>(b * k + j);
    return TermPlace{d, block_begin(table, topo.expert_local(e) * topo.W + my_ep) + slot, RowRequest{e, slot}};
  };
  const auto shared_place = [&](std::int64_t b) {  // call with b ascending
    if (topo.is_shared(my_ep)) return TermPlace{my_ep, b, RowRequest{shared_expert_code(my_ep), static_cast<std::int32_t>(b)}};
    while (b >= contract::shared_range_begin(my_ep, shared_target + 1, bs, topo.S)) ++shared_target;
    const std::int32_t* table = s.counts(topo.global_rank(shared_target, my_tp));
    const std::int64_t slot = b - contract::shared_range_begin(my_ep, shared_target, bs, topo.S);
    return TermPlace{shared_target, table[my_ep - 1] + slot, RowRequest{shared_expert_code(shared_target), static_cast<std::int32_t>(slot)}};
  };
  const int my_host = s.my_host();
  const auto host_of_ep = [&](int d) { return s.routes.host_of(topo.global_rank(d, my_tp)); };
  // Rows on other hosts: ask this rank's proxy on each for them, in reduce order; serve the ranks this
  // rank carries for from its host's windows; then read them from the answers.
  const std::size_t answer_stride = contract::align_up(min_row_bytes, 4);
  std::int64_t rows_from_other_hosts = 0;
  s.traffic.combine_bytes_between_hosts = 0;
  if (s.routes.multi_host()) {
    for (auto& message : s.to_host) message.clear();
    const auto request = [&](const TermPlace& place) {
      const int host = host_of_ep(place.d);
      if (host == my_host) return;
      std::memcpy(append(s.to_host[static_cast<std::size_t>(host)], sizeof(RowRequest)), &place.target, sizeof(RowRequest));
      ++rows_from_other_hosts;
    };
    for (std::int64_t b = 0; b < bs; ++b) {
      for (std::int64_t j = 0; j < k; ++j) request(moe_place(b, j));
      if (topo.S > 0) request(shared_place(b));
    }
    shared_target = 0;
    s.exchange_with_proxies("combine.requests");
    std::exception_ptr serve_error;
    const std::vector<int>& senders = s.routes.carried_for(me);
    s.carried_out.resize(senders.size());
    for (std::size_t i = 0; i < senders.size(); ++i) {
      const int r = senders[i];
      std::vector<std::byte>& answer = s.carried_out[i];
      answer.clear();
      const std::int64_t ok = 0;
      std::memcpy(append(answer, sizeof ok), &ok, sizeof ok);
      try {
        MessageReader in(s.carried[i]);
        const auto bad = [&](const std::string& what) {
          throw PeerError(ErrorCode::protocol, r, "combine.requests", concat("rank ", me, ": rank ", r, " asked this host for ", what));
        };
        if (in.left() % sizeof(RowRequest) != 0) bad(concat("a request of ", in.left(), " bytes, not a whole number of rows"));
        RowRequest target{};
        while (in.read(&target)) {
          ExpertPlace place;
          if (!decode_expert(topo, target.code, &place)) bad(concat("expert code ", target.code));
          const int d = place.ep;
          if (host_of_ep(d) != my_host) bad(concat("the rows of EP rank ", d, ", which is not on this host"));
          const std::int32_t* table = s.counts(topo.global_rank(d, my_tp));
          const int index = place.local * topo.W + s.ep_of(r);
          const std::int64_t begin = block_begin(table, index);
          if (target.slot < 0 || target.slot >= table[index] - begin) {
            bad(concat("slot ", target.slot, " of expert code ", target.code, ", outside its ", table[index] - begin, " rows"));
          }
          const std::byte* row = rows_of[static_cast<std::size_t>(d)] + static_cast<std::size_t>(begin + target.slot) * row_bytes_of[static_cast<std::size_t>(d)];
          std::memcpy(append(answer, answer_stride), row, min_row_bytes);
        }
      } catch (const Error& e) {
        if (!serve_error) serve_error = std::current_exception();
        answer.clear();
        const auto status = static_cast<std::int64_t>(e.code());
        std::memcpy(append(answer, sizeof status), &status, sizeof status);
        const std::string text = e.what();
        std::memcpy(append(answer, text.size()), text.data(), text.size());
      }
      s.traffic.combine_bytes_between_hosts += static_cast<std::int64_t>(answer.size());
    }
    s.answer_carried("combine.hosts");
    if (serve_error) std::rethrow_exception(serve_error);
    for (int host = 0; host < s.routes.hosts(); ++host) {
      if (host == my_host) continue;
      const int proxy = s.routes.proxy(me, host);
      const std::vector<std::byte>& answer = s.from_host[static_cast<std::size_t>(host)];
      std::int64_t status = -1;
      if (answer.size() >= sizeof status) std::memcpy(&status, answer.data(), sizeof status);
      if (status > 0 && status <= static_cast<std::int64_t>(ErrorCode::peer_lost)) {
        throw PeerError(ErrorCode::peer_failed, proxy, "combine.hosts",
                        concat("rank ", me, ": rank ", proxy, " could not serve this rank's rows (", error_code_name(static_cast<ErrorCode>(status)),
                               "): ", std::string(reinterpret_cast<const char*>(answer.data()) + sizeof status, answer.size() - sizeof status)));
      }
      const std::size_t asked = s.to_host[static_cast<std::size_t>(host)].size() / sizeof(RowRequest);
      if (status != 0 || answer.size() != sizeof status + asked * answer_stride) {
        throw PeerError(ErrorCode::protocol, proxy, "combine.hosts",
                        concat("rank ", me, ": rank ", proxy, " answered ", answer.size(), " bytes with status ", status, " for ", asked, " rows"));
      }
      s.traffic.combine_bytes_between_hosts += static_cast<std::int64_t>(s.to_host[static_cast<std::size_t>(host)].size());
    }
  }
  std::vector<std::size_t>& answered = s.answered;  // per host: rows of its answer reduced so far
  answered.assign(static_cast<std::size_t>(s.routes.hosts()), 0);
  const auto term_row = [&](const TermPlace& place) -> const std::byte* {
    const int host = host_of_ep(place.d);
    if (host == my_host) return rows_of[static_cast<std::size_t>(place.d)] + static_cast<std::size_t>(place.row) * row_bytes_of[static_cast<std::size_t>(place.d)];
    return s.from_host[static_cast<std::size_t>(host)].data() + sizeof(std::int64_t) + answered[static_cast<std::size_t>(host)]++ * answer_stride;
  };
  // The K + 1 rows of one token and their weights (the shared expert's is unweighted).
  std::vector<CombineTerm>& terms = s.terms;
  terms.resize(static_cast<std::size_t>(k + 1));
  // Reduce in chunks of H so the fp32 accumulator stays in L1; every element still adds its terms in
  // increasing k, so the result is bit-identical to a whole-row reduce.
  constexpr std::int64_t kChunk = 1024;  // a multiple of the comm-quant group of 8
  float* acc = s.row_scratch(std::min(h, kChunk));
  for (std::int64_t b = 0; b < bs; ++b) {
    std::size_t n = 0;
    for (std::int64_t j = 0; j < k; ++j) terms[n++] = CombineTerm{term_row(moe_place(b, j)), true, expert_scales.at<float>(b, j)};
    if (topo.S > 0) terms[n++] = CombineTerm{term_row(shared_place(b)), false, 1.0f};
    for (std::int64_t h0 = 0; h0 < h; h0 += kChunk) {
      const std::int64_t len = std::min(kChunk, h - h0);
      std::fill_n(acc, len, 0.0f);
      for (std::size_t i = 0; i < n; ++i) {
        const CombineTerm& t = terms[i];
        if (quantized) {
          const auto* scales = reinterpret_cast<const std::uint16_t*>(t.row) + h0 / 8;
          const auto* q = reinterpret_cast<const std::int8_t*>(t.row + groups * 2) + h0;
          if (t.weighted) kernels::accumulate_scaled_comm_quant(acc, q, scales, type, t.weight, len);
          else kernels::accumulate_comm_quant(acc, q, scales, type, len);
        } else {
          const auto* y = reinterpret_cast<const std::uint16_t*>(t.row) + h0;
          if (t.weighted) kernels::accumulate_scaled(acc, y, type, t.weight, len);
          else kernels::accumulate(acc, y, type, len);
        }
      }
      kernels::store_row(acc, type, len, out.ptr<std::uint16_t>(b, h0), out.strides[1]);
    }
  }
  const std::int64_t rows_read = bs * k + (topo.S > 0 ? bs : 0);
  s.traffic.combine_rows_read = rows_read;
  s.traffic.combine_bytes_read = rows_read * static_cast<std::int64_t>(min_row_bytes);
  s.traffic.combine_bytes_between_hosts_flat = rows_from_other_hosts * static_cast<std::int64_t>(min_row_bytes);
  return out;
}

}  // namespace moedist
