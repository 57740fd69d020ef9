// A strict reader and a writer for the safetensors format (https://huggingface.co/docs/safetensors):
//
//   8 bytes   N, the header length, unsigned little-endian
//   N bytes   UTF-8 JSON object: {"<name>": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [b, e]}, ...,
//             "__metadata__": {"<key>": "<string value>", ...}}   (may be padded with trailing spaces)
//   rest      the data buffer; [b, e) is relative to its start; tensors tile it exactly, in any order
//
// moedist uses the six dtypes BF16, F16, F32, I8, I32, I64 (little-endian, row-major). The reader checks
// every rule before it hands out a single byte and raises moedist::Error(ErrorCode::case_file) with a
// message that names the file, the tensor and the rule; it never trusts a length or offset it has not
// checked against the file size.
#pragma once

#include <cstdint>
#include <fstream>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "moedist/dtype.h"
#include "moedist/tensor.h"

namespace moedist::casefile {

// The largest header the reader accepts (the limit of the reference implementation). A larger length
// field is far more likely a corrupt or foreign file than a real header.
inline constexpr std::uint64_t kMaxSafetensorsHeaderBytes = 100'000'000;

// safetensors' dtype name for a moedist dtype ("BF16", ...), and the inverse (false for any other name).
std::string_view safetensors_dtype_name(DType dtype) noexcept;
bool safetensors_dtype_from_name(std::string_view name, DType* out) noexcept;

// "[2, 3]": a shape as messages print it.
std::string shape_to_string(const std::vector<std::int64_t>& shape);

// One tensor of a safetensors header, already checked against the file.
struct SafetensorsEntry {
  std::string name;
  DType dtype = DType::fp32;
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0;  // byte range in the data buffer
  std::uint64_t end = 0;

  std::uint64_t nbytes() const noexcept { return end - begin; }
};

// Opens a file and validates its whole header on construction; tensor bytes are read on demand, so a
// large file is never held twice in memory. Not thread-safe (one file position).
class SafetensorsReader {
 public:
  explicit SafetensorsReader(const std::string& path);

  const std::string& path() const noexcept { return path_; }
  const std::map<std::string, std::string>& metadata() const noexcept { return metadata_; }
  // Sorted by name.
  const std::vector<SafetensorsEntry>& entries() const noexcept { return entries_; }
  // nullptr if there is no tensor of that name.
  const SafetensorsEntry* find(std::string_view name) const noexcept;

  // Copies the entry's entry.nbytes() bytes to destination.
  void read_bytes(const SafetensorsEntry& entry, void* destination) const;
  // Reads a 1-D or 2-D entry into an owning tensor; any other rank is a case_file error, since every
  // moedist tensor is a vector or a matrix.
  Tensor read_tensor(const SafetensorsEntry& entry) const;

 private:
  std::string path_;
  mutable std::ifstream file_;
  std::uint64_t data_start_ = 0;  // 8 + N
  std::map<std::string, std::string> metadata_;
  std::vector<SafetensorsEntry> entries_;
};

// Collects tensors and metadata, then writes one file. Tensors are laid out in the order they were
// added; the header is padded with spaces to a multiple of 8 bytes so that every tensor of an 8-byte
// dtype stays aligned when the file is mapped.
class SafetensorsWriter {
 public:
  void set_metadata(const std::string& key, const std::string& value);
  // data must hold numel(shape) * dtype_size(dtype) bytes and stay valid until write() returns.
  void add(const std::string& name, DType dtype, std::vector<std::int64_t> shape, const void* data);
  // Adds a present, contiguous tensor with its own shape (1-D or 2-D).
  void add(const std::string& name, const Tensor& tensor);

  void write(const std::string& path) const;

 private:
  struct Item {
    std::string name;
    DType dtype;
    std::vector<std::int64_t> shape;
    const void* data;
    std::uint64_t nbytes;
  };
  std::map<std::string, std::string> metadata_;
  std::vector<Item> items_;
};

}  // namespace moedist::casefile
