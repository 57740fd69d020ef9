// The combine steps V1 and V2 share (combine_steps.h).
#include "ops/combine_steps.h"

#include <algorithm>
#include <cstring>

#include "common/format.h"
#include "kernels/row_kernels.h"
#include "ops/host_messages.h"

namespace moedist::combine_steps {

// Rows in this rank's window (combine_buffer(), or dispatch's expand_x passed back) feed one combine per
// dispatch: the previous combine read them in place, and slower ranks may have gone on reading them
// after it returned here, so a caller that rewrote them since may have changed what those ranks
// summed. Refused rather than read again (group_state.h, combined_since_dispatch).
void check_window_rows_unused(const Group::State& s, const TensorView& expand_x) {
  if (!s.combined_since_dispatch || expand_x.data == nullptr || expand_x.rows() == 0 || expand_x.cols() == 0) return;
  const std::int64_t last = (expand_x.rows() - 1) * expand_x.strides[0] + (expand_x.cols() - 1) * expand_x.strides[1];
  const auto first = reinterpret_cast<std::uintptr_t>(expand_x.data);
  const auto end = first + static_cast<std::uintptr_t>(last + 1) * dtype_size(expand_x.dtype);
  const auto window = reinterpret_cast<std::uintptr_t>(s.transport->window(s.me()));
  if (first < window + s.transport->window_size(s.me()) && window < end) {
    fail(ErrorCode::invalid_argument, "expand_x", "rows in this rank's window",
         "were read in place by the previous combine, which other ranks may still have been reading after it returned "
         "here, so they may not be rewritten or combined again before the next dispatch: dispatch again, or pass "
         "combine a buffer of your own");
  }
}

// T = 2 (§4.4): the peer's tokens' rows of this rank's partial result go to the peer's inbox; after a
// barrier, this rank's own rows are reduced with what the peer sent into the staging rows.
namespace {

PublishedRows tp_reduce(const CombineCall& c, const std::exception_ptr& route_error) {
  Group::State& s = c.s;
  const contract::Topology& topo = c.topo;
  const int my_ep = topo.ep_rank;
  const std::int64_t x_cs = c.expand_x.strides[1];
  const std::size_t stage_row_bytes = c.my_layout.combine_row_bytes;
  std::byte* my_window = s.transport->window(s.me());
  std::byte* my_stage = my_window + c.my_layout.combine_rows_offset;
  if (!route_error) {
    const int peer = topo.global_rank(my_ep, 1 - topo.tp_rank);
    const contract::WindowLayout peer_layout(topo, s.shape_of(peer), my_ep);
    auto* inbox = reinterpret_cast<std::uint16_t*>(s.transport->window(peer) + peer_layout.tp_inbox_offset);
    s.pool.parallel_for(0, c.rows.peer_rows, s.min_chunk(c.h * 2), [&](std::int64_t begin, std::int64_t end, int) {
      for (std::int64_t i = begin; i < end; ++i)
        kernels::copy_row16(c.expand_x.ptr<std::uint16_t>(c.rows.own_rows + i, 0), x_cs, c.h, inbox + i * c.h);
    });
  }
  s.step(route_error, "combine.tp");
  const auto* inbox = reinterpret_cast<const std::uint16_t*>(my_window + c.my_layout.tp_inbox_offset);
  // Row by row, so reducing in place is safe (each row is read and written by one thread).
  s.pool.parallel_for(0, c.rows.own_rows, s.min_chunk(c.h * 4), [&](std::int64_t begin, std::int64_t end, int) {
    for (std::int64_t i = begin; i < end; ++i) {
      auto* staged = reinterpret_cast<std::uint16_t*>(my_stage + static_cast<std::size_t>(i) * stage_row_bytes);
      if (c.v2)
        kernels::tp_reduce_row_even(c.expand_x.ptr<std::uint16_t>(i, 0), x_cs, inbox + i * c.h, c.type, c.h, staged);
      else
        kernels::tp_reduce_row(c.expand_x.ptr<std::uint16_t>(i, 0), x_cs, inbox + i * c.h, c.type, c.h, staged);
    }
  });
  return PublishedRows{c.my_layout.combine_rows_offset, stage_row_bytes};
}

// T = 1: this rank's rows go to its staging rows, int8-quantized with comm_quant_mode 2 (§4.5). Rows
// that already sit in this rank's window (dispatch's expand_x view passed back, or combine_buffer())
// are read in place: no copy at all.
PublishedRows stage_own_rows(const CombineCall& c, const std::exception_ptr& route_error) {
  Group::State& s = c.s;
  const contract::WindowLayout& mine = c.my_layout;
  const std::size_t stage_row_bytes = mine.combine_row_bytes;
  std::byte* my_window = s.transport->window(s.me());
  std::byte* my_stage = my_window + mine.combine_rows_offset;
  const std::int64_t x_cs = c.expand_x.strides[1];
  const auto* x_base = static_cast<const std::byte*>(c.expand_x.data);
  const bool in_stage =
      x_base == my_stage && x_cs == 1 && static_cast<std::size_t>(c.expand_x.strides[0]) * 2 == stage_row_bytes;
  const bool in_dispatch_region =
      x_base == my_window + mine.expand_x_offset && x_cs == 1 && c.expand_x.strides[0] == c.h;
  PublishedRows published{mine.combine_rows_offset, stage_row_bytes};
  if (route_error) return published;
  if (c.quantized) {
    // Quantize through a scratch row per thread: the source row may be the very slot it is written to.
    const std::int64_t scratch_floats = c.h + static_cast<std::int64_t>(stage_row_bytes) / 4 + 1;
    for (int t = 0; t < s.pool.size(); ++t) s.row_scratch(t, scratch_floats);  // sized on the calling thread
    const std::size_t groups = mine.comm_quant_groups;
    s.pool.parallel_for(0, c.rows.own_rows, s.min_chunk(c.h * 2), [&](std::int64_t begin, std::int64_t end, int t) {
      auto* packed = reinterpret_cast<std::byte*>(s.row_scratch(t, scratch_floats));
      for (std::int64_t i = begin; i < end; ++i) {
        kernels::comm_quantize_row(c.expand_x.ptr<std::uint16_t>(i, 0), x_cs, c.type, c.h,
                                   reinterpret_cast<std::int8_t*>(packed + groups * 2),
                                   reinterpret_cast<std::uint16_t*>(packed));
        std::memcpy(my_stage + static_cast<std::size_t>(i) * stage_row_bytes, packed,
                    groups * 2 + static_cast<std::size_t>(c.h));
      }
    });
  } else if (in_dispatch_region) {
    published = PublishedRows{mine.expand_x_offset, static_cast<std::size_t>(c.h) * 2};
  } else if (!in_stage) {
    s.pool.parallel_for(0, c.rows.own_rows, s.min_chunk(c.h * 2), [&](std::int64_t begin, std::int64_t end, int) {
      for (std::int64_t i = begin; i < end; ++i) {
        kernels::copy_row16(c.expand_x.ptr<std::uint16_t>(i, 0), x_cs, c.h,
                            reinterpret_cast<std::uint16_t*>(my_stage + static_cast<std::size_t>(i) * stage_row_bytes));
      }
    });
  }
  return published;
}

}  // namespace

// Makes this rank's rows readable by the source ranks: TP reduce first (§4.4), else optional int8
// quantization (§4.5). Returns where they are.
PublishedRows stage_rows(const CombineCall& c, const std::exception_ptr& route_error) {
  return c.topo.T == 2 ? tp_reduce(c, route_error) : stage_own_rows(c, route_error);
}

// The output: the caller's buffer, else the group's, reallocated only when its shape changes.
MutableTensorView combine_output(const CombineCall& c) {
  if (c.out.present()) return c.out;
  Group::State& s = c.s;
  if (s.combine_out.dtype() != c.expand_x.dtype || s.combine_out.rows() != c.bs || s.combine_out.cols() != c.h) {
    s.combine_out = Tensor(c.expand_x.dtype, c.bs, c.h);
  }
  return s.combine_out.mutable_view();
}

// Where every expert rank of this rank's TP lane published its rows (s.rows_of, s.row_bytes_of);
// checked against its window before any address is formed.
void locate_published_rows(const CombineCall& c) {
  Group::State& s = c.s;
  const contract::Topology& topo = c.topo;
  s.rows_of.resize(static_cast<std::size_t>(topo.W));
  s.row_bytes_of.resize(static_cast<std::size_t>(topo.W));
  for (int d = 0; d < topo.W; ++d) {
    const int gd = topo.global_rank(d, topo.tp_rank);
    const StepRecord& published = s.steps[static_cast<std::size_t>(gd)];
    const std::int64_t held = s.header(gd).own_rows;
    // Without a product that could overflow: offset and row size within the window, and room for the rows.
    const std::size_t window_bytes = s.transport->window_size(gd);
    if (published.row_bytes < static_cast<std::int64_t>(c.min_row_bytes) || published.rows_offset < 0 ||
        static_cast<std::uint64_t>(published.rows_offset) > window_bytes ||
        static_cast<std::uint64_t>(published.row_bytes) > window_bytes ||
        (held > 0 && (window_bytes - static_cast<std::size_t>(published.rows_offset)) /
                             static_cast<std::size_t>(published.row_bytes) <
                         static_cast<std::size_t>(held))) {
      throw PeerError(ErrorCode::protocol, gd, "combine.data",
                      concat("rank ", s.me(), ": rank ", gd, " published its rows at offset ", published.rows_offset,
                             " with ", published.row_bytes, "-byte rows, outside its window"));
    }
    std::byte* window = s.transport->window(gd);  // nullptr on another host: its rows come through the proxy there
    s.rows_of[static_cast<std::size_t>(d)] = window == nullptr ? nullptr : window + published.rows_offset;
    s.row_bytes_of[static_cast<std::size_t>(d)] = static_cast<std::size_t>(published.row_bytes);
  }
}

// Answers the ranks this rank carries for from its host's windows (s.carried_out): a status of 0 and
// the rows, or the failure's code and message. Returns the first failure, to raise once all are answered.
std::exception_ptr serve_carried_requests(const CombineCall& c, AnswerRequests answer_requests) {
  Group::State& s = c.s;
  std::exception_ptr serve_error;
  const std::vector<int>& senders = s.routes.carried_for(s.me());
  s.carried_out.resize(senders.size());
  for (std::size_t i = 0; i < senders.size(); ++i) {
    std::vector<std::byte>& answer = s.carried_out[i];
    answer.clear();
    const std::int64_t ok = 0;
    std::memcpy(append(answer, sizeof ok), &ok, sizeof ok);
    try {
      answer_requests(c, senders[i], s.carried[i], answer);
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
  return serve_error;
}

// Each proxy's answer must carry status 0 and exactly the rows asked for; a proxy's failure is raised here.
void check_answers(const CombineCall& c) {
  Group::State& s = c.s;
  const int me = s.me();
  for (int host = 0; host < s.routes.hosts(); ++host) {
    if (host == c.my_host) continue;
    const int proxy = s.routes.proxy(me, host);
    const std::vector<std::byte>& answer = s.from_host[static_cast<std::size_t>(host)];
    std::int64_t status = -1;
    if (answer.size() >= sizeof status) std::memcpy(&status, answer.data(), sizeof status);
    if (status > 0 && status <= static_cast<std::int64_t>(ErrorCode::peer_lost)) {
      throw PeerError(ErrorCode::peer_failed, proxy, "combine.hosts",
                      concat("rank ", me, ": rank ", proxy, " could not serve this rank's rows (",
                             error_code_name(static_cast<ErrorCode>(status)), "): ",
                             std::string(reinterpret_cast<const char*>(answer.data()) + sizeof status,
                                         answer.size() - sizeof status)));
    }
    const std::size_t asked = s.to_host[static_cast<std::size_t>(host)].size() / sizeof(RowRequest);
    if (status != 0 || answer.size() != sizeof status + asked * c.answer_stride) {
      throw PeerError(ErrorCode::protocol, proxy, "combine.hosts",
                      concat("rank ", me, ": rank ", proxy, " answered ", answer.size(), " bytes with status ", status,
                             " for ", asked, " rows"));
    }
    s.traffic.combine_bytes_between_hosts +=
        static_cast<std::int64_t>(s.to_host[static_cast<std::size_t>(host)].size());
  }
}

void accumulate_row(const CombineCall& c, float* acc, const std::byte* row, bool int8_groups, bool weighted,
                    float weight, std::int64_t h0, std::int64_t len) {
  if (int8_groups) {
    const auto* scales = reinterpret_cast<const std::uint16_t*>(row) + h0 / 8;
    const auto* q = reinterpret_cast<const std::int8_t*>(row + c.my_layout.comm_quant_groups * 2) + h0;
    if (weighted)
      kernels::accumulate_scaled_comm_quant(acc, q, scales, c.type, weight, len);
    else
      kernels::accumulate_comm_quant(acc, q, scales, c.type, len);
  } else {
    const auto* y = reinterpret_cast<const std::uint16_t*>(row) + h0;
    if (weighted)
      kernels::accumulate_scaled(acc, y, c.type, weight, len);
    else
      kernels::accumulate(acc, y, c.type, len);
  }
}

}  // namespace moedist::combine_steps
