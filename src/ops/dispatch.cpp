// Dispatch = validate, plan, exchange counts, write every row (quantized on the way) straight to its
// final place in the receiver's window, then the TP all-gather and the outputs.
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

// A peer's record must describe a routing its BS and K allow; otherwise writing its rows could land
// outside the receiver's rows. Checked on every rank for every rank, so all ranks fail alike.
void check_dispatch_record(const Group::State& s, int r, const char* phase) {
  const contract::Topology& topo = s.topo;
  const CallHeader& hd = s.header(r);
  const std::int32_t* counts = s.counts(r);
  auto bad = [&](const std::string& what) {
    throw PeerError(ErrorCode::protocol, r, phase, concat("rank ", s.me(), ": the count record of rank ", r, " is inconsistent: ", what));
  };
  if (hd.bs < 0 || hd.k < 1 || hd.h < 1) bad(concat("BS ", hd.bs, ", K ", hd.k, ", H ", hd.h));
  std::int64_t moe_rows = 0, shared_rows = 0;
  for (int i = 0; i < topo.count_record_len(); ++i) {
    if (counts[i] < 0 || counts[i] > hd.bs) bad(concat("entry ", i, " = ", counts[i], " is outside [0, BS = ", hd.bs, "]"));
    if (i >= topo.S * topo.L) {
      moe_rows += counts[i];
    } else if (i % topo.L == 0) {
      shared_rows += counts[i];
    } else if (counts[i] != 0) {
      bad(concat("entry ", i, " addresses a shared-expert rank's local expert ", i % topo.L));
    }
  }
  if (moe_rows != hd.bs * hd.k) bad(concat("it sends ", moe_rows, " rows to MoE experts, not BS * K = ", hd.bs * hd.k));
  const std::int64_t want_shared = topo.is_shared(r / topo.T) ? 0 : (topo.S > 0 ? hd.bs : 0);
  if (shared_rows != want_shared) bad(concat("it sends ", shared_rows, " rows to shared experts, not ", want_shared));
}


// A proxy writes the rows that the ranks it carries for sent to this host into their destination windows.
// Every target is checked against the sender's count record: it must name an expert on this host and a
// row of the sender's block there, and the sender must fill each of its rows on this host exactly once.
void write_carried_rows(Group::State& s, const std::vector<Destination>& dests, bool quant, std::int64_t h, std::int64_t k,
                        bool has_expert_scales) {
  const contract::Topology& topo = s.topo;
  const std::size_t stride = payload_stride(quant, h);
  const std::size_t row_bytes = static_cast<std::size_t>(h) * (quant ? 1 : 2);
  const std::vector<int>& senders = s.routes.carried_for(s.me());
  std::vector<std::int64_t>& first_seen = s.seen_first;
  std::vector<RemoteTarget> targets(static_cast<std::size_t>(k + 1));
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
      if (!in.read(&entry) || entry.targets < 1 || entry.targets > k + 1 || (entry.payloads != 1 && entry.payloads != entry.targets)) {
        bad(concat("an entry header (", entry.targets, " targets, ", entry.payloads, " rows) is cut short or out of range"));
      }
      for (std::int32_t t = 0; t < entry.targets; ++t) {
        if (!in.read(&targets[static_cast<std::size_t>(t)])) bad("a target list is cut short");
      }
      const std::byte* payload = in.take(static_cast<std::size_t>(entry.payloads) * stride);
      if (payload == nullptr) bad("a row is cut short");
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
        const std::byte* src = payload + (entry.payloads == 1 ? 0 : static_cast<std::size_t>(t) * stride);
        if (quant) {
          std::memcpy(dest.expand_x + static_cast<std::size_t>(row) * row_bytes, src + 4, row_bytes);
          std::memcpy(&dest.dynamic_scales[row], src, 4);
        } else {
          std::memcpy(dest.expand_x + static_cast<std::size_t>(row) * row_bytes, src, row_bytes);
        }
        if (has_expert_scales) dest.expand_scales[row] = shared ? 1.0f : target.weight;
      }
    }
    if (written != expected) bad(concat("it filled ", written, " of the ", expected, " rows its count record sends to this host"));
  }
}

}  // namespace

DispatchResult Group::dispatch(const TensorView& x, const TensorView& expert_ids, const DispatchOptions& o) {
  State& s = *state_;
  const contract::Topology& topo = s.topo;
  const int me = s.me();
  const int my_ep = topo.ep_rank, my_tp = topo.tp_rank;
  ++s.seq;

  // 1. Validate and plan locally; publish the counts (or the failure) and learn everyone's.
  std::exception_ptr local_error;
  contract::CallShape shape;
  try {
    shape = contract::check_dispatch(s.config, x, expert_ids, o);
    s.plan.build(topo, expert_ids, my_ep);
  } catch (...) {
    local_error = std::current_exception();
  }
  s.describe_call(shape, x.dtype, o.quant_mode, o.expert_scales.present(), 0, 0);
  if (!local_error) std::copy(s.plan.counts.begin(), s.plan.counts.end(), s.own_counts());
  s.exchange(CallKind::dispatch, local_error, "dispatch.counts");
  s.require_same_call("dispatch.counts", true);
  for (int r = 0; r < s.transport->size(); ++r) check_dispatch_record(s, r, "dispatch.counts");

  // 2. Receive layouts of every destination of every EP group; capacity checked everywhere alike.
  const auto records_of_group = [&](int tp) { return [&s, tp, T = topo.T](int r) { return s.counts(r * T + tp); }; };
  std::vector<std::int32_t>& prefix = s.scratch_prefix;
  for (int tp = 0; tp < topo.T; ++tp) {
    for (int d = 0; d < topo.W; ++d) {
      const int gd = topo.global_rank(d, tp);
      prefix.resize(static_cast<std::size_t>(topo.W * topo.local_experts(d)));
      contract::receive_prefix_sums(topo, records_of_group(tp), d, s.header(gd).bs, prefix.data());
      const std::int64_t most = topo.receive_rows(d, s.header(gd).bs, shape.k);
      if (prefix.back() > most) {
        throw PeerError(ErrorCode::capacity, gd, "dispatch.counts",
                        concat("rank ", me, ": rank ", gd, " would receive ", prefix.back(), " rows but can hold at most ", most));
      }
      if (tp == my_tp) s.dest_prefix[static_cast<std::size_t>(d)] = prefix;
      if (tp != my_tp && d == my_ep) s.peer_prefix = prefix;  // the TP peer's own half (§3.5)
    }
  }
  s.ensure_windows("dispatch.window");

  // 3. Write every row straight into its destination's window.
  const bool quant = o.quant_mode == 2;
  const std::size_t out_elem = quant ? 1 : 2;
  const std::int64_t h = shape.h, k = shape.k, bs = shape.bs;
  std::vector<Destination>& dests = s.destinations;
  dests.assign(static_cast<std::size_t>(topo.W), Destination{});
  const int my_host = s.my_host();
  const auto host_of_ep = [&](int d) { return s.routes.host_of(topo.global_rank(d, my_tp)); };
  for (int d = 0; d < topo.W; ++d) {
    const int gd = topo.global_rank(d, my_tp);
    const contract::WindowLayout layout(topo, s.shape_of(gd), d);
    Destination& dest = dests[static_cast<std::size_t>(d)];
    dest.capacity_rows = layout.receive_rows;
    dest.local = host_of_ep(d) == my_host;
    if (!dest.local) continue;  // reached through this rank's proxy on its host
    std::byte* base = s.transport->window(gd);
    dest.expand_x = base + layout.expand_x_offset;
    dest.dynamic_scales = reinterpret_cast<float*>(base + layout.dynamic_scales_offset);
    dest.expand_scales = reinterpret_cast<float*>(base + layout.expand_scales_offset);
  }
  for (auto& message : s.to_host) message.clear();
  // First row of this rank's block at each (destination, local expert).
  std::vector<std::int64_t>& block_start = s.block_start;
  block_start.assign(static_cast<std::size_t>(topo.count_record_len()), 0);
  for (int d = 0; d < topo.W; ++d) {
    const auto& dest_table = s.dest_prefix[static_cast<std::size_t>(d)];
    for (int l = 0; l < topo.local_experts(d); ++l) {
      const std::size_t entry = static_cast<std::size_t>(d * topo.L + l);
      const std::size_t pos = topo.is_shared(d) ? static_cast<std::size_t>(my_ep) : static_cast<std::size_t>(l * topo.W + my_ep);
      block_start[entry] = dest_table[pos] - s.own_counts()[entry];
    }
  }

  const Half type = x.dtype == DType::bf16 ? Half::bf16 : Half::fp16;
  const std::int64_t x_cs = x.strides[1];
  const bool smoothing = o.scales.present();
  const auto smooth_row = [&](std::int64_t row) -> std::int64_t { return smoothing ? row : -1; };
  float* scratch = s.row_scratch(2 * h);
  float* gathered_scales = scratch + h;
  // A scales row as a packed pointer: itself when its columns are contiguous, else gathered.
  const auto smooth_ptr = [&](std::int64_t row) -> const float* {
    if (row < 0) return nullptr;
    if (o.scales.strides[1] == 1) return o.scales.ptr<float>(row, 0);
    for (std::int64_t i = 0; i < h; ++i) gathered_scales[i] = o.scales.at<float>(row, i);
    return gathered_scales;
  };
  std::vector<RowTarget>& targets = s.row_targets;
  targets.resize(static_cast<std::size_t>(k + 1));
  const std::size_t stride = payload_stride(quant, h);
  const std::int64_t row_out_bytes = h * static_cast<std::int64_t>(out_elem) + (quant ? 4 : 0) + (o.expert_scales.present() ? 4 : 0);
  std::int64_t rows_sent = 0, rows_to_other_hosts = 0;
  int shared_target = 0;  // shared-expert rank of the current token (MoE source ranks)
  for (std::int64_t b = 0; b < bs; ++b) {
    std::size_t n = 0;
    for (std::int64_t j = 0; j < k; ++j) {
      const std::int32_t e = expert_ids.at<std::int32_t>(b, j);
      const int d = topo.expert_rank(e);
      const std::size_t entry = static_cast<std::size_t>(topo.S * topo.L + e);
      const std::int64_t row = block_start[entry] + s.plan.expand_idx[static_cast<std::size_t>(b * k + j)];
      const float weight = o.expert_scales.present() ? o.expert_scales.at<float>(b, j) : 1.0f;
      const std::int32_t slot = s.plan.expand_idx[static_cast<std::size_t>(b * k + j)];
      targets[n++] = RowTarget{&dests[static_cast<std::size_t>(d)], row, smooth_row(topo.S > 0 ? e + 1 : e), weight, host_of_ep(d), e, slot};
    }
    if (topo.S > 0) {
      if (topo.is_shared(my_ep)) {
        // A shared-expert rank keeps its own tokens: row b of its own expand_x (§3.4.1).
        targets[n++] = RowTarget{&dests[static_cast<std::size_t>(my_ep)], b, smooth_row(0), 1.0f, my_host, shared_expert_code(my_ep),
                                 static_cast<std::int32_t>(b)};
      } else {
        while (b >= contract::shared_range_begin(my_ep, shared_target + 1, bs, topo.S)) ++shared_target;
        const std::int64_t slot = b - contract::shared_range_begin(my_ep, shared_target, bs, topo.S);
        const std::int64_t row = block_start[static_cast<std::size_t>(shared_target * topo.L)] + slot;
        targets[n++] = RowTarget{&dests[static_cast<std::size_t>(shared_target)], row, smooth_row(0), 1.0f, host_of_ep(shared_target),
                                 shared_expert_code(shared_target), static_cast<std::int32_t>(slot)};
      }
    }
    const std::uint16_t* xrow = x.ptr<std::uint16_t>(b, 0);
    // Without smoothing every int8 copy of a token is identical: quantize once, copy the rest.
    const std::byte* quantized = nullptr;
    const float* quantized_scale = nullptr;
    bool to_other_hosts = false;
    for (std::size_t i = 0; i < n; ++i) {
      const RowTarget& t = targets[i];
      if (t.row < 0 || t.row >= t.dest->capacity_rows) {
        throw Error(ErrorCode::internal, concat("dispatch computed row ", t.row, " outside capacity ", t.dest->capacity_rows));
      }
      if (!t.dest->local) {
        to_other_hosts = true;
        continue;
      }
      std::byte* dst = t.dest->expand_x + static_cast<std::size_t>(t.row * h) * out_elem;
      if (!quant) {
        kernels::copy_row16(xrow, x_cs, h, reinterpret_cast<std::uint16_t*>(dst));
      } else if (t.smooth_row < 0 && quantized != nullptr) {
        std::memcpy(dst, quantized, static_cast<std::size_t>(h));
        t.dest->dynamic_scales[t.row] = *quantized_scale;
      } else {
        kernels::quantize_row(xrow, x_cs, type, smooth_ptr(t.smooth_row), h, reinterpret_cast<std::int8_t*>(dst),
                              &t.dest->dynamic_scales[t.row], scratch);
        if (t.smooth_row < 0) {
          quantized = dst;
          quantized_scale = &t.dest->dynamic_scales[t.row];
        }
      }
      if (o.expert_scales.present()) t.dest->expand_scales[t.row] = t.weight;
    }
    // Targets on other hosts: one entry per host, for the proxy there to fan out (host_messages.h).
    for (std::size_t i = 0; to_other_hosts && i < n; ++i) {
      const RowTarget& first = targets[i];
      bool host_seen = first.dest->local;
      for (std::size_t j = 0; j < i && !host_seen; ++j) host_seen = !targets[j].dest->local && targets[j].host == first.host;
      if (host_seen) continue;
      std::int32_t count = 0;
      for (std::size_t j = i; j < n; ++j) count += !targets[j].dest->local && targets[j].host == first.host ? 1 : 0;
      const bool row_per_target = quant && smoothing;
      const std::int32_t payloads = row_per_target ? count : 1;
      std::byte* at = append(s.to_host[static_cast<std::size_t>(first.host)],
                             sizeof(RemoteEntry) + static_cast<std::size_t>(count) * sizeof(RemoteTarget) + static_cast<std::size_t>(payloads) * stride);
      const RemoteEntry head{count, payloads};
      std::memcpy(at, &head, sizeof head);
      at += sizeof head;
      std::byte* payload = at + static_cast<std::size_t>(count) * sizeof(RemoteTarget);
      for (std::size_t j = i; j < n; ++j) {
        const RowTarget& t = targets[j];
        if (t.dest->local || t.host != first.host) continue;
        const RemoteTarget wire{t.code, t.slot, t.weight};
        std::memcpy(at, &wire, sizeof wire);
        at += sizeof wire;
        if (row_per_target) {
          kernels::quantize_row(xrow, x_cs, type, smooth_ptr(t.smooth_row), h, reinterpret_cast<std::int8_t*>(payload + 4),
                                reinterpret_cast<float*>(payload), scratch);
          payload += stride;
        }
        ++rows_to_other_hosts;
      }
      if (row_per_target) continue;
      if (!quant) {
        kernels::copy_row16(xrow, x_cs, h, reinterpret_cast<std::uint16_t*>(payload));
      } else if (quantized != nullptr) {
        std::memcpy(payload + 4, quantized, static_cast<std::size_t>(h));
        std::memcpy(payload, quantized_scale, 4);
      } else {
        kernels::quantize_row(xrow, x_cs, type, nullptr, h, reinterpret_cast<std::int8_t*>(payload + 4), reinterpret_cast<float*>(payload), scratch);
        quantized = payload + 4;
        quantized_scale = reinterpret_cast<const float*>(payload);
      }
    }
    rows_sent += static_cast<std::int64_t>(n);
  }
  s.traffic.dispatch_rows_sent = rows_sent;
  s.traffic.dispatch_bytes_sent = rows_sent * row_out_bytes;
  s.traffic.dispatch_bytes_between_hosts_flat = rows_to_other_hosts * row_out_bytes;
  s.traffic.dispatch_bytes_between_hosts = 0;
  for (const auto& message : s.to_host) s.traffic.dispatch_bytes_between_hosts += static_cast<std::int64_t>(message.size());

  // Rows for other hosts go to this rank's proxies there, who write them into their hosts' windows.
  std::exception_ptr carry_error;
  if (s.routes.multi_host()) {
    s.exchange_with_proxies("dispatch.hosts");
    try {
      write_carried_rows(s, dests, quant, h, k, o.expert_scales.present());
    } catch (...) {
      carry_error = std::current_exception();
    }
  }
  s.step(carry_error, "dispatch.data");

  // 4. TP all-gather (§3.5): the peer's own rows follow this rank's own rows.
  const contract::WindowLayout my_layout(topo, shape, my_ep);
  std::byte* my_window = s.transport->window(me);
  const std::int64_t n_self = s.dest_prefix[static_cast<std::size_t>(my_ep)].back();
  std::int64_t n_peer = 0;
  if (topo.T == 2) {
    n_peer = s.peer_prefix.back();
    const int peer = topo.global_rank(my_ep, 1 - my_tp);
    const contract::WindowLayout peer_layout(topo, s.shape_of(peer), my_ep);
    const std::byte* peer_window = s.transport->window(peer);
    std::memcpy(my_window + my_layout.expand_x_offset + static_cast<std::size_t>(n_self * h) * out_elem,
                peer_window + peer_layout.expand_x_offset, static_cast<std::size_t>(n_peer * h) * out_elem);
    std::memcpy(my_window + my_layout.dynamic_scales_offset + static_cast<std::size_t>(n_self) * 4,
                peer_window + peer_layout.dynamic_scales_offset, static_cast<std::size_t>(n_peer) * 4);
    std::memcpy(my_window + my_layout.expand_scales_offset + static_cast<std::size_t>(n_self) * 4,
                peer_window + peer_layout.expand_scales_offset, static_cast<std::size_t>(n_peer) * 4);
    s.step(nullptr, "dispatch.tp");
  }

  // 5. Outputs.
  const std::int64_t valid = n_self + n_peer;
  const int local = topo.local_experts(my_ep);
  const auto& own_prefix = s.dest_prefix[static_cast<std::size_t>(my_ep)];
  s.ep_recv_counts.assign(own_prefix.begin(), own_prefix.end());
  if (topo.T == 2) s.ep_recv_counts.insert(s.ep_recv_counts.end(), s.peer_prefix.begin(), s.peer_prefix.end());
  s.expert_token_nums.assign(static_cast<std::size_t>(local), 0);
  for (int l = 0; l < local; ++l) {
    const std::int64_t end = own_prefix[static_cast<std::size_t>(l * topo.W + topo.W - 1)];
    const std::int64_t begin = l == 0 ? 0 : own_prefix[static_cast<std::size_t>(l * topo.W - 1)];
    s.expert_token_nums[static_cast<std::size_t>(l)] = o.expert_token_nums_type == 1 ? end - begin : end;
  }
  if (topo.T == 2) s.expert_token_nums[0] = valid;  // L == 1 with TP: one expert holds both halves
  s.tp_recv_counts.clear();
  if (topo.T == 2) {
    s.tp_recv_counts.assign(2, 0);
    s.tp_recv_counts[static_cast<std::size_t>(my_tp)] = static_cast<std::int32_t>(n_self);
    s.tp_recv_counts[static_cast<std::size_t>(1 - my_tp)] = static_cast<std::int32_t>(n_peer);
  }

  s.last_dispatch = shape;
  DispatchResult result;
  result.valid_rows = valid;
  result.A = my_layout.capacity_a;
  const std::int64_t rows = my_layout.dispatch_rows;
  const DType x_out = quant ? DType::int8 : x.dtype;
  result.expand_x = matrix_view(my_window + my_layout.expand_x_offset, x_out, rows, h);
  result.dynamic_scales = vector_view(my_window + my_layout.dynamic_scales_offset, DType::fp32, rows);
  if (o.expert_scales.present()) result.expand_scales = vector_view(my_window + my_layout.expand_scales_offset, DType::fp32, rows);
  result.expand_idx = vector_view(s.plan.expand_idx.data(), DType::int32, bs * k);
  result.expert_token_nums = vector_view(s.expert_token_nums.data(), DType::int64, local);
  result.ep_recv_counts = vector_view(s.ep_recv_counts.data(), DType::int32, static_cast<std::int64_t>(s.ep_recv_counts.size()));
  if (topo.T == 2) result.tp_recv_counts = vector_view(s.tp_recv_counts.data(), DType::int32, 2);

  // Caller buffers get copies of the valid part; their views replace the group's. They were checked
  // against torch_npu's shapes (A rows); a shared-expert rank can receive more than A rows when ranks
  // have different BS, so check the rows of this call before writing any of them.
  const DispatchOutputs& out = o.out;
  for (const MutableTensorView* buffer : {&out.expand_x, &out.dynamic_scales, &out.expand_scales}) {
    if (buffer->present() && buffer->rows() < valid) {
      const char* name = buffer == &out.expand_x ? "out.expand_x" : buffer == &out.dynamic_scales ? "out.dynamic_scales" : "out.expand_scales";
      fail(ErrorCode::capacity, concat(name, ".shape[0]"), concat(buffer->rows()),
           concat("this call produced ", valid, " rows on this shared-expert rank, more than A * max(T, 1) because "
                  "ranks have different BS; size buffers with capacity().max_receive_rows"));
    }
  }
  if (out.expand_x.present()) {
    for (std::int64_t r = 0; r < valid; ++r) {
      const std::byte* src = my_window + my_layout.expand_x_offset + static_cast<std::size_t>(r * h) * out_elem;
      if (out.expand_x.strides[1] == 1) {
        std::memcpy(out.expand_x.ptr<std::byte>() + static_cast<std::size_t>(r * out.expand_x.strides[0]) * out_elem, src,
                    static_cast<std::size_t>(h) * out_elem);
      } else if (quant) {
        for (std::int64_t c = 0; c < h; ++c) *out.expand_x.ptr<std::int8_t>(r, c) = reinterpret_cast<const std::int8_t*>(src)[c];
      } else {
        for (std::int64_t c = 0; c < h; ++c) *out.expand_x.ptr<std::uint16_t>(r, c) = reinterpret_cast<const std::uint16_t*>(src)[c];
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
    copy_vector(out.dynamic_scales, reinterpret_cast<const float*>(my_window + my_layout.dynamic_scales_offset), valid, &result.dynamic_scales);
  if (out.expand_scales.present() && o.expert_scales.present())
    copy_vector(out.expand_scales, reinterpret_cast<const float*>(my_window + my_layout.expand_scales_offset), valid, &result.expand_scales);
  if (out.expand_idx.present()) copy_vector(out.expand_idx, s.plan.expand_idx.data(), bs * k, &result.expand_idx);
  if (out.expert_token_nums.present()) copy_vector(out.expert_token_nums, s.expert_token_nums.data(), local, &result.expert_token_nums);
  if (out.ep_recv_counts.present())
    copy_vector(out.ep_recv_counts, s.ep_recv_counts.data(), static_cast<std::int64_t>(s.ep_recv_counts.size()), &result.ep_recv_counts);
  if (out.tp_recv_counts.present()) copy_vector(out.tp_recv_counts, s.tp_recv_counts.data(), 2, &result.tp_recv_counts);
  return result;
}

}  // namespace moedist
