#include "transport/mpi/mpi_transport.h"

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <thread>

#include "common/format.h"
#include "moedist/launch.h"

namespace moedist::mpi {

using Clock = std::chrono::steady_clock;

namespace {

// What every rank tells every other when it joins.
struct Hello {
  std::int32_t rank;
  std::int32_t ranks_per_node;
  char name[MPI_MAX_PROCESSOR_NAME];
  char boot_id[40];  // with name, tells the ranks of one running machine (a recycled hostname is another boot)
};

struct Place {
  std::int32_t node;  // the lowest group rank on this rank's node
  std::int32_t node_size;
  char job[48];       // a fresh shared-memory job name; the host's first rank's is used
};

struct SizeNote {
  std::uint64_t bytes;
  std::int64_t status;  // 0, or the ErrorCode of a failed allocation on this rank's host
};

int ranks_per_node_setting(const MpiOptions& o) {
  if (o.ranks_per_node < 0) fail_value("MpiOptions::ranks_per_node", o.ranks_per_node, "must be >= 0");
  if (o.ranks_per_node > 0) return o.ranks_per_node;
  const char* text = std::getenv("MOEDIST_RANKS_PER_NODE");
  if (text == nullptr || *text == '\0') return 0;
  char* end = nullptr;
  const long v = std::strtol(text, &end, 10);
  if (end == text || *end != '\0' || v < 1 || v > (1 << 20)) {
    fail(ErrorCode::invalid_argument, "MOEDIST_RANKS_PER_NODE", text,
         "must be a positive integer (ranks per virtual host)");
  }
  return static_cast<int>(v);
}

// A full memory barrier (a locked read-modify-write): this process's stores to shared windows are
// visible before a message that announces them, and peers' stores before this rank reads after one.
// (Written as an atomic RMW rather than std::atomic_thread_fence, which ThreadSanitizer does not support.)
void full_barrier() noexcept {
  static std::atomic<int> word{0};
  word.fetch_add(0, std::memory_order_seq_cst);
}

// This boot of this machine (Linux); empty where it cannot be read, and the hostname alone decides.
void read_boot_id(char (&out)[40]) {
  std::FILE* f = std::fopen("/proc/sys/kernel/random/boot_id", "re");
  if (f == nullptr) return;
  const std::size_t n = std::fread(out, 1, sizeof out - 1, f);
  std::fclose(f);
  out[n] = '\0';
  if (char* newline = std::strchr(out, '\n')) *newline = '\0';
}

std::string mpi_error_text(int code) {
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(code, text, &len) != MPI_SUCCESS) return "MPI error " + std::to_string(code);
  return std::string(text, static_cast<std::size_t>(len));
}

}  // namespace

MpiTransport::MpiTransport(MPI_Comm comm, int rank, const MpiOptions& options)
    : rank_(rank),
      timeout_(options.wait.timeout),
      wait_(wait_policy(options.spin, 1)),
      on_phase_(options.on_phase),
      message_limit_(options.test_message_limit > 0 ? std::min<std::size_t>(options.test_message_limit, INT_MAX)
                                                    : INT_MAX) {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (initialized == 0 || finalized != 0) {
    throw Error(ErrorCode::invalid_argument, "join_mpi: MPI is not initialized (call MPI_Init or MPI_Init_thread first, and "
                                             "MPI_Finalize only after the group is destroyed)");
  }
  if (comm == MPI_COMM_NULL)
    moedist::fail(ErrorCode::invalid_argument, "comm", "MPI_COMM_NULL", "must be a communicator of the group's ranks");
  // The group makes its MPI calls from the thread that calls join, dispatch and combine, one at a time.
  // Below MPI_THREAD_SERIALIZED that is allowed only from the main thread (the one that initialized MPI).
  int provided = MPI_THREAD_SINGLE;
  MPI_Query_thread(&provided);
  if (provided < MPI_THREAD_SERIALIZED) {
    int is_main = 0;
    MPI_Is_thread_main(&is_main);
    if (is_main == 0) {
      moedist::fail(ErrorCode::invalid_argument, "MPI thread level",
                    provided == MPI_THREAD_SINGLE ? "MPI_THREAD_SINGLE" : "MPI_THREAD_FUNNELED",
                    "allows MPI calls only from the main thread, but join_mpi was called from another: join, dispatch "
                    "and combine from the main thread, or initialize MPI with MPI_Init_thread at "
                    "MPI_THREAD_SERIALIZED or MPI_THREAD_MULTIPLE");
    }
  }
  const int rpn = ranks_per_node_setting(options);
  MPI_Comm_size(comm, &size_);
  if (rank < 0 || rank >= size_) fail_value("rank", rank, concat("must be in [0, ", size_, "), the size of comm"));
  comm_rank_of_.resize(static_cast<std::size_t>(size_));
  notices_.reserve(1);  // at most one notice (this transport fails once); sends point into it
  for (int r = 0; r < size_; ++r) comm_rank_of_[static_cast<std::size_t>(r)] = r;  // until the hello says better
  sizes_.assign(static_cast<std::size_t>(size_), 0);
  host_of_.assign(static_cast<std::size_t>(size_), 0);

  // A private communicator: moedist's messages never match the caller's.
  MPI_Request dup = MPI_REQUEST_NULL;
  check(MPI_Comm_idup(comm, &comm_, &dup), -1, "join", "MPI_Comm_idup");
  pending_.assign(1, Pending{dup, -1, -1});
  wait_all(pending_, "join");
  // A constructor that throws runs no destructor: free the duplicate here, or every failed join leaks a
  // communicator. (One whose MPI_Comm_idup timed out cannot be: a pending collective cannot be cancelled.)
  struct FreeOnThrow {
    MPI_Comm* comm;
    bool armed = true;
    explicit FreeOnThrow(MPI_Comm* c) : comm(c) {}
    FreeOnThrow(const FreeOnThrow&) = delete;
    FreeOnThrow& operator=(const FreeOnThrow&) = delete;
    ~FreeOnThrow() {
      if (armed && *comm != MPI_COMM_NULL) MPI_Comm_free(comm);
    }
  } free_on_throw{&comm_};
  MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
  void* tag_ub = nullptr;
  int has_tag_ub = 0;
  MPI_Comm_get_attr(comm_, MPI_TAG_UB, &tag_ub, &has_tag_ub);
  if (has_tag_ub != 0) tag_limit_ = *static_cast<int*>(tag_ub);

  // 1. Who is who: group rank of every comm rank (gathered in comm-rank order).
  int my_comm_rank = 0;
  MPI_Comm_rank(comm_, &my_comm_rank);
  const int group_rank = rank_;
  rank_ = my_comm_rank;  // index by comm rank for this one exchange
  Hello hello{};
  hello.rank = group_rank;
  hello.ranks_per_node = rpn;
  int name_len = 0;
  MPI_Get_processor_name(hello.name, &name_len);
  read_boot_id(hello.boot_id);
  std::vector<Hello> hellos(static_cast<std::size_t>(size_));
  allgather(&hello, sizeof hello, hellos.data(), "join");
  rank_ = group_rank;
  std::vector<int> claimed(static_cast<std::size_t>(size_), -1);
  for (int c = 0; c < size_; ++c) {
    const Hello& h = hellos[static_cast<std::size_t>(c)];
    if (h.ranks_per_node != rpn) {
      throw PeerError(ErrorCode::config_mismatch, h.rank, "join",
                      concat("rank ", rank_, " has MOEDIST_RANKS_PER_NODE / ranks_per_node ", rpn, " but rank ", h.rank, " has ",
                             h.ranks_per_node, ": every rank must use the same value"));
    }
    if (h.rank < 0 || h.rank >= size_ || claimed[static_cast<std::size_t>(h.rank)] >= 0) {
      throw PeerError(ErrorCode::config_mismatch, h.rank, "join",
                      concat("comm ranks ", h.rank >= 0 && h.rank < size_ ? claimed[static_cast<std::size_t>(h.rank)] : -1, " and ", c,
                             " both joined as group rank ", h.rank, " (or it is outside [0, ", size_, ")): each rank needs its own ep_rank_id / tp_rank_id"));
    }
    claimed[static_cast<std::size_t>(h.rank)] = c;
  }
  for (int r = 0; r < size_; ++r) comm_rank_of_[static_cast<std::size_t>(r)] = claimed[static_cast<std::size_t>(r)];

  // 2. Nodes: the ranks that can share memory, those of one machine (hostname and boot id from the
  //    hello). Not MPI_Comm_split_type: it blocks, and after a step that timed out on some rank, the
  //    ranks whose step completed would wait in it forever for that one.
  const auto same_machine = [](const Hello& a, const Hello& b) {
    return strnlen(a.name, sizeof a.name) == strnlen(b.name, sizeof b.name) &&
           std::strncmp(a.name, b.name, sizeof a.name) == 0 &&
           std::strncmp(a.boot_id, b.boot_id, sizeof a.boot_id) == 0;
  };
  const Hello& own = hellos[static_cast<std::size_t>(comm_rank_of_[static_cast<std::size_t>(rank_)])];
  Place place{};
  place.node = size_;
  for (int r = 0; r < size_; ++r) {
    if (!same_machine(own, hellos[static_cast<std::size_t>(comm_rank_of_[static_cast<std::size_t>(r)])])) continue;
    place.node = std::min(place.node, r);
    ++place.node_size;
  }
  const std::string job = new_job_name();
  std::strncpy(place.job, job.c_str(), sizeof place.job - 1);
  std::vector<Place> places(static_cast<std::size_t>(size_));
  allgather(&place, sizeof place, places.data(), "join");
  wait_ = wait_policy(options.spin, place.node_size);

  // 3. Hosts: each node, or each run of rpn ranks of a node; numbered by their first rank.
  std::map<int, std::vector<int>> nodes;
  for (int r = 0; r < size_; ++r) nodes[places[static_cast<std::size_t>(r)].node].push_back(r);
  std::vector<std::vector<int>> hosts;
  for (const auto& [first, members] : nodes) {
    const std::size_t chunk = rpn > 0 ? static_cast<std::size_t>(rpn) : members.size();
    for (std::size_t i = 0; i < members.size(); i += chunk) {
      hosts.emplace_back(members.begin() + static_cast<std::ptrdiff_t>(i), members.begin() + static_cast<std::ptrdiff_t>(std::min(members.size(), i + chunk)));
    }
  }
  std::sort(hosts.begin(), hosts.end());
  local_index_.assign(static_cast<std::size_t>(size_), -1);
  for (std::size_t h = 0; h < hosts.size(); ++h) {
    const auto& members = hosts[h];
    const Hello& first = hellos[static_cast<std::size_t>(comm_rank_of_[static_cast<std::size_t>(members.front())])];
    std::string name = std::string(first.name, strnlen(first.name, sizeof first.name));
    if (rpn > 0) name = concat("virtual host ", h, " (ranks ", members.front(), "-", members.back(), ") on ", name);
    host_names_.push_back(name);
    const bool mine = std::find(members.begin(), members.end(), rank_) != members.end();
    for (std::size_t i = 0; i < members.size(); ++i) {
      host_of_[static_cast<std::size_t>(members[i])] = static_cast<int>(h);
      if (mine) local_index_[static_cast<std::size_t>(members[i])] = static_cast<int>(i);
    }
  }
  local_ranks_ = hosts[static_cast<std::size_t>(host_of_[static_cast<std::size_t>(rank_)])];

  // 4. Shared memory within the host, under the host's first rank's job name.
  ShmOptions shm_options;
  shm_options.wait.timeout = timeout_;
  shm_options.spin = options.spin;
  const Place& leader = places[static_cast<std::size_t>(local_ranks_.front())];
  try {
    shm_ = std::make_unique<shm::ShmTransport>(std::string(leader.job, strnlen(leader.job, sizeof leader.job)),
                                               local_index_[static_cast<std::size_t>(rank_)], static_cast<int>(local_ranks_.size()),
                                               shm_options);
  } catch (const PeerError& e) {
    fail_from_host(e);
  }
  SizeNote note{shm_->window_size(local_index_[static_cast<std::size_t>(rank_)]), 0};
  std::vector<SizeNote> notes(static_cast<std::size_t>(size_));
  allgather(&note, sizeof note, notes.data(), "join");
  for (int r = 0; r < size_; ++r) sizes_[static_cast<std::size_t>(r)] = notes[static_cast<std::size_t>(r)].bytes;
  free_on_throw.armed = false;
}

MpiTransport::~MpiTransport() {
  shm_.reset();
  int finalized = 0;
  MPI_Finalized(&finalized);
  // After a failure requests may still be in flight; freeing the communicator could then wait for them.
  if (comm_ != MPI_COMM_NULL && finalized == 0 && !failed_) MPI_Comm_free(&comm_);
}

std::byte* MpiTransport::window(int rank) noexcept {
  const int local = local_index_[static_cast<std::size_t>(rank)];
  return local < 0 ? nullptr : shm_->window(local);
}

std::string MpiTransport::describe(int rank) const {
  if (rank < 0 || rank >= size_) return "an unknown rank";
  return concat("rank ", rank, " (", host_names_.empty() ? std::string("?") : host_names_[static_cast<std::size_t>(host_of(rank))], ")");
}

int MpiTransport::next_tag() {
  tag_ = tag_ >= tag_limit_ - 1 ? 1 : tag_ + 1;
  return tag_;
}

void MpiTransport::send_notices(int lost, ErrorCode code, const std::string& how) {
  if (!shm_ || lost < 0 || lost >= size_ || !notices_.empty()) return;  // before joining finished there is nobody to tell
  Notice& n = notices_.emplace_back(Notice{lost, static_cast<std::int32_t>(code), {}});
  std::strncpy(n.how, how.c_str(), sizeof n.how - 1);
  std::vector<MPI_Request> sent;
  for (int r = 0; r < size_; ++r) {
    if (r == rank_ || r == lost) continue;
    MPI_Request req = MPI_REQUEST_NULL;
    if (MPI_Isend(&n, sizeof n, MPI_BYTE, comm_rank_of_[static_cast<std::size_t>(r)], tag_limit_, comm_, &req) == MPI_SUCCESS) {
      sent.push_back(req);
    }
  }
  // Push the notices out before this rank leaves the group (and its host-mates see its connection
  // close): a notice still queued here would let them blame this rank instead of the one it lost. A
  // notice is small, so it completes as soon as it is copied out; an unreachable peer is not waited for.
  const Clock::time_point until = Clock::now() + std::chrono::milliseconds(200);
  int done = 0;
  while (!sent.empty() && done == 0 && Clock::now() < until) {
    if (MPI_Testall(static_cast<int>(sent.size()), sent.data(), &done, MPI_STATUSES_IGNORE) != MPI_SUCCESS) break;
    if (done == 0) sched_yield();
  }
  for (MPI_Request& req : sent) {
    if (req != MPI_REQUEST_NULL) MPI_Request_free(&req);
  }
}

void MpiTransport::watch_peers(std::vector<Pending>& pending, const std::vector<int>& unmatched, std::string_view phase) {
  const Clock::time_point now = Clock::now();
  if (now - last_watch_ < std::chrono::milliseconds(1)) return;
  last_watch_ = now;
  // Another rank's notice: it lost a rank (its host-mate died, or a wait timed out). Every call needs
  // every rank, so the group is broken; name the rank it lost, the cause, not whoever left after it.
  const auto read_notices = [&] {
  for (;;) {
    int flag = 0;
    MPI_Status status;
    if (MPI_Iprobe(MPI_ANY_SOURCE, tag_limit_, comm_, &flag, &status) != MPI_SUCCESS || flag == 0) break;
    Notice n{};
    int count = 0;
    MPI_Get_count(&status, MPI_BYTE, &count);
    MPI_Recv(count == static_cast<int>(sizeof n) ? &n : nullptr, count == static_cast<int>(sizeof n) ? count : 0, MPI_BYTE,
             status.MPI_SOURCE, tag_limit_, comm_, MPI_STATUS_IGNORE);
    n.how[sizeof n.how - 1] = '\0';
    if (cause_ < 0 && count == static_cast<int>(sizeof n) && n.dead >= 0 && n.dead < size_) {
      cause_ = n.dead;
      // The reporter's code travels with the notice: a peer that timed out on a rank is late, not dead,
      // for every rank it tells (a rank the reporter saw die stays lost).
      cause_code_ = n.code == static_cast<std::int32_t>(ErrorCode::capacity)  ? ErrorCode::capacity
                    : n.code == static_cast<std::int32_t>(ErrorCode::timeout) ? ErrorCode::timeout
                                                                              : ErrorCode::peer_lost;
      cause_how_ = n.how;
    }
  }
  if (cause_ >= 0 && cause_code_ == ErrorCode::capacity) {
    fail(PeerError(ErrorCode::capacity, cause_, std::string(phase),
                   concat("rank ", rank_, ": ", describe(cause_), " could not send its message in phase '", phase,
                          "', as it reported: ", cause_how_)));
  }
  if (cause_ >= 0 && cause_code_ == ErrorCode::timeout) {
    fail(PeerError(ErrorCode::timeout, cause_, std::string(phase),
                   concat("rank ", rank_, ": ", describe(cause_), " did not arrive in time in phase '", phase,
                          "', as another rank reported: ", cause_how_)));
  }
  if (cause_ >= 0) {
    fail(PeerError(ErrorCode::peer_lost, cause_, std::string(phase),
                   concat("rank ", rank_, ": ", describe(cause_), " was lost in phase '", phase, "', as another rank reported: ", cause_how_)));
  }
  };
  read_notices();
  // A host-mate this rank still waits for, whose shared-memory connection closed, has exited or was
  // killed. One that finished its part and left (the normal end of a group) is no failure; nor is one
  // whose message just arrived: test before concluding.
  for (std::size_t i = 0; shm_ && i < local_ranks_.size(); ++i) {
    const int g = local_ranks_[i];
    if (g == rank_ || !shm_->peer_gone(static_cast<int>(i))) continue;
    bool waiting = std::find(unmatched.begin(), unmatched.end(), g) != unmatched.end();
    for (Pending& p : pending) {
      if (p.peer != g || p.request == MPI_REQUEST_NULL) continue;
      int flag = 0;
      MPI_Status status;
      check(MPI_Test(&p.request, &flag, &status), p.peer, phase, "MPI_Test");
      waiting = waiting || flag == 0;
    }
    if (waiting) {
      // A host-mate that left because it lost another rank told everyone before its connection closed:
      // that notice, if there is one, names the cause.
      read_notices();
      fail(PeerError(ErrorCode::peer_lost, g, std::string(phase),
                     concat("rank ", rank_, ": ", describe(g), " exited or was killed in phase '", phase,
                            "' (its shared-memory connection closed)")));
    }
  }
}

void MpiTransport::require_usable(std::string_view phase) const {
  if (failed_) {
    throw PeerError(ErrorCode::peer_failed, failed_peer_, std::string(phase),
                    concat("rank ", rank_, ": the group failed earlier and is unusable: ", failed_reason_));
  }
}

void MpiTransport::fail(const PeerError& error) {
  failed_ = true;
  failed_peer_ = error.peer();
  failed_reason_ = error.what();
  // The other ranks are told which rank this one lost, so that they name it too (and at once), rather
  // than this rank, which leaves the group now.
  // A message too long for MPI fails the whole group the same way, at once: its peers would otherwise
  // wait for it until their timeout.
  if (error.code() == ErrorCode::peer_lost || error.code() == ErrorCode::timeout ||
      error.code() == ErrorCode::capacity) {
    send_notices(error.peer(), error.code(), error.what());
  }
  // Receives are cancelled and sends released; a nonblocking collective (joining's MPI_Comm_idup) can
  // be neither, so it stays as it is (the transport is unusable from here on).
  for (Pending& p : pending_) {
    if (p.request == MPI_REQUEST_NULL || p.peer < 0) continue;
    if (p.expected >= 0) MPI_Cancel(&p.request);
    MPI_Request_free(&p.request);
  }
  pending_.clear();
  throw error;
}

void MpiTransport::fail_from_host(const PeerError& e) {
  const int peer = e.peer() >= 0 && e.peer() < static_cast<int>(local_ranks_.size()) ? local_ranks_[static_cast<std::size_t>(e.peer())] : -1;
  fail(PeerError(e.code(), peer, e.phase(), concat(e.what(), " (within ", host_names_[static_cast<std::size_t>(host_of(rank_))],
                                                      ", where shared-memory rank i is group rank ", local_ranks_.front(), " + i)")));
}

void MpiTransport::check(int result, int peer, std::string_view phase, const char* call) {
  if (result == MPI_SUCCESS) return;
  int error_class = 0;
  MPI_Error_class(result, &error_class);
  if (error_class == MPI_ERR_TRUNCATE) {
    fail(PeerError(ErrorCode::protocol, peer, std::string(phase),
                   concat("rank ", rank_, ": ", describe(peer), " sent a longer message than expected in phase '", phase,
                          "': the ranks disagree about the group configuration or the order of calls")));
  }
  fail(PeerError(ErrorCode::peer_lost, peer, std::string(phase),
                 concat("rank ", rank_, ": ", call, " failed in phase '", phase, "' talking to ", describe(peer), ": ", mpi_error_text(result))));
}

void MpiTransport::time_out(int peer, std::string_view phase) {
  fail(PeerError(ErrorCode::timeout, peer, std::string(phase),
                 concat("rank ", rank_, ": timed out after ", timeout_.count(), " ms in phase '", phase, "' waiting for ", describe(peer),
                        ": that rank stopped, or its host cannot be reached")));
}

void MpiTransport::sleep_step(Clock::time_point started) const {
  const auto waited = Clock::now() - started;
  if (waited < wait_.spin) {
    for (int i = 0; i < 64; ++i) cpu_relax();
  } else if (waited < wait_.spin + wait_.yield) {
    sched_yield();
  } else {
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

void MpiTransport::wait_all(std::vector<Pending>& pending, std::string_view phase) {
  const Clock::time_point started = Clock::now();
  const Clock::time_point deadline = started + timeout_;
  for (;;) {
    bool done = true;
    for (Pending& p : pending) {
      if (p.request == MPI_REQUEST_NULL) continue;
      int flag = 0;
      MPI_Status status;
      check(MPI_Test(&p.request, &flag, &status), p.peer, phase, "MPI_Test");
      if (flag == 0) {
        done = false;
        continue;
      }
      if (p.expected >= 0 && static_cast<std::size_t>(p.peer) < arrived_.size())
        arrived_[static_cast<std::size_t>(p.peer)] = Clock::now();
      if (p.expected >= 0) {
        int count = 0;
        MPI_Get_count(&status, MPI_BYTE, &count);
        if (count != p.expected) {
          fail(PeerError(ErrorCode::config_mismatch, p.peer, std::string(phase),
                         concat("rank ", rank_, ": ", describe(p.peer), " sent a ", count, "-byte record in phase '", phase, "' where ",
                                p.expected, " bytes were expected: the ranks disagree about the group configuration")));
        }
      }
    }
    if (done) return;
    if (shm_) watch_peers(pending, {}, phase);
    if (Clock::now() > deadline) {
      for (const Pending& p : pending) {
        if (p.request != MPI_REQUEST_NULL) time_out(p.peer, phase);
      }
    }
    sleep_step(started);
  }
}

void MpiTransport::allgather(const void* in, std::size_t bytes, void* out, std::string_view phase) {
  require_usable(phase);
  if (on_phase_) on_phase_(phase);
  if (bytes > static_cast<std::size_t>(INT_MAX)) throw Error(ErrorCode::capacity, concat("phase '", phase, "': a ", bytes, "-byte record is too long for MPI"));
  const int count = static_cast<int>(bytes);
  auto* dst = static_cast<std::byte*>(out);
  full_barrier();  // this rank's window stores before its record
  const int tag = next_tag();
  pending_.clear();
  for (int r = 0; r < size_; ++r) {
    if (r == rank_) continue;
    MPI_Request req = MPI_REQUEST_NULL;
    check(MPI_Irecv(dst + static_cast<std::size_t>(r) * bytes, count, MPI_BYTE, comm_rank_of_[static_cast<std::size_t>(r)], tag, comm_, &req), r, phase, "MPI_Irecv");
    pending_.push_back(Pending{req, r, count});
  }
  std::memcpy(dst + static_cast<std::size_t>(rank_) * bytes, in, bytes);
  for (int r = 0; r < size_; ++r) {
    if (r == rank_) continue;
    MPI_Request req = MPI_REQUEST_NULL;
    check(MPI_Isend(in, count, MPI_BYTE, comm_rank_of_[static_cast<std::size_t>(r)], tag, comm_, &req), r, phase, "MPI_Isend");
    pending_.push_back(Pending{req, r, -1});
  }
  const Clock::time_point entered = Clock::now();
  arrived_.assign(static_cast<std::size_t>(size_), entered);
  waits_.resize(static_cast<std::size_t>(size_));
  wait_all(pending_, phase);
  for (std::size_t r = 0; r < arrived_.size(); ++r)
    waits_[r] = std::chrono::duration_cast<std::chrono::nanoseconds>(arrived_[r] - entered).count();
  full_barrier();  // peers' window stores before this rank reads them
}

void MpiTransport::last_allgather_waits(std::span<std::int64_t> out) const {
  for (std::size_t r = 0; r < out.size() && r < waits_.size(); ++r) out[r] = waits_[r];
}

void MpiTransport::exchange(std::span<const Outgoing> out, std::span<const int> from, std::span<std::vector<std::byte>> in,
                            std::string_view phase) {
  require_usable(phase);
  if (on_phase_) on_phase_(phase);
  const int tag = next_tag();
  // Every message is checked before any is posted: an error mid-round would leave sends in flight. One
  // too long fails the group on every rank (the notices of fail()), so nobody waits for this rank.
  for (const Outgoing& m : out) {
    if (m.peer < 0 || m.peer >= size_ || m.peer == rank_) throw Error(ErrorCode::internal, concat("exchange to rank ", m.peer));
    if (m.bytes > message_limit_) {
      fail(PeerError(
          ErrorCode::capacity, rank_, std::string(phase),
          concat("rank ", rank_, ": phase '", phase, "': a ", m.bytes, "-byte message to rank ", m.peer,
                 " is longer than one MPI message can be (", message_limit_, " bytes); use smaller batches")));
    }
  }
  pending_.clear();  // all completed: the last call waited for every request it posted
  for (const Outgoing& m : out) {
    MPI_Request req = MPI_REQUEST_NULL;
    check(MPI_Isend(m.data, static_cast<int>(m.bytes), MPI_BYTE, comm_rank_of_[static_cast<std::size_t>(m.peer)], tag, comm_, &req), m.peer,
          phase, "MPI_Isend");
    pending_.push_back(Pending{req, m.peer, -1});
  }
  // Incoming sizes are not known in advance: probe for each message, then receive it into a buffer of its size.
  std::vector<char> matched(from.size(), 0);
  std::size_t unmatched = from.size();
  const Clock::time_point started = Clock::now();
  const Clock::time_point deadline = started + timeout_;
  while (unmatched > 0) {
    for (std::size_t i = 0; i < from.size(); ++i) {
      if (matched[i] != 0) continue;
      int flag = 0;
      MPI_Message message = MPI_MESSAGE_NULL;
      MPI_Status status;
      check(MPI_Improbe(comm_rank_of_[static_cast<std::size_t>(from[i])], tag, comm_, &flag, &message, &status), from[i], phase, "MPI_Improbe");
      if (flag == 0) continue;
      int count = 0;
      MPI_Get_count(&status, MPI_BYTE, &count);
      in[i].resize(static_cast<std::size_t>(count));
      MPI_Request req = MPI_REQUEST_NULL;
      check(MPI_Imrecv(in[i].data(), count, MPI_BYTE, &message, &req), from[i], phase, "MPI_Imrecv");
      pending_.push_back(Pending{req, from[i], count});
      matched[i] = 1;
      --unmatched;
    }
    if (unmatched == 0) break;
    // Keep sends moving while probing (a large send progresses only inside MPI calls).
    for (Pending& p : pending_) {
      if (p.request == MPI_REQUEST_NULL) continue;
      int flag = 0;
      check(MPI_Test(&p.request, &flag, MPI_STATUS_IGNORE), p.peer, phase, "MPI_Test");
    }
    if (shm_ && Clock::now() - last_watch_ >= std::chrono::milliseconds(1)) {
      std::vector<int> waiting;
      for (std::size_t i = 0; i < from.size(); ++i) {
        if (matched[i] == 0) waiting.push_back(from[i]);
      }
      watch_peers(pending_, waiting, phase);
    }
    if (Clock::now() > deadline) {
      for (std::size_t i = 0; i < from.size(); ++i) {
        if (matched[i] == 0) time_out(from[i], phase);
      }
    }
    sleep_step(started);
  }
  wait_all(pending_, phase);
}

void MpiTransport::resize_window(std::size_t bytes, std::string_view phase) {
  require_usable(phase);
  if (on_phase_) on_phase_(phase);
  SizeNote note{0, 0};
  try {
    shm_->resize_window(bytes, phase);
    note.bytes = shm_->window_size(local_index_[static_cast<std::size_t>(rank_)]);
  } catch (const PeerError& e) {
    if (e.code() != ErrorCode::capacity) fail_from_host(e);
    note.status = static_cast<std::int64_t>(e.code());  // an allocation failed on this host: tell every host
  }
  std::vector<SizeNote> notes(static_cast<std::size_t>(size_));
  allgather(&note, sizeof note, notes.data(), phase);
  for (int r = 0; r < size_; ++r) {
    if (notes[static_cast<std::size_t>(r)].status != 0) {
      throw PeerError(ErrorCode::capacity, r, std::string(phase),
                      concat("rank ", rank_, ": ", describe(r), " could not allocate its window in phase '", phase, "'"));
    }
    sizes_[static_cast<std::size_t>(r)] = notes[static_cast<std::size_t>(r)].bytes;
  }
}

int comm_size_of(MPI_Comm comm) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (initialized == 0)
    throw Error(ErrorCode::invalid_argument, "join_mpi: MPI is not initialized (call MPI_Init first)");
  if (comm == MPI_COMM_NULL)
    moedist::fail(ErrorCode::invalid_argument, "comm", "MPI_COMM_NULL", "must be a communicator of the group's ranks");
  int size = 0;
  MPI_Comm_size(comm, &size);
  return size;
}

void require_group_comm(MPI_Comm comm, const GroupConfig& config) {
  const int world = config.ep_world_size * tp_domain_size(config);
  const int size = comm_size_of(comm);
  if (size != world) {
    moedist::fail(ErrorCode::config_mismatch, "ep_world_size * max(tp_world_size, 1)", concat(world),
                  concat("must equal the size of comm, ", size));
  }
}

}  // namespace moedist::mpi
