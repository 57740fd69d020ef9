// Review fixes of the shared-memory transport, tested with one forked process per rank.
#include "moedist/shm.h"

#include <dirent.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <string>

#include "moedist/error.h"
#include "process/rank_processes.h"
#include "transport/shm/shm_transport.h"
#include "transport/shm/socket_mesh.h"

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define MOEDIST_REVIEW_SANITIZER 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define MOEDIST_REVIEW_SANITIZER 1
#endif
#endif

namespace moedist::testing {
namespace {

// What one rank reports to the parent, through a shared anonymous mapping.
struct Report {
  std::atomic<int> stage;  // how far the body got
  int resize_code;         // -1: resize_window returned
  int resize_peer;
  int next_code;  // the call after it: -1 returned
  int next_peer;
  char message[512];
};

[[maybe_unused]] std::size_t virtual_bytes() {  // unused where a sanitizer skips its test
  std::ifstream in("/proc/self/statm");
  std::size_t pages = 0;
  in >> pages;
  return pages * static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
}

// Item 3: rank 0 cannot map rank 1's grown window (RLIMIT_AS just above its use). Every rank must raise
// the same named error and every rank's transport must be failed afterwards, with nothing hanging.
TEST(ReviewShm, FailedMapOfGrownWindowFailsEveryRankAlike) {
#ifdef MOEDIST_REVIEW_SANITIZER
  GTEST_SKIP() << "RLIMIT_AS cannot be used under a sanitizer (it reserves terabytes of virtual memory)";
#else
  constexpr int kWorld = 2;
  auto* reports = static_cast<Report*>(
      ::mmap(nullptr, sizeof(Report) * kWorld, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0));
  ASSERT_NE(reports, MAP_FAILED);
  std::memset(static_cast<void*>(reports), 0, sizeof(Report) * kWorld);
  const std::string job = "review-shm-map-" + std::to_string(::getpid());
  process::RankProcesses ranks;
  for (int r = 0; r < kWorld; ++r) {
    ranks.start([&, r] {
      ::alarm(60);  // a second guard against a hang
      Report& rep = reports[r];
      rep.resize_code = rep.next_code = -1;
      ShmOptions options;
      options.wait.timeout = std::chrono::milliseconds(5000);
      shm::ShmTransport t(job, r, kWorld, options);
      rep.stage = 1;
      if (r == 0) {
        const rlim_t limit = virtual_bytes() + (64u << 20);
        const rlimit rl{limit, limit};
        if (::setrlimit(RLIMIT_AS, &rl) != 0) return 3;
      }
      const std::size_t grow = r == 1 ? (std::size_t{1} << 30) : 0;  // 1 GiB: far past rank 0's limit
      try {
        t.resize_window(grow, "grow");
      } catch (const PeerError& e) {
        rep.resize_code = static_cast<int>(e.code());
        rep.resize_peer = e.peer();
        std::strncpy(rep.message, e.what(), sizeof(rep.message) - 1);
      }
      rep.stage = 2;
      try {
        int in = r, out[kWorld] = {};
        t.allgather(&in, sizeof(in), out, "next");
      } catch (const PeerError& e) {
        rep.next_code = static_cast<int>(e.code());
        rep.next_peer = e.peer();
      }
      rep.stage = 3;
      return 0;
    });
  }
  const auto start = std::chrono::steady_clock::now();
  const auto exits = ranks.wait();
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(40));
  for (int r = 0; r < kWorld; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    const Report& rep = reports[r];
    EXPECT_TRUE(exits[static_cast<std::size_t>(r)].ok()) << exits[static_cast<std::size_t>(r)].describe();
    ASSERT_EQ(rep.stage.load(), 3);
    EXPECT_EQ(rep.resize_code, static_cast<int>(ErrorCode::capacity)) << rep.message;
    EXPECT_EQ(rep.resize_peer, 0) << rep.message;  // the rank that could not map
    EXPECT_NE(std::string(rep.message).find("could not map"), std::string::npos) << rep.message;
    EXPECT_EQ(rep.next_code, static_cast<int>(ErrorCode::peer_failed));  // the group is failed everywhere
  }
  ::munmap(reports, sizeof(Report) * kWorld);
#endif
}

int open_fds() {
  DIR* d = ::opendir("/proc/self/fd");
  if (d == nullptr) return -1;
  int n = 0;
  while (::readdir(d) != nullptr) ++n;
  ::closedir(d);
  return n - 3;  // ".", ".." and the directory's own descriptor
}

int moedist_mappings() {
  std::ifstream in("/proc/self/maps");
  int n = 0;
  for (std::string line; std::getline(in, line);) n += line.find("moedist-") != std::string::npos ? 1 : 0;
  return n;
}

void set_nofile(rlim_t n) {
  rlimit rl{};
  ::getrlimit(RLIMIT_NOFILE, &rl);
  rl.rlim_cur = n;
  ::setrlimit(RLIMIT_NOFILE, &rl);
}

// Runs body in a child with only descriptors 0-2 open, so that the next descriptors are 3, 4, ...
// and RLIMIT_NOFILE decides which creation fails. body returns "" or what went wrong.
void in_child(const std::function<std::string()>& body) {
  auto* text = static_cast<char*>(::mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0));
  ASSERT_NE(text, MAP_FAILED);
  std::strcpy(text, "the child reported nothing");
  process::RankProcesses ranks;
  ranks.start([&] {
    ::alarm(60);
    for (int fd = 3; fd < 4096; ++fd) ::close(fd);
    const std::string failure = body();
    std::strncpy(text, failure.c_str(), 4095);
    return failure.empty() ? 0 : 1;
  });
  const auto exits = ranks.wait();
  EXPECT_TRUE(exits[0].ok()) << exits[0].describe() << ": " << text;
  EXPECT_STREQ(text, "");
  ::munmap(text, 4096);
}

// Item 10: the control memfd and its mapping must not leak when the window memfd cannot be created.
TEST(ReviewShm, NoDescriptorOrMappingLeaksWhenTheWindowCannotBeCreated) {
  const std::string job = "review-shm-nofile-" + std::to_string(::getpid());
  in_child([&]() -> std::string {
    const int fds = open_fds();
    const int maps = moedist_mappings();
    ShmOptions options;
    options.wait.timeout = std::chrono::milliseconds(3000);
    set_nofile(5);  // 3: the rank's claim socket, 4: the control memfd, 5: the window memfd fails
    bool threw = false;
    try {
      shm::ShmTransport t(job, 0, 1, options);
    } catch (const Error&) {
      threw = true;
    }
    set_nofile(64);
    if (!threw) return "the transport was created despite RLIMIT_NOFILE 5";
    if (open_fds() != fds)
      return "descriptors leaked: " + std::to_string(open_fds()) + " open, " + std::to_string(fds) + " before";
    if (moedist_mappings() != maps)
      return "mappings leaked: " + std::to_string(moedist_mappings()) + " moedist mappings, " + std::to_string(maps) +
             " before";
    try {
      shm::ShmTransport t(job, 0, 1, options);  // the retry joins
    } catch (const Error& e) {
      return std::string("the retry failed: ") + e.what();
    }
    return "";
  });
}

// Item 10: the claim must not stay bound when the listener cannot be created (a retry in the same
// process would otherwise report the rank "already taken").
TEST(ReviewShm, NoClaimOrListenerLeaksWhenTheMeshCannotListen) {
  const std::string job = "review-mesh-nofile-" + std::to_string(::getpid());
  in_child([&]() -> std::string {
    const int fds = open_fds();
    set_nofile(4);  // 3: the claim socket; the listener's socket fails
    bool threw = false;
    try {
      shm::SocketMesh m(job, 0, 2, std::chrono::steady_clock::now() + std::chrono::milliseconds(500));
    } catch (const Error&) {
      threw = true;
    }
    set_nofile(64);
    if (!threw) return "the mesh was created despite RLIMIT_NOFILE 4";
    if (open_fds() != fds)
      return "descriptors leaked: " + std::to_string(open_fds()) + " open, " + std::to_string(fds) + " before";
    try {
      shm::SocketMesh m(job, 0, 1, std::chrono::steady_clock::now() + std::chrono::milliseconds(2000));
    } catch (const Error& e) {
      return std::string("the retry failed: ") + e.what();
    }
    return "";
  });
}

}  // namespace
}  // namespace moedist::testing
