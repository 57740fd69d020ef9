// The transport interface: how ranks exchange small records and reach each other's windows. It moves
// bytes and knows nothing about MoE; the operators in src/ops compose it with src/contract.
//
// This is the extension interface for new transports (docs/architecture.md, "Adding a transport"):
// a transport is a subclass in a folder of its own under src/transport/, made by that folder's join
// function and listed in the registry (registry.h). tests/transport/conformance.cpp checks the
// guarantees below over every transport; every implementation must give all of them.
//
// Ranks and hosts. rank() is this rank's place in 0..size()-1, fixed for the transport's life. Ranks
// are grouped into hosts 0..host_count()-1 (host_of(rank)); a transport without hosts has one. Ranks of
// one host can address each other's windows; ranks of different hosts reach each other only through
// exchange(). Collective calls (allgather, resize_window, exchange) are made by every rank in the same
// order. Each waits at most the transport's timeout (WaitOptions::timeout); a wait that ends without
// the peer raises a PeerError with ErrorCode::timeout naming the missing peer (PeerError::peer(), and
// the message) and the caller's `phase` (PeerError::phase()). A peer seen to have died (its process
// exited, its connection closed) is reported sooner, as ErrorCode::peer_lost naming it. After any such
// failure the transport stays failed: every later call raises at once rather than waiting again.
//
// Windows. Every rank owns a window, a byte region that the ranks of its host can load from and store
// to; windows of different ranks may have different sizes (window_size(rank)). resize_window grows
// this rank's window to at least the bytes asked for and keeps one that is already long enough. The
// new window's contents are unspecified, but the previous window stays mapped, its contents intact,
// until the next resize_window, so that views into it which a caller passes back stay valid for the
// call that resized. A rank's view of the windows (window(rank), window_size(rank)) changes only when
// its own resize_window returns, never under it while it still reads a peer's window from the previous
// step; from then on it sees every same-host rank's new window, and ranks of other hosts have
// window(rank) == nullptr.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/cpu_placement.h"

namespace moedist {

// How a waiting rank waits before it sleeps. A rank that is running arrives within microseconds, far
// sooner than a sleeping waiter is woken (on a virtual machine, waking a halted vCPU takes hundreds of
// microseconds), so waiters first spin, and when ranks outnumber cores they yield the core instead of
// holding it, so the rank they wait for can run.
struct WaitPolicy {
  std::chrono::microseconds spin{0};   // busy-wait this long (with a pause hint)
  std::chrono::microseconds yield{0};  // then sched_yield() in a loop this long, then sleep
  // Past those, while the awaited rank is busy (inside an operator call, Transport::set_busy): go on
  // spinning or yielding rather than sleep. The rank is on its way to the step; waking a sleeper would
  // cost more than its remaining work usually does, and under a competing load far more.
  enum class WhileBusy : std::uint8_t { sleep, spin, yield };
  WhileBusy while_busy = WhileBusy::sleep;
};

// `requested` >= 0: spin that long, never yield, and sleep after it whatever the awaited rank does.
// Negative (automatic): spin 200 us, and on while the awaited rank is busy, when every one of
// `world_size` ranks can have a core of its own; else yield for up to 2 ms, and on while it is busy.
WaitPolicy wait_policy(std::chrono::microseconds requested, int world_size) noexcept;

// A pause hint for spin loops.
inline void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// The pauses of a wait for a busy rank (WaitPolicy::while_busy). Spinning also yields the core every
// 20 us: that costs a system call when no other thread wants the core, and gives the core up when one
// does, for instead of holding a core through whole scheduler slices while the awaited rank waits for
// one, the waiter lets it (or whatever holds its core) run.
class BusyPause {
 public:
  explicit BusyPause(WaitPolicy::WhileBusy mode) noexcept : mode_(mode) {}
  void operator()() noexcept;

 private:
  WaitPolicy::WhileBusy mode_;
  std::chrono::steady_clock::time_point next_yield_ = std::chrono::steady_clock::now() + kYieldEvery;
  static constexpr std::chrono::microseconds kYieldEvery{20};
};

class Transport {
 public:
  virtual ~Transport() = default;

  virtual int rank() const noexcept = 0;
  virtual int size() const noexcept = 0;

  // Collective: every rank contributes `bytes` bytes; `out` receives size() * bytes, in rank order.
  // It is also a barrier: no rank returns before every rank has entered.
  virtual void allgather(const void* in, std::size_t bytes, void* out, std::string_view phase) = 0;

  // How long this rank waited for each rank in its last allgather: per rank, the nanoseconds from this
  // rank's entry until that rank had entered too (on one machine, from both entry times; from another
  // machine, until its record arrived), 0 when it was there first and for this rank itself. `out` has
  // size() entries. The V2 operators' performance_info reports these (V2 §5.1). A transport that cannot
  // tell reports zeros (the default).
  virtual void last_allgather_waits(std::span<std::int64_t> out) const;

  // A hint from the operators: true while this rank is inside an operator call (between its
  // collectives it works toward the next one), false outside (the caller's own work, which may take
  // long). Ranks waiting for a busy rank keep spinning or yielding instead of sleeping
  // (WaitPolicy::while_busy). A transport may ignore it (the default).
  virtual void set_busy(bool /*busy*/) noexcept {}

  // Collective: this rank's window becomes at least `bytes` long (each rank passes its own need; a
  // window already that long is kept as it is). The new window's contents are unspecified; the previous
  // window of this rank stays mapped with its contents until the next resize, so views into it that a
  // caller passes back stay valid for the call that resized.
  virtual void resize_window(std::size_t bytes, std::string_view phase) = 0;

  // Size of any rank's window, this host's or another's.
  virtual std::size_t window_size(int rank) const noexcept = 0;
  // Base address of `rank`'s window in this process, valid until the next resize_window; nullptr for a
  // rank on another host.
  virtual std::byte* window(int rank) noexcept = 0;

  // Hosts are numbered 0..host_count()-1; a transport without hosts has one.
  virtual int host_count() const noexcept { return 1; }
  virtual int host_of(int /*rank*/) const noexcept { return 0; }
  // A short name of a host for messages (a node name, or "virtual host 2 of node n1").
  virtual std::string host_name(int host) const;

  // One message to one peer.
  struct Outgoing {
    int peer;
    const std::byte* data;
    std::size_t bytes;
  };
  // Collective point-to-point round: sends each message of `out` to its peer and receives exactly one
  // message from each rank of `from` into in[i] (resized to the message; sizes need not be known in
  // advance). Every rank calls it in the same order, with matching lists. Waits at most the timeout.
  virtual void exchange(std::span<const Outgoing> out, std::span<const int> from, std::span<std::vector<std::byte>> in,
                        std::string_view phase);
};

}  // namespace moedist
