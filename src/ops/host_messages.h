// What crosses hosts, in the messages of Transport::exchange(). Written by the sender, read by the
// receiver with a bounds-checked cursor (nothing a peer sends is trusted).
//
// Dispatch, sender -> its proxy on a host: one entry per token that has destinations there:
//   RemoteEntry, then `targets` RemoteTarget, then `payloads` rows of payload_stride() bytes:
//   one row for all targets (the token, or its int8 row when no smooth scales make the copies differ),
//   else one per target. A row is the token's H 16-bit values, or a float scale then H int8.
// Combine, source -> proxy: the RowRequest of every expert row it needs from that host (V2: the EP
// rank and the token's (b, k) slot, as V2's row index names it),
//   in the order it reduces them; proxy -> source: an int64 status (0, or an ErrorCode followed by the
//   message), then the rows in that order, each as it sits in the expert rank's window.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "contract/layout.h"

namespace moedist {

struct RemoteEntry {
  std::int32_t targets;
  std::int32_t payloads;
  std::int32_t token;  // the token's row in the sender's x (V2 triples)
};

// An expert row: code >= 0 names MoE expert `code`, code < 0 the shared expert of shared-expert rank
// -1 - code; slot is the row within the sender's block there (expand_idx, or the token's place in the
// rows the sender sends that shared-expert rank).
struct RemoteTarget {
  std::int32_t code;
  std::int32_t slot;
  float weight;
  std::int32_t k;  // V2: the triple's k (the entry's, or K + j for shared expert j)
};

// Combine: an expert row a source asks a proxy for, named as in RemoteTarget (V1), or by EP rank
// (code) and the token's slot b * (K + Sn) + k (V2).
struct RowRequest {
  std::int32_t code;
  std::int32_t slot;
};

inline std::int32_t shared_expert_code(int shared_rank) noexcept { return -1 - shared_rank; }

// Where an expert code from a peer points: its EP rank and local expert. False when the code names
// no expert of the topology (checked before any index is formed from it).
struct ExpertPlace {
  int ep = 0;
  int local = 0;
};
inline bool decode_expert(const contract::Topology& topo, std::int32_t code, ExpertPlace* out) noexcept {
  if (code < 0) {
    if (-1 - static_cast<std::int64_t>(code) >= topo.S) return false;
    *out = ExpertPlace{-1 - code, 0};
    return true;
  }
  if (code >= topo.E) return false;
  *out = ExpertPlace{topo.expert_rank(code), topo.expert_local(code)};
  return true;
}

// Bytes of one dispatch payload row; a multiple of 4, so every field of a message stays aligned.
inline std::size_t payload_stride(bool quant, std::int64_t h) noexcept {
  return quant ? 4 + contract::align_up(static_cast<std::size_t>(h), 4) : contract::align_up(static_cast<std::size_t>(h) * 2, 4);
}

// Appends n bytes to a message and returns where they go.
inline std::byte* append(std::vector<std::byte>& message, std::size_t n) {
  const std::size_t at = message.size();
  message.resize(at + n);
  return message.data() + at;
}

// A read cursor over a received message.
class MessageReader {
 public:
  explicit MessageReader(const std::vector<std::byte>& m) : p_(m.data()), left_(m.size()) {}
  bool done() const noexcept { return left_ == 0; }
  std::size_t left() const noexcept { return left_; }
  // Copies a T out, or returns false when fewer bytes are left.
  template <class T>
  bool read(T* out) noexcept {
    if (left_ < sizeof(T)) return false;
    std::memcpy(out, p_, sizeof(T));
    skip(sizeof(T));
    return true;
  }
  // n bytes in place, or nullptr when fewer are left.
  const std::byte* take(std::size_t n) noexcept {
    if (left_ < n) return nullptr;
    const std::byte* at = p_;
    skip(n);
    return at;
  }

 private:
  void skip(std::size_t n) noexcept {
    p_ += n;
    left_ -= n;
  }
  const std::byte* p_;
  std::size_t left_;
};

}  // namespace moedist
