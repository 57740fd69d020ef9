// Fuzzes what a rank accepts from its peers: rank 0 of a world of 2-4 ranks (on one host or two) runs
// dispatch and combine while the other ranks are simulated by a transport whose every record, window
// size, published row offset and cross-host message is a copy of rank 0's own with bytes changed by the
// fuzzer. Whatever they send, rank 0 must finish or raise a moedist::Error: never crash, read or write
// out of bounds, or hang.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "fuzz_input.h"
#include "moedist/error.h"
#include "moedist/group.h"
#include "moedist/tensor.h"
#include "transport/transport.h"

namespace moedist::fuzz {
namespace {

// Changes a few bytes of each buffer the simulated peers produce, as the input says.
class Mutator {
 public:
  explicit Mutator(Input& in) : in_(in) {}
  void apply(std::byte* data, std::size_t bytes) {
    const int n = in_.byte() % 4;
    for (int i = 0; i < n && bytes > 0; ++i) {
      const std::size_t at = (static_cast<std::size_t>(in_.byte()) << 8 | in_.byte()) % bytes;
      data[at] ^= static_cast<std::byte>(in_.byte());
    }
  }
  void apply(std::vector<std::byte>& message) {
    const std::uint8_t resize = in_.byte();
    if (resize % 8 == 1) message.resize(message.size() / 2);
    if (resize % 8 == 2) message.resize(message.size() + resize / 8);
    apply(message.data(), message.size());
  }
  std::size_t extra() { return in_.byte() % 4 == 0 ? 0 : static_cast<std::size_t>(in_.byte()) * 64; }

 private:
  Input& in_;
};

class FakePeers final : public Transport {
 public:
  FakePeers(int size, int hosts, Mutator& m) : size_(size), hosts_(hosts), m_(m), windows_(static_cast<std::size_t>(size)) {
    for (auto& w : windows_) w.assign(4096, std::byte{0});
  }
  int rank() const noexcept override { return 0; }
  int size() const noexcept override { return size_; }
  void allgather(const void* in, std::size_t bytes, void* out, std::string_view) override {
    auto* dst = static_cast<std::byte*>(out);
    for (int r = 0; r < size_; ++r) std::memcpy(dst + static_cast<std::size_t>(r) * bytes, in, bytes);
    for (int r = 1; r < size_; ++r) m_.apply(dst + static_cast<std::size_t>(r) * bytes, bytes);
  }
  void resize_window(std::size_t bytes, std::string_view phase) override {
    // As the real transports do when an allocation fails (and they would for sizes like these).
    if (bytes > (std::size_t{1} << 28)) throw Error(ErrorCode::capacity, std::string(phase) + ": cannot allocate a window this large");
    for (int r = 0; r < size_; ++r) {
      auto& w = windows_[static_cast<std::size_t>(r)];
      const std::size_t want = r == 0 ? bytes : bytes + m_.extra();  // peers may map more than they need
      if (w.size() < want) w.assign(want, std::byte{0});
    }
  }
  std::size_t window_size(int r) const noexcept override { return windows_[static_cast<std::size_t>(r)].size(); }
  std::byte* window(int r) noexcept override { return host_of(r) == 0 ? windows_[static_cast<std::size_t>(r)].data() : nullptr; }
  int host_count() const noexcept override { return hosts_; }
  int host_of(int r) const noexcept override { return hosts_ == 1 ? 0 : (r < (size_ + 1) / 2 ? 0 : 1); }
  void exchange(std::span<const Outgoing> out, std::span<const int> from, std::span<std::vector<std::byte>> in,
                std::string_view) override {
    for (std::size_t i = 0; i < from.size(); ++i) {
      if (out.empty()) {
        in[i].clear();
      } else {
        const Outgoing& o = out[i % out.size()];
        in[i].assign(o.data, o.data + o.bytes);
      }
      m_.apply(in[i]);
    }
  }

 private:
  int size_, hosts_;
  Mutator& m_;
  std::vector<std::vector<std::byte>> windows_;
};

}  // namespace
}  // namespace moedist::fuzz

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace moedist;
  fuzz::Input in(data, size);
  const int n = 2 + in.byte() % 3;
  const int hosts = 1 + in.byte() % 2;
  const int quant = in.byte() % 2 == 0 ? 0 : 2;
  const int shared = n >= 3 && in.byte() % 2 == 0 ? 1 : 0;
  constexpr std::int64_t kBs = 4, kH = 32, kK = 2;
  GroupConfig c;
  c.ep_world_size = n;
  c.ep_rank_id = 0;
  c.shared_expert_rank_num = shared;
  c.moe_expert_num = 2 * (n - shared);
  fuzz::Mutator m(in);

  Tensor x(DType::bf16, kBs, kH), ids(DType::int32, kBs, kK), weights(DType::fp32, kBs, kK);
  for (std::int64_t i = 0; i < x.numel(); ++i) x.data<std::uint16_t>()[i] = static_cast<std::uint16_t>(0x3f80 + i % 64);
  for (std::int64_t b = 0; b < kBs; ++b) {
    ids.data<std::int32_t>()[b * kK] = static_cast<std::int32_t>(b % c.moe_expert_num);
    ids.data<std::int32_t>()[b * kK + 1] = static_cast<std::int32_t>((b + 1) % c.moe_expert_num);
  }
  std::fill_n(weights.data<float>(), weights.numel(), 0.5f);
  try {
    Group group(c, std::make_unique<fuzz::FakePeers>(n, hosts, m));
    for (int call = 0; call < 2; ++call) {
      try {
        DispatchOptions o;
        o.quant_mode = quant;
        o.expert_scales = weights.view();
        const DispatchResult d = group.dispatch(x.view(), ids.view(), o);
        // Identity experts: the dispatched rows (quant_mode 0) or zeros in bf16 (quant_mode 2).
        Tensor expert_out(DType::bf16, d.valid_rows, kH);
        if (quant == 0) {
          for (std::int64_t r = 0; r < d.valid_rows; ++r) std::memcpy(expert_out.data<std::uint16_t>() + r * kH, d.expand_x.ptr<std::uint16_t>(r), kH * 2);
        }
        group.combine(expert_out.view(), ids.view(), d.expand_idx, d.ep_recv_counts, weights.view(), CombineOptions{});
      } catch (const Error&) {
      }
    }
  } catch (const Error&) {
  }
  return 0;
}
