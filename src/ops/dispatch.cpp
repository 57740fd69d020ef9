// Dispatch = validate, plan, exchange counts, write every row (quantized on the way) straight to its
// final place in the receiver's window, then the TP all-gather and the outputs. Group::dispatch is the
// list of these phases, in the order of docs/architecture.md ("A dispatch, from one rank's side").
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common/format.h"
#include "contract/checks.h"
#include "contract/record_checks.h"
#include "contract/shared_split.h"
#include "kernels/row_kernels.h"
#include "ops/group_state.h"
#include "ops/host_messages.h"

namespace moedist {

using numeric::Half;

namespace {

// A peer's record must describe a routing its BS and K allow, with a BS the configuration allows
// (contract/record_checks.h, the GPU's rule too); otherwise writing its rows could land outside the
// receiver's rows, and sizes derived from its BS could be anything. Checked on every rank for every
// rank, so all ranks fail alike.
void check_dispatch_record(const Group::State& s, int r, const char* phase) {
  const contract::Topology& topo = s.topo;
  const CallHeader& hd = s.header(r);
  const std::int32_t* counts = s.counts(r);
  auto bad = [&](const std::string& what) {
    throw PeerError(ErrorCode::protocol, r, phase, concat("rank ", s.me(), ": the count record of rank ", r, " is inconsistent: ", what));
  };
  if (hd.k < 1 || hd.h < 1) bad(concat("BS ", hd.bs, ", K ", hd.k, ", H ", hd.h));
  const std::int64_t max_bs = contract::peer_bs_limit(topo.global_bs, topo.W, s.header(s.me()).bs);
  const bool v2 = hd.version == 2;
  const contract::RecordCheck c =
      v2 ? contract::check_send_counts_v2(counts, topo.W, topo.S, topo.L, topo.R, r / topo.T, hd.bs, hd.active, hd.k,
                                          max_bs)
         : contract::check_send_counts(counts, topo.W, topo.S, topo.L, r / topo.T, hd.bs, hd.active, hd.k, max_bs);
  switch (c.fault) {
    case contract::RecordFault::none:
      return;
    case contract::RecordFault::bs_range:
      return bad(concat("BS ", c.value, " is outside [0, ", c.bound, "]",
                        topo.global_bs != 0
                            ? concat(" (global_bs / ep_world_size = ", topo.global_bs, " / ", topo.W, ")")
                            : std::string(" (this rank's BS; global_bs = 0)")));
    case contract::RecordFault::active_range:
      return bad(concat(c.value, " active tokens, outside [0, BS = ", c.bound, "]"));
    case contract::RecordFault::entry_range:
      return bad(concat("entry ", c.entry, " = ", c.value, " is outside [0, active tokens = ", c.bound, "]"));
    case contract::RecordFault::entry_shared_local:
      return bad(concat("entry ", c.entry, " addresses a shared-expert rank's local expert ", c.entry % topo.L));
    case contract::RecordFault::moe_rows:
      return bad(concat("it sends ", c.value, " rows to MoE experts, ", v2 ? "more than" : "not",
                        " active tokens * K = ", c.bound));
    case contract::RecordFault::shared_rows:
      if (v2)
        return bad(concat("entry ", c.entry, " sends ", c.value, " rows to shared-expert rank ", c.entry / topo.L,
                          ", not ", c.bound));
      return bad(concat("it sends ", c.value, " rows to shared experts, not ", c.bound));
  }
}

// Validates and plans locally, then publishes this rank's record (its counts, or its failure) and
// learns everyone's. Returns the shape this rank's arguments were checked to.
contract::CallShape publish_records(Group::State& s, const TensorView& x, const TensorView& expert_ids,
                                    const DispatchOptions& o) {
  std::exception_ptr local_error;
  contract::CallShape shape;
  try {
    shape = contract::check_dispatch(s.config, x, expert_ids, o);
    s.plan.build(s.topo, expert_ids, s.topo.ep_rank, shape.active);
  } catch (...) {
    local_error = std::current_exception();
  }
  s.describe_call(shape, x.dtype, o.quant_mode, o.expert_scales.present(), 0, 0);
  if (!local_error) std::copy(s.plan.counts.begin(), s.plan.counts.end(), s.own_counts());
  s.exchange(CallKind::dispatch, local_error, "dispatch.counts");
  return shape;
}

// The same for a V2 call: its own checks and plan (active entries, special experts, Sn shared experts).
contract::CallShape publish_records_v2(Group::State& s, const TensorView& x, const TensorView& expert_ids,
                                       const DispatchV2Options& o, contract::EntryMask* mask) {
  std::exception_ptr local_error;
  contract::CallShape shape;
  shape.version = 2;
  try {
    contract::SpecialExperts experts;
    shape = contract::check_dispatch_v2(s.config, x, expert_ids, o, mask, &experts);
    s.plan_v2.build(s.topo, expert_ids, *mask, experts, s.topo.ep_rank);
  } catch (...) {
    local_error = std::current_exception();
  }
  s.describe_call(shape, x.dtype, o.quant_mode, o.expert_scales.present(), 0, 0);
  if (!local_error) std::copy(s.plan_v2.counts.begin(), s.plan_v2.counts.end(), s.own_counts());
  s.exchange(CallKind::dispatch, local_error, "dispatch.counts");
  return shape;
}

// Every rank checks every record alike: the same call everywhere, and counts the sender's BS and K allow.
void check_records(const Group::State& s) {
  s.require_same_call("dispatch.counts", true);
  for (int r = 0; r < s.transport->size(); ++r) check_dispatch_record(s, r, "dispatch.counts");
}

// Receive layouts of every destination of every EP group; capacity checked everywhere alike. The prefix
// sums are 64-bit, so that records adding up past 2^31 rows are seen as what they are (an int32 sum
// would wrap below the capacity and pass); what a rank receives must also fit ep_recv_counts (int32).
void plan_receive_blocks(Group::State& s, std::int64_t k, int version) {
  const contract::Topology& topo = s.topo;
  const int my_ep = topo.ep_rank, my_tp = topo.tp_rank;
  const auto records_of_group = [&](int tp) { return [&s, tp, T = topo.T](int r) { return s.counts(r * T + tp); }; };
  std::vector<std::int64_t>& prefix = s.scratch_prefix;
  for (int tp = 0; tp < topo.T; ++tp) {
    for (int d = 0; d < topo.W; ++d) {
      const int gd = topo.global_rank(d, tp);
      prefix.resize(static_cast<std::size_t>(topo.W * topo.local_experts(d)));
      const std::int64_t rows =
          version == 2
              ? contract::receive_prefix_sums_v2(topo.W, topo.S, topo.L, records_of_group(tp), d, prefix.data())
              : contract::receive_prefix_sums(topo, records_of_group(tp), d, s.header(gd).active, prefix.data());
      const std::int64_t most = std::min<std::int64_t>(topo.receive_rows(d, s.header(gd).bs, k, version), INT32_MAX);
      if (rows > most) {
        throw PeerError(ErrorCode::capacity, gd, "dispatch.counts",
                        concat("rank ", s.me(), ": rank ", gd, " would receive ", rows, " rows but can hold at most ",
                               most, most == INT32_MAX ? " (ep_recv_counts is int32)" : ""));
      }
      if (tp == my_tp) s.dest_prefix[static_cast<std::size_t>(d)] = prefix;
      if (tp != my_tp && d == my_ep) s.peer_prefix = prefix;  // the TP peer's own half (§3.5)
    }
  }
}

// One dispatch call as the phases after the count exchange share it: the caller's arguments, the
// shape they were checked to, and what follows from them.
struct DispatchCall {
  DispatchCall(Group::State& state, const TensorView& x_, const TensorView& expert_ids_, const DispatchOptions& o_,
               const contract::CallShape& shape_)
      : s(state),
        topo(state.topo),
        x(x_),
        expert_ids(expert_ids_),
        o(o_),
        shape(shape_),
        h(shape_.h),
        k(shape_.k),
        bs(shape_.bs),
        active(shape_.active),
        quant(o_.quant_mode == 2),
        out_elem(quant ? 1 : 2),
        stride(payload_stride(quant, h)),
        type(x_.dtype == DType::bf16 ? Half::bf16 : Half::fp16),
        x_cs(x_.strides[1]),
        smoothing(o_.scales.present()),
        my_host(state.my_host()),
        my_layout(topo, shape_, topo.ep_rank) {}

  Group::State& s;
  const contract::Topology& topo;
  const TensorView& x;
  const TensorView& expert_ids;
  const DispatchOptions& o;
  const contract::CallShape shape;
  const std::int64_t h, k, bs;
  const std::int64_t active;   // V1: tokens sent, [0, active) (x_active_mask); V2: the active tokens' number
  const bool quant;            // quant_mode 2: rows are int8 with a per-row scale
  const std::size_t out_elem;  // bytes of one expand_x element
  const std::size_t stride;    // bytes of one payload row in a message to another host
  const Half type;
  const std::int64_t x_cs;  // x's column stride
  const bool smoothing;     // smooth scales given
  const int my_host;
  const contract::WindowLayout my_layout;        // this rank's window for this call
  std::int64_t n_self = 0, n_peer = 0;           // rows of this rank's own EP region, and of its TP peer's (T == 2)
  const contract::EntryMask* v2_mask = nullptr;  // a V2 call: its mask (the plan is s.plan_v2)
  bool v2() const { return v2_mask != nullptr; }

  int host_of_ep(int d) const { return s.routes.host_of(topo.global_rank(d, topo.tp_rank)); }
  std::int64_t smooth_row(std::int64_t row) const { return smoothing ? row : -1; }
  // A scales row as a packed pointer: itself when its columns are contiguous, else gathered into `gathered`.
  const float* smooth_ptr(std::int64_t row, float* gathered) const {
    if (row < 0) return nullptr;
    if (o.scales.strides[1] == 1) return o.scales.ptr<float>(row, 0);
    for (std::int64_t i = 0; i < h; ++i) gathered[i] = o.scales.at<float>(row, i);
    return gathered;
  }
};

// One thread's working storage while it writes rows: the copies of its current token and its scratch.
struct RowWork {
  RowTarget* targets;      // a token's copies (route_token / route_token_v2)
  float* scratch;          // quantization scratch (H floats)
  float* gathered_scales;  // a scales row gathered from strided columns (H floats)
};

// One token's row while its copies are written. Without smoothing every int8 copy of a token is
// identical: it is quantized once and the other copies are copied from the first.
struct TokenRow {
  const std::uint16_t* x;
  std::int64_t b;  // the token (V2 triples)
  const std::byte* quantized = nullptr;
  const float* quantized_scale = nullptr;
};

// Where each destination's rows go: its window when it is on this host, else this rank's proxy there.
void locate_destinations(DispatchCall& c) {
  Group::State& s = c.s;
  const contract::Topology& topo = c.topo;
  std::vector<Destination>& dests = s.destinations;
  dests.assign(static_cast<std::size_t>(topo.W), Destination{});
  for (int d = 0; d < topo.W; ++d) {
    const int gd = topo.global_rank(d, topo.tp_rank);
    const contract::WindowLayout layout(topo, s.shape_of(gd), d);
    Destination& dest = dests[static_cast<std::size_t>(d)];
    dest.capacity_rows = layout.receive_rows;
    dest.local = c.host_of_ep(d) == c.my_host;
    if (!dest.local) continue;  // reached through this rank's proxy on its host
    std::byte* base = s.transport->window(gd);
    dest.expand_x = base + layout.expand_x_offset;
    dest.dynamic_scales = reinterpret_cast<float*>(base + layout.dynamic_scales_offset);
    dest.expand_scales = reinterpret_cast<float*>(base + layout.expand_scales_offset);
    if (c.v2()) dest.assist = reinterpret_cast<std::int32_t*>(base + layout.assist_offset);
  }
  for (auto& message : s.to_host) message.clear();
  // First row of this rank's block at each (destination, local expert).
  std::vector<std::int64_t>& block_start = s.block_start;
  block_start.assign(static_cast<std::size_t>(topo.count_record_len()), 0);
  for (int d = 0; d < topo.W; ++d) {
    const auto& dest_table = s.dest_prefix[static_cast<std::size_t>(d)];
    for (int l = 0; l < topo.local_experts(d); ++l) {
      const std::size_t entry = static_cast<std::size_t>(d * topo.L + l);
      const std::size_t pos = topo.is_shared(d) ? static_cast<std::size_t>(topo.ep_rank)
                                                : static_cast<std::size_t>(l * topo.W + topo.ep_rank);
      block_start[entry] = dest_table[pos] - s.own_counts()[entry];
    }
  }
}

// The copies of token b, into `targets`: its K experts, then its shared expert. Returns their number.
// Call with b ascending: shared_target follows the shared split from one token to the next (starting
// from 0 at any token gives the same target, as it only depends on b).
std::size_t route_token(const DispatchCall& c, std::int64_t b, int& shared_target, RowTarget* targets) {
  Group::State& s = c.s;
  const contract::Topology& topo = c.topo;
  const int my_ep = topo.ep_rank;
  const std::vector<Destination>& dests = s.destinations;
  const std::vector<std::int64_t>& block_start = s.block_start;
  std::size_t n = 0;
  for (std::int64_t j = 0; j < c.k; ++j) {
    const std::int32_t e = c.expert_ids.at<std::int32_t>(b, j);
    const int d = topo.expert_rank(e);
    const std::size_t entry = static_cast<std::size_t>(topo.S * topo.L + e);
    const std::int64_t row = block_start[entry] + s.plan.expand_idx[static_cast<std::size_t>(b * c.k + j)];
    const float weight = c.o.expert_scales.present() ? c.o.expert_scales.at<float>(b, j) : 1.0f;
    const std::int32_t slot = s.plan.expand_idx[static_cast<std::size_t>(b * c.k + j)];
    targets[n++] = RowTarget{&dests[static_cast<std::size_t>(d)],
                             row,
                             c.smooth_row(topo.S > 0 ? e + 1 : e),
                             weight,
                             c.host_of_ep(d),
                             e,
                             slot,
                             static_cast<std::int32_t>(j)};
  }
  if (topo.S > 0) {
    if (topo.is_shared(my_ep)) {
      // A shared-expert rank keeps its own tokens: row b of its own expand_x (§3.4.1).
      targets[n++] = RowTarget{&dests[static_cast<std::size_t>(my_ep)],
                               b,
                               c.smooth_row(0),
                               1.0f,
                               c.my_host,
                               shared_expert_code(my_ep),
                               static_cast<std::int32_t>(b),
                               static_cast<std::int32_t>(c.k)};
    } else {
      while (b >= contract::shared_range_begin(my_ep, shared_target + 1, c.active, topo.S)) ++shared_target;
      const std::int64_t slot = b - contract::shared_range_begin(my_ep, shared_target, c.active, topo.S);
      const std::int64_t row = block_start[static_cast<std::size_t>(shared_target * topo.L)] + slot;
      targets[n++] = RowTarget{&dests[static_cast<std::size_t>(shared_target)],
                               row,
                               c.smooth_row(0),
                               1.0f,
                               c.host_of_ep(shared_target),
                               shared_expert_code(shared_target),
                               static_cast<std::int32_t>(slot),
                               static_cast<std::int32_t>(c.k)};
    }
  }
  return n;
}

// The copies of token b in a V2 call (V2 §3.1-§3.5), into `targets`: its active entries that name
// MoE experts, in k order (smooth row Sn + e), then one per shared expert j, to EP rank (r % R) + j * R
// (smooth row j, triple k = K + j). Returns their number (0 for an inactive token).
std::size_t route_token_v2(const DispatchCall& c, std::int64_t b, RowTarget* targets) {
  Group::State& s = c.s;
  const contract::Topology& topo = c.topo;
  const contract::SendPlanV2& plan = s.plan_v2;
  const std::int32_t token_slot = plan.token_slot[static_cast<std::size_t>(b)];
  if (token_slot < 0) return 0;
  const std::vector<Destination>& dests = s.destinations;
  std::size_t n = 0;
  for (std::int64_t j = 0; j < c.k; ++j) {
    const std::int32_t slot = plan.slot[static_cast<std::size_t>(b * c.k + j)];
    if (slot < 0) continue;  // masked, or a special expert
    const std::int32_t e = c.expert_ids.at<std::int32_t>(b, j);
    const int d = topo.expert_rank(e);
    const float weight = c.o.expert_scales.present() ? c.o.expert_scales.at<float>(b, j) : 1.0f;
    targets[n++] = RowTarget{&dests[static_cast<std::size_t>(d)],
                             s.block_start[static_cast<std::size_t>(topo.S * topo.L + e)] + slot,
                             c.smooth_row(topo.Sn + e),
                             weight,
                             c.host_of_ep(d),
                             e,
                             slot,
                             static_cast<std::int32_t>(j)};
  }
  for (int j = 0; j < topo.Sn; ++j) {
    const int d = topo.v2_shared_target(topo.ep_rank, j);
    targets[n++] = RowTarget{&dests[static_cast<std::size_t>(d)],
                             s.block_start[static_cast<std::size_t>(d * topo.L)] + token_slot,
                             c.smooth_row(j),
                             1.0f,
                             c.host_of_ep(d),
                             shared_expert_code(d),
                             token_slot,
                             static_cast<std::int32_t>(c.k + j)};
  }
  return n;
}

// A V2 row's triple (V2 §3.6): who sent it, which token, which k.
void write_triple(std::int32_t* assist, std::int64_t row, int source_ep, std::int64_t b, std::int32_t k) {
  assist[3 * row] = source_ep;
  assist[3 * row + 1] = static_cast<std::int32_t>(b);
  assist[3 * row + 2] = k;
}

// Writes the token's copies whose destinations are on this host, each straight into its final row.
// Returns whether some of its copies go to other hosts.
bool write_local_rows(const DispatchCall& c, const RowWork& w, std::size_t n, TokenRow& row) {
  bool to_other_hosts = false;
  for (std::size_t i = 0; i < n; ++i) {
    const RowTarget& t = w.targets[i];
    if (t.row < 0 || t.row >= t.dest->capacity_rows) {
      throw Error(ErrorCode::internal,
                  concat("dispatch computed row ", t.row, " outside capacity ", t.dest->capacity_rows));
    }
    if (!t.dest->local) {
      to_other_hosts = true;
      continue;
    }
    std::byte* dst = t.dest->expand_x + static_cast<std::size_t>(t.row * c.h) * c.out_elem;
    if (!c.quant) {
      kernels::copy_row16(row.x, c.x_cs, c.h, reinterpret_cast<std::uint16_t*>(dst));
    } else if (t.smooth_row < 0 && row.quantized != nullptr) {
      std::memcpy(dst, row.quantized, static_cast<std::size_t>(c.h));
      t.dest->dynamic_scales[t.row] = *row.quantized_scale;
    } else {
      kernels::quantize_row(row.x, c.x_cs, c.type, c.smooth_ptr(t.smooth_row, w.gathered_scales), c.h,
                            reinterpret_cast<std::int8_t*>(dst), &t.dest->dynamic_scales[t.row], w.scratch);
      if (t.smooth_row < 0) {
        row.quantized = dst;
        row.quantized_scale = &t.dest->dynamic_scales[t.row];
      }
    }
    if (c.o.expert_scales.present()) t.dest->expand_scales[t.row] = t.weight;
    if (c.v2()) write_triple(t.dest->assist, t.row, c.topo.ep_rank, row.b, t.k);
  }
  return to_other_hosts;
}

// The one payload row of an entry whose targets all take the same bytes: the token, or its int8 row.
void pack_common_payload(const DispatchCall& c, const RowWork& w, std::byte* payload, TokenRow& row) {
  if (!c.quant) {
    kernels::copy_row16(row.x, c.x_cs, c.h, reinterpret_cast<std::uint16_t*>(payload));
  } else if (row.quantized != nullptr) {
    std::memcpy(payload + 4, row.quantized, static_cast<std::size_t>(c.h));
    std::memcpy(payload, row.quantized_scale, 4);
  } else {
    kernels::quantize_row(row.x, c.x_cs, c.type, nullptr, c.h, reinterpret_cast<std::int8_t*>(payload + 4),
                          reinterpret_cast<float*>(payload), w.scratch);
    row.quantized = payload + 4;
    row.quantized_scale = reinterpret_cast<const float*>(payload);
  }
}

// Appends the token's entry for the host of target `first` to the message for this rank's proxy there:
// the targets on that host from `first` on, then their rows. Returns the number of targets.
std::int64_t pack_host_entry(const DispatchCall& c, const RowWork& w, std::size_t first, std::size_t n, TokenRow& row) {
  const RowTarget* targets = w.targets;
  const int host = targets[first].host;
  const auto on_host = [&](const RowTarget& t) { return !t.dest->local && t.host == host; };
  std::int32_t count = 0;
  for (std::size_t j = first; j < n; ++j) count += on_host(targets[j]) ? 1 : 0;
  const bool row_per_target = c.quant && c.smoothing;
  const std::int32_t payloads = row_per_target ? count : 1;
  std::byte* at = append(c.s.to_host[static_cast<std::size_t>(host)],
                         sizeof(RemoteEntry) + static_cast<std::size_t>(count) * sizeof(RemoteTarget) +
                             static_cast<std::size_t>(payloads) * c.stride);
  const RemoteEntry head{count, payloads, static_cast<std::int32_t>(row.b)};
  std::memcpy(at, &head, sizeof head);
  at += sizeof head;
  std::byte* payload = at + static_cast<std::size_t>(count) * sizeof(RemoteTarget);
  for (std::size_t j = first; j < n; ++j) {
    const RowTarget& t = targets[j];
    if (!on_host(t)) continue;
    const RemoteTarget wire{t.code, t.slot, t.weight, t.k};
    std::memcpy(at, &wire, sizeof wire);
    at += sizeof wire;
    if (row_per_target) {
      kernels::quantize_row(row.x, c.x_cs, c.type, c.smooth_ptr(t.smooth_row, w.gathered_scales), c.h,
                            reinterpret_cast<std::int8_t*>(payload + 4), reinterpret_cast<float*>(payload), w.scratch);
      payload += c.stride;
    }
  }
  if (!row_per_target) pack_common_payload(c, w, payload, row);
  return count;
}

// Targets on other hosts: one entry per host, for the proxy there to fan out (host_messages.h).
// Returns the number of targets packed.
std::int64_t pack_rows_for_other_hosts(const DispatchCall& c, const RowWork& w, std::size_t n, TokenRow& row) {
  const RowTarget* targets = w.targets;
  std::int64_t packed = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const RowTarget& first = targets[i];
    bool host_seen = first.dest->local;
    for (std::size_t j = 0; j < i && !host_seen; ++j)
      host_seen = !targets[j].dest->local && targets[j].host == first.host;
    if (!host_seen) packed += pack_host_entry(c, w, i, n, row);
  }
  return packed;
}

// Where write_local_rows left the token's int8 row (quantized once, without smoothing) in a window of
// this host, for its copies to other hosts to reuse: the first local copy without smoothing.
void find_local_quantized_row(const DispatchCall& c, const RowWork& w, std::size_t n, TokenRow& row) {
  if (!c.quant) return;
  for (std::size_t i = 0; i < n; ++i) {
    const RowTarget& t = w.targets[i];
    if (!t.dest->local || t.smooth_row >= 0) continue;
    row.quantized = t.dest->expand_x + static_cast<std::size_t>(t.row * c.h) * c.out_elem;
    row.quantized_scale = &t.dest->dynamic_scales[t.row];
    return;
  }
}

// Thread `thread`'s working storage for write_rows.
RowWork row_work(const DispatchCall& c, int thread) {
  float* scratch = c.s.row_scratch(thread, 2 * c.h);
  return RowWork{c.s.worker_targets[static_cast<std::size_t>(thread)].data(), scratch, scratch + c.h};
}

// Every copy of every token of this rank: written into its window on this host, or packed for the
// proxy on its host. The tokens' copies on this host are written by the rank's threads, each a
// contiguous range of tokens (each row's bytes do not depend on which thread writes it); the messages
// for other hosts are then appended token by token on the calling thread, in token order.
void write_rows(DispatchCall& c) {
  Group::State& s = c.s;
  const std::size_t max_targets = static_cast<std::size_t>(c.k + std::max(1, c.topo.Sn));
  for (int t = 0; t < s.pool.size(); ++t) {
    s.worker_targets[static_cast<std::size_t>(t)].resize(max_targets);
    s.row_scratch(t, 2 * c.h);  // sized here, on the calling thread
  }
  const bool multi_host = s.routes.multi_host();
  const std::int64_t tokens = c.v2() ? c.bs : c.active;  // V2: route_token_v2 skips the inactive ones
  s.token_flags.assign(multi_host ? static_cast<std::size_t>(tokens) : 0, 0);
  std::vector<std::int64_t>& rows_sent = s.scratch_prefix;  // per thread
  rows_sent.assign(static_cast<std::size_t>(s.pool.size()), 0);
  s.pool.parallel_for(0, tokens, s.min_chunk(c.h * 2), [&](std::int64_t begin, std::int64_t end, int thread) {
    const RowWork w = row_work(c, thread);
    int shared_target = 0;  // shared-expert rank of the current token (MoE source ranks)
    std::int64_t sent = 0;
    for (std::int64_t b = begin; b < end; ++b) {
      const std::size_t n = c.v2() ? route_token_v2(c, b, w.targets) : route_token(c, b, shared_target, w.targets);
      if (n == 0) continue;
      TokenRow row{c.x.ptr<std::uint16_t>(b, 0), b};
      if (write_local_rows(c, w, n, row)) s.token_flags[static_cast<std::size_t>(b)] = 1;
      sent += static_cast<std::int64_t>(n);
    }
    rows_sent[static_cast<std::size_t>(thread)] = sent;
  });
  std::int64_t rows_to_other_hosts = 0;
  if (multi_host) {
    const RowWork w = row_work(c, 0);
    int shared_target = 0;
    for (std::int64_t b = 0; b < tokens; ++b) {
      if (s.token_flags[static_cast<std::size_t>(b)] == 0) continue;
      const std::size_t n = c.v2() ? route_token_v2(c, b, w.targets) : route_token(c, b, shared_target, w.targets);
      TokenRow row{c.x.ptr<std::uint16_t>(b, 0), b};
      find_local_quantized_row(c, w, n, row);
      rows_to_other_hosts += pack_rows_for_other_hosts(c, w, n, row);
    }
  }
  std::int64_t total_sent = 0;
  for (const std::int64_t n : rows_sent) total_sent += n;
  const std::int64_t row_out_bytes =
      c.h * static_cast<std::int64_t>(c.out_elem) + (c.quant ? 4 : 0) + (c.o.expert_scales.present() ? 4 : 0);
  s.traffic.dispatch_rows_sent = total_sent;
  s.traffic.dispatch_bytes_sent = total_sent * row_out_bytes;
  s.traffic.dispatch_bytes_between_hosts_flat = rows_to_other_hosts * row_out_bytes;
  s.traffic.dispatch_bytes_between_hosts = 0;
  for (const auto& message : s.to_host)
    s.traffic.dispatch_bytes_between_hosts += static_cast<std::int64_t>(message.size());
}

// A proxy writes the rows that the ranks it carries for sent to this host into their destination windows.
// Every target is checked against the sender's count record: it must name an expert on this host and a
// row of the sender's block there, and the sender must fill each of its rows on this host exactly once.
void write_carried_rows(Group::State& s, const std::vector<Destination>& dests, bool quant, std::int64_t h,
                        std::int64_t k, bool has_expert_scales, bool v2) {
  const contract::Topology& topo = s.topo;
  const std::size_t stride = payload_stride(quant, h);
  const std::size_t row_bytes = static_cast<std::size_t>(h) * (quant ? 1 : 2);
  const std::vector<int>& senders = s.routes.carried_for(s.me());
  std::vector<std::int64_t>& first_seen = s.seen_first;
  const std::int64_t max_targets = k + (v2 ? std::max(1, topo.Sn) : 1);  // a token's copies: K and its shared experts
  std::vector<RemoteTarget> targets(static_cast<std::size_t>(max_targets));
  for (std::size_t i = 0; i < senders.size(); ++i) {
    const int r = senders[i];
    const int r_ep = s.ep_of(r);
    const std::int32_t* counts = s.counts(r);
    const auto bad = [&](const std::string& what) {
      throw PeerError(ErrorCode::protocol, r, "dispatch.hosts",
                      concat("rank ", s.me(), ": the rows rank ", r, " sent for this host are malformed: ", what));
    };
    first_seen.assign(static_cast<std::size_t>(topo.count_record_len()), -1);
    std::int64_t expected = 0;
    for (int d = 0; d < topo.W; ++d) {
      if (!dests[static_cast<std::size_t>(d)].local) continue;
      for (int l = 0; l < topo.local_experts(d); ++l) {
        first_seen[static_cast<std::size_t>(d * topo.L + l)] = expected;
        expected += counts[d * topo.L + l];
      }
    }
    s.seen.assign(static_cast<std::size_t>(expected), 0);
    std::int64_t written = 0;
    MessageReader in(s.carried[i]);
    while (!in.done()) {
      RemoteEntry entry{};
      if (!in.read(&entry) || entry.targets < 1 || entry.targets > max_targets ||
          (entry.payloads != 1 && entry.payloads != entry.targets)) {
        bad(concat("an entry header (", entry.targets, " targets, ", entry.payloads, " rows) is cut short or out of range"));
      }
      for (std::int32_t t = 0; t < entry.targets; ++t) {
        if (!in.read(&targets[static_cast<std::size_t>(t)])) bad("a target list is cut short");
      }
      const std::byte* payload = in.take(static_cast<std::size_t>(entry.payloads) * stride);
      if (payload == nullptr) bad("a row is cut short");
      if (v2 && (entry.token < 0 || entry.token >= s.header(r).bs))
        bad(concat("token ", entry.token, " is outside its BS ", s.header(r).bs));
      for (std::int32_t t = 0; t < entry.targets; ++t) {
        const RemoteTarget& target = targets[static_cast<std::size_t>(t)];
        const bool shared = target.code < 0;
        ExpertPlace place;
        if (!decode_expert(topo, target.code, &place)) bad(concat("expert code ", target.code, " is out of range"));
        const int d = place.ep, l = place.local;
        const Destination& dest = dests[static_cast<std::size_t>(d)];
        if (!dest.local) bad(concat("expert code ", target.code, " lives on EP rank ", d, ", which is not on this host"));
        const std::size_t record_entry = static_cast<std::size_t>(d * topo.L + l);
        const std::int32_t count = counts[record_entry];
        if (target.slot < 0 || target.slot >= count) bad(concat("slot ", target.slot, " of expert code ", target.code, " is outside its ", count, " rows"));
        std::uint8_t& seen = s.seen[static_cast<std::size_t>(first_seen[record_entry] + target.slot)];
        if (seen != 0) bad(concat("slot ", target.slot, " of expert code ", target.code, " is sent twice"));
        seen = 1;
        ++written;
        const std::size_t pos = topo.is_shared(d) ? static_cast<std::size_t>(r_ep) : static_cast<std::size_t>(l * topo.W + r_ep);
        const std::int64_t row = s.dest_prefix[static_cast<std::size_t>(d)][pos] - count + target.slot;
        // Follows from the checks above; checked before the write all the same.
        if (row < 0 || row >= dest.capacity_rows) {
          bad(concat("slot ", target.slot, " of expert code ", target.code, " lands on row ", row, ", outside the ",
                     dest.capacity_rows, " rows of EP rank ", d));
        }
        const std::byte* src = payload + (entry.payloads == 1 ? 0 : static_cast<std::size_t>(t) * stride);
        if (quant) {
          std::memcpy(dest.expand_x + static_cast<std::size_t>(row) * row_bytes, src + 4, row_bytes);
          std::memcpy(&dest.dynamic_scales[row], src, 4);
        } else {
          std::memcpy(dest.expand_x + static_cast<std::size_t>(row) * row_bytes, src, row_bytes);
        }
        if (has_expert_scales) dest.expand_scales[row] = shared ? 1.0f : target.weight;
        if (v2) {
          // The triple's k: an entry of the token for a MoE expert, K + j on shared expert j's rank.
          const bool k_ok = shared ? target.k == k + topo.v2_shared_expert_of(d) : target.k >= 0 && target.k < k;
          if (!k_ok) bad(concat("k ", target.k, " does not fit expert code ", target.code, " (K = ", k, ")"));
          write_triple(dest.assist, row, r_ep, entry.token, target.k);
        }
      }
    }
    if (written != expected) bad(concat("it filled ", written, " of the ", expected, " rows its count record sends to this host"));
  }
}

// Rows for other hosts go to this rank's proxies there, who write them into their hosts' windows.
// Returns this rank's failure as a proxy, for the barrier that follows to carry to every rank.
std::exception_ptr forward_rows_to_other_hosts(const DispatchCall& c) {
  std::exception_ptr carry_error;
  if (!c.s.routes.multi_host()) return carry_error;
  c.s.exchange_with_proxies("dispatch.hosts");
  try {
    write_carried_rows(c.s, c.s.destinations, c.quant, c.h, c.k, c.o.expert_scales.present(), c.v2());
  } catch (...) {
    carry_error = std::current_exception();
  }
  return carry_error;
}

// TP all-gather (§3.5): the peer's own rows follow this rank's own rows.
void tp_gather(DispatchCall& c) {
  Group::State& s = c.s;
  const contract::Topology& topo = c.topo;
  const int my_ep = topo.ep_rank, my_tp = topo.tp_rank;
  std::byte* my_window = s.transport->window(s.me());
  c.n_self = s.dest_prefix[static_cast<std::size_t>(my_ep)].back();
  if (topo.T != 2) return;
  c.n_peer = s.peer_prefix.back();
  const int peer = topo.global_rank(my_ep, 1 - my_tp);
  const contract::WindowLayout peer_layout(topo, s.shape_of(peer), my_ep);
  const contract::WindowLayout& mine = c.my_layout;
  // Both counts come from peers' records and were checked against each rank's capacity; the rows this
  // copies must also lie inside the peer's rows and fit after this rank's own. Checked before the copy
  // all the same, and a failure goes to the barrier, so that both TP ranks raise it.
  std::exception_ptr error;
  if (c.n_peer > peer_layout.receive_rows || c.n_self > mine.receive_rows || c.n_self + c.n_peer > mine.dispatch_rows) {
    error = std::make_exception_ptr(
        PeerError(ErrorCode::capacity, peer, "dispatch.tp",
                  concat("rank ", s.me(), ": ", c.n_self, " own and ", c.n_peer, " TP peer rows do not fit its ",
                         mine.dispatch_rows, " rows (the peer holds at most ", peer_layout.receive_rows, ")")));
  } else {
    const std::byte* peer_window = s.transport->window(peer);
    std::memcpy(my_window + mine.expand_x_offset + static_cast<std::size_t>(c.n_self * c.h) * c.out_elem,
                peer_window + peer_layout.expand_x_offset, static_cast<std::size_t>(c.n_peer * c.h) * c.out_elem);
    std::memcpy(my_window + mine.dynamic_scales_offset + static_cast<std::size_t>(c.n_self) * 4,
                peer_window + peer_layout.dynamic_scales_offset, static_cast<std::size_t>(c.n_peer) * 4);
    std::memcpy(my_window + mine.expand_scales_offset + static_cast<std::size_t>(c.n_self) * 4,
                peer_window + peer_layout.expand_scales_offset, static_cast<std::size_t>(c.n_peer) * 4);
  }
  s.step(error, "dispatch.tp");
}

// The group-owned counts: ep_recv_counts, expert_token_nums and tp_recv_counts, from the records.
void count_received_rows(const DispatchCall& c) {
  Group::State& s = c.s;
  const contract::Topology& topo = c.topo;
  const int my_tp = topo.tp_rank;
  const int local = topo.local_experts(topo.ep_rank);
  const auto& own_prefix = s.dest_prefix[static_cast<std::size_t>(topo.ep_rank)];
  s.ep_recv_counts.assign(own_prefix.begin(), own_prefix.end());
  if (topo.T == 2) s.ep_recv_counts.insert(s.ep_recv_counts.end(), s.peer_prefix.begin(), s.peer_prefix.end());
  s.expert_token_nums.assign(static_cast<std::size_t>(local), 0);
  for (int l = 0; l < local; ++l) {
    const std::int64_t end = own_prefix[static_cast<std::size_t>(l * topo.W + topo.W - 1)];
    const std::int64_t begin = l == 0 ? 0 : own_prefix[static_cast<std::size_t>(l * topo.W - 1)];
    s.expert_token_nums[static_cast<std::size_t>(l)] = c.o.expert_token_nums_type == 1 ? end - begin : end;
  }
  if (topo.T == 2) s.expert_token_nums[0] = c.n_self + c.n_peer;  // L == 1 with TP: one expert holds both halves
  s.tp_recv_counts.clear();
  if (topo.T == 2) {
    s.tp_recv_counts.assign(2, 0);
    s.tp_recv_counts[static_cast<std::size_t>(my_tp)] = static_cast<std::int32_t>(c.n_self);
    s.tp_recv_counts[static_cast<std::size_t>(1 - my_tp)] = static_cast<std::int32_t>(c.n_peer);
  }
}

// The outputs as views: the rows in this rank's window (valid until the next dispatch), the counts in
// the group's storage.
DispatchResult window_outputs(const DispatchCall& c) {
  Group::State& s = c.s;
  const contract::WindowLayout& mine = c.my_layout;
  std::byte* my_window = s.transport->window(s.me());
  s.last_dispatch = c.shape;
  s.combined_since_dispatch = false;  // this call's first exchange waited for every rank's last combine
  DispatchResult result;
  result.valid_rows = c.n_self + c.n_peer;
  result.A = mine.capacity_a;
  const std::int64_t rows = mine.dispatch_rows;
  const DType x_out = c.quant ? DType::int8 : c.x.dtype;
  result.expand_x = matrix_view(my_window + mine.expand_x_offset, x_out, rows, c.h);
  result.dynamic_scales = vector_view(my_window + mine.dynamic_scales_offset, DType::fp32, rows);
  if (c.o.expert_scales.present())
    result.expand_scales = vector_view(my_window + mine.expand_scales_offset, DType::fp32, rows);
  if (c.v2()) {
    result.assist_info_for_combine =
        vector_view(my_window + mine.assist_offset, DType::int32, contract::sat_mul(rows, std::int64_t{3}));
  } else {
    result.expand_idx = vector_view(s.plan.expand_idx.data(), DType::int32, c.bs * c.k);
  }
  result.expert_token_nums =
      vector_view(s.expert_token_nums.data(), DType::int64, c.topo.local_experts(c.topo.ep_rank));
  result.ep_recv_counts = vector_view(s.ep_recv_counts.data(), DType::int32, static_cast<std::int64_t>(s.ep_recv_counts.size()));
  if (c.topo.T == 2) result.tp_recv_counts = vector_view(s.tp_recv_counts.data(), DType::int32, 2);
  return result;
}

// Caller buffers get copies of the valid part; their views replace the group's. They were checked
// against torch_npu's shapes (A rows); a shared-expert rank can receive more than A rows when ranks
// have different BS, so check the rows of this call before writing any of them.
void copy_to_caller_buffers(const DispatchCall& c, DispatchResult& result) {
  Group::State& s = c.s;
  const DispatchOutputs& out = c.o.out;
  const std::int64_t valid = result.valid_rows, h = c.h;
  const std::size_t out_elem = c.out_elem;
  for (const MutableTensorView* buffer : {&out.expand_x, &out.dynamic_scales, &out.expand_scales}) {
    if (buffer->present() && buffer->rows() < valid) {
      const char* name = buffer == &out.expand_x ? "out.expand_x" : buffer == &out.dynamic_scales ? "out.dynamic_scales" : "out.expand_scales";
      fail(ErrorCode::capacity, concat(name, ".shape[0]"), concat(buffer->rows()),
           concat("this call produced ", valid,
                  " rows on this shared-expert rank, more than A * max(T, 1) because "
                  "ranks have different BS; size buffers with capacity().max_receive_rows"));
    }
  }
  const std::byte* my_window = s.transport->window(s.me());
  const contract::WindowLayout& mine = c.my_layout;
  if (out.expand_x.present()) {
    for (std::int64_t r = 0; r < valid; ++r) {
      const std::byte* src = my_window + mine.expand_x_offset + static_cast<std::size_t>(r * h) * out_elem;
      if (out.expand_x.strides[1] == 1) {
        std::memcpy(out.expand_x.ptr<std::byte>() + static_cast<std::size_t>(r * out.expand_x.strides[0]) * out_elem, src,
                    static_cast<std::size_t>(h) * out_elem);
      } else if (c.quant) {
        for (std::int64_t col = 0; col < h; ++col)
          *out.expand_x.ptr<std::int8_t>(r, col) = reinterpret_cast<const std::int8_t*>(src)[col];
      } else {
        for (std::int64_t col = 0; col < h; ++col)
          *out.expand_x.ptr<std::uint16_t>(r, col) = reinterpret_cast<const std::uint16_t*>(src)[col];
      }
    }
    result.expand_x = out.expand_x;
  }
  const auto copy_vector = [](const MutableTensorView& dst, const auto* src, std::int64_t n, TensorView* slot) {
    using T = std::remove_cv_t<std::remove_pointer_t<decltype(src)>>;
    for (std::int64_t i = 0; i < n; ++i) *dst.template ptr<T>(i) = src[i];
    *slot = dst;
  };
  if (out.dynamic_scales.present())
    copy_vector(out.dynamic_scales, reinterpret_cast<const float*>(my_window + mine.dynamic_scales_offset), valid,
                &result.dynamic_scales);
  if (out.expand_scales.present() && c.o.expert_scales.present())
    copy_vector(out.expand_scales, reinterpret_cast<const float*>(my_window + mine.expand_scales_offset), valid,
                &result.expand_scales);
  if (out.expand_idx.present()) copy_vector(out.expand_idx, s.plan.expand_idx.data(), c.bs * c.k, &result.expand_idx);
  if (out.expert_token_nums.present())
    copy_vector(out.expert_token_nums, s.expert_token_nums.data(), c.topo.local_experts(c.topo.ep_rank),
                &result.expert_token_nums);
  if (out.ep_recv_counts.present())
    copy_vector(out.ep_recv_counts, s.ep_recv_counts.data(), static_cast<std::int64_t>(s.ep_recv_counts.size()), &result.ep_recv_counts);
  if (out.tp_recv_counts.present()) copy_vector(out.tp_recv_counts, s.tp_recv_counts.data(), 2, &result.tp_recv_counts);
}

// The seven outputs: the counts, the views, and copies into the caller's buffers where given.
DispatchResult make_outputs(const DispatchCall& c) {
  count_received_rows(c);
  DispatchResult result = window_outputs(c);
  copy_to_caller_buffers(c, result);
  return result;
}

// The options V2 shares with V1, as the phases above read them.
DispatchOptions common_options(const DispatchV2Options& o) {
  DispatchOptions common;
  common.scales = o.scales;
  common.expert_scales = o.expert_scales;
  common.quant_mode = o.quant_mode;
  common.expert_token_nums_type = o.expert_token_nums_type;
  common.out.expand_x = o.out.expand_x;
  common.out.dynamic_scales = o.out.dynamic_scales;
  common.out.expert_token_nums = o.out.expert_token_nums;
  common.out.ep_recv_counts = o.out.ep_recv_counts;
  common.out.tp_recv_counts = o.out.tp_recv_counts;
  common.out.expand_scales = o.out.expand_scales;
  return common;
}

// V2: the own rows' triples into the caller's assist_info_for_combine (the rest is left as it is).
// Without one under the ascend_a3 profile, into group storage of torch_npu's length max(BS * K, 128 * A)
// (V2 §1.4): that profile's combine insists on 128 * A entries (V2 §3.6), more than the window's 3 per
// row, and must take dispatch's own output back.
void copy_triples(const DispatchCall& c, const MutableTensorView& out, DispatchResult& result) {
  MutableTensorView target = out;
  if (!target.present()) {
    if (c.s.config.profile != Profile::ascend_a3) return;
    const std::int64_t len = std::max(c.bs * c.k, contract::sat_mul(c.my_layout.capacity_a, std::int64_t{128}));
    c.s.assist_storage.assign(static_cast<std::size_t>(len), 0);
    target = vector_view(c.s.assist_storage.data(), DType::int32, len);
  }
  const auto* triples =
      reinterpret_cast<const std::int32_t*>(c.s.transport->window(c.s.me()) + c.my_layout.assist_offset);
  for (std::int64_t i = 0; i < 3 * c.n_self; ++i) *target.ptr<std::int32_t>(i) = triples[i];
  result.assist_info_for_combine = target;
}

}  // namespace

DispatchResult Group::dispatch_v2(const TensorView& x, const TensorView& expert_ids, const DispatchV2Options& o) {
  State& s = *state_;
  const BusyWhileCalling busy(*s.transport);
  ++s.seq;
  const WaitClock clock(s, o.performance_info);
  contract::EntryMask mask;
  const contract::CallShape shape = publish_records_v2(s, x, expert_ids, o, &mask);
  check_records(s);
  plan_receive_blocks(s, shape.k, 2);
  s.ensure_windows("dispatch.window");
  const DispatchOptions common = common_options(o);
  DispatchCall call(s, x, expert_ids, common, shape);
  call.v2_mask = &mask;
  locate_destinations(call);
  write_rows(call);
  s.step(forward_rows_to_other_hosts(call), "dispatch.data");
  tp_gather(call);
  DispatchResult result = make_outputs(call);
  copy_triples(call, o.out.assist_info_for_combine, result);
  clock.record();
  return result;
}

DispatchResult Group::dispatch(const TensorView& x, const TensorView& expert_ids, const DispatchOptions& o) {
  State& s = *state_;
  const BusyWhileCalling busy(*s.transport);
  ++s.seq;
  const contract::CallShape shape = publish_records(s, x, expert_ids, o);
  check_records(s);
  plan_receive_blocks(s, shape.k, 1);
  s.ensure_windows("dispatch.window");  // grows them when some rank's layout needs more room
  DispatchCall call(s, x, expert_ids, o, shape);
  locate_destinations(call);
  write_rows(call);
  // Every row is in place once every rank is past this barrier; it also carries a proxy's failure.
  s.step(forward_rows_to_other_hosts(call), "dispatch.data");
  tp_gather(call);
  return make_outputs(call);
}

}  // namespace moedist
