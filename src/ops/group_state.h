// The state a Group keeps between calls, and the call record every rank publishes at the start of a
// collective call (its status, its call shape and its routing counts).
#pragma once

#include <algorithm>
#include <cstdint>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include "common/worker_pool.h"
#include "contract/layout.h"
#include "contract/routing_plan.h"
#include "contract/v2_routing.h"
#include "kernels/row_kernels.h"
#include "moedist/group.h"
#include "ops/host_routes.h"
#include "transport/transport.h"

namespace moedist {

enum class CallKind : std::int64_t { join = 1, dispatch = 2, combine = 3, step = 4 };

// Fixed-size header of a call record; a record is the header followed by count_record_len() int32.
struct CallHeader {
  std::int64_t kind = 0;
  std::int64_t seq = 0;
  std::int64_t status = 0;  // 0 = ok, else the ErrorCode of the rank's local failure
  std::int64_t bs = 0, k = 0, h = 0;
  std::int64_t active = 0;   // tokens that take part (x_active_mask), <= bs
  std::int64_t version = 0;  // 1: a V1 operator, 2: a V2 operator (0: join)
  std::int64_t dtype = 0;
  std::int64_t mode = 0;                 // quant_mode (dispatch) or comm_quant_mode (combine)
  std::int64_t has_expert_scales = 0;
  std::int64_t own_rows = 0, peer_rows = 0;  // combine: n_self, n_peer
  std::int64_t window_bytes = 0;         // the sender's current window size
  // Configuration (checked at join).
  std::int64_t ep_world_size = 0, ep_rank_id = 0, moe_expert_num = 0, tp_world_size = 0, tp_rank_id = 0;
  std::int64_t shared_expert_rank_num = 0, shared_expert_num = 0, expert_shard_type = 0, global_bs = 0, profile = 0;
  char message[1024] = {};  // the rank's error message when status != 0
};

// What a rank publishes at a barrier inside a call: whether it can go on.
struct StepRecord {
  std::int64_t seq = 0;
  std::int64_t status = 0;
  std::int64_t rows_offset = 0;  // combine.data: where in its window the rank's expert-output rows start
  std::int64_t row_bytes = 0;    // and their stride in bytes
  char message[1024] = {};
};

// Where the rows dispatch sends to one destination rank go.
struct Destination {
  bool local = false;             // on this rank's host: written directly; else through its proxy
  std::byte* expand_x = nullptr;  // row 0 of expand_x in the destination's window
  float* dynamic_scales = nullptr;
  float* expand_scales = nullptr;
  std::int32_t* assist = nullptr;  // V2: the rows' triples (source EP rank, token, k)
  std::int64_t capacity_rows = 0;  // rows of its own EP region
};

// One copy of a token row: where it goes and which smooth-scales row quantizes it.
struct RowTarget {
  const Destination* dest;
  std::int64_t row;
  std::int64_t smooth_row;  // row of `scales`, or -1: no smoothing
  float weight;
  int host;                 // the destination's host
  std::int32_t code;        // the expert as a proxy names it (RemoteTarget::code)
  std::int32_t slot;        // the row within this rank's block there
  std::int32_t k;           // V2: the triple's k (the routing entry, or K + j for shared expert j)
};

struct Group::State {
  State(const GroupConfig& c, std::unique_ptr<Transport> t, const GroupOptions& o);

  GroupConfig config;
  GroupOptions options;
  contract::Topology topo;
  std::unique_ptr<Transport> transport;
  std::int64_t seq = 0;
  TrafficCounters traffic;

  // Call records of the last exchange, rank-major, and this rank's own record.
  std::size_t record_bytes = 0;
  std::vector<std::byte> own_record;
  std::vector<std::byte> records;
  std::vector<StepRecord> steps;

  contract::SendPlan plan;        // dispatch's; backs DispatchResult::expand_idx
  contract::SendPlan route_plan;  // combine's check of the routing it is given
  contract::SendPlanV2 plan_v2;   // V2 dispatch's, and V2 combine's count of what it expects back
  // Per destination EP rank: its ep_recv_counts (own half) as computed from the records, 64-bit (rows
  // computed from them are checked against capacities before ep_recv_counts gets them as int32).
  std::vector<std::vector<std::int64_t>> dest_prefix;
  std::vector<std::int64_t> peer_prefix;  // the TP peer's own half (T == 2)

  // Group-owned outputs.
  std::vector<std::int32_t> expand_idx, ep_recv_counts, tp_recv_counts;
  std::vector<std::int64_t> expert_token_nums;
  std::vector<std::int32_t> assist_storage;  // V2 under ascend_a3: assist_info_for_combine at torch_npu's length
  Tensor combine_out;
  // This rank's threads for its row work (GroupOptions::worker_threads), and each thread's scratch:
  // row-sized fp32 (quantization, accumulation) and the copies of the token it routes (dispatch).
  WorkerPool pool;
  std::vector<std::vector<float>> worker_floats;
  std::vector<std::vector<RowTarget>> worker_targets;
  // Per-call working storage, kept so that a call in steady state allocates nothing.
  std::vector<std::int64_t> scratch_prefix;
  std::vector<Destination> destinations;
  std::vector<std::int64_t> block_start;
  std::vector<std::uint8_t> token_flags;    // dispatch: tokens with copies for other hosts
  std::vector<const std::byte*> term_rows;  // combine V2: the row of each (token, slot), in reduce order
  std::vector<const std::byte*> rows_of;
  std::vector<std::size_t> row_bytes_of;
  std::vector<kernels::ReduceTerm> terms;  // a token's expert-output rows in combine, with their weights
  contract::CallShape last_dispatch;  // shape of the last successful dispatch (for combine_buffer())
  // Lifetime of the rows a combine reads in place (docs/architecture.md, "Lifetimes"). Without a TP
  // domain, the other ranks of this rank's host read its window in combine (its expert-output rows: the
  // combine_buffer() region, or dispatch's expand_x passed back), and a faster rank returns from
  // combine while slower ones still read. No closing barrier waits for them: the next collective call
  // does (its first exchange). Until then those rows are not this rank's to write, which the group
  // enforces where it can see it: combine_buffer() is absent, and a combine refuses rows in the window.
  // The same on every rank (a rank alone on its host too), so a program behaves alike at any size.
  bool combined_since_dispatch = false;  // T != 2 and a combine has published this rank's rows since the last dispatch

  // Several hosts: who carries whose rows, and the messages of the current call.
  HostRoutes routes;
  std::vector<std::vector<std::byte>> to_host;      // per host: what this rank sends its proxy there
  std::vector<std::vector<std::byte>> from_host;    // per host: the proxy's answer (combine)
  std::vector<std::vector<std::byte>> carried;      // per rank carried for: what it sent this rank
  std::vector<std::vector<std::byte>> carried_out;  // per rank carried for: this rank's answer (combine)
  std::vector<Transport::Outgoing> outgoing;
  std::vector<int> peers;
  std::vector<std::uint8_t> seen;                   // rows of one carried sender already written
  std::vector<std::int64_t> seen_first;             // per count-record entry: where its rows start in `seen`
  std::vector<std::size_t> answered;                // combine: per host, rows of its answer used so far

  // The V2 combine's row index (combine_v2.cpp) trusts its region of this rank's window to hold only
  // entries of earlier calls, each tagged with its call's number, or zeros. That holds while every call
  // since the region was cleared had this rank's same shape (the same layout, so no rows were written
  // there) and the window was not remapped; otherwise the region is cleared before its next use.
  bool index_clean = false;
  contract::CallShape index_shape;
  std::int64_t window_generation = 0, index_generation = -1;  // resizes of this rank's window

  // performance_info (V2 §5.1): while a call that reports it runs, per rank the longest this rank waited
  // for it at one of the call's collectives (ns).
  bool measuring_waits = false;
  std::vector<std::int64_t> call_waits, last_waits;
  void note_waits() {
    if (!measuring_waits) return;
    transport->last_allgather_waits(last_waits);
    for (std::size_t r = 0; r < call_waits.size(); ++r) call_waits[r] = std::max(call_waits[r], last_waits[r]);
  }

  CallHeader& own_header() { return *reinterpret_cast<CallHeader*>(own_record.data()); }
  std::int32_t* own_counts() { return reinterpret_cast<std::int32_t*>(own_record.data() + sizeof(CallHeader)); }
  const CallHeader& header(int rank) const {
    return *reinterpret_cast<const CallHeader*>(records.data() + static_cast<std::size_t>(rank) * record_bytes);
  }
  const std::int32_t* counts(int rank) const {
    return reinterpret_cast<const std::int32_t*>(records.data() + static_cast<std::size_t>(rank) * record_bytes +
                                                 sizeof(CallHeader));
  }

  // Fills this rank's call header for the next exchange and clears its count record.
  void describe_call(const contract::CallShape& shape, DType dtype, int mode, bool has_expert_scales,
                     std::int64_t own_rows, std::int64_t peer_rows);
  // Starts a collective call: publishes this rank's record (status from `local_error`, if any) and
  // gathers everyone's. Then rethrows this rank's own error, or raises a PeerError for the first rank
  // that failed, so that every rank leaves the call together and the group stays usable.
  void exchange(CallKind kind, const std::exception_ptr& local_error, const char* phase);
  // A barrier that also carries a status: raises like exchange() when any rank failed.
  void step(const std::exception_ptr& local_error, const char* phase, std::size_t rows_offset = 0,
            std::size_t row_bytes = 0);
  // Checks that every rank's record agrees with this rank's on the given fields.
  void require_same_call(const char* phase, bool check_bs) const;
  // Resizes windows when any rank's window is smaller than its layout for the given shapes needs.
  void ensure_windows(const char* phase);
  contract::CallShape shape_of(int rank) const {
    const CallHeader& hd = header(rank);
    return contract::CallShape{hd.bs, hd.k, hd.h, hd.active, hd.version == 2 ? 2 : 1};
  }
  int ep_of(int rank) const { return rank / topo.T; }
  int tp_of(int rank) const { return rank % topo.T; }
  int me() const { return transport->rank(); }
  int my_host() const { return routes.host_of(me()); }
  // Sends to_host[h] to this rank's proxy on every other host and receives what each rank it carries
  // for sent into `in`; then, with `answer`, sends carried_out back and receives from_host.
  void exchange_with_proxies(const char* phase);
  void answer_carried(const char* phase);
  // Thread `thread`'s fp32 scratch of at least n floats (thread 0 is the caller's).
  float* row_scratch(int thread, std::int64_t n) {
    std::vector<float>& scratch = worker_floats[static_cast<std::size_t>(thread)];
    if (scratch.size() < static_cast<std::size_t>(n)) scratch.resize(static_cast<std::size_t>(n));
    return scratch.data();
  }
  // Items of `item_bytes` bytes of row work each that make a chunk worth another thread.
  std::int64_t min_chunk(std::int64_t item_bytes) const {
    const std::int64_t bytes = options.min_chunk_bytes > 0 ? options.min_chunk_bytes : 16 * 1024;
    return std::max<std::int64_t>(
        1, (bytes + std::max<std::int64_t>(item_bytes, 1) - 1) / std::max<std::int64_t>(item_bytes, 1));
  }
};

// Measures a V2 call's waits for performance_info, and folds them in when the call succeeds: entry r
// becomes max(entry, the longest wait in microseconds for the ranks of EP rank r), the kernels' atomic
// maximum (V2 §5.1).
class WaitClock {
 public:
  WaitClock(Group::State& s, const MutableTensorView& performance_info) : s_(s), out_(performance_info) {
    if (!out_.present()) return;
    s_.measuring_waits = true;
    s_.call_waits.assign(static_cast<std::size_t>(s_.transport->size()), 0);
    s_.last_waits.assign(s_.call_waits.size(), 0);
  }
  ~WaitClock() { s_.measuring_waits = false; }
  WaitClock(const WaitClock&) = delete;
  WaitClock& operator=(const WaitClock&) = delete;

  void record() const {
    if (!out_.present()) return;
    for (std::size_t g = 0; g < s_.call_waits.size(); ++g) {
      std::int64_t& entry = *out_.ptr<std::int64_t>(static_cast<std::int64_t>(g) / s_.topo.T);
      entry = std::max(entry, s_.call_waits[g] / 1000);
    }
  }

 private:
  Group::State& s_;
  MutableTensorView out_;
};

// Marks this rank busy for its peers' waits while an operator call runs (Transport::set_busy): between
// its collectives it is on its way to the next one, so a peer waiting for it spins rather than sleeps.
class BusyWhileCalling {
 public:
  explicit BusyWhileCalling(Transport& transport) noexcept : transport_(transport) { transport_.set_busy(true); }
  ~BusyWhileCalling() { transport_.set_busy(false); }
  BusyWhileCalling(const BusyWhileCalling&) = delete;
  BusyWhileCalling& operator=(const BusyWhileCalling&) = delete;

 private:
  Transport& transport_;
};

}  // namespace moedist
