// Group construction, the join handshake and the collective-call plumbing shared by dispatch and combine.
#include <algorithm>
#include <cstring>

#include "common/format.h"
#include "contract/record_checks.h"
#include "ops/group_state.h"

namespace moedist {

namespace {
std::int64_t error_code_of(const std::exception_ptr& e, std::string* message) {
  try {
    std::rethrow_exception(e);
  } catch (const Error& err) {
    *message = err.what();
    return static_cast<std::int64_t>(err.code());
  } catch (const std::exception& err) {
    *message = err.what();
    return static_cast<std::int64_t>(ErrorCode::internal);
  }
}
}  // namespace

Group::State::State(const GroupConfig& c, std::unique_ptr<Transport> t, const GroupOptions& o)
    : config(c), options(o), topo(c), transport(std::move(t)), pool(o.worker_threads) {
  worker_floats.resize(static_cast<std::size_t>(pool.size()));
  worker_targets.resize(static_cast<std::size_t>(pool.size()));
  record_bytes = sizeof(CallHeader) + static_cast<std::size_t>(topo.count_record_len()) * sizeof(std::int32_t);
  record_bytes = contract::align_up(record_bytes, 8);
  own_record.resize(record_bytes);
  records.resize(record_bytes * static_cast<std::size_t>(transport->size()));
  steps.resize(static_cast<std::size_t>(transport->size()));
  dest_prefix.resize(static_cast<std::size_t>(topo.W));
  std::vector<int> host_of(static_cast<std::size_t>(transport->size()));
  for (int r = 0; r < transport->size(); ++r) host_of[static_cast<std::size_t>(r)] = transport->host_of(r);
  routes.build(topo, host_of);
  to_host.resize(static_cast<std::size_t>(routes.hosts()));
  from_host.resize(static_cast<std::size_t>(routes.hosts()));
}

void Group::State::exchange_with_proxies(const char* phase) {
  outgoing.clear();
  for (int h = 0; h < routes.hosts(); ++h) {
    if (h == my_host()) continue;
    const auto& box = to_host[static_cast<std::size_t>(h)];
    outgoing.push_back(Transport::Outgoing{routes.proxy(me(), h), box.data(), box.size()});
  }
  const std::vector<int>& from = routes.carried_for(me());
  carried.resize(from.size());
  transport->exchange(outgoing, from, carried, phase);
}

void Group::State::answer_carried(const char* phase) {
  const std::vector<int>& to = routes.carried_for(me());
  outgoing.clear();
  for (std::size_t i = 0; i < to.size(); ++i) outgoing.push_back(Transport::Outgoing{to[i], carried_out[i].data(), carried_out[i].size()});
  peers.clear();
  std::vector<std::vector<std::byte>> answers;
  for (int h = 0; h < routes.hosts(); ++h) {
    if (h == my_host()) continue;
    peers.push_back(routes.proxy(me(), h));
    answers.push_back(std::move(from_host[static_cast<std::size_t>(h)]));  // keeps its capacity
  }
  transport->exchange(outgoing, peers, answers, phase);
  std::size_t i = 0;
  for (int h = 0; h < routes.hosts(); ++h) {
    if (h != my_host()) from_host[static_cast<std::size_t>(h)] = std::move(answers[i++]);
  }
}

void Group::State::describe_call(const contract::CallShape& shape, DType dtype, int mode, bool has_expert_scales,
                                 std::int64_t own_rows, std::int64_t peer_rows) {
  CallHeader& hd = own_header();
  hd.bs = shape.bs;
  hd.active = shape.active;
  hd.version = shape.version;
  hd.k = shape.k;
  hd.h = shape.h;
  hd.dtype = static_cast<std::int64_t>(dtype);
  hd.mode = mode;
  hd.has_expert_scales = has_expert_scales ? 1 : 0;
  hd.own_rows = own_rows;
  hd.peer_rows = peer_rows;
  std::fill_n(own_counts(), topo.count_record_len(), 0);
}

void Group::State::exchange(CallKind kind, const std::exception_ptr& local_error, const char* phase) {
  CallHeader& hd = own_header();
  hd.kind = static_cast<std::int64_t>(kind);
  hd.seq = seq;
  hd.window_bytes = static_cast<std::int64_t>(transport->window_size(me()));
  hd.status = 0;
  std::memset(hd.message, 0, sizeof(hd.message));
  if (local_error) {
    std::string message;
    hd.status = error_code_of(local_error, &message);
    std::strncpy(hd.message, message.c_str(), sizeof(hd.message) - 1);
  }
  transport->allgather(own_record.data(), record_bytes, records.data(), phase);
  note_waits();
  if (local_error) std::rethrow_exception(local_error);
  for (int r = 0; r < transport->size(); ++r) {
    const CallHeader& other = header(r);
    if (other.status != 0) {
      throw PeerError(ErrorCode::peer_failed, r, phase,
                      concat("rank ", me(), ": peer rank ", r, " failed in phase '", phase, "' (",
                             error_code_name(static_cast<ErrorCode>(other.status)), "): ", other.message));
    }
    if (other.kind != hd.kind) {
      throw PeerError(ErrorCode::config_mismatch, r, phase,
                      concat("rank ", me(), " is in phase '", phase, "' but rank ", r,
                             " made a different call (call kind ", other.kind, " vs ", hd.kind,
                             "): every rank must call dispatch and combine in the same order"));
    }
    if (other.seq != hd.seq) {
      throw PeerError(ErrorCode::protocol, r, phase,
                      concat("rank ", me(), " is at call ", hd.seq, " but rank ", r, " is at call ", other.seq));
    }
    if (other.version != hd.version) {
      throw PeerError(ErrorCode::config_mismatch, r, phase,
                      concat("rank ", me(), " made a V", hd.version, " call but rank ", r, " a V", other.version,
                             " one: every rank must call the same operators"));
    }
  }
}

void Group::State::step(const std::exception_ptr& local_error, const char* phase, std::size_t rows_offset,
                        std::size_t row_bytes) {
  StepRecord mine;
  mine.seq = seq;
  mine.rows_offset = static_cast<std::int64_t>(rows_offset);
  mine.row_bytes = static_cast<std::int64_t>(row_bytes);
  if (local_error) {
    std::string message;
    mine.status = error_code_of(local_error, &message);
    std::strncpy(mine.message, message.c_str(), sizeof(mine.message) - 1);
  }
  transport->allgather(&mine, sizeof(mine), steps.data(), phase);
  note_waits();
  if (local_error) std::rethrow_exception(local_error);
  for (int r = 0; r < transport->size(); ++r) {
    const StepRecord& other = steps[static_cast<std::size_t>(r)];
    if (other.status != 0) {
      throw PeerError(ErrorCode::peer_failed, r, phase,
                      concat("rank ", me(), ": peer rank ", r, " failed in phase '", phase, "' (",
                             error_code_name(static_cast<ErrorCode>(other.status)), "): ", other.message));
    }
    if (other.seq != seq) {
      throw PeerError(ErrorCode::protocol, r, phase,
                      concat("rank ", me(), " is at call ", seq, " but rank ", r, " is at call ", other.seq));
    }
  }
}

void Group::State::require_same_call(const char* phase, bool check_bs) const {
  const auto fields = [](const CallHeader& h) {
    return contract::CallFields{h.bs, h.k, h.h, h.dtype, h.mode, h.has_expert_scales};
  };
  const contract::CallFields mine = fields(header(me()));
  for (int r = 0; r < transport->size(); ++r) {
    // Every rank of the world, TP peers included: the TP all-gather sizes the peer's rows by this BS too.
    const contract::CallMismatch m =
        contract::first_call_mismatch(fields(header(r)), mine, check_bs && config.global_bs == 0);
    if (!m.found) continue;
    const char* what = "";
    switch (m.field) {
      case contract::CallField::bs:
        throw PeerError(ErrorCode::config_mismatch, r, phase,
                        concat("global_bs = 0 requires the same BS on every rank, but rank ", me(), " has BS ", m.mine,
                               " and rank ", r, " has BS ", m.theirs, "; pass global_bs = max BS * ep_world_size"));
      case contract::CallField::h:
        what = "H";
        break;
      case contract::CallField::k:
        what = "K";
        break;
      case contract::CallField::dtype:
        what = "the dtype code";
        break;
      case contract::CallField::mode:
        what = header(me()).kind == static_cast<std::int64_t>(CallKind::dispatch) ? "quant_mode" : "comm_quant_mode";
        break;
      case contract::CallField::expert_scales:
        what = "expert_scales given (1) or not (0)";
        break;
    }
    throw PeerError(ErrorCode::config_mismatch, r, phase,
                    concat("rank ", me(), " has ", what, " = ", m.mine, " but rank ", r, " has ", m.theirs,
                           ": all ranks must agree on it"));
  }
}

void Group::State::ensure_windows(const char* phase) {
  bool grow = false;
  std::size_t mine = 0;
  for (int r = 0; r < transport->size(); ++r) {
    const contract::WindowLayout layout(topo, shape_of(r), ep_of(r));
    if (layout.total_bytes >= static_cast<std::size_t>(contract::kSizeLimit)) {  // checked on every rank alike
      throw PeerError(ErrorCode::capacity, r, phase,
                      concat("rank ", me(), ": the call of rank ", r, " (BS ", header(r).bs, ", K ", header(r).k, ", H ", header(r).h,
                             ", global_bs ", config.global_bs, ") would need a window of more than 2^62 bytes"));
    }
    if (static_cast<std::int64_t>(layout.total_bytes) > header(r).window_bytes) grow = true;
    if (r == me()) mine = layout.total_bytes;
  }
  if (grow) {
    transport->resize_window(mine, phase);
    ++window_generation;
  }
  const contract::CallShape shape = shape_of(me());
  if (shape.bs != index_shape.bs || shape.k != index_shape.k || shape.h != index_shape.h ||
      shape.version != index_shape.version || window_generation != index_generation) {
    index_clean = false;
  }
  // Every address computed from here on lies inside these sizes; check what the transport really mapped.
  for (int r = 0; r < transport->size(); ++r) {
    const contract::WindowLayout layout(topo, shape_of(r), ep_of(r));
    if (transport->window_size(r) < layout.total_bytes) {
      throw PeerError(ErrorCode::protocol, r, phase,
                      concat("rank ", me(), ": the window of rank ", r, " has ", transport->window_size(r), " bytes but its layout needs ",
                             layout.total_bytes));
    }
  }
}

void validate_group_options(const GroupOptions& options) {
  if (options.worker_threads < 1 || options.worker_threads > GroupOptions::kMaxWorkerThreads) {
    fail_value("GroupOptions::worker_threads", options.worker_threads,
               concat("must be in [1, ", GroupOptions::kMaxWorkerThreads, "] (threads of this rank for its row work)"));
  }
  if (options.min_chunk_bytes < 0)
    fail_value("GroupOptions::min_chunk_bytes", options.min_chunk_bytes, "must be >= 0 (0 = automatic)");
}

namespace {
const GroupOptions& checked(const GroupOptions& options) {
  validate_group_options(options);
  return options;
}
}  // namespace

Group::Group(const GroupConfig& config, std::unique_ptr<Transport> transport, const GroupOptions& options)
    : state_(std::make_unique<State>(config, std::move(transport), checked(options))) {
  State& s = *state_;
  CallHeader& hd = s.own_header();
  hd.ep_world_size = config.ep_world_size;
  hd.ep_rank_id = config.ep_rank_id;
  hd.moe_expert_num = config.moe_expert_num;
  hd.tp_world_size = config.tp_world_size;
  hd.tp_rank_id = config.tp_rank_id;
  hd.shared_expert_rank_num = config.shared_expert_rank_num;
  hd.shared_expert_num = config.shared_expert_num;
  hd.expert_shard_type = config.expert_shard_type;
  hd.global_bs = config.global_bs;
  hd.profile = static_cast<std::int64_t>(config.profile);
  s.exchange(CallKind::join, nullptr, "join");
  for (int r = 0; r < s.transport->size(); ++r) {
    const CallHeader& o = s.header(r);
    auto differ = [&](const char* what, std::int64_t a, std::int64_t b) {
      if (a != b) {
        throw PeerError(ErrorCode::config_mismatch, r, "join",
                        concat("rank ", s.me(), " has ", what, " = ", a, " but rank ", r, " has ", b,
                               ": every rank of a group must pass the same configuration"));
      }
    };
    differ("ep_world_size", hd.ep_world_size, o.ep_world_size);
    differ("moe_expert_num", hd.moe_expert_num, o.moe_expert_num);
    differ("tp_world_size", hd.tp_world_size, o.tp_world_size);
    differ("shared_expert_rank_num", hd.shared_expert_rank_num, o.shared_expert_rank_num);
    differ("shared_expert_num", hd.shared_expert_num, o.shared_expert_num);
    differ("expert_shard_type", hd.expert_shard_type, o.expert_shard_type);
    differ("global_bs", hd.global_bs, o.global_bs);
    differ("profile", hd.profile, o.profile);
    differ("global rank of (ep_rank_id, tp_rank_id)", r, o.ep_rank_id * s.topo.T + o.tp_rank_id);
  }
}

Group::~Group() = default;

const GroupConfig& Group::config() const noexcept { return state_->config; }
const GroupOptions& Group::options() const noexcept { return state_->options; }
int Group::local_expert_num() const noexcept { return moedist::local_expert_num(state_->config); }
bool Group::is_shared_expert_rank() const noexcept { return moedist::is_shared_expert_rank(state_->config); }
const TrafficCounters& Group::traffic() const noexcept { return state_->traffic; }

MutableTensorView Group::combine_buffer(DType dtype) {
  State& s = *state_;
  if (s.topo.T == 2 || s.last_dispatch.h == 0 || (dtype != DType::bf16 && dtype != DType::fp16)) return MutableTensorView{};
  if (s.combined_since_dispatch) return MutableTensorView{};  // peers may still read these rows (group_state.h)
  const contract::WindowLayout layout(s.topo, s.last_dispatch, s.topo.ep_rank);
  std::byte* base = s.transport->window(s.me()) + layout.combine_rows_offset;
  return matrix_view(static_cast<void*>(base), dtype, layout.receive_rows, s.last_dispatch.h,
                     static_cast<std::int64_t>(layout.combine_row_bytes / 2), 1);
}

}  // namespace moedist
