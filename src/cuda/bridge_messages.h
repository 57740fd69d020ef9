// What crosses hosts in a CUDA group across hosts (host_bridge.cpp), as bytes: written by one rank, read
// by another, which checks every field before any of it is used as a size or an index (nothing a peer
// sends is trusted). Pure C++, no CUDA: tests/cuda_bridge_messages_test.cpp runs it in every build.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "cuda/device_state.h"

namespace moedist::cuda {

// Dispatch, sender -> its proxy on another host: this header, then (unless the sender failed: its flag
// word's failed bit, and nothing after the header) its routing state (ids and expand_idx [BS*K] int32,
// the V2 token numbers [BS] int32), its expert_scales [BS*K] float when it has them, then `rows` rows
// (the token b, int32, and its H 16-bit values, padded to 4 bytes) and `scale_rows` smooth-scale rows
// (the row, int32, and H floats). Where the sender's blocks start on each rank the proxy computes
// itself from the records (the same plan the sender made).
struct RowsHeader {
  std::uint64_t word = 0;  // the sender's flag word of this call: (seq << 1) | failed
  std::int64_t bs = 0;
  std::int32_t k = 0, h = 0, version = 0, quant = 0, bf16 = 0, has_expert_scales = 0, has_scales = 0;
  std::int32_t rows = 0, scale_rows = 0, unused = 0;
};

// The sender's routing state and inputs, as the kernels left them (host copies).
struct RowsContent {
  std::span<const std::int32_t> ids, expand_idx, token_slot;
  std::span<const float> expert_scales;                       // empty without them
  std::span<const std::uint16_t> x;                           // (BS, H), contiguous
  std::vector<std::int32_t> tokens;                           // the rows to send, ascending
  std::vector<std::pair<std::int32_t, const float*>> smooth;  // smooth-scale rows to send: (row, H floats)
};

// The group's shapes a message is checked against.
struct BridgeLimits {
  std::int64_t max_bs = 0, k = 0, h = 0;
  std::int64_t scale_rows = 0;  // rows a `scales` argument may have: E + max(1, Sn)
  int E = 0, S = 0, L = 0;
};

// A rows message that passed the checks: views into it.
struct RowsMessage {
  RowsHeader head;
  const std::byte *ids = nullptr, *expand_idx = nullptr, *token_slot = nullptr, *expert_scales = nullptr;
  std::vector<std::pair<std::int32_t, const std::byte*>> rows;        // (token b, H 16-bit values)
  std::vector<std::pair<std::int32_t, const std::byte*>> scale_rows;  // (row, H floats)
};

// Appends the message of a sender whose header is `head` (rows and scale_rows are set from `content`).
void write_rows_message(std::vector<std::byte>& message, RowsHeader head, const RowsContent& content,
                        const BridgeLimits& limits);
// Whether `message` is a well-formed rows message of a sender that did not fail, within `limits`: the
// shapes, every id that names a block (V1 every entry; V2 the sent ones, expand_idx >= 0) an expert in
// [0, E), every row's token in [0, BS), every scale row in [0, scale_rows), and nothing left over.
bool read_rows_message(const std::vector<std::byte>& message, const BridgeLimits& limits, RowsMessage* out);
// The flag word a rows message carries, or 0 when it has no header.
std::uint64_t rows_message_word(const std::vector<std::byte>& message);
// Whether a read rows message agrees with what its sender published for call `seq`: the call (its seq,
// BS, K, H, operator version, quant mode, expert_scales given) is its record's, and every row index it
// names lies in its block: expand_idx of a sent entry below the rows its record sends that expert
// (`counts`: the record's W * L entries), a V2 token number below its active tokens (or -1).
bool rows_agree_with_record(const RowsMessage& m, const RecordHeader& record, std::span<const std::int32_t> counts,
                            std::uint64_t seq, const BridgeLimits& limits);

// Combine, source -> proxy: this header, then n RemoteRequest (the proxy's kernel checks each one).
struct RequestsHeader {
  std::uint64_t seq = 0;
  std::int64_t n = 0;
};
void write_requests(std::vector<std::byte>& message, std::uint64_t seq, std::span<const RemoteRequest> requests);
// The requests (n RemoteRequest, as bytes) of a well-formed message of call `seq` with at most `most` of
// them, or nullptr (n = 0).
const std::byte* read_requests(const std::vector<std::byte>& message, std::int64_t most, std::uint64_t seq,
                               std::int64_t* n);

// Combine, proxy -> source: this header, then n index entries (uint64), W holder counts (int64) and n
// rows of `pitch` bytes; failed != 0: the proxy failed, and nothing follows.
struct ReplyHeader {
  std::int64_t failed = 0;
  std::int64_t n = 0;
};
struct ReplyView {
  const std::byte* entries = nullptr;
  const std::byte* counts = nullptr;
  const std::byte* rows = nullptr;
};
// Begins an answer to n requests (failed: the request message broke a rule; nothing may follow).
void write_reply_header(std::vector<std::byte>& message, bool failed, std::int64_t n);
// Whether `message` answers n requests in full and without a failure, for a group of W EP ranks.
bool read_reply(const std::vector<std::byte>& message, std::int64_t n, int W, std::size_t pitch, ReplyView* out);

}  // namespace moedist::cuda
