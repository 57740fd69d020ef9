// The messages of a CUDA group across hosts (bridge_messages.h).
#include "cuda/bridge_messages.h"

#include <algorithm>
#include <cstring>

#include "contract/layout.h"
#include "ops/host_messages.h"

namespace moedist::cuda {

namespace {

template <class T>
void put_all(std::vector<std::byte>& m, std::span<const T> values) {
  if (!values.empty()) std::memcpy(append(m, values.size_bytes()), values.data(), values.size_bytes());
}
template <class T>
void put(std::vector<std::byte>& m, const T& value) {
  std::memcpy(append(m, sizeof(T)), &value, sizeof(T));
}
std::size_t row_bytes(std::int64_t h) { return contract::align_up(static_cast<std::size_t>(h) * 2, 4); }
std::size_t count_of(std::int64_t n, std::size_t each) { return static_cast<std::size_t>(n) * each; }

}  // namespace

void write_rows_message(std::vector<std::byte>& m, RowsHeader head, const RowsContent& c, const BridgeLimits& limits) {
  if ((head.word & 1u) != 0) {  // a failed sender sends its flag word alone
    put(m, RowsHeader{head.word});
    return;
  }
  head.rows = static_cast<std::int32_t>(c.tokens.size());
  head.scale_rows = static_cast<std::int32_t>(c.smooth.size());
  put(m, head);
  put_all(m, c.ids);
  put_all(m, c.expand_idx);
  put_all(m, c.token_slot);
  if (head.has_expert_scales != 0) put_all(m, c.expert_scales);
  const std::size_t values = static_cast<std::size_t>(limits.h) * 2;
  for (const std::int32_t b : c.tokens) {
    put(m, b);
    std::byte* at = append(m, row_bytes(limits.h));
    std::memcpy(at, c.x.data() + static_cast<std::size_t>(b) * static_cast<std::size_t>(limits.h), values);
    std::fill(at + values, at + row_bytes(limits.h), std::byte{0});
  }
  for (const auto& [row, data] : c.smooth) {
    put(m, row);
    std::memcpy(append(m, static_cast<std::size_t>(limits.h) * 4), data, static_cast<std::size_t>(limits.h) * 4);
  }
}

std::uint64_t rows_message_word(const std::vector<std::byte>& message) {
  MessageReader in(message);
  RowsHeader head;
  return in.read(&head) ? head.word : 0;
}

bool read_rows_message(const std::vector<std::byte>& message, const BridgeLimits& lim, RowsMessage* out) {
  MessageReader in(message);
  RowsHeader& hd = out->head;
  if (!in.read(&hd) || (hd.word & 1u) != 0) return false;
  if (hd.bs < 0 || hd.bs > lim.max_bs || hd.k != lim.k || hd.h != lim.h || (hd.version != 1 && hd.version != 2) ||
      (hd.quant != 0 && hd.quant != 2) || (hd.bf16 != 0 && hd.bf16 != 1) ||
      (hd.has_expert_scales != 0 && hd.has_expert_scales != 1) ||
      (hd.has_scales != 0 && !(hd.has_scales == 1 && hd.quant == 2)) || hd.rows < 0 || hd.rows > hd.bs ||
      hd.scale_rows < 0 || hd.scale_rows > lim.scale_rows)
    return false;
  const std::int64_t n = hd.bs * hd.k;
  out->ids = in.take(count_of(n, 4));
  out->expand_idx = in.take(count_of(n, 4));
  out->token_slot = in.take(count_of(hd.bs, 4));
  out->expert_scales = hd.has_expert_scales != 0 ? in.take(count_of(n, 4)) : nullptr;
  if (out->ids == nullptr || out->expand_idx == nullptr || out->token_slot == nullptr ||
      (hd.has_expert_scales != 0 && out->expert_scales == nullptr))
    return false;
  for (std::int64_t t = 0; t < n; ++t) {
    std::int32_t id = 0, slot = 0;
    std::memcpy(&id, out->ids + 4 * t, 4);
    std::memcpy(&slot, out->expand_idx + 4 * t, 4);
    if ((hd.version == 1 || slot >= 0) && (id < 0 || id >= lim.E)) return false;
  }
  out->rows.clear();
  out->scale_rows.clear();
  for (std::int32_t i = 0; i < hd.rows; ++i) {
    std::int32_t b = -1;
    const std::byte* row = in.read(&b) ? in.take(row_bytes(lim.h)) : nullptr;
    if (row == nullptr || b < 0 || b >= hd.bs) return false;
    out->rows.emplace_back(b, row);
  }
  for (std::int32_t i = 0; i < hd.scale_rows; ++i) {
    std::int32_t r = -1;
    const std::byte* row = in.read(&r) ? in.take(static_cast<std::size_t>(lim.h) * 4) : nullptr;
    if (row == nullptr || r < 0 || r >= lim.scale_rows) return false;
    out->scale_rows.emplace_back(r, row);
  }
  return in.done();
}

bool rows_agree_with_record(const RowsMessage& m, const RecordHeader& rec, std::span<const std::int32_t> counts,
                            std::uint64_t seq, const BridgeLimits& lim) {
  const RowsHeader& hd = m.head;
  if ((hd.word >> 1) != seq || rec.failed != 0 || hd.bs != rec.bs || hd.k != rec.k || hd.h != rec.h ||
      hd.version != rec.version || hd.quant != rec.mode || hd.has_expert_scales != rec.has_expert_scales)
    return false;
  for (std::int64_t t = 0; t < hd.bs * hd.k; ++t) {
    std::int32_t id = 0, slot = 0;
    std::memcpy(&id, m.ids + 4 * t, 4);
    std::memcpy(&slot, m.expand_idx + 4 * t, 4);
    if (hd.version == 2 && slot < 0) continue;  // not sent
    // read_rows_message saw the id in [0, E): its block is (S + id / L, id % L).
    const auto entry = static_cast<std::size_t>((lim.S + id / lim.L) * lim.L + id % lim.L);
    if (entry >= counts.size() || slot < 0 || slot >= counts[entry]) return false;
  }
  for (std::int64_t b = 0; b < hd.bs && hd.version == 2; ++b) {
    std::int32_t token = 0;
    std::memcpy(&token, m.token_slot + 4 * b, 4);
    if (token < -1 || token >= rec.active) return false;
  }
  return true;
}

void write_requests(std::vector<std::byte>& m, std::uint64_t seq, std::span<const RemoteRequest> requests) {
  put(m, RequestsHeader{seq, static_cast<std::int64_t>(requests.size())});
  put_all(m, requests);
}

const std::byte* read_requests(const std::vector<std::byte>& message, std::int64_t most, std::uint64_t seq,
                               std::int64_t* n) {
  *n = 0;
  MessageReader in(message);
  RequestsHeader hd;
  if (!in.read(&hd) || hd.seq != seq || hd.n < 0 || hd.n > most || in.left() != count_of(hd.n, sizeof(RemoteRequest)))
    return nullptr;
  *n = hd.n;
  return in.take(in.left());
}

void write_reply_header(std::vector<std::byte>& m, bool failed, std::int64_t n) {
  put(m, ReplyHeader{failed ? 1 : 0, n});
}

bool read_reply(const std::vector<std::byte>& message, std::int64_t n, int W, std::size_t pitch, ReplyView* out) {
  MessageReader in(message);
  ReplyHeader hd;
  if (!in.read(&hd) || hd.failed != 0 || hd.n != n || in.left() != count_of(n, 8 + pitch) + count_of(W, 8))
    return false;
  out->entries = in.take(count_of(n, 8));
  out->counts = in.take(count_of(W, 8));
  out->rows = in.take(count_of(n, pitch));
  return true;
}

}  // namespace moedist::cuda
