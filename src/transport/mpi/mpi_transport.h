// The MPI transport: a world of processes on one or more hosts. Within a host, ranks share memory
// through the shared-memory transport (their windows are addressable); between hosts, records and rows
// travel as MPI point-to-point messages on a private duplicate of the caller's communicator. Every wait
// polls nonblocking requests against a deadline, so an unreachable host is reported, never waited for
// forever.
#pragma once

#include <mpi.h>

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "moedist/error.h"
#include "moedist/mpi.h"
#include "transport/shm/shm_transport.h"
#include "transport/transport.h"

namespace moedist::mpi {

class MpiTransport final : public Transport {
 public:
  // Collective over `comm`; `rank` is this process's place in the group (0..size(comm)-1, distinct).
  MpiTransport(MPI_Comm comm, int rank, const MpiOptions& options);
  ~MpiTransport() override;

  int rank() const noexcept override { return rank_; }
  int size() const noexcept override { return size_; }
  void allgather(const void* in, std::size_t bytes, void* out, std::string_view phase) override;
  void last_allgather_waits(std::span<std::int64_t> out) const override;
  void resize_window(std::size_t bytes, std::string_view phase) override;
  std::size_t window_size(int rank) const noexcept override { return sizes_[static_cast<std::size_t>(rank)]; }
  std::byte* window(int rank) noexcept override;
  int host_count() const noexcept override { return static_cast<int>(host_names_.size()); }
  int host_of(int rank) const noexcept override { return host_of_[static_cast<std::size_t>(rank)]; }
  std::string host_name(int host) const override { return host_names_[static_cast<std::size_t>(host)]; }
  void exchange(std::span<const Outgoing> out, std::span<const int> from, std::span<std::vector<std::byte>> in,
                std::string_view phase) override;

 private:
  // A request in flight, and the group rank it talks to (for the message when it does not complete).
  struct Pending {
    MPI_Request request;
    int peer;
    int expected;  // bytes a receive must bring; -1 for a send or an unchecked request
  };
  int next_tag();
  void check(int mpi_result, int peer, std::string_view phase, const char* call);
  void wait_all(std::vector<Pending>& pending, std::string_view phase);
  // Called with the group rank of a peer whose message has not come by the deadline.
  [[noreturn]] void time_out(int peer, std::string_view phase);
  [[noreturn]] void fail(const PeerError& error);
  // Fails with an error of the host's shared-memory transport, its peer named by group rank.
  [[noreturn]] void fail_from_host(const PeerError& error);
  void require_usable(std::string_view phase) const;
  std::string describe(int rank) const;
  void sleep_step(std::chrono::steady_clock::time_point started) const;
  // At most every millisecond: fails when another rank's notice names a lost rank (the group is broken:
  // every call needs every rank), or when a host-mate this rank still waits for (a pending request, or
  // an unmatched sender) has exited or was killed (its shared-memory connection closed).
  void watch_peers(std::vector<Pending>& pending, const std::vector<int>& unmatched, std::string_view phase);
  // Tells every other rank that `lost` was lost (a notice on the reserved tag), without waiting.
  void send_notices(int lost, ErrorCode code, const std::string& how);

  MPI_Comm comm_ = MPI_COMM_NULL;  // private duplicate; comm rank != group rank in general
  int rank_ = 0, size_ = 0;
  std::vector<int> comm_rank_of_;  // group rank -> rank in comm_
  std::vector<int> host_of_;
  std::vector<std::string> host_names_;
  std::vector<int> local_index_;   // group rank -> index in this host's shared-memory world, -1 elsewhere
  std::vector<int> local_ranks_;   // this host's group ranks, ascending
  std::unique_ptr<shm::ShmTransport> shm_;
  std::vector<std::size_t> sizes_;
  std::chrono::milliseconds timeout_;
  WaitPolicy wait_;
  int tag_ = 0, tag_limit_ = 32767;  // data tags cycle through [1, tag_limit_); tag_limit_ carries notices
  std::vector<Pending> pending_;
  std::vector<std::chrono::steady_clock::time_point> arrived_;  // per rank: when its last record came
  std::vector<std::int64_t> waits_;                             // of the last allgather (ns)
  std::function<void(std::string_view)> on_phase_;
  std::size_t message_limit_;         // longest MPI message (MpiOptions::test_message_limit lowers it)
  int cause_ = -1;                    // the rank another rank reported lost (a notice), or -1
  ErrorCode cause_code_ = ErrorCode::peer_lost;
  std::string cause_how_;
  struct Notice {
    std::int32_t dead;
    std::int32_t code;  // the ErrorCode every rank raises: peer_lost, or capacity for a message too long
    char how[500];
  };
  std::vector<Notice> notices_;       // sent without waiting; kept alive until the transport goes
  std::chrono::steady_clock::time_point last_watch_{};
  bool failed_ = false;
  int failed_peer_ = -1;
  std::string failed_reason_;
};

// The size of a caller's communicator for a join, after checking that MPI is initialized and `comm`
// is not MPI_COMM_NULL (invalid_argument otherwise).
int comm_size_of(MPI_Comm comm);
// comm_size_of's checks, and that `comm` holds exactly the group's ranks (config_mismatch otherwise).
void require_group_comm(MPI_Comm comm, const GroupConfig& config);

}  // namespace moedist::mpi
