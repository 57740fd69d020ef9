#include "transport/shm/shm_transport.h"

#include <linux/futex.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>
#include <optional>

#include "moedist/error.h"

namespace moedist::shm {
namespace {

using Clock = std::chrono::steady_clock;

constexpr std::uint64_t kControlMagic = 0x6d6f65646973744bull;  // "moedistK"
constexpr std::uint32_t kControlVersion = 5;
constexpr std::size_t kSlotBytes = 256 * 1024;  // largest record of one collective step
constexpr std::size_t kPage = 4096;
constexpr std::uint64_t kAllocationFailed = ~std::uint64_t{0};  // a SegmentNote that says the allocation failed

std::size_t round_to_page(std::size_t n) { return (n + kPage - 1) / kPage * kPage; }

std::uint64_t hash_of(const std::string& s) {
  std::uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

int futex(std::atomic<std::uint32_t>* word, int op, std::uint32_t value, const timespec* timeout) {
  return static_cast<int>(::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(word), op, value, timeout, nullptr, 0));
}

// A memfd of `bytes` bytes mapped read-write; the descriptor is returned for sharing.
std::byte* create_shared(std::size_t bytes, const char* name, int* fd_out) {
  const int fd = ::memfd_create(name, MFD_CLOEXEC);
  if (fd < 0) throw Error(ErrorCode::internal, std::string("memfd_create: ") + std::strerror(errno));
  // Owner-only, like a 0600 file: a memfd has no name, but /proc/<pid>/fd would otherwise expose it.
  if (::fchmod(fd, 0600) != 0 || ::ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
    const int err = errno;
    ::close(fd);
    throw Error(ErrorCode::capacity,
                "cannot size a " + std::to_string(bytes) + "-byte shared window: " + std::strerror(err));
  }
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) {
    const int err = errno;
    ::close(fd);
    throw Error(ErrorCode::capacity,
                "cannot map a " + std::to_string(bytes) + "-byte shared window: " + std::strerror(err));
  }
  *fd_out = fd;
  return static_cast<std::byte*>(p);
}

// What a rank tells each peer about a memfd it sends.
struct SegmentNote {
  std::uint64_t bytes = 0;  // 0: no new segment
};

}  // namespace

// The head of a rank's control segment, followed by two record slots (steps alternate between them).
struct ShmTransport::Control {
  std::uint64_t magic;
  std::uint32_t version;
  std::int32_t rank;
  std::int32_t world;
  std::uint32_t owner_uid;
  std::uint64_t job_hash;
  std::uint64_t slot_bytes;
  alignas(64) std::atomic<std::uint32_t> steps;  // futex word: collective steps entered (records published)
  // Peers asleep (or about to be) on `steps`: a publisher makes the FUTEX_WAKE system call only when one
  // is, which spares it on every step where all waiters spin.
  std::atomic<std::uint32_t> sleepers;
  std::atomic<std::uint32_t> busy;  // 1 while the rank is inside an operator call (Transport::set_busy)
  // The CPU the rank last ran on when it published, waited or changed `busy` (-1: not known). A waiter on
  // that same CPU sleeps instead of spinning: the rank cannot run there while it spins.
  std::atomic<std::int32_t> cpu;
  // Rank 0's only: when the next rank of the host may move off a shared CPU (move_off_cpu; steady ns).
  std::atomic<std::int64_t> next_move_ns;
  alignas(64) std::uint64_t record_bytes[2];
  std::int64_t entered_ns[2];  // when the rank entered the step (steady clock: one per machine), by parity

  std::byte* slot(std::uint32_t step) noexcept {
    return reinterpret_cast<std::byte*>(this) + kControlHead + (step & 1u) * slot_bytes;
  }
  static constexpr std::size_t kControlHead = 256;
};

ShmTransport::ShmTransport(const std::string& job, int rank, int world_size, const ShmOptions& options)
    : options_(options),
      wait_(wait_policy(options.spin, world_size)),
      job_hash_(hash_of(job)),
      mesh_(job, rank, world_size, Clock::now() + options.wait.timeout),
      controls_(static_cast<std::size_t>(world_size)),
      windows_(static_cast<std::size_t>(world_size)),
      retired_(static_cast<std::size_t>(world_size)),
      waits_(static_cast<std::size_t>(world_size), 0) {
  static_assert(sizeof(Control) <= Control::kControlHead, "control head must fit its reserved bytes");
  const std::size_t control_bytes = round_to_page(Control::kControlHead + 2 * kSlotBytes);
  int control_fd = -1, window_fd = -1;
  const char* phase = "connect";
  try {
    // Inside the try: when the window cannot be created, the control segment must not leak.
    Mapping& own_control = controls_[static_cast<std::size_t>(rank)];
    own_control.base = create_shared(control_bytes, "moedist-control", &control_fd);
    own_control.size = control_bytes;
    Control* c = new (own_control.base) Control{};
    c->magic = kControlMagic;
    c->version = kControlVersion;
    c->rank = rank;
    c->world = world_size;
    c->owner_uid = static_cast<std::uint32_t>(::getuid());
    c->job_hash = job_hash_;
    c->slot_bytes = kSlotBytes;
    c->cpu.store(-1, std::memory_order_relaxed);
    c->next_move_ns.store(0, std::memory_order_relaxed);
    Mapping& own_window = windows_[static_cast<std::size_t>(rank)];
    own_window.base = create_shared(kPage, "moedist-window", &window_fd);
    own_window.size = kPage;

    const SegmentNote control_note{control_bytes}, window_note{kPage};
    for (int peer = 0; peer < world_size; ++peer) {
      if (peer == rank) continue;
      mesh_.send(peer, &control_note, sizeof(control_note), control_fd, phase);
      mesh_.send(peer, &window_note, sizeof(window_note), window_fd, phase);
    }
    const auto deadline = Clock::now() + options_.wait.timeout;
    for (int peer = 0; peer < world_size; ++peer) {
      if (peer == rank) continue;
      SegmentNote note;
      int fd = mesh_.receive(peer, &note, sizeof(note), deadline, phase);
      controls_[static_cast<std::size_t>(peer)] = map_peer_memfd(fd, note.bytes, peer, "control segment", phase);
      const Control* pc = control(peer);
      if (pc->magic != kControlMagic || pc->version != kControlVersion || pc->rank != peer || pc->world != world_size ||
          pc->job_hash != job_hash_ || pc->owner_uid != ::getuid() || pc->slot_bytes != kSlotBytes ||
          note.bytes < Control::kControlHead + 2 * kSlotBytes) {
        throw PeerError(ErrorCode::protocol, peer, phase,
                        "the control segment of rank " + std::to_string(peer) +
                            " fails its checks (magic, version, rank, world, job, owner or size)");
      }
      fd = mesh_.receive(peer, &note, sizeof(note), deadline, phase);
      windows_[static_cast<std::size_t>(peer)] = map_peer_memfd(fd, note.bytes, peer, "window", phase);
    }
  } catch (...) {
    if (control_fd >= 0) ::close(control_fd);
    if (window_fd >= 0) ::close(window_fd);
    for (Mapping& m : controls_)
      if (m.base != nullptr) ::munmap(m.base, m.size);
    for (Mapping& m : windows_)
      if (m.base != nullptr) ::munmap(m.base, m.size);
    throw;
  }
  // The mappings keep the memory alive; no name or descriptor is left behind.
  ::close(control_fd);
  ::close(window_fd);
}

ShmTransport::~ShmTransport() {
  for (auto* list : {&controls_, &windows_, &retired_}) {
    for (Mapping& m : *list) {
      if (m.base != nullptr) ::munmap(m.base, m.size);
    }
  }
}

ShmTransport::Control* ShmTransport::control(int rank) const noexcept {
  return reinterpret_cast<Control*>(controls_[static_cast<std::size_t>(rank)].base);
}

ShmTransport::Mapping ShmTransport::map_peer_memfd(int fd, std::size_t expected, int peer, const char* what,
                                                   const char* phase) {
  if (fd < 0) {
    throw PeerError(ErrorCode::protocol, peer, phase,
                    "rank " + std::to_string(peer) + " sent no descriptor for its " + what);
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0 || st.st_uid != ::getuid() || (st.st_mode & 077) != 0 ||
      static_cast<std::size_t>(st.st_size) != expected || expected == 0) {
    ::close(fd);
    throw PeerError(ErrorCode::protocol, peer, phase,
                    "the " + std::string(what) + " of rank " + std::to_string(peer) +
                        " has the wrong owner, mode or size (expected " + std::to_string(expected) + " bytes)");
  }
  void* p = ::mmap(nullptr, expected, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  const int err = errno;
  ::close(fd);
  if (p == MAP_FAILED) {
    throw PeerError(
        ErrorCode::capacity, peer, phase,
        "cannot map the " + std::string(what) + " of rank " + std::to_string(peer) + ": " + std::strerror(err));
  }
  return Mapping{static_cast<std::byte*>(p), expected};
}

void ShmTransport::fail(const PeerError& error) {
  failed_ = true;
  failed_peer_ = error.peer();
  failed_reason_ = error.what();
  throw error;
}

void ShmTransport::set_busy(bool busy) noexcept {
  control(rank())->busy.store(busy ? 1 : 0, std::memory_order_relaxed);
  note_cpu();
}

int ShmTransport::note_cpu() noexcept {
  const int cpu = current_cpu();
  // Stored only when it changed: peers read this cache line in every wait.
  if (cpu != noted_cpu_) {
    noted_cpu_ = cpu;
    control(rank())->cpu.store(cpu, std::memory_order_relaxed);
  }
  return cpu;
}

void ShmTransport::enter(std::string_view phase) {
  if (failed_) {
    throw PeerError(ErrorCode::peer_failed, failed_peer_, std::string(phase),
                    "rank " + std::to_string(rank()) + ": the group failed earlier and is unusable: " + failed_reason_);
  }
  if (options_.on_phase) options_.on_phase(phase);
}

void ShmTransport::wait_for(int peer, std::uint32_t target, Clock::time_point deadline, const char* phase) {
  std::atomic<std::uint32_t>* word = &control(peer)->steps;
  const auto reached = [&](std::uint32_t seen) { return static_cast<std::int32_t>(seen - target) >= 0; };
  // Whether the peer last ran on this CPU: then it cannot run while this rank spins or yields (see
  // current_cpu), and this rank moves to a free CPU or, with none, sleeps at once. The CPU is read again in every loop,
  // since either rank may have moved.
  const std::atomic<std::int32_t>& peer_cpu = control(peer)->cpu;
  const auto on_peer_cpu = [&] {
    const int cpu = note_cpu();
    if (cpu < 0 || peer_cpu.load(std::memory_order_relaxed) != cpu) return false;
    // Onto a CPU no rank of this host uses, if the affinity allows one (move_off_cpu); else give this one up.
    std::atomic<std::int64_t>& next_move_ns = control(0)->next_move_ns;
    if (move_due(next_move_ns)) {
      taken_.clear();
      for (int p = 0; p < size(); ++p) {
        if (p != rank()) taken_.push_back(control(p)->cpu.load(std::memory_order_relaxed));
      }
      if (move_off_cpu(cpu, taken_, next_move_ns)) {
        note_cpu();
        return false;
      }
    }
    return true;
  };
  bool sleep_now = false;
  const auto spin_end = Clock::now() + wait_.spin;
  do {
    if (reached(word->load(std::memory_order_acquire))) return;
    if (on_peer_cpu()) {
      sleep_now = true;
      break;
    }
    cpu_relax();
  } while (Clock::now() < spin_end);
  const auto yield_end = Clock::now() + wait_.yield;
  while (!sleep_now && Clock::now() < yield_end) {
    if (reached(word->load(std::memory_order_acquire))) return;
    if (on_peer_cpu()) break;
    ::sched_yield();
  }
  for (;;) {
    const std::uint32_t seen = word->load(std::memory_order_acquire);
    if (reached(seen)) return;
    if (mesh_.peer_gone(peer)) {
      fail(PeerError(ErrorCode::peer_lost, peer, phase,
                     "rank " + std::to_string(rank()) + ": rank " + std::to_string(peer) + " (pid " +
                         std::to_string(mesh_.peer_pid(peer)) + ") exited or was killed; lost in phase '" + phase +
                         "'"));
    }
    const auto now = Clock::now();
    if (now >= deadline) {
      fail(PeerError(ErrorCode::timeout, peer, phase,
                     "rank " + std::to_string(rank()) + ": timed out after " +
                         std::to_string(options_.wait.timeout.count()) + " ms in phase '" + phase +
                         "' waiting for rank " + std::to_string(peer)));
    }
    const auto slice = std::min<Clock::duration>(deadline - now, std::chrono::milliseconds(20));
    // A busy peer is on its way here: spin or yield (the policy's choice) while it stays busy, looking
    // at its liveness and the deadline again every slice.
    std::atomic<std::uint32_t>& peer_busy = control(peer)->busy;
    if (wait_.while_busy != WaitPolicy::WhileBusy::sleep && peer_busy.load(std::memory_order_relaxed) != 0 &&
        !on_peer_cpu()) {
      const auto slice_end = now + slice;
      BusyPause pause(wait_.while_busy);
      while (!reached(word->load(std::memory_order_acquire)) && peer_busy.load(std::memory_order_relaxed) != 0 &&
             !on_peer_cpu() && Clock::now() < slice_end) {
        pause();
      }
      continue;
    }
    // Sleep until the peer publishes (it wakes us), or 20 ms pass and we look at its liveness again.
    const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(slice).count();
    const timespec ts{static_cast<time_t>(ns / 1000000000), static_cast<long>(ns % 1000000000)};
    // Counted before the futex compares the word: a publisher that stores its step after this count
    // sees it and wakes us; one that stored before changed the word, and the wait returns at once.
    std::atomic<std::uint32_t>& sleepers = control(peer)->sleepers;
    sleepers.fetch_add(1, std::memory_order_seq_cst);
    futex(word, FUTEX_WAIT, seen, &ts);
    sleepers.fetch_sub(1, std::memory_order_seq_cst);
  }
}

void ShmTransport::allgather(const void* in, std::size_t bytes, void* out, std::string_view phase_view) {
  enter(phase_view);
  const std::string phase(phase_view);
  if (bytes > kSlotBytes) {
    throw Error(ErrorCode::capacity, "a record of " + std::to_string(bytes) + " bytes exceeds the " +
                                         std::to_string(kSlotBytes) + "-byte slot of the shared-memory transport");
  }
  const std::int64_t entered =
      std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
  const std::uint32_t step = ++steps_;
  Control* mine = control(rank());
  std::memcpy(mine->slot(step), in, bytes);
  mine->record_bytes[step & 1u] = bytes;
  mine->entered_ns[step & 1u] = entered;
  note_cpu();
  mine->steps.store(step, std::memory_order_seq_cst);  // ordered before the load of sleepers (see wait_for)
  if (mine->sleepers.load(std::memory_order_seq_cst) != 0) futex(&mine->steps, FUTEX_WAKE, INT_MAX, nullptr);

  const auto deadline = Clock::now() + options_.wait.timeout;
  auto* dst = static_cast<std::byte*>(out);
  for (int peer = 0; peer < size(); ++peer) {
    if (peer != rank()) wait_for(peer, step, deadline, phase.c_str());
    Control* pc = control(peer);
    const std::uint64_t got = pc->record_bytes[step & 1u];
    if (got != bytes) {
      fail(PeerError(ErrorCode::config_mismatch, peer, phase,
                     "rank " + std::to_string(peer) + " sent a " + std::to_string(got) + "-byte record in phase '" +
                         phase + "' where rank " + std::to_string(rank()) + " expected " + std::to_string(bytes) +
                         " bytes: the ranks disagree about the group configuration"));
    }
    std::memcpy(dst + static_cast<std::size_t>(peer) * bytes, pc->slot(step), bytes);
    waits_[static_cast<std::size_t>(peer)] = std::max<std::int64_t>(0, pc->entered_ns[step & 1u] - entered);
  }
}

void ShmTransport::last_allgather_waits(std::span<std::int64_t> out) const {
  for (std::size_t r = 0; r < out.size() && r < waits_.size(); ++r) out[r] = waits_[r];
}

// After a resize in which some rank sent a new window: one small status round, so that every rank
// learns whether any rank could not map it. A rank that kept an old mapping while its peers moved on
// would read and write the wrong memory, so the whole group fails, alike on every rank, naming the
// lowest rank that could not map.
void ShmTransport::settle_mapping(const std::optional<PeerError>& own, const std::string& phase) {
  struct MapStatus {
    std::int32_t failed = 0;
    std::int32_t code = 0;
  };
  MapStatus mine;
  if (own) mine = MapStatus{1, static_cast<std::int32_t>(own->code())};
  std::optional<PeerError> lost;
  for (int peer = 0; peer < size(); ++peer) {
    if (peer == rank()) continue;
    try {
      mesh_.send(peer, &mine, sizeof(mine), -1, phase.c_str());
    } catch (const PeerError& e) {
      if (!lost) lost = e;
    }
  }
  const auto deadline = Clock::now() + options_.wait.timeout;
  int culprit = own ? rank() : -1;
  ErrorCode code = own ? own->code() : ErrorCode::capacity;
  for (int peer = 0; peer < size(); ++peer) {
    if (peer == rank()) continue;
    MapStatus theirs;
    try {
      const int stray = mesh_.receive(peer, &theirs, sizeof(theirs), deadline, phase.c_str());
      if (stray >= 0) ::close(stray);
    } catch (const PeerError& e) {
      if (!lost || (lost->code() != ErrorCode::peer_lost && e.code() == ErrorCode::peer_lost)) lost = e;
      continue;
    }
    if (theirs.failed != 0 && (culprit < 0 || peer < culprit)) {
      culprit = peer;
      code = theirs.code == static_cast<std::int32_t>(ErrorCode::protocol) ? ErrorCode::protocol : ErrorCode::capacity;
    }
  }
  if (lost) fail(*lost);
  if (culprit < 0) return;
  std::string reason = "rank " + std::to_string(culprit) + " could not map a peer's new window in phase '" + phase +
                       "'; the ranks' views of the windows differ, so the group is unusable";
  if (culprit == rank() && own) reason += " (" + std::string(own->what()) + ")";
  fail(PeerError(code, culprit, phase, reason));
}

void ShmTransport::resize_window(std::size_t bytes, std::string_view phase_view) {
  enter(phase_view);
  const std::string phase(phase_view);
  const auto deadline = Clock::now() + options_.wait.timeout;
  try {
    SegmentNote note;
    int fd = -1;
    const auto me = static_cast<std::size_t>(rank());
    std::string own_failure;
    if (bytes > windows_[me].size) {
      note.bytes = round_to_page(bytes);
      try {
        std::byte* fresh = create_shared(note.bytes, "moedist-window", &fd);
        if (retired_[me].base != nullptr) ::munmap(retired_[me].base, retired_[me].size);
        retired_[me] = windows_[me];
        windows_[me] = Mapping{fresh, note.bytes};
      } catch (const Error& e) {
        own_failure = e.what();
        note.bytes = kAllocationFailed;  // tell the peers, so every rank fails alike instead of waiting
      }
    }
    // Send to every peer and read every peer's note before raising anything: a rank that gave up
    // half-way would look lost to the ranks it had not reached yet, and they would name it, not the
    // rank that really died.
    std::optional<PeerError> lost;
    for (int peer = 0; peer < size(); ++peer) {
      if (peer == rank()) continue;
      try {
        mesh_.send(peer, &note, sizeof(note), fd, phase.c_str());
      } catch (const PeerError& e) {
        if (!lost) lost = e;
      }
    }
    const bool sent_window = fd >= 0;
    if (fd >= 0) ::close(fd);
    int failed_peer = own_failure.empty() ? -1 : rank();
    bool any_grew = sent_window;           // every rank sees the same notes, so all agree on this
    std::optional<PeerError> map_failure;  // this rank could not map a peer's new window
    for (int peer = 0; peer < size(); ++peer) {
      if (peer == rank()) continue;
      SegmentNote theirs;
      int peer_fd = -1;
      try {
        peer_fd = mesh_.receive(peer, &theirs, sizeof(theirs), deadline, phase.c_str());
      } catch (const PeerError& e) {
        if (!lost || (lost->code() != ErrorCode::peer_lost && e.code() == ErrorCode::peer_lost)) lost = e;
        continue;
      }
      if (theirs.bytes == 0 || theirs.bytes == kAllocationFailed) {
        if (peer_fd >= 0) ::close(peer_fd);
        if (theirs.bytes == kAllocationFailed && failed_peer < 0) failed_peer = peer;
        continue;
      }
      any_grew = true;
      if (map_failure) {
        ::close(peer_fd);  // this rank fails anyway; keep draining so no note is left in a socket
        continue;
      }
      try {
        const Mapping fresh = map_peer_memfd(peer_fd, theirs.bytes, peer, "window", phase.c_str());
        Mapping& retired = retired_[static_cast<std::size_t>(peer)];
        if (retired.base != nullptr) ::munmap(retired.base, retired.size);
        retired = windows_[static_cast<std::size_t>(peer)];
        windows_[static_cast<std::size_t>(peer)] = fresh;
      } catch (const PeerError& e) {
        map_failure = e;
      }
    }
    if (lost) throw *lost;
    if (any_grew) settle_mapping(map_failure, phase);
    if (failed_peer >= 0) {
      // The group stays usable: every rank saw the same notes and raises the same error.
      throw PeerError(ErrorCode::capacity, failed_peer, phase,
                      failed_peer == rank() ? own_failure
                                            : "rank " + std::to_string(failed_peer) +
                                                  " could not allocate its window in phase '" + phase + "'");
    }
  } catch (const PeerError& e) {
    if (failed_ || e.code() == ErrorCode::capacity) throw;  // failed_: settle_mapping already failed the group
    fail(e);
  }
}

}  // namespace moedist::shm
