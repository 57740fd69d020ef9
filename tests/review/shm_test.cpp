// Review fixes of the shared-memory transport, tested with one forked process per rank.
#include "moedist/shm.h"

#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <fstream>
#include <string>

#include "moedist/error.h"
#include "process/rank_processes.h"
#include "transport/shm/shm_transport.h"

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

std::size_t virtual_bytes() {
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

}  // namespace
}  // namespace moedist::testing
