// Reading a fuzzer's bytes as typed values: small values more often than large ones, and zeros once the
// input runs out, so that every input is usable.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace moedist::fuzz {

class Input {
 public:
  Input(const std::uint8_t* data, std::size_t size) : p_(data), left_(size) {}

  std::uint8_t byte() {
    if (left_ == 0) return 0;
    --left_;
    return *p_++;
  }
  std::int64_t raw64() {
    std::int64_t v = 0;
    for (int i = 0; i < 8; ++i) v = static_cast<std::int64_t>(static_cast<std::uint64_t>(v) << 8 | byte());
    return v;
  }
  // Mostly in [low, high]; one time in eight any 64-bit value (negative and huge ones included).
  std::int64_t number(std::int64_t low, std::int64_t high) {
    const std::uint8_t kind = byte();
    if (kind % 8 == 7) return raw64();
    const std::uint64_t span = static_cast<std::uint64_t>(high - low) + 1;
    return low + static_cast<std::int64_t>((static_cast<std::uint64_t>(byte()) << 8 | byte()) % span);
  }
  std::size_t left() const noexcept { return left_; }
  const std::uint8_t* rest() const noexcept { return p_; }

 private:
  const std::uint8_t* p_;
  std::size_t left_;
};

// An int from a fuzzed 64-bit value, saturated (the configuration's fields are ints).
inline int as_int(std::int64_t v) {
  if (v > 0x7fffffff) return 0x7fffffff;
  if (v < -0x7fffffff - 1) return -0x7fffffff - 1;
  return static_cast<int>(v);
}

}  // namespace moedist::fuzz
