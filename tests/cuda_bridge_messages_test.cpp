// The messages a CUDA group across hosts sends between hosts (src/cuda/bridge_messages.h): what a
// sender writes reads back field for field, and every way a peer's message can break a rule (short,
// long, shapes that are not the group's, ids that name no expert, rows of tokens it does not have,
// scale rows past the end) is refused before anything in it is used.
#include <gtest/gtest.h>

#include <cstring>
#include <functional>
#include <vector>

#include "cuda/bridge_messages.h"

namespace moedist::cuda {
namespace {

// A group of W = 4 EP ranks, 2 experts each (E = 8), no shared-expert ranks; K = 2, H = 3, max_bs 4.
BridgeLimits limits() { return BridgeLimits{4, 2, 3, 8 + 1, 8, 0, 2}; }

struct Sender {
  std::vector<std::int32_t> ids{0, 7, 3, 4, 5, 1}, expand_idx{0, 0, 0, 0, 1, 0}, token_slot{0, 0, 0};
  std::vector<float> expert_scales{0.5f, 0.25f, 1.0f, 2.0f, 3.0f, 4.0f};
  std::vector<std::uint16_t> x{1, 2, 3, 4, 5, 6, 7, 8, 9};  // (BS = 3, H = 3)
  std::vector<float> smooth_row = {1.5f, 2.5f, 3.5f};

  RowsHeader head() const {
    RowsHeader h;
    h.word = (5u << 1);
    h.bs = 3;
    h.k = 2;
    h.h = 3;
    h.version = 1;
    h.quant = 2;
    h.bf16 = 1;
    h.has_expert_scales = 1;
    h.has_scales = 1;
    return h;
  }
  std::vector<std::byte> message(const RowsHeader& h) const {
    RowsContent c;
    c.ids = ids;
    c.expand_idx = expand_idx;
    c.token_slot = token_slot;
    c.expert_scales = expert_scales;
    c.x = x;
    c.tokens = {0, 2};
    c.smooth = {{8, smooth_row.data()}};
    std::vector<std::byte> m;
    write_rows_message(m, h, c, limits());
    return m;
  }
};

template <class T>
T at(const std::byte* p, std::size_t i) {
  T v;
  std::memcpy(&v, p + i * sizeof(T), sizeof(T));
  return v;
}

TEST(CudaBridgeMessages, RowsReadBackAsWritten) {
  const Sender s;
  const std::vector<std::byte> m = s.message(s.head());
  RowsMessage r;
  ASSERT_TRUE(read_rows_message(m, limits(), &r));
  EXPECT_EQ(r.head.word, s.head().word);
  EXPECT_EQ(r.head.rows, 2);
  EXPECT_EQ(r.head.scale_rows, 1);
  for (std::size_t t = 0; t < s.ids.size(); ++t) {
    EXPECT_EQ(at<std::int32_t>(r.ids, t), s.ids[t]);
    EXPECT_EQ(at<std::int32_t>(r.expand_idx, t), s.expand_idx[t]);
    EXPECT_EQ(at<float>(r.expert_scales, t), s.expert_scales[t]);
  }
  ASSERT_EQ(r.rows.size(), 2u);
  EXPECT_EQ(r.rows[0].first, 0);
  EXPECT_EQ(r.rows[1].first, 2);
  for (std::size_t i = 0; i < 3; ++i) EXPECT_EQ(at<std::uint16_t>(r.rows[1].second, i), s.x[6 + i]);
  ASSERT_EQ(r.scale_rows.size(), 1u);
  EXPECT_EQ(r.scale_rows[0].first, 8);
  EXPECT_EQ(at<float>(r.scale_rows[0].second, 2), 3.5f);
}

TEST(CudaBridgeMessages, AFailedSenderSendsItsWordAlone) {
  const Sender s;
  RowsHeader h = s.head();
  h.word |= 1u;
  const std::vector<std::byte> m = s.message(h);
  EXPECT_EQ(m.size(), sizeof(RowsHeader));
  EXPECT_EQ(rows_message_word(m), h.word);
  RowsMessage r;
  EXPECT_FALSE(read_rows_message(m, limits(), &r));  // nothing to write on its behalf
  EXPECT_EQ(rows_message_word({}), 0u);
}

// Each change of a valid message that breaks a rule is refused.
TEST(CudaBridgeMessages, RowsThatBreakARuleAreRefused) {
  const Sender s;
  const std::vector<std::byte> good = s.message(s.head());
  RowsMessage r;
  ASSERT_TRUE(read_rows_message(good, limits(), &r));
  const auto refused = [&](const char* what, const std::function<void(std::vector<std::byte>&)>& change) {
    std::vector<std::byte> m = good;
    change(m);
    EXPECT_FALSE(read_rows_message(m, limits(), &r)) << what;
  };
  const auto set_header = [](std::vector<std::byte>& m, const std::function<void(RowsHeader&)>& edit) {
    RowsHeader h;
    std::memcpy(&h, m.data(), sizeof(h));
    edit(h);
    std::memcpy(m.data(), &h, sizeof(h));
  };
  refused("one byte short", [](auto& m) { m.pop_back(); });
  refused("one byte long", [](auto& m) { m.push_back(std::byte{0}); });
  refused("only part of a header", [](auto& m) { m.resize(sizeof(RowsHeader) - 1); });
  refused("BS over max_bs", [&](auto& m) { set_header(m, [](RowsHeader& h) { h.bs = 5; }); });
  refused("a negative BS", [&](auto& m) { set_header(m, [](RowsHeader& h) { h.bs = -1; }); });
  refused("another K", [&](auto& m) { set_header(m, [](RowsHeader& h) { h.k = 3; }); });
  refused("another H", [&](auto& m) { set_header(m, [](RowsHeader& h) { h.h = 4; }); });
  refused("version 3", [&](auto& m) { set_header(m, [](RowsHeader& h) { h.version = 3; }); });
  refused("quant mode 1", [&](auto& m) { set_header(m, [](RowsHeader& h) { h.quant = 1; }); });
  refused("smooth scales without quantization", [&](auto& m) { set_header(m, [](RowsHeader& h) { h.quant = 0; }); });
  refused("more rows than tokens", [&](auto& m) { set_header(m, [](RowsHeader& h) { h.rows = 4; }); });
  refused("more scale rows than the group has",
          [&](auto& m) { set_header(m, [](RowsHeader& h) { h.scale_rows = 10; }); });
  const std::size_t ids_at = sizeof(RowsHeader);
  refused("an id past the experts", [&](auto& m) {
    std::int32_t bad = 8;
    std::memcpy(m.data() + ids_at + 4, &bad, 4);
  });
  refused("a negative id", [&](auto& m) {
    std::int32_t bad = -1;
    std::memcpy(m.data() + ids_at, &bad, 4);
  });
  // The rows start after the routing state: 6 ids, 6 expand_idx, 3 token numbers, 6 expert_scales.
  const std::size_t rows_at = ids_at + 4 * (6 + 6 + 3) + 4 * 6;
  refused("a row of a token past BS", [&](auto& m) {
    std::int32_t bad = 3;
    std::memcpy(m.data() + rows_at, &bad, 4);
  });
  refused("a row of a negative token", [&](auto& m) {
    std::int32_t bad = -2;
    std::memcpy(m.data() + rows_at, &bad, 4);
  });
  const std::size_t row_record = 4 + 8;  // the token, then H = 3 16-bit values padded to 8 bytes
  const std::size_t scales_at = rows_at + 2 * row_record;
  refused("a scale row past the group's", [&](auto& m) {
    std::int32_t bad = 9;
    std::memcpy(m.data() + scales_at, &bad, 4);
  });
  // The offsets above are the fields named: a valid value written there is accepted.
  for (const std::size_t field : {rows_at, scales_at}) {
    std::vector<std::byte> m = good;
    const std::int32_t fine = 1;
    std::memcpy(m.data() + field, &fine, 4);
    EXPECT_TRUE(read_rows_message(m, limits(), &r)) << field;
    EXPECT_EQ(field == rows_at ? r.rows[0].first : r.scale_rows[0].first, 1);
  }
}

// V2: an entry that is not sent (expand_idx -1: masked, a special expert) may hold any id; a sent one
// must name an expert.
TEST(CudaBridgeMessages, V2ChecksTheIdsOfSentEntriesOnly) {
  Sender s;
  s.ids = {0, 9, 3, 4, 5, 1};  // 9: a special expert of a V2 call
  s.expand_idx = {0, -1, 0, 0, 1, 0};
  RowsHeader h = s.head();
  h.version = 2;
  RowsMessage r;
  EXPECT_TRUE(read_rows_message(s.message(h), limits(), &r));
  s.expand_idx[1] = 0;
  EXPECT_FALSE(read_rows_message(s.message(h), limits(), &r));
}

// A message must be of the call its sender published, and name only rows inside the sender's blocks.
TEST(CudaBridgeMessages, RowsMustAgreeWithTheSendersRecord) {
  const Sender s;
  RowsMessage m;
  const std::vector<std::byte> bytes = s.message(s.head());
  ASSERT_TRUE(read_rows_message(bytes, limits(), &m));
  RecordHeader rec;
  rec.bs = 3;
  rec.k = 2;
  rec.h = 3;
  rec.version = 1;
  rec.mode = 2;
  rec.has_expert_scales = 1;
  rec.active = 3;
  // Rows per expert (S = 0, 2 experts per rank: entry e is expert e): expert 5 gets two (expand_idx 0, 1).
  std::vector<std::int32_t> counts{1, 1, 0, 1, 1, 2, 0, 1};
  EXPECT_TRUE(rows_agree_with_record(m, rec, counts, 5, limits()));
  EXPECT_FALSE(rows_agree_with_record(m, rec, counts, 6, limits())) << "another call";
  const auto differs = [&](const char* what,
                           const std::function<void(RecordHeader&, std::vector<std::int32_t>&)>& edit) {
    RecordHeader r = rec;
    std::vector<std::int32_t> c = counts;
    edit(r, c);
    EXPECT_FALSE(rows_agree_with_record(m, r, c, 5, limits())) << what;
  };
  differs("the record failed", [](RecordHeader& r, auto&) { r.failed = 1; });
  differs("another BS", [](RecordHeader& r, auto&) { r.bs = 2; });
  differs("another quant mode", [](RecordHeader& r, auto&) { r.mode = 0; });
  differs("another version", [](RecordHeader& r, auto&) { r.version = 2; });
  differs("no expert_scales", [](RecordHeader& r, auto&) { r.has_expert_scales = 0; });
  differs("a row past its block", [](RecordHeader&, std::vector<std::int32_t>& c) { c[5] = 1; });
  differs("a short record", [](RecordHeader&, std::vector<std::int32_t>& c) { c.resize(7); });
  // V2: a token number below the active tokens, or -1.
  Sender v2 = s;
  v2.token_slot = {0, -1, 1};
  RowsHeader h = v2.head();
  h.version = 2;
  const std::vector<std::byte> v2_bytes = v2.message(h);
  ASSERT_TRUE(read_rows_message(v2_bytes, limits(), &m));
  rec.version = 2;
  rec.active = 2;
  EXPECT_TRUE(rows_agree_with_record(m, rec, counts, 5, limits()));
  rec.active = 1;
  EXPECT_FALSE(rows_agree_with_record(m, rec, counts, 5, limits())) << "a token number past the active tokens";
}

TEST(CudaBridgeMessages, RequestsAndRepliesAreCheckedForSize) {
  std::vector<RemoteRequest> list(3);
  list[1].holder = 5;
  std::vector<std::byte> m;
  write_requests(m, 7, list);
  std::int64_t n = -1;
  const std::byte* got = read_requests(m, 3, 7, &n);
  ASSERT_NE(got, nullptr);
  EXPECT_EQ(n, 3);
  EXPECT_EQ(at<RemoteRequest>(got, 1).holder, 5);
  EXPECT_EQ(read_requests(m, 2, 7, &n), nullptr) << "more requests than a source can have";
  EXPECT_EQ(n, 0);
  EXPECT_EQ(read_requests(m, 3, 8, &n), nullptr) << "requests of another call";
  EXPECT_EQ(n, 0);
  m.pop_back();
  EXPECT_EQ(read_requests(m, 3, 7, &n), nullptr) << "a short message";

  const std::size_t pitch = 16;
  const int W = 4;
  const auto reply = [&](bool failed, std::int64_t count, std::size_t body) {
    std::vector<std::byte> r;
    write_reply_header(r, failed, count);
    r.resize(r.size() + body);
    return r;
  };
  ReplyView view;
  EXPECT_TRUE(read_reply(reply(false, 2, 2 * (8 + pitch) + W * 8), 2, W, pitch, &view));
  EXPECT_EQ(view.rows - view.entries, static_cast<std::ptrdiff_t>(2 * 8 + W * 8));
  EXPECT_FALSE(read_reply(reply(true, 0, 0), 2, W, pitch, &view)) << "a failed proxy";
  EXPECT_FALSE(read_reply(reply(false, 1, 1 * (8 + pitch) + W * 8), 2, W, pitch, &view)) << "fewer rows than asked";
  EXPECT_FALSE(read_reply(reply(false, 2, 2 * (8 + pitch) + W * 8 + 1), 2, W, pitch, &view)) << "a byte too many";
}

}  // namespace
}  // namespace moedist::cuda
