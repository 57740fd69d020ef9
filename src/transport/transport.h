// The transport interface: how ranks exchange small records and reach each other's windows.
// It moves bytes and knows nothing about MoE; the operators in src/ops compose it with src/contract.
//
// Every rank owns a window (a byte region all ranks of the world can load from and store to). Rank
// windows may have different sizes. Collective calls (allgather, resize_window) must be made by every
// rank in the same order; each waits at most the transport's timeout and then raises a PeerError that
// names the missing peer and the phase. After such a failure the transport stays failed.
#pragma once

#include <cstddef>
#include <string_view>

namespace moedist {

class Transport {
 public:
  virtual ~Transport() = default;

  virtual int rank() const noexcept = 0;
  virtual int size() const noexcept = 0;

  // Collective: every rank contributes `bytes` bytes; `out` receives size() * bytes, in rank order.
  // It is also a barrier: no rank returns before every rank has entered.
  virtual void allgather(const void* in, std::size_t bytes, void* out, std::string_view phase) = 0;

  // Collective: this rank's window becomes at least `bytes` long (each rank passes its own need).
  // Contents are not preserved. The previous window of this rank stays readable until the next resize,
  // so views into it that a caller passes back stay valid for the call that resized.
  virtual void resize_window(std::size_t bytes, std::string_view phase) = 0;

  virtual std::size_t window_size(int rank) const noexcept = 0;
  // Base address of `rank`'s window in this process; valid until the next resize_window.
  virtual std::byte* window(int rank) noexcept = 0;
};

}  // namespace moedist
