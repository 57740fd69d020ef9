#include "transport/shm/socket_mesh.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <thread>

#include "moedist/error.h"

namespace moedist::shm {
namespace {

using Clock = std::chrono::steady_clock;

constexpr std::uint64_t kHelloMagic = 0x6d6f656469737431ull;  // "moedist1"

struct Hello {
  std::uint64_t magic = kHelloMagic;
  std::uint64_t job_hash = 0;
  std::int32_t world = 0;
  std::int32_t rank = 0;
  std::int32_t pid = 0;
  std::int32_t uid = 0;
};

std::uint64_t hash_job(const std::string& job) {
  std::uint64_t h = 1469598103934665603ull;  // FNV-1a
  for (unsigned char c : job) h = (h ^ c) * 1099511628211ull;
  return h;
}

[[noreturn]] void fail_errno(ErrorCode code, int peer, const char* phase, const std::string& what) {
  throw PeerError(code, peer, phase, what + ": " + std::strerror(errno));
}

// A send or receive on a peer's connection failed: a reset or broken pipe means the process is gone.
[[noreturn]] void fail_io(int peer, const char* phase, const char* operation) {
  const int err = errno;
  const bool gone = err == ECONNRESET || err == EPIPE || err == ENOTCONN;
  throw PeerError(gone ? ErrorCode::peer_lost : ErrorCode::peer_failed, peer, phase,
                  "rank " + std::to_string(peer) + (gone ? " exited or was killed" : " is unreachable") + " (" +
                      operation + ": " + std::strerror(err) + ") in phase '" + phase + "'");
}

sockaddr_un address_of(const std::string& job, int rank, socklen_t* len) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  const std::string name = socket_name(job, rank);
  if (name.size() + 1 > sizeof(addr.sun_path)) {
    throw Error(ErrorCode::invalid_argument, "job name '" + job + "' is too long for a socket name (at most " +
                                                 std::to_string(sizeof(addr.sun_path) - 24) + " characters)");
  }
  addr.sun_path[0] = '\0';  // abstract namespace: no file system entry
  std::memcpy(addr.sun_path + 1, name.data(), name.size());
  *len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + name.size());
  return addr;
}

int remaining_ms(Clock::time_point deadline) {
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
  return left <= 0 ? 0 : static_cast<int>(std::min<long long>(left, 1 << 30));
}

// Waits until `fd` is readable (or closed), at most until the deadline.
bool wait_readable(int fd, Clock::time_point deadline) {
  for (;;) {
    pollfd p{fd, POLLIN, 0};
    const int n = ::poll(&p, 1, remaining_ms(deadline));
    if (n > 0) return true;
    if (n == 0) return false;
    if (errno != EINTR) return false;
  }
}

void write_all(int fd, const void* data, std::size_t bytes, int peer, const char* phase) {
  const auto* p = static_cast<const char*>(data);
  while (bytes > 0) {
    const ssize_t n = ::send(fd, p, bytes, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) fail_io(peer, phase, "send");
    p += n;
    bytes -= static_cast<std::size_t>(n);
  }
}

void read_exact(int fd, void* data, std::size_t bytes, Clock::time_point deadline, int peer, const char* phase) {
  auto* p = static_cast<char*>(data);
  while (bytes > 0) {
    if (!wait_readable(fd, deadline)) {
      throw PeerError(ErrorCode::timeout, peer, phase,
                      "timed out in phase '" + std::string(phase) + "' waiting for rank " + std::to_string(peer));
    }
    const ssize_t n = ::recv(fd, p, bytes, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n == 0) {
      throw PeerError(ErrorCode::peer_lost, peer, phase,
                      "rank " + std::to_string(peer) + " exited or was killed (its connection closed) in phase '" +
                          std::string(phase) + "'");
    }
    if (n < 0) fail_io(peer, phase, "recv");
    p += n;
    bytes -= static_cast<std::size_t>(n);
  }
}

}  // namespace

std::string socket_name(const std::string& job, int rank) { return "moedist." + job + "." + std::to_string(rank); }

SocketMesh::SocketMesh(const std::string& job, int rank, int world_size, Clock::time_point deadline)
    : rank_(rank),
      world_(world_size),
      fds_(static_cast<std::size_t>(world_size), -1),
      pids_(static_cast<std::size_t>(world_size), 0) {
  if (job.empty()) throw Error(ErrorCode::invalid_argument, "job name must not be empty");
  if (world_size < 1 || rank < 0 || rank >= world_size) {
    throw Error(ErrorCode::invalid_argument,
                "rank " + std::to_string(rank) + " is outside the world of " + std::to_string(world_size));
  }
  Hello mine;
  mine.job_hash = hash_job(job);
  mine.world = world_size;
  mine.rank = rank;
  mine.pid = static_cast<std::int32_t>(::getpid());
  mine.uid = static_cast<std::int32_t>(::getuid());
  const char* phase = "connect";

  // Everything this constructor opened is closed on any error: a destructor does not run for a
  // constructor that throws, and a claim left bound would make a retry report "already taken".
  int listener = -1;
  const auto cleanup = [&] {
    if (listener >= 0) ::close(listener);
    listener = -1;
    if (claim_ >= 0) ::close(claim_);
    claim_ = -1;
    for (int& fd : fds_) {
      if (fd >= 0) ::close(fd);
      fd = -1;
    }
  };
  try {
    // Claim the rank for the life of the mesh: a second process that says it is this rank fails here,
    // at once, instead of racing for the connections.
    {
      claim_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
      if (claim_ < 0) fail_errno(ErrorCode::internal, rank, phase, "socket");
      socklen_t len = 0;
      const sockaddr_un addr = address_of(job + ".claim", rank, &len);
      if (::bind(claim_, reinterpret_cast<const sockaddr*>(&addr), len) != 0) {
        const int err = errno;
        ::close(claim_);
        claim_ = -1;
        errno = err;
        fail_errno(
            ErrorCode::config_mismatch, rank, phase,
            "rank " + std::to_string(rank) + " of job '" + job + "' is already taken by another process on this host");
      }
    }

    // Listen for the higher ranks; connect to the lower ones.
    if (rank + 1 < world_size) {
      listener = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
      if (listener < 0) fail_errno(ErrorCode::internal, rank, phase, "socket");
      socklen_t len = 0;
      const sockaddr_un addr = address_of(job, rank, &len);
      if (::bind(listener, reinterpret_cast<const sockaddr*>(&addr), len) != 0) {
        const int err = errno;
        ::close(listener);
        listener = -1;
        errno = err;
        fail_errno(ErrorCode::config_mismatch, rank, phase,
                   "rank " + std::to_string(rank) + " of job '" + job + "' is already taken on this host (bind)");
      }
      if (::listen(listener, world_size) != 0) fail_errno(ErrorCode::internal, rank, phase, "listen");
    }
    const auto check_peer = [&](int fd, const Hello& theirs, int expected_rank) {
      ucred cred{};
      socklen_t cred_len = sizeof(cred);
      if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &cred_len) != 0)
        fail_errno(ErrorCode::internal, expected_rank, phase, "SO_PEERCRED");
      if (theirs.magic != kHelloMagic || theirs.job_hash != mine.job_hash) {
        throw PeerError(ErrorCode::protocol, expected_rank, phase,
                        "a process that is not part of job '" + job + "' connected");
      }
      if (cred.uid != ::getuid() || static_cast<int>(cred.pid) != theirs.pid) {
        throw PeerError(ErrorCode::protocol, expected_rank, phase,
                        "the process claiming rank " + std::to_string(theirs.rank) + " runs as uid " +
                            std::to_string(cred.uid) + " (pid " + std::to_string(cred.pid) +
                            "); only processes of the same user may join");
      }
      if (theirs.world != world_size) {
        throw PeerError(ErrorCode::config_mismatch, theirs.rank, phase,
                        "rank " + std::to_string(theirs.rank) + " says the world has " + std::to_string(theirs.world) +
                            " ranks, rank " + std::to_string(rank) + " says " + std::to_string(world_size));
      }
      if (expected_rank >= 0 && theirs.rank != expected_rank) {
        throw PeerError(ErrorCode::protocol, expected_rank, phase, "connected to the wrong rank");
      }
    };
    for (int peer = 0; peer < rank; ++peer) {
      socklen_t len = 0;
      const sockaddr_un addr = address_of(job, peer, &len);
      int fd = -1;
      for (;;) {
        fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0) fail_errno(ErrorCode::internal, peer, phase, "socket");
        if (::connect(fd, reinterpret_cast<const sockaddr*>(&addr), len) == 0) break;
        ::close(fd);
        if (Clock::now() >= deadline) {
          throw PeerError(ErrorCode::timeout, peer, phase,
                          "rank " + std::to_string(rank) + ": timed out in phase 'connect' waiting for rank " +
                              std::to_string(peer) + " of job '" + job + "' to start");
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
      }
      fds_[static_cast<std::size_t>(peer)] = fd;
      write_all(fd, &mine, sizeof(mine), peer, phase);
      Hello theirs;
      read_exact(fd, &theirs, sizeof(theirs), deadline, peer, phase);
      check_peer(fd, theirs, peer);
      pids_[static_cast<std::size_t>(peer)] = theirs.pid;
    }
    for (int accepted = rank + 1; accepted < world_size; ++accepted) {
      if (!wait_readable(listener, deadline)) {
        int missing = -1;
        for (int r = rank + 1; r < world_size && missing < 0; ++r) {
          if (fds_[static_cast<std::size_t>(r)] < 0) missing = r;
        }
        throw PeerError(ErrorCode::timeout, missing, phase,
                        "rank " + std::to_string(rank) + ": timed out in phase 'connect' waiting for rank " +
                            std::to_string(missing) + " of job '" + job + "' to start");
      }
      const int fd = ::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd < 0) fail_errno(ErrorCode::internal, rank, phase, "accept");
      Hello theirs;
      try {
        read_exact(fd, &theirs, sizeof(theirs), deadline, -1, phase);
        // Answer before judging, so that a peer with a different world size sees the mismatch too.
        if (theirs.magic == kHelloMagic && theirs.job_hash == mine.job_hash)
          write_all(fd, &mine, sizeof(mine), theirs.rank, phase);
        check_peer(fd, theirs, -1);
      } catch (...) {
        ::close(fd);
        throw;
      }
      if (theirs.rank <= rank || theirs.rank >= world_size || fds_[static_cast<std::size_t>(theirs.rank)] >= 0) {
        ::close(fd);
        throw PeerError(ErrorCode::config_mismatch, theirs.rank, phase,
                        "two processes claim rank " + std::to_string(theirs.rank) + " of job '" + job + "'");
      }
      fds_[static_cast<std::size_t>(theirs.rank)] = fd;
      pids_[static_cast<std::size_t>(theirs.rank)] = theirs.pid;
    }
  } catch (...) {
    cleanup();
    throw;
  }
  // Everyone is connected: stop listening, so the name disappears and nobody else can join.
  if (listener >= 0) ::close(listener);
  pids_[static_cast<std::size_t>(rank)] = mine.pid;
}

SocketMesh::~SocketMesh() {
  for (int fd : fds_) {
    if (fd >= 0) ::close(fd);
  }
  if (claim_ >= 0) ::close(claim_);
}

void SocketMesh::send(int peer, const void* data, std::size_t bytes, int fd, const char* phase) {
  const int sock = fds_[static_cast<std::size_t>(peer)];
  if (fd < 0) {
    write_all(sock, data, bytes, peer, phase);
    return;
  }
  iovec iov{const_cast<void*>(data), bytes};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof(control);
  cmsghdr* cm = CMSG_FIRSTHDR(&msg);
  cm->cmsg_level = SOL_SOCKET;
  cm->cmsg_type = SCM_RIGHTS;
  cm->cmsg_len = CMSG_LEN(sizeof(int));
  std::memcpy(CMSG_DATA(cm), &fd, sizeof(int));
  ssize_t n;
  do {
    n = ::sendmsg(sock, &msg, MSG_NOSIGNAL);
  } while (n < 0 && errno == EINTR);
  if (n < 0) fail_io(peer, phase, "sendmsg");
  // The descriptor travels with the first byte; send whatever the kernel did not take.
  if (static_cast<std::size_t>(n) < bytes)
    write_all(sock, static_cast<const char*>(data) + n, bytes - static_cast<std::size_t>(n), peer, phase);
}

int SocketMesh::receive(int peer, void* data, std::size_t bytes, Clock::time_point deadline, const char* phase) {
  const int sock = fds_[static_cast<std::size_t>(peer)];
  if (!wait_readable(sock, deadline)) {
    throw PeerError(ErrorCode::timeout, peer, phase,
                    "rank " + std::to_string(rank_) + ": timed out in phase '" + phase + "' waiting for rank " +
                        std::to_string(peer));
  }
  iovec iov{data, bytes};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof(control);
  ssize_t n;
  do {
    n = ::recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
  } while (n < 0 && errno == EINTR);
  if (n == 0) {
    throw PeerError(
        ErrorCode::peer_lost, peer, phase,
        "rank " + std::to_string(peer) + " exited or was killed (its connection closed) in phase '" + phase + "'");
  }
  if (n < 0) fail_io(peer, phase, "recvmsg");
  int fd = -1;
  for (cmsghdr* cm = CMSG_FIRSTHDR(&msg); cm != nullptr; cm = CMSG_NXTHDR(&msg, cm)) {
    if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS && cm->cmsg_len == CMSG_LEN(sizeof(int))) {
      std::memcpy(&fd, CMSG_DATA(cm), sizeof(int));
    }
  }
  if ((msg.msg_flags & MSG_CTRUNC) != 0) {
    if (fd >= 0) ::close(fd);
    throw PeerError(ErrorCode::protocol, peer, phase,
                    "rank " + std::to_string(peer) + " sent more descriptors than expected");
  }
  if (static_cast<std::size_t>(n) < bytes) {
    try {
      read_exact(sock, static_cast<char*>(data) + n, bytes - static_cast<std::size_t>(n), deadline, peer, phase);
    } catch (...) {
      if (fd >= 0) ::close(fd);
      throw;
    }
  }
  return fd;
}

bool SocketMesh::peer_gone(int peer) const noexcept {
  pollfd p{fds_[static_cast<std::size_t>(peer)], POLLRDHUP, 0};
  return ::poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR)) != 0;
}

}  // namespace moedist::shm
