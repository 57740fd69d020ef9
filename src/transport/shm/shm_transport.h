// The shared-memory transport: ranks are processes; each owns a control segment (the futex word and
// record slots of its collective steps) and a window, both memfds that every rank maps.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "moedist/error.h"
#include "moedist/shm.h"
#include "transport/shm/socket_mesh.h"
#include "transport/transport.h"

namespace moedist::shm {

class ShmTransport final : public Transport {
 public:
  ShmTransport(const std::string& job, int rank, int world_size, const ShmOptions& options);
  ~ShmTransport() override;

  int rank() const noexcept override { return mesh_.rank(); }
  int size() const noexcept override { return mesh_.size(); }
  void allgather(const void* in, std::size_t bytes, void* out, std::string_view phase) override;
  void last_allgather_waits(std::span<std::int64_t> out) const override;
  void set_busy(bool busy) noexcept override;
  void resize_window(std::size_t bytes, std::string_view phase) override;
  std::size_t window_size(int rank) const noexcept override { return windows_[static_cast<std::size_t>(rank)].size; }
  std::byte* window(int rank) noexcept override { return windows_[static_cast<std::size_t>(rank)].base; }

  // True when `peer`'s process exited or was killed (its connection closed). For transports that wait
  // on something else (MPI) and want to notice a dead host-mate at once.
  bool peer_gone(int peer) const noexcept { return peer != rank() && mesh_.peer_gone(peer); }

 private:
  struct Mapping {
    std::byte* base = nullptr;
    std::size_t size = 0;
  };
  struct Control;

  Control* control(int rank) const noexcept;
  void wait_for(int peer, std::uint32_t target, std::chrono::steady_clock::time_point deadline, const char* phase);
  // Publishes the CPU this rank runs on (Control::cpu) and returns it.
  int note_cpu() noexcept;
  void enter(std::string_view phase);
  [[noreturn]] void fail(const PeerError& error);
  void settle_mapping(const std::optional<PeerError>& own, const std::string& phase);
  Mapping map_peer_memfd(int fd, std::size_t expected, int peer, const char* what, const char* phase);

  ShmOptions options_;
  WaitPolicy wait_;
  int noted_cpu_ = -1;      // the CPU last stored in this rank's Control::cpu
  std::vector<int> taken_;  // the peers' CPUs, gathered for move_off_cpu
  std::uint64_t job_hash_ = 0;
  SocketMesh mesh_;
  std::vector<Mapping> controls_;
  std::vector<Mapping> windows_;
  std::vector<Mapping> retired_;  // each rank's previous window, unmapped at its next resize
  std::uint32_t steps_ = 0;       // collective steps this rank has entered
  bool failed_ = false;
  int failed_peer_ = -1;
  std::string failed_reason_;
  std::vector<std::int64_t> waits_;  // of the last allgather
};

}  // namespace moedist::shm
