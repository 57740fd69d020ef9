#include "transport/transport.h"

#include <string>
#include <thread>

#include "moedist/error.h"

namespace moedist {

WaitPolicy wait_policy(std::chrono::microseconds requested, int world_size) noexcept {
  using WhileBusy = WaitPolicy::WhileBusy;
  if (requested.count() >= 0) return WaitPolicy{requested, std::chrono::microseconds(0), WhileBusy::sleep};
  const unsigned cores = std::thread::hardware_concurrency();
  if (cores != 0 && static_cast<unsigned>(world_size) <= cores)
    return WaitPolicy{std::chrono::microseconds(200), {}, WhileBusy::spin};
  return WaitPolicy{std::chrono::microseconds(0), std::chrono::microseconds(2000), WhileBusy::yield};
}

void BusyPause::operator()() noexcept {
  if (mode_ == WaitPolicy::WhileBusy::spin) {
    cpu_relax();
    const auto now = std::chrono::steady_clock::now();
    if (now < next_yield_) return;
    next_yield_ = now + kYieldEvery;
  }
  std::this_thread::yield();
}

void Transport::last_allgather_waits(std::span<std::int64_t> out) const {
  for (std::int64_t& w : out) w = 0;
}

std::string Transport::host_name(int host) const { return "host " + std::to_string(host); }

void Transport::exchange(std::span<const Outgoing> out, std::span<const int> from, std::span<std::vector<std::byte>>,
                         std::string_view phase) {
  if (!out.empty() || !from.empty()) {
    throw Error(ErrorCode::internal,
                "phase '" + std::string(phase) + "': this transport has one host and no point-to-point messages");
  }
}

}  // namespace moedist
