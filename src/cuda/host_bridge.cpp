// The host's part of a call of a CUDA group across hosts (host_bridge.h; docs/cuda.md, "Across hosts").
#include "cuda/host_bridge.h"

#include <algorithm>
#include <cstring>
#include <set>

#include "common/format.h"
#include "cuda/bridge_messages.h"
#include "cuda/device_guard.h"
#include "cuda/kernels.h"
#include "cuda/protocol.h"
#include "moedist/error.h"
#include "ops/host_messages.h"  // append

namespace moedist::cuda {

namespace {

template <class T>
void copy_out(std::vector<std::byte>& message, const T* device, std::int64_t n) {
  if (n <= 0) return;
  check_cuda(cudaMemcpy(append(message, sizeof(T) * static_cast<std::size_t>(n)), device,
                        sizeof(T) * static_cast<std::size_t>(n), cudaMemcpyDeviceToHost),
             "cudaMemcpy (a message to another host)");
}
// The DeviceGroup through which protocol.h sees a sender's routing state held on the host.
DeviceGroup routed_as(DeviceGroup g, int sender, int T, std::vector<std::int32_t>& ids, std::vector<std::int32_t>& idx,
                      std::vector<std::int32_t>& slot, std::vector<std::int64_t>& block_start,
                      std::vector<std::int64_t>& tp_shift, std::vector<std::int64_t>& shared_start) {
  g.ep_rank = sender / T;
  g.tp_rank = sender % T;
  g.dispatch_ids = ids.data();
  g.dispatch_expand_idx = idx.data();
  g.token_slot = slot.data();
  g.block_start = block_start.data();
  g.tp_shift = tp_shift.data();
  g.shared_start = shared_start.data();
  return g;
}

void upload(void* device, const void* host, std::size_t bytes) {
  if (bytes > 0)
    check_cuda(cudaMemcpy(device, host, bytes, cudaMemcpyHostToDevice), "cudaMemcpy (a message from another host)");
}

}  // namespace

template <class T>
T* HostBridge::device_array(std::int64_t n) {
  void* p = nullptr;
  check_cuda(cudaMalloc(&p, static_cast<std::size_t>(std::max<std::int64_t>(n, 1)) * sizeof(T)),
             "cudaMalloc (buffers between hosts)");
  allocations_.push_back(p);
  return static_cast<T*>(p);
}

HostBridge::HostBridge(Transport& transport, DeviceGroup& group, const contract::Topology& topo, std::int64_t max_bs,
                       std::int64_t k, std::int64_t h, std::byte* window)
    : transport_(transport),
      g_(group),
      topo_(topo),
      max_bs_(max_bs),
      h_(h),
      window_(window),
      limits_{max_bs, k, h, topo.E + std::max(1, topo.Sn), topo.E, topo.S, topo.L} {
  const int world = transport.size(), me = transport.rank();
  std::vector<int> local_index(static_cast<std::size_t>(world));
  std::vector<int> seen(static_cast<std::size_t>(transport.host_count()), 0);
  for (int r = 0; r < world; ++r)
    local_index[static_cast<std::size_t>(r)] = seen[static_cast<std::size_t>(transport.host_of(r))]++;
  host_slot_.assign(static_cast<std::size_t>(transport.host_count()), -1);
  for (int host = 0; host < transport.host_count(); ++host) {
    if (host == transport.host_of(me)) continue;
    for (int r = 0; r < world; ++r) {
      if (transport.host_of(r) == host &&
          local_index[static_cast<std::size_t>(r)] == local_index[static_cast<std::size_t>(me)]) {
        host_slot_[static_cast<std::size_t>(host)] = static_cast<int>(proxies_.size());
        proxies_.push_back(r);
      }
    }
  }
  const std::int64_t slots = k + std::max(1, topo.Sn);
  const std::int64_t entries = contract::sat_mul(max_bs, slots);
  const auto pitch = static_cast<std::int64_t>(g_.off.combine_pitch);
  g_.remote_slots = slots;
  g_.remote_rows = device_array<std::byte>(contract::sat_mul(entries, pitch));
  g_.remote_index = device_array<std::uint64_t>(entries);
  g_.remote_counts = device_array<std::int64_t>(topo.W);
  g_.remote_failed = device_array<std::int64_t>(world);
  x_compact_ = device_array<std::uint16_t>(max_bs * h);
  es_compact_ = device_array<float>(max_bs * k);
  as_ = g_;
  as_.dispatch_ids = device_array<std::int32_t>(max_bs * k);
  as_.dispatch_expand_idx = device_array<std::int32_t>(max_bs * k);
  as_.token_slot = device_array<std::int32_t>(max_bs);
  as_.block_start = device_array<std::int64_t>(topo.count_record_len());
  as_.tp_shift = device_array<std::int64_t>(topo.W);
  as_.shared_start = device_array<std::int64_t>(std::max(topo.S, 1));
  as_.status = device_array<Status>(1);
  x_stage_ = device_array<std::uint16_t>(max_bs * h);
  es_stage_ = device_array<float>(max_bs * k);
  scales_stage_ = device_array<float>(limits_.scale_rows * h);
  requests_ = device_array<RemoteRequest>(entries);
  proxy_requests_ = device_array<RemoteRequest>(entries);
  gathered_rows_ = device_array<std::byte>(contract::sat_mul(entries, pitch));
  gathered_entries_ = device_array<std::uint64_t>(entries);
  gathered_counts_ = device_array<std::int64_t>(topo.W);
  void* pinned = nullptr;
  const std::size_t x_bytes = contract::align_up(static_cast<std::size_t>(max_bs * h) * 2, 16);
  check_cuda(cudaHostAlloc(&pinned, std::max<std::size_t>(x_bytes + static_cast<std::size_t>(max_bs * k) * 4, 1),
                           cudaHostAllocDefault),
             "cudaHostAlloc (rows between hosts)");
  pinned_ = static_cast<std::byte*>(pinned);
  x_pinned_ = reinterpret_cast<std::uint16_t*>(pinned_);
  es_pinned_ = reinterpret_cast<float*>(pinned_ + x_bytes);
}

HostBridge::~HostBridge() {
  for (void* p : allocations_) cudaFree(p);
  if (pinned_ != nullptr) cudaFreeHost(pinned_);
  cudaGetLastError();
}

Status HostBridge::read_status() const {
  Status st;
  check_cuda(cudaMemcpy(&st, g_.status, sizeof(st), cudaMemcpyDeviceToHost), "cudaMemcpy (status)");
  return st;
}

HostBridge::HostNeeds HostBridge::needs_by_host(const DeviceGroup& hg, const DispatchArgs& ha,
                                                bool smooth_scales) const {
  HostNeeds needs;
  needs.tokens.resize(static_cast<std::size_t>(transport_.host_count()));
  needs.smooth.resize(static_cast<std::size_t>(transport_.host_count()));
  DispatchArgs unweighted = ha;  // weights play no part in where a row goes
  unweighted.expert_scales = nullptr;
  std::vector<Target> targets(static_cast<std::size_t>(target_count(hg, ha.k, ha.version)));
  std::vector<bool> wanted(needs.tokens.size());
  for (std::int64_t b = 0; b < ha.bs; ++b) {
    const int count = targets_of(hg, unweighted, b, targets.data());
    std::fill(wanted.begin(), wanted.end(), false);
    for (int j = 0; j < count; ++j) {
      const Target& tg = targets[static_cast<std::size_t>(j)];
      if (tg.ep < 0) continue;
      const auto host = static_cast<std::size_t>(transport_.host_of(topo_.global_rank(tg.ep, hg.tp_rank)));
      wanted[host] = true;
      if (smooth_scales) needs.smooth[host].insert(tg.smooth_row);
    }
    for (std::size_t host = 0; host < wanted.size(); ++host) {
      if (wanted[host]) needs.tokens[host].push_back(static_cast<std::int32_t>(b));  // once per host
    }
  }
  return needs;
}

void HostBridge::plan_as(int sender, int version, std::vector<std::int64_t>* block_start,
                         std::vector<std::int64_t>* tp_shift, std::vector<std::int64_t>* shared_start) const {
  block_start->assign(static_cast<std::size_t>(topo_.count_record_len()), 0);
  tp_shift->assign(static_cast<std::size_t>(topo_.W), 0);
  shared_start->assign(static_cast<std::size_t>(std::max(topo_.S, 1)), 0);
  std::vector<std::byte*> windows(static_cast<std::size_t>(g_.world), nullptr);
  windows[static_cast<std::size_t>(g_.me)] = const_cast<std::byte*>(inbox_image_.data());  // read only: the records
  Status scratch;  // the sender checked its capacities itself; a failure here changes no start
  DeviceGroup pg = g_;
  pg.windows = windows.data();
  pg.status = &scratch;
  pg.ep_rank = sender / topo_.T;
  pg.tp_rank = sender % topo_.T;
  pg.block_start = block_start->data();
  pg.tp_shift = tp_shift->data();
  pg.shared_start = shared_start->data();
  DispatchArgs pa;
  pa.version = version;
  pa.capacity_moe = pa.capacity_shared = std::int64_t{1} << 62;
  for (int d = 0; d < topo_.W; ++d) plan_destination(pg, pa, d);
}

std::vector<std::vector<std::byte>> HostBridge::exchange_with_proxies(
    const std::vector<std::vector<std::byte>>& messages, std::string_view phase) {
  std::vector<Transport::Outgoing> out;
  for (std::size_t i = 0; i < proxies_.size(); ++i) {
    out.push_back({proxies_[i], messages[i].data(), messages[i].size()});
    traffic_.bytes += static_cast<std::int64_t>(messages[i].size());
  }
  std::vector<std::vector<std::byte>> in(proxies_.size());
  transport_.exchange(out, proxies_, in, phase);
  return in;
}

void HostBridge::exchange_records(cudaStream_t stream) {
  check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize (records to other hosts)");
  const int world = g_.world, me = g_.me;
  const std::size_t stride = g_.off.record_stride, each = stride + sizeof(std::uint64_t);
  std::byte* inbox = window_ + g_.off.inbox;
  auto* count_flags = reinterpret_cast<std::uint64_t*>(window_ + g_.off.count_flags);
  // What this rank published to itself: its record and its count flag of this call.
  std::vector<std::byte> mine(each);
  check_cuda(cudaMemcpy(mine.data(), inbox + static_cast<std::size_t>(me) * stride, stride, cudaMemcpyDeviceToHost),
             "cudaMemcpy (record)");
  check_cuda(cudaMemcpy(mine.data() + stride, count_flags + me, sizeof(std::uint64_t), cudaMemcpyDeviceToHost),
             "cudaMemcpy (record)");
  std::vector<std::byte> all(each * static_cast<std::size_t>(world));
  transport_.allgather(mine.data(), each, all.data(), "cuda.records");
  traffic_ = {};  // a new call
  for (int r = 0; r < world; ++r)
    traffic_.bytes += transport_.host_of(r) != transport_.host_of(me) ? static_cast<std::int64_t>(each) : 0;
  // Every rank's record, laid out as in a window's inbox, for planning as a sender (plan_as).
  inbox_image_.assign(g_.off.inbox + stride * static_cast<std::size_t>(world), std::byte{0});
  for (int r = 0; r < world; ++r)
    std::memcpy(inbox_image_.data() + g_.off.inbox + stride * static_cast<std::size_t>(r),
                all.data() + each * static_cast<std::size_t>(r), stride);
  for (int r = 0; r < world; ++r) {
    if (transport_.host_of(r) == transport_.host_of(me)) continue;
    const std::byte* theirs = all.data() + each * static_cast<std::size_t>(r);
    upload(inbox + static_cast<std::size_t>(r) * stride, theirs, stride);
    upload(count_flags + r, theirs + stride, sizeof(std::uint64_t));  // after the record: the copies are in order
  }
}

void HostBridge::carry_rows(const DispatchArgs& a, cudaStream_t stream) {
  check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize (rows to other hosts)");
  const Status st = read_status();
  RowsHeader head;
  head.word = flag_word(st.seq, st.code != 0);
  const std::size_t hosts = proxies_.size();
  std::vector<std::vector<std::byte>> messages(hosts);
  if (st.code != 0) {
    for (auto& m : messages) write_rows_message(m, head, {}, limits_);
  } else {
    head.bs = a.bs;
    head.k = static_cast<std::int32_t>(a.k);
    head.h = static_cast<std::int32_t>(a.h);
    head.version = a.version;
    head.quant = a.quant;
    head.bf16 = a.bf16;
    head.has_expert_scales = a.expert_scales != nullptr ? 1 : 0;
    head.has_scales = a.quant == 2 && a.scales != nullptr ? 1 : 0;
    const std::int64_t n = a.bs * a.k;
    // The routing state the kernels left, and the inputs in contiguous form, staged in pinned memory.
    check_cuda(enqueue_compact_inputs(a, x_compact_, head.has_expert_scales != 0 ? es_compact_ : nullptr, stream),
               "compacting rows");
    check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize (rows to other hosts)");
    std::uint16_t* x_host = x_pinned_;
    float* es_host = es_pinned_;
    check_cuda(cudaMemcpy(x_host, x_compact_, static_cast<std::size_t>(a.bs * a.h) * 2, cudaMemcpyDeviceToHost),
               "cudaMemcpy (rows)");
    if (head.has_expert_scales != 0)
      check_cuda(cudaMemcpy(es_host, es_compact_, static_cast<std::size_t>(n) * 4, cudaMemcpyDeviceToHost),
                 "cudaMemcpy (expert_scales)");
    std::vector<std::int32_t> ids(static_cast<std::size_t>(n)), idx(static_cast<std::size_t>(n)),
        slot(static_cast<std::size_t>(a.bs));
    std::vector<std::int64_t> block_start(static_cast<std::size_t>(topo_.count_record_len())),
        tp_shift(static_cast<std::size_t>(topo_.W)), shared_start(static_cast<std::size_t>(std::max(topo_.S, 1)));
    const auto down = [](auto& v, const auto* device) {
      if (!v.empty())
        check_cuda(cudaMemcpy(v.data(), device, v.size() * sizeof(v[0]), cudaMemcpyDeviceToHost),
                   "cudaMemcpy (routing state)");
    };
    down(ids, g_.dispatch_ids);
    down(idx, g_.dispatch_expand_idx);
    if (a.version == 2) down(slot, g_.token_slot);
    down(block_start, g_.block_start);
    down(tp_shift, g_.tp_shift);
    down(shared_start, g_.shared_start);
    // Which tokens (and smooth-scale rows) each other host needs: the targets as the kernels find them.
    const DeviceGroup hg = routed_as(g_, g_.me, topo_.T, ids, idx, slot, block_start, tp_shift, shared_start);
    DispatchArgs ha = a;
    ha.expert_scales = head.has_expert_scales != 0 ? es_host : nullptr;
    ha.expert_scales_row_stride = a.k;
    ha.expert_scales_col_stride = 1;
    std::vector<RowsContent> content(hosts);
    std::vector<std::set<std::int64_t>> smooth(hosts);
    const HostNeeds needs = needs_by_host(hg, ha, head.has_scales != 0);
    for (int host = 0; host < transport_.host_count(); ++host) {
      const int i = host_slot_[static_cast<std::size_t>(host)];
      if (i < 0) continue;  // this host: written already
      content[static_cast<std::size_t>(i)].tokens = needs.tokens[static_cast<std::size_t>(host)];
      smooth[static_cast<std::size_t>(i)] = needs.smooth[static_cast<std::size_t>(host)];
    }
    // The smooth-scale rows any host needs, copied once.
    std::set<std::int64_t> all_smooth;
    for (const auto& rows : smooth) all_smooth.insert(rows.begin(), rows.end());
    std::vector<float> smooth_rows(all_smooth.size() * static_cast<std::size_t>(a.h));
    std::vector<std::int64_t> smooth_index(all_smooth.begin(), all_smooth.end());
    for (std::size_t r = 0; r < smooth_index.size(); ++r) {
      check_cuda(cudaMemcpy(smooth_rows.data() + r * static_cast<std::size_t>(a.h),
                            a.scales + smooth_index[r] * a.scales_row_stride, static_cast<std::size_t>(a.h) * 4,
                            cudaMemcpyDeviceToHost),
                 "cudaMemcpy (scales)");
    }
    for (std::size_t i = 0; i < hosts; ++i) {
      RowsContent& c = content[i];
      c.ids = ids;
      c.expand_idx = idx;
      c.token_slot = slot;
      if (head.has_expert_scales != 0) c.expert_scales = {es_host, static_cast<std::size_t>(n)};
      c.x = {x_host, static_cast<std::size_t>(a.bs * a.h)};
      for (const std::int64_t row : smooth[i]) {
        const auto at = static_cast<std::size_t>(std::lower_bound(smooth_index.begin(), smooth_index.end(), row) -
                                                 smooth_index.begin());
        c.smooth.emplace_back(static_cast<std::int32_t>(row), smooth_rows.data() + at * static_cast<std::size_t>(a.h));
      }
      traffic_.token_rows += static_cast<std::int64_t>(c.tokens.size());
      write_rows_message(messages[i], head, c, limits_);
    }
  }
  const std::vector<std::vector<std::byte>> in = exchange_with_proxies(messages, "cuda.rows");
  for (std::size_t i = 0; i < hosts; ++i) proxy_rows(proxies_[i], in[i], stream);
}

// As sender's proxy: checks its message, stages its state and rows, runs write_rows as the sender, and
// raises its rows flag in every window of this host (with the failed bit when it failed or its message
// broke a rule).
void HostBridge::proxy_rows(int sender, const std::vector<std::byte>& message, cudaStream_t stream) {
  std::uint64_t word = rows_message_word(message);
  const bool sender_failed = (word & 1u) != 0;
  const std::uint64_t seq = read_status().seq;
  const std::byte* record =
      inbox_image_.data() + g_.off.inbox + g_.off.record_stride * static_cast<std::size_t>(sender);
  RecordHeader rec;
  std::memcpy(&rec, record, sizeof(rec));
  std::vector<std::int32_t> counts(static_cast<std::size_t>(topo_.count_record_len()));
  std::memcpy(counts.data(), record + sizeof(RecordHeader), counts.size() * 4);
  RowsMessage m;
  bool ok =
      !sender_failed && read_rows_message(message, limits_, &m) && rows_agree_with_record(m, rec, counts, seq, limits_);
  const RowsHeader& hd = m.head;
  std::vector<std::int64_t> block_start, tp_shift, shared_start;
  std::vector<std::int32_t> ids, idx, slot;
  if (ok) {
    // Where the sender's blocks start: planned here from the records, as the sender planned them.
    plan_as(sender, hd.version, &block_start, &tp_shift, &shared_start);
    const std::int64_t n = hd.bs * hd.k;
    const auto take = [](std::vector<std::int32_t>& to, const std::byte* from, std::int64_t count) {
      to.resize(static_cast<std::size_t>(count));
      if (count > 0) std::memcpy(to.data(), from, to.size() * 4);  // (an empty vector's data() may be null)
    };
    take(ids, m.ids, n);
    take(idx, m.expand_idx, n);
    take(slot, m.token_slot, hd.bs);
    // It must bring every row (and smooth-scale row) that has a target on this host, and no other.
    const DeviceGroup hg = routed_as(g_, sender, topo_.T, ids, idx, slot, block_start, tp_shift, shared_start);
    DispatchArgs ha;
    ha.bs = hd.bs;
    ha.k = hd.k;
    ha.version = hd.version;
    const HostNeeds needs = needs_by_host(hg, ha, hd.has_scales != 0);
    const int here = transport_.host_of(g_.me);
    std::vector<std::int32_t> brought;
    for (const auto& row : m.rows) brought.push_back(row.first);
    std::set<std::int64_t> scales_brought;
    for (const auto& row : m.scale_rows) scales_brought.insert(row.first);
    ok = brought == needs.tokens[static_cast<std::size_t>(here)] &&
         scales_brought == needs.smooth[static_cast<std::size_t>(here)] && scales_brought.size() == m.scale_rows.size();
  }
  if (ok) {
    const std::int64_t n = hd.bs * hd.k;
    upload(as_.dispatch_ids, ids.data(), static_cast<std::size_t>(n) * 4);
    upload(as_.dispatch_expand_idx, idx.data(), static_cast<std::size_t>(n) * 4);
    upload(as_.token_slot, slot.data(), static_cast<std::size_t>(hd.bs) * 4);
    upload(as_.block_start, block_start.data(), block_start.size() * 8);
    upload(as_.tp_shift, tp_shift.data(), tp_shift.size() * 8);
    upload(as_.shared_start, shared_start.data(), shared_start.size() * 8);
    if (m.expert_scales != nullptr) upload(es_stage_, m.expert_scales, static_cast<std::size_t>(n) * 4);
    for (const auto& [b, row] : m.rows) upload(x_stage_ + b * h_, row, static_cast<std::size_t>(h_) * 2);
    for (const auto& [r, row] : m.scale_rows) upload(scales_stage_ + r * h_, row, static_cast<std::size_t>(h_) * 4);
  }
  if (ok) {
    DeviceGroup as = as_;
    as.ep_rank = sender / topo_.T;
    as.tp_rank = sender % topo_.T;
    as.me = sender;
    check_cuda(cudaMemset(as.status, 0, sizeof(Status)), "cudaMemset (status)");
    DispatchArgs a;
    a.x = x_stage_;
    a.x_row_stride = h_;
    a.x_col_stride = 1;
    a.scales = hd.has_scales != 0 ? scales_stage_ : nullptr;
    a.scales_row_stride = h_;
    a.expert_scales = hd.has_expert_scales != 0 ? es_stage_ : nullptr;
    a.expert_scales_row_stride = hd.k;
    a.expert_scales_col_stride = 1;
    a.bs = hd.bs;
    a.k = hd.k;
    a.h = hd.h;
    a.bf16 = hd.bf16;
    a.quant = hd.quant;
    a.version = hd.version;
    check_cuda(enqueue_write_rows(as, a, stream), "write_rows (as a proxy)");
  } else if (!sender_failed) {
    word = flag_word(seq, true);  // its message broke a rule: the ranks of this host name it as failed
  }
  check_cuda(enqueue_raise_flags(g_, g_.off.rows_flags, sender, word, stream), "raise_flags (as a proxy)");
  check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize (rows from other hosts)");
}

void HostBridge::carry_combine_rows(const CombineArgs& a, cudaStream_t stream) {
  traffic_ = {};  // a new call
  check_cuda(enqueue_remote_requests(g_, a, requests_, stream), "listing the rows of other hosts");
  check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize (rows from other hosts)");
  const Status st = read_status();
  // Whether each rank had failed when it signalled its combine flags (a failure of its own, not one it
  // saw in a peer): on one host the flags carry it; across hosts this all-gather does, so that every rank
  // of a TP lane names a failed rank of its lane, as on one host.
  const std::int64_t mine = st.combine_signalled_failed;
  std::vector<std::int64_t> failed(static_cast<std::size_t>(g_.world), 0);
  transport_.allgather(&mine, sizeof(mine), failed.data(), "cuda.combine_status");
  for (int r = 0; r < g_.world; ++r) {
    const bool elsewhere = transport_.host_of(r) != transport_.host_of(g_.me);
    traffic_.bytes += elsewhere ? static_cast<std::int64_t>(sizeof(mine)) : 0;
    if (!elsewhere || r % topo_.T != topo_.tp_rank) failed[static_cast<std::size_t>(r)] = 0;
  }
  const std::int64_t total = a.bs * g_.remote_slots;
  std::vector<RemoteRequest> all(static_cast<std::size_t>(total));
  if (total > 0)
    check_cuda(cudaMemcpy(all.data(), requests_, all.size() * sizeof(RemoteRequest), cudaMemcpyDeviceToHost),
               "cudaMemcpy (requests)");
  const std::size_t hosts = proxies_.size();
  std::vector<std::vector<std::int64_t>> where(hosts);  // per host: the (token, slot) of each request, in order
  std::vector<std::vector<RemoteRequest>> lists(hosts);
  for (std::int64_t i = 0; i < total; ++i) {
    const RemoteRequest& q = all[static_cast<std::size_t>(i)];
    if (q.holder < 0 || q.holder >= g_.world) continue;
    const int slot_of_host = host_slot_[static_cast<std::size_t>(transport_.host_of(q.holder))];
    if (slot_of_host < 0) continue;
    where[static_cast<std::size_t>(slot_of_host)].push_back(i);
    lists[static_cast<std::size_t>(slot_of_host)].push_back(q);
  }
  std::vector<std::vector<std::byte>> requests(hosts);
  for (std::size_t i = 0; i < hosts; ++i) write_requests(requests[i], st.seq, lists[i]);
  const std::vector<std::vector<std::byte>> asked = exchange_with_proxies(requests, "cuda.combine_requests");
  std::vector<std::vector<std::byte>> replies(hosts);
  for (std::size_t i = 0; i < hosts; ++i)
    replies[i] = answer_requests(proxies_[i], asked[i], a.version, st.seq, stream);
  const std::vector<std::vector<std::byte>> answers = exchange_with_proxies(replies, "cuda.combine_rows");

  // The answers into remote_rows, remote_index, remote_counts and remote_failed, each in one copy.
  const std::size_t pitch = g_.off.combine_pitch;
  std::vector<std::byte> rows(static_cast<std::size_t>(total) * pitch);
  std::vector<std::uint64_t> index(static_cast<std::size_t>(total), 0);
  std::vector<std::int64_t> counts(static_cast<std::size_t>(topo_.W), 0);
  for (std::size_t i = 0; i < hosts; ++i) {
    const auto n = static_cast<std::int64_t>(where[i].size());
    ReplyView reply;
    if (!read_reply(answers[i], n, topo_.W, pitch, &reply)) {  // the proxy failed, or its answer is malformed
      failed[static_cast<std::size_t>(proxies_[i])] = 1;
      continue;
    }
    const std::byte* entries = reply.entries;
    const std::byte* their_counts = reply.counts;
    const std::byte* their_rows = reply.rows;
    for (std::int64_t r = 0; r < n; ++r) {
      const auto at = static_cast<std::size_t>(where[i][static_cast<std::size_t>(r)]);
      std::memcpy(&index[at], entries + 8 * r, 8);
      if (a.version != 2 && index[at] != 1)
        failed[static_cast<std::size_t>(proxies_[i])] = 1;  // V1: a row it did not find
      std::memcpy(rows.data() + at * pitch, their_rows + static_cast<std::size_t>(r) * pitch, pitch);
    }
    for (int d = 0; d < topo_.W; ++d) {
      if (transport_.host_of(topo_.global_rank(d, topo_.tp_rank)) == transport_.host_of(proxies_[i]))
        std::memcpy(&counts[static_cast<std::size_t>(d)], their_counts + 8 * d, 8);
    }
  }
  upload(g_.remote_rows, rows.data(), rows.size());
  upload(g_.remote_index, index.data(), index.size() * 8);
  upload(g_.remote_counts, counts.data(), counts.size() * 8);
  upload(g_.remote_failed, failed.data(), failed.size() * 8);
}

// As source's proxy: the rows its requests name, from this host's holders (checked by the kernel),
// with the holders' index entries and counts of the source's rows.
std::vector<std::byte> HostBridge::answer_requests(int source, const std::vector<std::byte>& message, int version,
                                                   std::uint64_t seq, cudaStream_t stream) {
  std::int64_t n = 0;
  const std::byte* requests = read_requests(message, max_bs_ * g_.remote_slots, seq, &n);
  // A failure of this rank or of a holder reaches the source through the combine all-gather, naming the
  // rank that failed; the answer fails only for a request message that breaks a rule.
  const bool ok = requests != nullptr;
  if (!ok) n = 0;
  const std::size_t pitch = g_.off.combine_pitch;
  std::vector<std::byte> reply;
  write_reply_header(reply, !ok, n);
  if (!ok) return reply;
  upload(proxy_requests_, requests, static_cast<std::size_t>(n) * sizeof(RemoteRequest));
  check_cuda(enqueue_gather_requested_rows(g_, proxy_requests_, n, version, source / topo_.T, gathered_rows_,
                                           gathered_entries_, gathered_counts_, stream),
             "gathering rows for another host");
  check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize (rows for other hosts)");
  copy_out(reply, gathered_entries_, n);
  copy_out(reply, gathered_counts_, topo_.W);
  copy_out(reply, gathered_rows_, static_cast<std::int64_t>(static_cast<std::size_t>(n) * pitch));
  return reply;
}

}  // namespace moedist::cuda
