#include "casefile/safetensors.h"

#include <algorithm>
#include <array>
#include <bit>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <limits>
#include <set>
#include <tuple>
#include <utility>

#include <nlohmann/json.hpp>

#include "moedist/error.h"

namespace moedist::casefile {

// Tensor bytes are copied as they are stored, so the host must share the file's byte order.
static_assert(std::endian::native == std::endian::little, "safetensors data is little-endian");

namespace {

using nlohmann::json;

constexpr std::string_view kMetadataKey = "__metadata__";

[[noreturn]] void fail(const std::string& path, const std::string& what) {
  throw Error(ErrorCode::case_file, "file '" + path + "': " + what);
}

[[noreturn]] void fail_tensor(const std::string& path, const std::string& name, const std::string& what) {
  fail(path, "tensor '" + name + "': " + what);
}

std::size_t element_size(DType dtype) {
  switch (dtype) {
    case DType::int8:
    case DType::boolean:
      return 1;
    case DType::bf16:
    case DType::fp16: return 2;
    case DType::fp32:
    case DType::int32: return 4;
    case DType::int64: return 8;
  }
  return 0;
}

// numel(shape) * element size, or false when a dimension is negative or the product overflows.
bool checked_nbytes(const std::vector<std::int64_t>& shape, DType dtype, std::uint64_t* out) {
  std::uint64_t total = element_size(dtype);
  for (const std::int64_t dim : shape) {
    if (dim < 0) return false;
    if (__builtin_mul_overflow(total, static_cast<std::uint64_t>(dim), &total)) return false;
  }
  if (total > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) return false;
  *out = total;
  return true;
}

std::string errno_text() { return std::strerror(errno); }

// Parses the header text, rejecting duplicate keys at any depth (nlohmann would keep the last one
// silently, and two tensors of one name are a corrupt file).
json parse_header(const std::string& path, const std::string& text) {
  std::vector<std::set<std::string>> open_objects;
  std::string duplicate;
  const json::parser_callback_t track_keys = [&](int /*depth*/, json::parse_event_t event, json& parsed) {
    switch (event) {
      case json::parse_event_t::object_start: open_objects.emplace_back(); break;
      case json::parse_event_t::object_end: open_objects.pop_back(); break;
      case json::parse_event_t::key:
        if (!open_objects.empty() && !open_objects.back().insert(parsed.get<std::string>()).second &&
            duplicate.empty()) {
          duplicate = parsed.get<std::string>();
        }
        break;
      default: break;
    }
    return true;
  };
  json header;
  try {
    header = json::parse(text, track_keys, /*allow_exceptions=*/true);
  } catch (const json::exception& e) {
    fail(path, std::string("header is not valid JSON: ") + e.what());
  }
  if (!duplicate.empty()) fail(path, "header has the key '" + duplicate + "' twice");
  return header;
}

std::string json_text(const json& value) {
  std::string text = value.dump(-1, ' ', false, json::error_handler_t::replace);
  constexpr std::size_t kLimit = 60;
  if (text.size() > kLimit) text = text.substr(0, kLimit) + "...";
  return text;
}

// A non-negative JSON integer that fits in int64.
bool json_to_count(const json& value, std::int64_t* out) {
  if (!value.is_number_unsigned()) return false;
  const auto u = value.get<std::uint64_t>();
  if (u > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) return false;
  *out = static_cast<std::int64_t>(u);
  return true;
}

SafetensorsEntry parse_entry(const std::string& path, const std::string& name, const json& spec,
                             std::uint64_t buffer_bytes) {
  if (name.empty()) fail(path, "a tensor has an empty name");
  if (!spec.is_object()) fail_tensor(path, name, "its header entry must be a JSON object, got " + json_text(spec));
  for (const auto& [field, value] : spec.items()) {
    (void)value;
    if (field != "dtype" && field != "shape" && field != "data_offsets") {
      fail_tensor(path, name, "unknown field '" + field + "' (allowed: dtype, shape, data_offsets)");
    }
  }
  for (const char* field : {"dtype", "shape", "data_offsets"}) {
    if (!spec.contains(field)) fail_tensor(path, name, std::string("missing field '") + field + "'");
  }

  SafetensorsEntry entry;
  entry.name = name;
  const json& dtype = spec["dtype"];
  if (!dtype.is_string()) fail_tensor(path, name, "dtype must be a string, got " + json_text(dtype));
  if (!safetensors_dtype_from_name(dtype.get<std::string>(), &entry.dtype)) {
    fail_tensor(
        path, name,
        "unsupported dtype '" + dtype.get<std::string>() + "' (moedist reads BF16, F16, F32, I8, I32, I64, BOOL)");
  }

  const json& shape = spec["shape"];
  if (!shape.is_array()) fail_tensor(path, name, "shape must be an array, got " + json_text(shape));
  for (const json& dim : shape) {
    std::int64_t extent = 0;
    if (!json_to_count(dim, &extent)) {
      fail_tensor(path, name, "shape " + json_text(shape) + " must hold non-negative integers");
    }
    entry.shape.push_back(extent);
  }

  const json& offsets = spec["data_offsets"];
  std::int64_t begin = 0;
  std::int64_t end = 0;
  if (!offsets.is_array() || offsets.size() != 2 || !json_to_count(offsets[0], &begin) ||
      !json_to_count(offsets[1], &end)) {
    fail_tensor(path, name, "data_offsets must be [begin, end] with non-negative integers, got " + json_text(offsets));
  }
  if (begin > end) {
    fail_tensor(path, name, "data_offsets " + json_text(offsets) + " end before they begin");
  }
  entry.begin = static_cast<std::uint64_t>(begin);
  entry.end = static_cast<std::uint64_t>(end);
  if (entry.end > buffer_bytes) {
    fail_tensor(path, name, "data_offsets " + json_text(offsets) + " reach past the data buffer of " +
                                std::to_string(buffer_bytes) + " bytes");
  }

  std::uint64_t expected = 0;
  if (!checked_nbytes(entry.shape, entry.dtype, &expected)) {
    fail_tensor(path, name, "shape " + shape_to_string(entry.shape) + " has too many elements (size overflows)");
  }
  if (expected != entry.nbytes()) {
    fail_tensor(path, name, "data_offsets " + json_text(offsets) + " hold " + std::to_string(entry.nbytes()) +
                                " bytes but shape " + shape_to_string(entry.shape) + " of " +
                                std::string(safetensors_dtype_name(entry.dtype)) + " needs " +
                                std::to_string(expected) + " bytes");
  }
  return entry;
}

// The format requires the tensors to cover the data buffer exactly once: no overlaps (two tensors
// sharing bytes), no gaps and no trailing bytes (unindexed data, typical of a truncated or spliced file).
void check_tiling(const std::string& path, const std::vector<SafetensorsEntry>& entries, std::uint64_t buffer_bytes) {
  std::vector<const SafetensorsEntry*> by_offset;
  by_offset.reserve(entries.size());
  for (const SafetensorsEntry& entry : entries) by_offset.push_back(&entry);
  std::sort(by_offset.begin(), by_offset.end(), [](const SafetensorsEntry* a, const SafetensorsEntry* b) {
    return std::tie(a->begin, a->end, a->name) < std::tie(b->begin, b->end, b->name);
  });
  std::uint64_t cursor = 0;
  const SafetensorsEntry* previous = nullptr;
  for (const SafetensorsEntry* entry : by_offset) {
    if (entry->begin < cursor) {
      fail_tensor(path, entry->name, "data_offsets [" + std::to_string(entry->begin) + ", " +
                                         std::to_string(entry->end) + "] overlap tensor '" + previous->name +
                                         "' at [" + std::to_string(previous->begin) + ", " +
                                         std::to_string(previous->end) + "]");
    }
    if (entry->begin > cursor) {
      fail(path, "bytes [" + std::to_string(cursor) + ", " + std::to_string(entry->begin) +
                     ") of the data buffer belong to no tensor (tensors must tile the buffer without gaps)");
    }
    cursor = entry->end;
    previous = entry;
  }
  if (cursor != buffer_bytes) {
    fail(path, "the data buffer has " + std::to_string(buffer_bytes) + " bytes but the tensors cover only " +
                   std::to_string(cursor) + " (trailing bytes belong to no tensor)");
  }
}

}  // namespace

std::string_view safetensors_dtype_name(DType dtype) noexcept {
  switch (dtype) {
    case DType::bf16: return "BF16";
    case DType::fp16: return "F16";
    case DType::fp32: return "F32";
    case DType::int8: return "I8";
    case DType::int32: return "I32";
    case DType::int64: return "I64";
    case DType::boolean:
      return "BOOL";
  }
  return "?";
}

bool safetensors_dtype_from_name(std::string_view name, DType* out) noexcept {
  static constexpr std::array<DType, 7> kAll = {DType::bf16,  DType::fp16,  DType::fp32,   DType::int8,
                                                DType::int32, DType::int64, DType::boolean};
  for (const DType dtype : kAll) {
    if (safetensors_dtype_name(dtype) == name) {
      *out = dtype;
      return true;
    }
  }
  return false;
}

std::string shape_to_string(const std::vector<std::int64_t>& shape) {
  std::string text = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i != 0) text += ", ";
    text += std::to_string(shape[i]);
  }
  return text + "]";
}

SafetensorsReader::SafetensorsReader(const std::string& path) : path_(path) {
  std::error_code ec;
  const auto status = std::filesystem::status(path, ec);
  if (ec || !std::filesystem::exists(status)) fail(path, "cannot open: no such file");
  if (!std::filesystem::is_regular_file(status)) fail(path, "cannot open: not a regular file");
  const std::uint64_t file_bytes = std::filesystem::file_size(path, ec);
  if (ec) fail(path, "cannot determine the file size: " + ec.message());

  file_.open(path, std::ios::binary);
  if (!file_) fail(path, "cannot open: " + errno_text());

  if (file_bytes < 8) {
    fail(path, "the file has " + std::to_string(file_bytes) +
                   " bytes, fewer than the 8-byte header length that starts a safetensors file");
  }
  std::array<unsigned char, 8> length_bytes{};
  file_.read(reinterpret_cast<char*>(length_bytes.data()), 8);
  if (!file_) fail(path, "cannot read the header length: " + errno_text());
  std::uint64_t header_bytes = 0;
  for (int i = 7; i >= 0; --i) header_bytes = (header_bytes << 8) | length_bytes[static_cast<std::size_t>(i)];

  if (header_bytes > kMaxSafetensorsHeaderBytes) {
    fail(path, "header length " + std::to_string(header_bytes) + " exceeds the limit of " +
                   std::to_string(kMaxSafetensorsHeaderBytes) + " bytes (corrupt file or not safetensors)");
  }
  if (header_bytes > file_bytes - 8) {
    fail(path, "header length " + std::to_string(header_bytes) + " runs past the end of the file (" +
                   std::to_string(file_bytes) + " bytes; truncated file?)");
  }
  if (header_bytes < 2) {
    fail(path, "header length " + std::to_string(header_bytes) + " is too short for a JSON object");
  }
  std::string text(header_bytes, '\0');
  file_.read(text.data(), static_cast<std::streamsize>(header_bytes));
  if (!file_) fail(path, "cannot read the " + std::to_string(header_bytes) + "-byte header: " + errno_text());
  if (text.front() != '{') fail(path, "the header must start with '{' (a JSON object)");
  data_start_ = 8 + header_bytes;
  const std::uint64_t buffer_bytes = file_bytes - data_start_;

  const json header = parse_header(path, text);
  if (!header.is_object()) fail(path, "the header must be a JSON object");

  for (const auto& [name, spec] : header.items()) {
    if (name == kMetadataKey) {
      if (!spec.is_object()) fail(path, "__metadata__ must be a JSON object of strings, got " + json_text(spec));
      for (const auto& [key, value] : spec.items()) {
        if (!value.is_string()) {
          fail(path, "__metadata__ value of '" + key + "' must be a string, got " + json_text(value));
        }
        metadata_.emplace(key, value.get<std::string>());
      }
      continue;
    }
    entries_.push_back(parse_entry(path, name, spec, buffer_bytes));
  }
  std::sort(entries_.begin(), entries_.end(),
            [](const SafetensorsEntry& a, const SafetensorsEntry& b) { return a.name < b.name; });
  check_tiling(path, entries_, buffer_bytes);
}

const SafetensorsEntry* SafetensorsReader::find(std::string_view name) const noexcept {
  const auto it = std::lower_bound(entries_.begin(), entries_.end(), name,
                                   [](const SafetensorsEntry& e, std::string_view n) { return e.name < n; });
  return it != entries_.end() && it->name == name ? &*it : nullptr;
}

void SafetensorsReader::read_bytes(const SafetensorsEntry& entry, void* destination) const {
  if (entry.nbytes() == 0) return;
  file_.clear();
  file_.seekg(static_cast<std::streamoff>(data_start_ + entry.begin));
  file_.read(static_cast<char*>(destination), static_cast<std::streamsize>(entry.nbytes()));
  if (!file_ || static_cast<std::uint64_t>(file_.gcount()) != entry.nbytes()) {
    fail_tensor(path_, entry.name, "cannot read its " + std::to_string(entry.nbytes()) +
                                       " bytes (was the file changed while it was read?)");
  }
}

Tensor SafetensorsReader::read_tensor(const SafetensorsEntry& entry) const {
  Tensor tensor;
  if (entry.shape.size() == 1) {
    tensor = Tensor(entry.dtype, entry.shape[0]);
  } else if (entry.shape.size() == 2) {
    tensor = Tensor(entry.dtype, entry.shape[0], entry.shape[1]);
  } else {
    fail_tensor(path_, entry.name, "shape " + shape_to_string(entry.shape) + " has rank " +
                                       std::to_string(entry.shape.size()) +
                                       "; moedist tensors are 1-D or 2-D");
  }
  read_bytes(entry, tensor.raw());
  return tensor;
}

void SafetensorsWriter::set_metadata(const std::string& key, const std::string& value) { metadata_[key] = value; }

void SafetensorsWriter::add(const std::string& name, DType dtype, std::vector<std::int64_t> shape, const void* data) {
  if (name.empty() || name == kMetadataKey) {
    throw Error(ErrorCode::case_file, "safetensors writer: '" + name + "' is not a valid tensor name");
  }
  for (const Item& item : items_) {
    if (item.name == name) throw Error(ErrorCode::case_file, "safetensors writer: tensor '" + name + "' added twice");
  }
  std::uint64_t nbytes = 0;
  if (!checked_nbytes(shape, dtype, &nbytes)) {
    throw Error(ErrorCode::case_file,
                "safetensors writer: tensor '" + name + "' has an invalid shape " + shape_to_string(shape));
  }
  if (nbytes != 0 && data == nullptr) {
    throw Error(ErrorCode::case_file, "safetensors writer: tensor '" + name + "' has no data");
  }
  items_.push_back(Item{name, dtype, std::move(shape), data, nbytes});
}

void SafetensorsWriter::add(const std::string& name, const Tensor& tensor) {
  if (!tensor.present()) {
    throw Error(ErrorCode::case_file, "safetensors writer: tensor '" + name + "' is absent");
  }
  std::vector<std::int64_t> shape{tensor.rows()};
  if (tensor.ndim() == 2) shape.push_back(tensor.cols());
  add(name, tensor.dtype(), std::move(shape), tensor.raw());
}

void SafetensorsWriter::write(const std::string& path) const {
  json header = json::object();
  std::uint64_t offset = 0;
  for (const Item& item : items_) {
    header[item.name] = {{"dtype", safetensors_dtype_name(item.dtype)},
                         {"shape", item.shape},
                         {"data_offsets", {offset, offset + item.nbytes}}};
    offset += item.nbytes;
  }
  if (!metadata_.empty()) header[std::string(kMetadataKey)] = metadata_;

  std::string text;
  try {
    text = header.dump();
  } catch (const json::exception& e) {
    fail(path, std::string("cannot encode the header (names and metadata must be UTF-8): ") + e.what());
  }
  text.append((8 - text.size() % 8) % 8, ' ');

  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) fail(path, "cannot open for writing: " + errno_text());
  std::array<char, 8> length_bytes{};
  std::uint64_t length = text.size();
  for (char& byte : length_bytes) {
    byte = static_cast<char>(length & 0xffu);
    length >>= 8;
  }
  out.write(length_bytes.data(), 8);
  out.write(text.data(), static_cast<std::streamsize>(text.size()));
  for (const Item& item : items_) {
    if (item.nbytes != 0) out.write(static_cast<const char*>(item.data), static_cast<std::streamsize>(item.nbytes));
  }
  out.close();
  if (!out) fail(path, "write failed: " + errno_text());
}

}  // namespace moedist::casefile
