#include "transport/inproc/inproc_transport.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>
#include <sstream>
#include <thread>

#include "moedist/error.h"

namespace moedist::inproc {

InProcHub::InProcHub(int size, std::chrono::milliseconds timeout, std::chrono::microseconds spin, int ranks_per_host)
    : size_(size),
      ranks_per_host_(ranks_per_host >= size ? 0 : ranks_per_host),
      timeout_(timeout),
      wait_(wait_policy(spin, size)),
      arrived_at_(static_cast<std::size_t>(size)),
      busy_(static_cast<std::size_t>(size)),
      cpus_(static_cast<std::size_t>(size)),
      claimed_(static_cast<std::size_t>(size), false),
      windows_(static_cast<std::size_t>(size)) {
  for (std::atomic<int>& cpu : cpus_) cpu.store(-1, std::memory_order_relaxed);
  for (int p = 0; p < 2; ++p) {
    mail_[p].resize(static_cast<std::size_t>(size) * static_cast<std::size_t>(size));
    posted_[p].assign(static_cast<std::size_t>(size) * static_cast<std::size_t>(size), 0);
  }
  rounds_.assign(static_cast<std::size_t>(size), 0);
  slots_[0].resize(static_cast<std::size_t>(size));
  slots_[1].resize(static_cast<std::size_t>(size));
  entered_ns_[0].assign(static_cast<std::size_t>(size), 0);
  entered_ns_[1].assign(static_cast<std::size_t>(size), 0);
  // Every window starts with one page, so a window is never null (calls where every BS is 0 address it too).
  for (int r = 0; r < size; ++r) resize_window(r, 1);
}

InProcHub::~InProcHub() {
  for (Window& w : windows_) {
    std::free(w.data);
    std::free(w.retired);
  }
}

void InProcHub::claim(int rank) {
  std::lock_guard<std::mutex> lock(mu_);
  if (rank < 0 || rank >= size_) {
    throw Error(ErrorCode::invalid_argument,
                "global rank " + std::to_string(rank) + " is outside the world of " + std::to_string(size_) + " ranks");
  }
  if (claimed_[static_cast<std::size_t>(rank)]) {
    throw Error(ErrorCode::config_mismatch, "global rank " + std::to_string(rank) +
                                                " joined twice: two threads passed the same ep_rank_id / tp_rank_id");
  }
  claimed_[static_cast<std::size_t>(rank)] = true;
}

namespace {
std::int64_t steady_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
}  // namespace

int InProcHub::note_cpu(int rank) noexcept {
  const int cpu = current_cpu();
  std::atomic<int>& noted = cpus_[static_cast<std::size_t>(rank)];
  // Stored only when it changed: waiters read it in every pause.
  if (noted.load(std::memory_order_relaxed) != cpu) noted.store(cpu, std::memory_order_relaxed);
  return cpu;
}

bool InProcHub::missing_rank_on(int cpu, std::uint64_t gen) const noexcept {
  if (cpu < 0) return false;
  for (int r = 0; r < size_; ++r) {
    const auto i = static_cast<std::size_t>(r);
    if (arrived_at_[i].load(std::memory_order_relaxed) != gen + 1 && cpus_[i].load(std::memory_order_relaxed) == cpu)
      return true;
  }
  return false;
}

void InProcHub::allgather(int rank, const void* in, std::size_t bytes, void* out, std::string_view phase,
                          std::int64_t* waits) {
  const std::int64_t entered = steady_ns();
  note_cpu(rank);
  std::unique_lock<std::mutex> lock(mu_);
  if (failed_) {
    throw PeerError(ErrorCode::peer_failed, failed_peer_, std::string(phase),
                    "rank " + std::to_string(rank) + ": the group failed earlier and is unusable: " + failed_reason_);
  }
  const std::uint64_t gen = generation_.load(std::memory_order_relaxed);
  auto& slots = slots_[gen & 1];
  const auto* src = static_cast<const std::byte*>(in);
  slots[static_cast<std::size_t>(rank)].assign(src, src + bytes);
  entered_ns_[gen & 1][static_cast<std::size_t>(rank)] = entered;
  arrived_at_[static_cast<std::size_t>(rank)].store(gen + 1, std::memory_order_relaxed);
  if (++arrived_ == size_) {
    arrived_ = 0;
    generation_.store(gen + 1, std::memory_order_release);
    cv_.notify_all();
  } else {
    // Spin or yield first (without the lock, see WaitPolicy), then sleep on the condition.
    const auto deadline = std::chrono::steady_clock::now() + timeout_;
    if (wait_.spin.count() > 0 || wait_.yield.count() > 0 || wait_.while_busy != WaitPolicy::WhileBusy::sleep) {
      lock.unlock();
      const auto arrived = [&] {
        return generation_.load(std::memory_order_acquire) != gen || failed_flag_.load(std::memory_order_acquire);
      };
      // A missing rank that last ran on this CPU cannot run while this rank spins or yields here: then
      // it moves to a free CPU or, with none, sleeps at once (see current_cpu).
      const auto blocking_a_rank = [&] {
        const int cpu = note_cpu(rank);
        if (!missing_rank_on(cpu, gen)) return false;
        // Onto a CPU no other rank uses, if the affinity allows one (move_off_cpu); else give this one up.
        if (move_off_cpu(cpu, cpus_, rank, next_move_ns_)) {
          note_cpu(rank);
          return false;
        }
        return true;
      };
      const auto spin_end = std::chrono::steady_clock::now() + wait_.spin;
      while (!arrived() && !blocking_a_rank() && std::chrono::steady_clock::now() < spin_end) cpu_relax();
      const auto yield_end = std::chrono::steady_clock::now() + wait_.yield;
      while (!arrived() && !blocking_a_rank() && std::chrono::steady_clock::now() < yield_end)
        std::this_thread::yield();
      // Then on while a rank still missing is busy (WaitPolicy::while_busy), up to the timeout.
      const auto missing_rank_busy = [&] {
        for (int r = 0; r < size_; ++r) {
          const auto i = static_cast<std::size_t>(r);
          if (arrived_at_[i].load(std::memory_order_relaxed) != gen + 1 && busy_[i].load(std::memory_order_relaxed))
            return true;
        }
        return false;
      };
      if (wait_.while_busy != WaitPolicy::WhileBusy::sleep) {
        BusyPause pause(wait_.while_busy);
        while (!arrived() && missing_rank_busy() && !blocking_a_rank() && std::chrono::steady_clock::now() < deadline)
          pause();
      }
      lock.lock();
    }
    const bool done =
        cv_.wait_until(lock, deadline, [&] { return generation_.load(std::memory_order_relaxed) != gen || failed_; });
    if (!done) {
      std::ostringstream missing;
      int first_missing = -1;
      for (int r = 0; r < size_; ++r) {
        if (arrived_at_[static_cast<std::size_t>(r)].load(std::memory_order_relaxed) != gen + 1) {
          if (first_missing < 0) first_missing = r;
          missing << (missing.tellp() > 0 ? ", " : "") << r;
        }
      }
      std::ostringstream msg;
      msg << "rank " << rank << ": timed out after " << timeout_.count() << " ms in phase '" << phase
          << "' waiting for rank " << first_missing << " (not arrived: " << missing.str() << ")";
      failed_ = true;
      failed_flag_.store(true, std::memory_order_release);
      failed_peer_ = first_missing;
      failed_code_ = ErrorCode::timeout;
      failed_reason_ = msg.str();
      cv_.notify_all();
      throw PeerError(ErrorCode::timeout, first_missing, std::string(phase), msg.str());
    }
    if (generation_.load(std::memory_order_relaxed) ==
        gen) {  // woken by another rank's failure: report the same cause and peer
      throw PeerError(failed_code_, failed_peer_, std::string(phase),
                      "rank " + std::to_string(rank) + ": the group failed in phase '" + std::string(phase) +
                          "': " + failed_reason_);
    }
  }
  auto* dst = static_cast<std::byte*>(out);
  for (int r = 0; r < size_; ++r) {
    const auto& slot = slots[static_cast<std::size_t>(r)];
    if (slot.size() != bytes) {
      throw PeerError(ErrorCode::config_mismatch, r, std::string(phase),
                      "rank " + std::to_string(r) + " sent a " + std::to_string(slot.size()) +
                          "-byte record in phase '" + std::string(phase) + "' where rank " + std::to_string(rank) +
                          " expected " + std::to_string(bytes) +
                          " bytes: the ranks disagree about the group configuration");
    }
    std::memcpy(dst + static_cast<std::size_t>(r) * bytes, slot.data(), bytes);
    if (waits != nullptr)
      waits[r] = std::max<std::int64_t>(0, entered_ns_[gen & 1][static_cast<std::size_t>(r)] - entered);
  }
}

// Messages go to mailboxes, then a barrier (an allgather) makes them visible. A mailbox of one parity is
// written again two rounds later, after its reader has passed the barrier of the round in between.
void InProcHub::exchange(int rank, std::span<const Transport::Outgoing> out, std::span<const int> from,
                         std::span<std::vector<std::byte>> in, std::string_view phase) {
  const int parity = static_cast<int>(rounds_[static_cast<std::size_t>(rank)]++ & 1);
  const auto box = [&](int to, int sender) {
    return static_cast<std::size_t>(to) * static_cast<std::size_t>(size_) + static_cast<std::size_t>(sender);
  };
  for (const Transport::Outgoing& m : out) {
    if (m.peer < 0 || m.peer >= size_ || host_of(m.peer) == host_of(rank)) {
      throw Error(ErrorCode::internal,
                  "rank " + std::to_string(rank) + " sent a message to rank " + std::to_string(m.peer) +
                      ", which is not a rank of another host, in phase '" + std::string(phase) + "'");
    }
    mail_[parity][box(m.peer, rank)].assign(m.data, m.data + m.bytes);
    posted_[parity][box(m.peer, rank)] = 1;
  }
  char none[1] = {};
  std::vector<char> ignored(static_cast<std::size_t>(size_));
  allgather(rank, none, 1, ignored.data(), phase, nullptr);
  for (std::size_t i = 0; i < from.size(); ++i) {
    const std::size_t b = box(rank, from[i]);
    if (posted_[parity][b] == 0) {
      throw PeerError(ErrorCode::protocol, from[i], std::string(phase),
                      "rank " + std::to_string(rank) + " expected a message from rank " + std::to_string(from[i]) +
                          " in phase '" + std::string(phase) + "' and got none");
    }
    posted_[parity][b] = 0;
    in[i].swap(mail_[parity][b]);
  }
}

void InProcHub::resize_window(int rank, std::size_t bytes) {
  Window& w = windows_[static_cast<std::size_t>(rank)];
  if (bytes <= w.size) return;
  const std::size_t rounded = (bytes + 4095) / 4096 * 4096;
  void* fresh = std::aligned_alloc(4096, rounded);
  if (fresh == nullptr) throw std::bad_alloc();
  std::free(w.retired);
  w.retired = w.data;
  w.data = static_cast<std::byte*>(fresh);
  w.size = rounded;
}

InProcTransport::InProcTransport(std::shared_ptr<InProcHub> hub, int rank) : hub_(std::move(hub)), rank_(rank) {
  waits_.assign(static_cast<std::size_t>(hub_->size()), 0);
  refresh_views();
}

void InProcTransport::refresh_views() {
  windows_.resize(static_cast<std::size_t>(hub_->size()));
  sizes_.resize(static_cast<std::size_t>(hub_->size()));
  for (int r = 0; r < hub_->size(); ++r) {
    windows_[static_cast<std::size_t>(r)] = hub_->host_of(r) == hub_->host_of(rank_) ? hub_->window(r) : nullptr;
    sizes_[static_cast<std::size_t>(r)] = hub_->window_size(r);
  }
}

void InProcTransport::resize_window(std::size_t bytes, std::string_view phase) {
  // Only this rank touches its own Window entry; the allgather that follows publishes the new pointer
  // and tells every rank whether every allocation succeeded, so a failure is raised everywhere alike.
  char failed = 0;
  try {
    hub_->resize_window(rank_, bytes);
  } catch (const std::bad_alloc&) {
    failed = 1;
  }
  std::vector<char> all(static_cast<std::size_t>(hub_->size()));
  hub_->allgather(rank_, &failed, 1, all.data(), phase, nullptr);
  refresh_views();  // every rank has resized: the allgather has published their new windows
  for (int r = 0; r < hub_->size(); ++r) {
    if (all[static_cast<std::size_t>(r)] != 0) {
      throw PeerError(ErrorCode::capacity, r, std::string(phase),
                      "rank " + std::to_string(r) + " could not allocate its " +
                          (r == rank_ ? std::to_string(bytes) + "-byte " : "") + "window in phase '" +
                          std::string(phase) + "'");
    }
  }
}

}  // namespace moedist::inproc
