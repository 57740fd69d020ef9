// In-process transport: ranks are threads of one process sharing a Hub. Windows are plain heap
// buffers, so a peer's window is reached by pointer.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "moedist/error.h"
#include "transport/transport.h"

namespace moedist::inproc {

class InProcHub {
 public:
  InProcHub(int size, std::chrono::milliseconds timeout, std::chrono::microseconds spin, int ranks_per_host = 0);
  ~InProcHub();

  int size() const noexcept { return size_; }
  std::chrono::milliseconds timeout() const noexcept { return timeout_; }

  // Claims `rank` for one joining thread; throws if the rank is out of range or already taken.
  void claim(int rank);

  // waits (size() entries, or null): per rank, how long after `rank` it entered (Transport::last_allgather_waits).
  void allgather(int rank, const void* in, std::size_t bytes, void* out, std::string_view phase, std::int64_t* waits);
  void resize_window(int rank, std::size_t bytes);
  void set_busy(int rank, bool busy) noexcept {
    busy_[static_cast<std::size_t>(rank)].store(busy, std::memory_order_relaxed);
    note_cpu(rank);
  }
  std::size_t window_size(int rank) const noexcept { return windows_[static_cast<std::size_t>(rank)].size; }
  std::byte* window(int rank) noexcept { return windows_[static_cast<std::size_t>(rank)].data; }
  int host_count() const noexcept { return ranks_per_host_ == 0 ? 1 : (size_ + ranks_per_host_ - 1) / ranks_per_host_; }
  int host_of(int rank) const noexcept { return ranks_per_host_ == 0 ? 0 : rank / ranks_per_host_; }
  void exchange(int rank, std::span<const Transport::Outgoing> out, std::span<const int> from,
                std::span<std::vector<std::byte>> in, std::string_view phase);

 private:
  // Records the CPU `rank` runs on now (cpus_) and returns it.
  int note_cpu(int rank) noexcept;
  // Whether a rank that has not arrived at generation `gen` last ran on `cpu` (see current_cpu).
  bool missing_rank_on(int cpu, std::uint64_t gen) const noexcept;

  struct Window {
    std::byte* data = nullptr;
    std::size_t size = 0;
    std::byte* retired = nullptr;  // the previous buffer, kept until the next resize
  };

  const int size_;
  const int ranks_per_host_;
  const std::chrono::milliseconds timeout_;
  const WaitPolicy wait_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<std::uint64_t> generation_{0};  // written under mu_; read without it while spinning
  std::atomic<bool> failed_flag_{false};      // mirrors failed_ for the spinning readers
  int arrived_ = 0;
  // Per rank: 1 + the generation it last entered (written under mu_, read by spinning waiters), and
  // whether it is inside an operator call (set_busy).
  std::vector<std::atomic<std::uint64_t>> arrived_at_;
  std::vector<std::atomic<bool>> busy_;
  // Per rank: the CPU it last ran on when it entered, waited or changed busy_ (-1: not known). A waiter
  // does not spin for a rank that needs the waiter's own CPU.
  std::vector<std::atomic<int>> cpus_;
  std::atomic<std::int64_t> next_move_ns_{0};     // move_off_cpu's: one move among the ranks per interval
  std::vector<std::vector<std::byte>> slots_[2];  // double-buffered by generation parity
  std::vector<std::int64_t> entered_ns_[2];       // per rank: when it entered (steady clock), by parity
  std::vector<bool> claimed_;
  bool failed_ = false;
  int failed_peer_ = -1;
  ErrorCode failed_code_ = ErrorCode::peer_failed;
  std::string failed_reason_;
  std::vector<Window> windows_;
  // exchange(): mail_[parity][to * size + from], alternating between rounds like the record slots.
  std::vector<std::vector<std::byte>> mail_[2];
  std::vector<char> posted_[2];
  std::vector<std::uint64_t> rounds_;  // per rank: exchange rounds entered (each touched only by its rank)
};

class InProcTransport final : public Transport {
 public:
  InProcTransport(std::shared_ptr<InProcHub> hub, int rank);

  int rank() const noexcept override { return rank_; }
  int size() const noexcept override { return hub_->size(); }
  void allgather(const void* in, std::size_t bytes, void* out, std::string_view phase) override {
    hub_->allgather(rank_, in, bytes, out, phase, waits_.data());
  }
  void last_allgather_waits(std::span<std::int64_t> out) const override {
    for (std::size_t r = 0; r < out.size() && r < waits_.size(); ++r) out[r] = waits_[r];
  }
  void resize_window(std::size_t bytes, std::string_view phase) override;
  void set_busy(bool busy) noexcept override { hub_->set_busy(rank_, busy); }
  std::size_t window_size(int rank) const noexcept override { return sizes_[static_cast<std::size_t>(rank)]; }
  std::byte* window(int rank) noexcept override { return windows_[static_cast<std::size_t>(rank)]; }
  int host_count() const noexcept override { return hub_->host_count(); }
  int host_of(int rank) const noexcept override { return hub_->host_of(rank); }
  void exchange(std::span<const Outgoing> out, std::span<const int> from, std::span<std::vector<std::byte>> in,
                std::string_view phase) override {
    hub_->exchange(rank_, out, from, in, phase);
  }

 private:
  // This rank's view of every window, taken when its own resize_window completes: a peer that has
  // already entered the next resize must not move a window under a rank still reading it (as with
  // processes, whose mappings change only in their own resize).
  void refresh_views();

  std::shared_ptr<InProcHub> hub_;
  int rank_;
  std::vector<std::byte*> windows_;  // nullptr for ranks on another (virtual) host
  std::vector<std::size_t> sizes_;
  std::vector<std::int64_t> waits_;  // of the last allgather
};

}  // namespace moedist::inproc
