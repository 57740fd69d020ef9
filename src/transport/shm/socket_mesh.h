// A full mesh of Unix stream sockets between the processes of one job, found through Linux abstract
// socket names ("\0moedist.<job>.<rank>": no file system entry, nothing to clean up). Every connection
// is authenticated with SO_PEERCRED (same uid) and a hello carrying the job, world size, rank and pid.
// It carries only small control messages and file descriptors (SCM_RIGHTS); it knows nothing about MoE.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace moedist::shm {

class SocketMesh {
 public:
  // Connects to every other rank of `job`; each call waits at most until `deadline`.
  SocketMesh(const std::string& job, int rank, int world_size, std::chrono::steady_clock::time_point deadline);
  ~SocketMesh();
  SocketMesh(const SocketMesh&) = delete;
  SocketMesh& operator=(const SocketMesh&) = delete;

  int rank() const noexcept { return rank_; }
  int size() const noexcept { return world_; }
  int peer_pid(int peer) const noexcept { return pids_[static_cast<std::size_t>(peer)]; }

  // Sends `bytes` bytes and optionally one file descriptor (fd < 0: none) to `peer`.
  void send(int peer, const void* data, std::size_t bytes, int fd, const char* phase);
  // Receives exactly `bytes` bytes from `peer`, and the file descriptor sent with them (or -1).
  int receive(int peer, void* data, std::size_t bytes, std::chrono::steady_clock::time_point deadline, const char* phase);
  // True when `peer`'s end of the connection is closed: the process exited or was killed.
  bool peer_gone(int peer) const noexcept;

 private:
  int rank_, world_;
  int claim_ = -1;         // bound to "moedist.<job>.claim.<rank>" while the mesh lives
  std::vector<int> fds_;   // connection to each peer (-1 for self)
  std::vector<int> pids_;
};

// The job-independent part of the abstract socket name, for tests and messages.
std::string socket_name(const std::string& job, int rank);

}  // namespace moedist::shm
