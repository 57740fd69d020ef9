// Case files: the safetensors layer on its own (round trips, every malformed-file rule), the case
// mapping (write -> read, structural rules), replay round trips (run_case -> write_outputs ->
// read_outputs), and replay with ranks as processes (the parent's failure reports, and `moedist replay`
// over both transports, byte for byte). Whether replay's numbers are right is the oracle property
// tests' business.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <map>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "casefile/case_file.h"
#include "casefile/safetensors.h"
#include "moedist/error.h"
#include "numeric/convert.h"
#include "oracle/oracle.h"
#include "test_support.h"

namespace moedist::casefile {
namespace {

namespace fs = std::filesystem;

class CaseFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() /
           ("moedist_casefile_" + std::to_string(::getpid()) + "_" + info->test_suite_name() + "_" + info->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }

 private:
  fs::path dir_;
};

// ---- helpers ------------------------------------------------------------------------------------

void write_bytes(const std::string& file, const std::string& bytes) {
  std::ofstream out(file, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::string read_bytes(const std::string& file) {
  std::ifstream in(file, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

std::string length_prefix(std::uint64_t n) {
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[static_cast<std::size_t>(i)] = static_cast<char>((n >> (8 * i)) & 0xffu);
  return bytes;
}

// A file with the given header text and data buffer.
std::string safetensors_bytes(const std::string& header, const std::string& data) {
  return length_prefix(header.size()) + header + data;
}

// Runs fn, expects a case_file error whose message contains every fragment.
void expect_case_file_error(const std::function<void()>& fn, std::initializer_list<std::string> fragments) {
  try {
    fn();
    ADD_FAILURE() << "expected a case_file error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::case_file) << e.what();
    const std::string message = e.what();
    for (const std::string& fragment : fragments) {
      EXPECT_NE(message.find(fragment), std::string::npos) << "message lacks '" << fragment << "': " << message;
    }
  }
}

void expect_bad_file(const std::string& file, const std::string& bytes, std::initializer_list<std::string> fragments) {
  write_bytes(file, bytes);
  expect_case_file_error([&] { SafetensorsReader reader(file); }, fragments);
}

Tensor patterned(DType dtype, std::vector<std::int64_t> shape, unsigned seed) {
  Tensor t = shape.size() == 1 ? Tensor(dtype, shape[0]) : Tensor(dtype, shape[0], shape[1]);
  auto* bytes = static_cast<unsigned char*>(t.raw());
  for (std::size_t i = 0; i < t.nbytes(); ++i) bytes[i] = static_cast<unsigned char>((i * 37 + seed * 11 + 5) & 0xffu);
  return t;
}

void expect_same_tensor(const Tensor& a, const Tensor& b, const std::string& label) {
  ASSERT_EQ(a.present(), b.present()) << label;
  if (!a.present()) return;
  EXPECT_EQ(a.dtype(), b.dtype()) << label;
  ASSERT_EQ(a.ndim(), b.ndim()) << label;
  ASSERT_EQ(a.rows(), b.rows()) << label;
  ASSERT_EQ(a.cols(), b.cols()) << label;
  if (a.nbytes() != 0) {
    EXPECT_EQ(std::memcmp(a.raw(), b.raw(), a.nbytes()), 0) << label << ": bytes differ";
  }
}

void expect_same_outputs(const std::vector<RankOutputs>& a, const std::vector<RankOutputs>& b) {
  ASSERT_EQ(a.size(), b.size());
  for (std::size_t g = 0; g < a.size(); ++g) {
    const std::string rank = "rank" + std::to_string(g) + ".";
    expect_same_tensor(a[g].expand_x, b[g].expand_x, rank + "expand_x");
    expect_same_tensor(a[g].dynamic_scales, b[g].dynamic_scales, rank + "dynamic_scales");
    expect_same_tensor(a[g].expand_scales, b[g].expand_scales, rank + "expand_scales");
    expect_same_tensor(a[g].expand_idx, b[g].expand_idx, rank + "expand_idx");
    expect_same_tensor(a[g].assist_info_for_combine, b[g].assist_info_for_combine, rank + "assist_info_for_combine");
    expect_same_tensor(a[g].expert_token_nums, b[g].expert_token_nums, rank + "expert_token_nums");
    expect_same_tensor(a[g].ep_recv_counts, b[g].ep_recv_counts, rank + "ep_recv_counts");
    expect_same_tensor(a[g].tp_recv_counts, b[g].tp_recv_counts, rank + "tp_recv_counts");
    expect_same_tensor(a[g].combine_out, b[g].combine_out, rank + "combine_out");
  }
}

// Every field of two cases: the configuration and every tensor of every rank.
void expect_same_case(const Case& a, const Case& b) {
  EXPECT_EQ(a.ep_world_size, b.ep_world_size);
  EXPECT_EQ(a.tp_world_size, b.tp_world_size);
  EXPECT_EQ(a.moe_expert_num, b.moe_expert_num);
  EXPECT_EQ(a.shared_expert_rank_num, b.shared_expert_rank_num);
  EXPECT_EQ(a.shared_expert_num, b.shared_expert_num);
  EXPECT_EQ(a.global_bs, b.global_bs);
  EXPECT_EQ(a.quant_mode, b.quant_mode);
  EXPECT_EQ(a.expert_token_nums_type, b.expert_token_nums_type);
  EXPECT_EQ(a.comm_quant_mode, b.comm_quant_mode);
  EXPECT_EQ(a.dtype, b.dtype);
  EXPECT_EQ(a.op, b.op);
  EXPECT_EQ(a.zero_expert_num, b.zero_expert_num);
  EXPECT_EQ(a.copy_expert_num, b.copy_expert_num);
  EXPECT_EQ(a.const_expert_num, b.const_expert_num);
  EXPECT_EQ(a.comm_alg, b.comm_alg);
  ASSERT_EQ(a.ranks.size(), b.ranks.size());
  for (std::size_t g = 0; g < a.ranks.size(); ++g) {
    const std::string rank = "rank" + std::to_string(g) + ".";
    const RankInputs& x = a.ranks[g];
    const RankInputs& y = b.ranks[g];
    expect_same_tensor(x.x, y.x, rank + "x");
    expect_same_tensor(x.expert_ids, y.expert_ids, rank + "expert_ids");
    expect_same_tensor(x.scales, y.scales, rank + "scales");
    expect_same_tensor(x.expert_scales, y.expert_scales, rank + "expert_scales");
    expect_same_tensor(x.x_active_mask, y.x_active_mask, rank + "x_active_mask");
    expect_same_tensor(x.combine_x, y.combine_x, rank + "combine_x");
    expect_same_tensor(x.ori_x, y.ori_x, rank + "ori_x");
    expect_same_tensor(x.shared_expert_x, y.shared_expert_x, rank + "shared_expert_x");
    expect_same_tensor(x.const_expert_alpha_1, y.const_expert_alpha_1, rank + "const_expert_alpha_1");
    expect_same_tensor(x.const_expert_alpha_2, y.const_expert_alpha_2, rank + "const_expert_alpha_2");
    expect_same_tensor(x.const_expert_v, y.const_expert_v, rank + "const_expert_v");
  }
}

// Random V2 cases (testing::random_case): every mask kind, special expert kind, Sn 0-4, T = 2, ...
testing::CaseLimits v2_limits(int max_ep_world_size = 16) {
  testing::CaseLimits limits;
  limits.v2 = 1;
  limits.token_masks = true;
  limits.max_ep_world_size = max_ep_world_size;
  return limits;
}

Case random_v2_case(std::uint64_t seed, int max_ep_world_size = 16) {
  std::mt19937_64 rng(seed);
  return testing::random_case(rng, v2_limits(max_ep_world_size));
}

// The first random V2 case (seeds 1, 2, ...) that has `property`: fixed cases that name what they cover.
Case v2_case_with(const std::function<bool(const Case&)>& property, int max_ep_world_size = 6) {
  for (std::uint64_t seed = 1; seed < 10000; ++seed) {
    Case c = random_v2_case(seed, max_ep_world_size);
    if (property(c)) return c;
  }
  throw std::runtime_error("no random V2 case of seeds 1..9999 has the property");
}

std::uint16_t to_half(DType dtype, float value) {
  return numeric::f32_to_half_rne(dtype == DType::bf16 ? numeric::Half::bf16 : numeric::Half::fp16, value);
}

struct CaseShape {
  int ep_world_size = 2;
  int tp_world_size = 0;
  int moe_expert_num = 4;
  int shared_expert_rank_num = 0;
  std::int64_t global_bs = 0;
  int quant_mode = 0;
  DType dtype = DType::bf16;
  std::vector<std::int64_t> bs;  // per global rank; empty = 3 everywhere
  std::int64_t k = 2;
  std::int64_t h = 8;
  bool scales = false;
  bool expert_scales = false;
};

// A valid case: small exactly representable x values, K distinct expert ids per token.
Case make_case(const CaseShape& shape) {
  Case c;
  c.ep_world_size = shape.ep_world_size;
  c.tp_world_size = shape.tp_world_size;
  c.moe_expert_num = shape.moe_expert_num;
  c.shared_expert_rank_num = shape.shared_expert_rank_num;
  c.global_bs = shape.global_bs;
  c.quant_mode = shape.quant_mode;
  c.dtype = shape.dtype;
  const int n = shape.ep_world_size * std::max(shape.tp_world_size, 1);
  for (int g = 0; g < n; ++g) {
    const std::int64_t bs = shape.bs.empty() ? 3 : shape.bs[static_cast<std::size_t>(g)];
    RankInputs in;
    in.x = Tensor(shape.dtype, bs, shape.h);
    for (std::int64_t b = 0; b < bs; ++b) {
      for (std::int64_t j = 0; j < shape.h; ++j) {
        const float value = static_cast<float>((g * 7 + b * 5 + j * 3) % 17 - 8) * 0.25f;
        in.x.data<std::uint16_t>()[b * shape.h + j] = to_half(shape.dtype, value);
      }
    }
    in.expert_ids = Tensor(DType::int32, bs, shape.k);
    for (std::int64_t b = 0; b < bs; ++b) {
      for (std::int64_t k = 0; k < shape.k; ++k) {
        in.expert_ids.data<std::int32_t>()[b * shape.k + k] =
            static_cast<std::int32_t>((g + b + k) % shape.moe_expert_num);
      }
    }
    if (shape.scales) {
      const std::int64_t rows = shape.moe_expert_num + (shape.shared_expert_rank_num > 0 ? 1 : 0);
      in.scales = Tensor(DType::fp32, rows, shape.h);
      for (std::int64_t i = 0; i < in.scales.numel(); ++i) {
        in.scales.data<float>()[i] = 0.5f + static_cast<float>(i % 5) * 0.25f;
      }
    }
    if (shape.expert_scales) {
      in.expert_scales = Tensor(DType::fp32, bs, shape.k);
      for (std::int64_t i = 0; i < in.expert_scales.numel(); ++i) {
        in.expert_scales.data<float>()[i] = 0.25f + static_cast<float>((i + g) % 3) * 0.125f;
      }
    }
    c.ranks.push_back(std::move(in));
  }
  return c;
}

// The metadata a valid case file carries, for tests that build files by hand.
std::map<std::string, std::string> base_metadata() {
  return {{"ep_world_size", "2"},   {"tp_world_size", "0"}, {"moe_expert_num", "4"},
          {"shared_expert_rank_num", "0"}, {"shared_expert_num", "1"}, {"global_bs", "0"},
          {"quant_mode", "0"},      {"expert_token_nums_type", "1"}, {"comm_quant_mode", "0"},
          {"dtype", "bfloat16"}};
}

// Writes a case file from raw parts, bypassing write_case's own checks.
void write_parts(const std::string& file, const std::map<std::string, std::string>& metadata,
                 const std::vector<std::pair<std::string, const Tensor*>>& tensors) {
  SafetensorsWriter writer;
  for (const auto& [key, value] : metadata) writer.set_metadata(key, value);
  for (const auto& [name, tensor] : tensors) writer.add(name, *tensor);
  writer.write(file);
}

// ---- safetensors layer --------------------------------------------------------------------------

TEST_F(CaseFileTest, SafetensorsRoundTripsEveryDtypeIncludingZeroSize) {
  const std::vector<std::pair<std::string, Tensor>> tensors = [] {
    std::vector<std::pair<std::string, Tensor>> list;
    list.emplace_back("a_bf16", patterned(DType::bf16, {3, 5}, 1));
    list.emplace_back("b_f16", patterned(DType::fp16, {7}, 2));
    list.emplace_back("c_f32", patterned(DType::fp32, {2, 3}, 3));
    list.emplace_back("d_i8", patterned(DType::int8, {5, 3}, 4));
    list.emplace_back("e_i32", patterned(DType::int32, {4}, 5));
    list.emplace_back("f_i64", patterned(DType::int64, {2, 2}, 6));
    list.emplace_back("g_empty_bf16", patterned(DType::bf16, {0, 8}, 7));
    list.emplace_back("h_empty_i64", patterned(DType::int64, {0}, 8));
    list.emplace_back("i_empty_cols", patterned(DType::fp32, {4, 0}, 9));
    list.emplace_back("j_bool", patterned(DType::boolean, {6}, 10));
    return list;
  }();
  SafetensorsWriter writer;
  writer.set_metadata("note", "round trip");
  writer.set_metadata("empty", "");
  // Added in reverse name order so that buffer order and name order differ.
  for (auto it = tensors.rbegin(); it != tensors.rend(); ++it) writer.add(it->first, it->second);
  writer.write(path("all.safetensors"));

  const SafetensorsReader reader(path("all.safetensors"));
  EXPECT_EQ(reader.metadata(), (std::map<std::string, std::string>{{"note", "round trip"}, {"empty", ""}}));
  ASSERT_EQ(reader.entries().size(), tensors.size());
  for (const auto& [name, tensor] : tensors) {
    const SafetensorsEntry* entry = reader.find(name);
    ASSERT_NE(entry, nullptr) << name;
    EXPECT_EQ(entry->dtype, tensor.dtype()) << name;
    EXPECT_EQ(entry->nbytes(), tensor.nbytes()) << name;
    expect_same_tensor(reader.read_tensor(*entry), tensor, name);
  }
  EXPECT_EQ(reader.find("missing"), nullptr);
  EXPECT_EQ(reader.find("g_empty_bf16")->shape, (std::vector<std::int64_t>{0, 8}));
}

TEST_F(CaseFileTest, SafetensorsWriterPadsHeaderToEightBytes) {
  const Tensor t = patterned(DType::int64, {3}, 1);
  SafetensorsWriter writer;
  writer.add("t", t);
  writer.write(path("pad.safetensors"));
  std::ifstream in(path("pad.safetensors"), std::ios::binary);
  unsigned char length[8] = {};
  in.read(reinterpret_cast<char*>(length), 8);
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | length[i];
  EXPECT_EQ(n % 8, 0u);
  EXPECT_EQ(fs::file_size(path("pad.safetensors")), 8 + n + t.nbytes());
}

TEST_F(CaseFileTest, SafetensorsReadsForeignLayouts) {
  // Hand-written headers: keys in any order, spaces and padding, an empty file with no tensors,
  // a data buffer laid out in a different order from the header.
  write_bytes(path("empty.safetensors"), safetensors_bytes("{}      ", ""));
  const SafetensorsReader empty(path("empty.safetensors"));
  EXPECT_TRUE(empty.entries().empty());
  EXPECT_TRUE(empty.metadata().empty());

  const std::string header =
      R"({ "b": {"shape": [2], "data_offsets": [0, 8], "dtype": "I32"},
           "a": {"data_offsets": [8, 10], "dtype": "I8", "shape": [1, 2]},
           "__metadata__": {"k": "v"} }   )";
  std::string data;
  for (std::int32_t v : {7, -3}) data.append(reinterpret_cast<const char*>(&v), 4);
  data += std::string("\x05\xfb", 2);
  write_bytes(path("foreign.safetensors"), safetensors_bytes(header, data));
  const SafetensorsReader reader(path("foreign.safetensors"));
  EXPECT_EQ(reader.metadata().at("k"), "v");
  const Tensor b = reader.read_tensor(*reader.find("b"));
  EXPECT_EQ(b.data<std::int32_t>()[0], 7);
  EXPECT_EQ(b.data<std::int32_t>()[1], -3);
  const Tensor a = reader.read_tensor(*reader.find("a"));
  ASSERT_EQ(a.ndim(), 2);
  EXPECT_EQ(a.data<std::int8_t>()[1], -5);
}

TEST_F(CaseFileTest, RejectsMissingAndTruncatedFiles) {
  expect_case_file_error([&] { SafetensorsReader reader(path("nope.safetensors")); }, {"nope.safetensors", "cannot open"});
  expect_case_file_error([&] { SafetensorsReader reader(path("")); }, {"cannot open"});
  expect_bad_file(path("short"), "abc", {"short", "3 bytes", "8-byte header length"});
  expect_bad_file(path("empty"), "", {"0 bytes"});
  // A well-formed file cut short: the header length now runs past the end.
  const std::string header = R"({"t":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})";
  const std::string whole = safetensors_bytes(header, std::string(16, '\0'));
  expect_bad_file(path("cut_header"), whole.substr(0, 20), {"runs past the end of the file", "truncated"});
  // Cut inside the data: the tensor now reaches past the buffer.
  expect_bad_file(path("cut_data"), whole.substr(0, whole.size() - 4), {"tensor 't'", "past the data buffer"});
}

TEST_F(CaseFileTest, RejectsBadHeaderLengths) {
  expect_bad_file(path("huge"), length_prefix(std::uint64_t{1} << 40) + "{}", {"exceeds the limit"});
  expect_bad_file(path("max"), length_prefix(~std::uint64_t{0}) + "{}", {"exceeds the limit"});
  expect_bad_file(path("zero"), length_prefix(0) + "{}", {"header length 0"});
  expect_bad_file(path("long"), length_prefix(100) + "{}", {"header length 100", "past the end"});
}

TEST_F(CaseFileTest, RejectsBadJson) {
  expect_bad_file(path("garbage"), safetensors_bytes("{not json}", ""), {"not valid JSON"});
  expect_bad_file(path("cut"), safetensors_bytes(R"({"t": {"dtype": "F32")", ""), {"not valid JSON"});
  expect_bad_file(path("array"), safetensors_bytes("[1, 2]", ""), {"must start with '{'"});
  expect_bad_file(path("trailing"), safetensors_bytes("{} x", ""), {"not valid JSON"});
  expect_bad_file(path("utf8"), safetensors_bytes("{\"\xff\": 1}", ""), {"not valid JSON"});
  expect_bad_file(path("dup"),
                  safetensors_bytes(R"({"t":{"dtype":"I8","shape":[1],"data_offsets":[0,1]},)"
                                    R"("t":{"dtype":"I8","shape":[1],"data_offsets":[1,2]}})",
                                    "ab"),
                  {"'t' twice"});
}

TEST_F(CaseFileTest, RejectsBadEntries) {
  const auto entry_file = [&](const std::string& name, const std::string& spec, std::size_t data_bytes,
                              std::initializer_list<std::string> fragments) {
    expect_bad_file(path(name), safetensors_bytes("{\"t\": " + spec + "}", std::string(data_bytes, '\0')), fragments);
  };
  entry_file("not_object", "[1]", 0, {"tensor 't'", "JSON object"});
  entry_file("no_offsets", R"({"dtype":"F32","shape":[1]})", 4, {"tensor 't'", "missing field 'data_offsets'"});
  entry_file("no_dtype", R"({"shape":[1],"data_offsets":[0,4]})", 4, {"missing field 'dtype'"});
  entry_file("no_shape", R"({"dtype":"F32","data_offsets":[0,4]})", 4, {"missing field 'shape'"});
  entry_file("extra", R"({"dtype":"F32","shape":[1],"data_offsets":[0,4],"align":8})", 4, {"unknown field 'align'"});
  entry_file("f64", R"({"dtype":"F64","shape":[1],"data_offsets":[0,8]})", 8, {"unsupported dtype 'F64'"});
  entry_file("u16", R"({"dtype":"U16","shape":[1],"data_offsets":[0,2]})", 2, {"unsupported dtype 'U16'"});
  entry_file("dtype_num", R"({"dtype":3,"shape":[1],"data_offsets":[0,4]})", 4, {"dtype must be a string"});
  entry_file("neg_dim", R"({"dtype":"F32","shape":[-1],"data_offsets":[0,4]})", 4, {"non-negative integers"});
  entry_file("float_dim", R"({"dtype":"F32","shape":[1.0],"data_offsets":[0,4]})", 4, {"non-negative integers"});
  entry_file("shape_obj", R"({"dtype":"F32","shape":{},"data_offsets":[0,4]})", 4, {"shape must be an array"});
  entry_file("one_offset", R"({"dtype":"F32","shape":[1],"data_offsets":[4]})", 4, {"data_offsets must be [begin, end]"});
  entry_file("neg_offset", R"({"dtype":"F32","shape":[1],"data_offsets":[-4,0]})", 4, {"data_offsets must be"});
  entry_file("reversed", R"({"dtype":"F32","shape":[1],"data_offsets":[4,0]})", 4, {"end before they begin"});
  entry_file("mismatch", R"({"dtype":"BF16","shape":[2,3],"data_offsets":[0,10]})", 10,
             {"tensor 't'", "hold 10 bytes", "[2, 3]", "needs 12 bytes"});
  entry_file("overflow", R"({"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4]})", 4,
             {"size overflows"});
  entry_file("out_of_range", R"({"dtype":"F32","shape":[2],"data_offsets":[0,8]})", 4, {"past the data buffer of 4 bytes"});
  entry_file("big_offset", R"({"dtype":"F32","shape":[1],"data_offsets":[0,18446744073709551615]})", 4,
             {"data_offsets must be"});
  expect_bad_file(path("empty_name"),
                  safetensors_bytes(R"({"":{"dtype":"I8","shape":[1],"data_offsets":[0,1]}})", "a"), {"empty name"});
}

TEST_F(CaseFileTest, RejectsOverlapsGapsAndTrailingBytes) {
  expect_bad_file(path("overlap"),
                  safetensors_bytes(R"({"a":{"dtype":"I8","shape":[4],"data_offsets":[0,4]},)"
                                    R"("b":{"dtype":"I8","shape":[4],"data_offsets":[2,6]}})",
                                    std::string(6, 'x')),
                  {"tensor 'b'", "overlap tensor 'a'"});
  expect_bad_file(path("same"),
                  safetensors_bytes(R"({"a":{"dtype":"I8","shape":[4],"data_offsets":[0,4]},)"
                                    R"("b":{"dtype":"I8","shape":[4],"data_offsets":[0,4]}})",
                                    std::string(4, 'x')),
                  {"overlap"});
  expect_bad_file(path("gap"),
                  safetensors_bytes(R"({"a":{"dtype":"I8","shape":[2],"data_offsets":[0,2]},)"
                                    R"("b":{"dtype":"I8","shape":[2],"data_offsets":[4,6]}})",
                                    std::string(6, 'x')),
                  {"bytes [2, 4)", "belong to no tensor"});
  expect_bad_file(path("trailing"),
                  safetensors_bytes(R"({"a":{"dtype":"I8","shape":[2],"data_offsets":[0,2]}})", std::string(5, 'x')),
                  {"5 bytes", "cover only 2"});
}

TEST_F(CaseFileTest, RejectsBadMetadata) {
  expect_bad_file(path("meta_array"), safetensors_bytes(R"({"__metadata__": [1]})", ""), {"__metadata__ must be"});
  expect_bad_file(path("meta_number"), safetensors_bytes(R"({"__metadata__": {"quant_mode": 2}})", ""),
                  {"'quant_mode' must be a string"});
  expect_bad_file(path("meta_null"), safetensors_bytes(R"({"__metadata__": {"a": null}})", ""), {"must be a string"});
}

TEST_F(CaseFileTest, ReadTensorRejectsRanksOtherThanOneAndTwo) {
  write_bytes(path("ranks.safetensors"),
              safetensors_bytes(R"({"cube":{"dtype":"I8","shape":[1,2,2],"data_offsets":[0,4]},)"
                                R"("scalar":{"dtype":"I8","shape":[],"data_offsets":[4,5]}})",
                                std::string(5, 'x')));
  const SafetensorsReader reader(path("ranks.safetensors"));  // legal safetensors ...
  expect_case_file_error([&] { (void)reader.read_tensor(*reader.find("cube")); },
                         {"tensor 'cube'", "[1, 2, 2]", "rank 3", "1-D or 2-D"});
  expect_case_file_error([&] { (void)reader.read_tensor(*reader.find("scalar")); }, {"rank 0", "1-D or 2-D"});
}

TEST_F(CaseFileTest, WriterRejectsMisuse) {
  const Tensor t = patterned(DType::int8, {2}, 1);
  SafetensorsWriter writer;
  writer.add("t", t);
  expect_case_file_error([&] { writer.add("t", t); }, {"'t' added twice"});
  expect_case_file_error([&] { writer.add("__metadata__", t); }, {"not a valid tensor name"});
  expect_case_file_error([&] { writer.add("absent", Tensor()); }, {"'absent' is absent"});
  expect_case_file_error([&] { writer.write(path("no_such_dir/out.safetensors")); }, {"cannot open for writing"});
}

// ---- case files ---------------------------------------------------------------------------------

TEST_F(CaseFileTest, CaseWriteReadRoundTrip) {
  CaseShape shape;
  shape.tp_world_size = 2;
  shape.moe_expert_num = 2;
  shape.dtype = DType::fp16;
  shape.bs = {3, 0, 2, 1};
  shape.global_bs = 6;
  shape.quant_mode = 2;
  shape.scales = true;
  shape.expert_scales = true;
  Case c = make_case(shape);
  c.comm_quant_mode = 0;
  c.expert_token_nums_type = 0;
  c.ranks[2].combine_x = patterned(DType::fp16, {5, shape.h}, 3);
  write_case(path("case.safetensors"), c);

  const Case back = read_case(path("case.safetensors"));
  expect_same_case(back, c);

  // The metadata is all strings, under the documented keys; a V1 case has no 'op' (absent means v1).
  const SafetensorsReader raw(path("case.safetensors"));
  EXPECT_EQ(raw.metadata().at("dtype"), "float16");
  EXPECT_EQ(raw.metadata().at("global_bs"), "6");
  EXPECT_EQ(raw.metadata().at("tp_world_size"), "2");
  EXPECT_EQ(raw.metadata().count("op"), 0u);
  EXPECT_EQ(raw.find("rank1.x")->shape, (std::vector<std::int64_t>{0, 8}));
}

// Random V2 cases (both mask kinds, zero / copy / const experts, ori_x, shared_expert_x, Sn 0-4, comm_alg, ...)
// come back field for field.
TEST_F(CaseFileTest, CaseWriteReadRoundTripV2) {
  int masks_2d = 0, const_experts = 0, shared_x = 0;
  for (std::uint64_t seed = 1; seed <= 40; ++seed) {
    const Case c = random_v2_case(seed);
    SCOPED_TRACE("seed " + std::to_string(seed) + ": " + testing::describe(c));
    ASSERT_EQ(c.op, 2);
    write_case(path("case.safetensors"), c);
    expect_same_case(read_case(path("case.safetensors")), c);
    const RankInputs& r0 = c.ranks.front();
    masks_2d += r0.x_active_mask.ndim() == 2 ? 1 : 0;
    const_experts += r0.const_expert_v.present() ? 1 : 0;
    shared_x += r0.shared_expert_x.present() ? 1 : 0;

    const SafetensorsReader raw(path("case.safetensors"));
    EXPECT_EQ(raw.metadata().at("op"), "v2");
    EXPECT_EQ(raw.metadata().at("comm_alg"), c.comm_alg);
    EXPECT_EQ(raw.metadata().at("zero_expert_num"), std::to_string(c.zero_expert_num));
  }
  // The seeds cover what the V2 fields add.
  EXPECT_GT(masks_2d, 0);
  EXPECT_GT(const_experts, 0);
  EXPECT_GT(shared_x, 0);
}

TEST_F(CaseFileTest, CaseMetadataRules) {
  const Case c = make_case(CaseShape{});
  const auto tensors = [&] {
    std::vector<std::pair<std::string, const Tensor*>> list;
    for (std::size_t g = 0; g < c.ranks.size(); ++g) {
      list.emplace_back("rank" + std::to_string(g) + ".x", &c.ranks[g].x);
      list.emplace_back("rank" + std::to_string(g) + ".expert_ids", &c.ranks[g].expert_ids);
    }
    return list;
  }();
  const std::string file = path("meta.safetensors");
  const auto expect_metadata_error = [&](const std::map<std::string, std::string>& metadata,
                                         std::initializer_list<std::string> fragments) {
    write_parts(file, metadata, tensors);
    expect_case_file_error([&] { (void)read_case(file); }, fragments);
  };

  write_parts(file, base_metadata(), tensors);
  EXPECT_NO_THROW((void)read_case(file));

  for (const auto& [key, value] : base_metadata()) {
    auto metadata = base_metadata();
    metadata.erase(key);
    expect_metadata_error(metadata, {"missing metadata key '" + key + "'"});
  }
  for (const std::string bad : {"12abc", "", " 2", "2 ", "+2", "0x10", "2.0", "two"}) {
    auto metadata = base_metadata();
    metadata["quant_mode"] = bad;
    expect_metadata_error(metadata, {"metadata 'quant_mode'", "not a decimal integer"});
  }
  auto metadata = base_metadata();
  metadata["global_bs"] = "-6";
  expect_metadata_error(metadata, {"'global_bs' is -6", "outside"});
  metadata = base_metadata();
  metadata["ep_world_size"] = "0";
  expect_metadata_error(metadata, {"'ep_world_size' is 0"});
  metadata = base_metadata();
  metadata["moe_expert_num"] = "99999999999999999999";
  expect_metadata_error(metadata, {"'moe_expert_num'", "outside"});
  metadata = base_metadata();
  metadata["ep_world_size"] = "4096";
  metadata["tp_world_size"] = "2";
  expect_metadata_error(metadata, {"8192 ranks"});
  metadata = base_metadata();
  metadata["dtype"] = "float32";
  expect_metadata_error(metadata, {"metadata 'dtype' is 'float32'"});
  // Extra metadata keys (notes, provenance) are allowed.
  metadata = base_metadata();
  metadata["comment"] = "recorded on host 3";
  write_parts(file, metadata, tensors);
  EXPECT_NO_THROW((void)read_case(file));
}

TEST_F(CaseFileTest, CaseTensorRules) {
  const Case c = make_case(CaseShape{});
  const std::string file = path("tensors.safetensors");
  // The valid tensors of the two ranks, with one entry replaced (nullptr removes it) and extras added.
  const auto expect_tensor_error = [&](const std::string& replace, const Tensor* with,
                                       std::initializer_list<std::string> fragments,
                                       const std::vector<std::pair<std::string, const Tensor*>>& extra = {}) {
    std::vector<std::pair<std::string, const Tensor*>> list;
    for (std::size_t g = 0; g < c.ranks.size(); ++g) {
      for (const auto& [field, tensor] : {std::pair<std::string, const Tensor*>{"x", &c.ranks[g].x},
                                          {"expert_ids", &c.ranks[g].expert_ids}}) {
        const std::string name = "rank" + std::to_string(g) + "." + field;
        if (name == replace) {
          if (with != nullptr) list.emplace_back(name, with);
        } else {
          list.emplace_back(name, tensor);
        }
      }
    }
    list.insert(list.end(), extra.begin(), extra.end());
    write_parts(file, base_metadata(), list);
    expect_case_file_error([&] { (void)read_case(file); }, fragments);
  };

  expect_tensor_error("rank1.x", nullptr, {"missing tensor 'rank1.x'"});
  expect_tensor_error("rank0.expert_ids", nullptr, {"missing tensor 'rank0.expert_ids'"});
  const Tensor x_f16 = patterned(DType::fp16, {3, 8}, 1);
  expect_tensor_error("rank1.x", &x_f16, {"'rank1.x'", "dtype F16 differs from the case dtype BF16"});
  const Tensor x_f32 = patterned(DType::fp32, {3, 8}, 1);
  expect_tensor_error("rank0.x", &x_f32, {"'rank0.x'", "dtype F32"});
  const Tensor x_1d = patterned(DType::bf16, {24}, 1);
  expect_tensor_error("rank0.x", &x_1d, {"'rank0.x'", "must be 2-D"});
  const Tensor x_wide = patterned(DType::bf16, {3, 9}, 1);
  expect_tensor_error("rank1.x", &x_wide, {"'rank1.x'", "H = 9", "H = 8"});
  const Tensor ids_i64 = patterned(DType::int64, {3, 2}, 1);
  expect_tensor_error("rank0.expert_ids", &ids_i64, {"'rank0.expert_ids'", "dtype must be I32"});
  const Tensor ids_rows = patterned(DType::int32, {2, 2}, 1);
  expect_tensor_error("rank0.expert_ids", &ids_rows, {"'rank0.expert_ids'", "2 rows", "BS = 3"});
  const Tensor ids_k = patterned(DType::int32, {3, 3}, 1);
  expect_tensor_error("rank1.expert_ids", &ids_k, {"'rank1.expert_ids'", "K = 3", "K = 2"});

  const Tensor* none = nullptr;
  const Tensor stray = patterned(DType::int8, {1}, 1);
  expect_tensor_error("", none, {"unknown tensor 'bias'"}, {{"bias", &stray}});
  expect_tensor_error("", none, {"unknown tensor 'rank0.bias'"}, {{"rank0.bias", &stray}});
  expect_tensor_error("", none, {"unknown tensor 'rank01.x'"}, {{"rank01.x", &c.ranks[1].x}});
  expect_tensor_error("", none, {"'rank2.x' names rank 2", "2 ranks"}, {{"rank2.x", &c.ranks[1].x}});
  const Tensor combine_f32 = patterned(DType::fp32, {3, 8}, 1);
  const Tensor scales_1d = patterned(DType::fp32, {8}, 1);
  expect_tensor_error("", none, {"'rank0.scales'", "must be 2-D"}, {{"rank0.scales", &scales_1d}});
  const Tensor scales_bf16 = patterned(DType::bf16, {4, 8}, 1);
  expect_tensor_error("", none, {"'rank0.scales'", "dtype must be F32"}, {{"rank0.scales", &scales_bf16}});
  const Tensor weights_shape = patterned(DType::fp32, {3, 3}, 1);
  expect_tensor_error("", none, {"'rank1.expert_scales'", "[3, 3]", "[3, 2]"},
                      {{"rank1.expert_scales", &weights_shape}});
  const Tensor weights_bf16 = patterned(DType::bf16, {3, 2}, 1);
  expect_tensor_error("", none, {"'rank1.expert_scales'", "dtype must be F32"},
                      {{"rank1.expert_scales", &weights_bf16}});
  const Tensor mask_i8 = patterned(DType::int8, {3}, 1);
  expect_tensor_error("", none, {"'rank0.x_active_mask'", "dtype must be BOOL"}, {{"rank0.x_active_mask", &mask_i8}});
  const Tensor mask_short = patterned(DType::boolean, {2}, 1);
  expect_tensor_error("", none, {"'rank1.x_active_mask'", "must be (BS,) = (3,)"},
                      {{"rank1.x_active_mask", &mask_short}});
  expect_tensor_error("", none, {"'rank0.combine_x'", "dtype F32 differs"}, {{"rank0.combine_x", &combine_f32}});
  const Tensor combine_narrow = patterned(DType::bf16, {3, 4}, 1);
  expect_tensor_error("", none, {"'rank0.combine_x'", "4 columns", "H = 8"}, {{"rank0.combine_x", &combine_narrow}});

  // 3-D tensors are valid safetensors but never moedist tensors.
  write_bytes(file, safetensors_bytes(R"({"rank0.x":{"dtype":"BF16","shape":[1,3,8],"data_offsets":[0,48]},)"
                                      R"("__metadata__":{"ep_world_size":"1","tp_world_size":"0",)"
                                      R"("moe_expert_num":"1","shared_expert_rank_num":"0","shared_expert_num":"1",)"
                                      R"("global_bs":"0","quant_mode":"0","expert_token_nums_type":"1",)"
                                      R"("comm_quant_mode":"0","dtype":"bfloat16"}})",
                                      std::string(48, '\0')));
  expect_case_file_error([&] { (void)read_case(file); }, {"tensor 'rank0.x'", "rank 3", "1-D or 2-D"});
}

// The metadata of a V2 case file over the two ranks of make_case(CaseShape{}): one zero and one const expert.
std::map<std::string, std::string> v2_metadata() {
  auto metadata = base_metadata();
  metadata["op"] = "v2";
  metadata["zero_expert_num"] = "1";
  metadata["copy_expert_num"] = "0";
  metadata["const_expert_num"] = "1";
  metadata["comm_alg"] = "";
  return metadata;
}

Tensor bool_tensor(std::vector<std::int64_t> shape, const std::vector<std::uint8_t>& values) {
  Tensor t = shape.size() == 1 ? Tensor(DType::boolean, shape[0]) : Tensor(DType::boolean, shape[0], shape[1]);
  std::copy(values.begin(), values.end(), t.data<std::uint8_t>());
  return t;
}

TEST_F(CaseFileTest, CaseV2Rules) {
  const Case c = make_case(CaseShape{});  // W 2, E 4, BS 3, K 2, H 8, bf16
  const std::string file = path("v2.safetensors");
  using Tensors = std::vector<std::pair<std::string, const Tensor*>>;
  const auto write = [&](const std::map<std::string, std::string>& metadata, const Tensors& extra) {
    Tensors list;
    for (std::size_t g = 0; g < c.ranks.size(); ++g) {
      list.emplace_back("rank" + std::to_string(g) + ".x", &c.ranks[g].x);
      list.emplace_back("rank" + std::to_string(g) + ".expert_ids", &c.ranks[g].expert_ids);
    }
    list.insert(list.end(), extra.begin(), extra.end());
    write_parts(file, metadata, list);
  };
  const auto expect_error = [&](const std::map<std::string, std::string>& metadata, const Tensors& extra,
                                std::initializer_list<std::string> fragments) {
    write(metadata, extra);
    expect_case_file_error([&] { (void)read_case(file); }, fragments);
  };

  // A valid V2 file: a (BS, K) mask on rank 0 and a (BS,) one on rank 1, ori_x, the const expert's (Q, H) tensors.
  const Tensor mask_2d = bool_tensor({3, 2}, {1, 0, 0, 0, 1, 1});
  const Tensor mask_1d = bool_tensor({3}, {1, 1, 0});
  const Tensor ori_x = patterned(DType::bf16, {3, 8}, 1);
  const Tensor const_row = patterned(DType::bf16, {1, 8}, 2);
  const Tensors v2_inputs = {{"rank0.x_active_mask", &mask_2d},
                             {"rank1.x_active_mask", &mask_1d},
                             {"rank0.ori_x", &ori_x},
                             {"rank1.shared_expert_x", &ori_x},
                             {"rank0.const_expert_alpha_1", &const_row},
                             {"rank0.const_expert_alpha_2", &const_row},
                             {"rank0.const_expert_v", &const_row}};
  write(v2_metadata(), v2_inputs);
  const Case v2 = read_case(file);
  EXPECT_EQ(v2.op, 2);
  EXPECT_EQ(v2.zero_expert_num, 1);
  EXPECT_EQ(v2.const_expert_num, 1);
  EXPECT_EQ(v2.comm_alg, "");
  EXPECT_EQ(v2.ranks[0].x_active_mask.ndim(), 2);
  EXPECT_TRUE(v2.ranks[1].shared_expert_x.present());
  auto metadata = v2_metadata();
  metadata["comm_alg"] = "fullmesh_v1";
  write(metadata, {});
  EXPECT_EQ(read_case(file).comm_alg, "fullmesh_v1");

  // op: absent or "v1" is V1; anything but "v1" and "v2" is refused.
  metadata = base_metadata();
  metadata["op"] = "v1";
  write(metadata, {});
  EXPECT_EQ(read_case(file).op, 1);
  for (const std::string bad : {"v3", "V2", "2", ""}) {
    metadata["op"] = bad;
    expect_error(metadata, {}, {"metadata 'op' is '" + bad + "'", "expected \"v1\"", "\"v2\""});
  }

  // A V2 file needs the four V2 keys, each in range; a V1 file has none of them.
  for (const std::string key : {"zero_expert_num", "copy_expert_num", "const_expert_num", "comm_alg"}) {
    metadata = v2_metadata();
    metadata.erase(key);
    expect_error(metadata, {}, {"missing metadata key '" + key + "'", "a V2 case file"});
    metadata = base_metadata();
    metadata[key] = "0";
    expect_error(metadata, {}, {"metadata '" + key + "' is a V2 key", "op v1", "metadata 'op' absent"});
  }
  metadata = v2_metadata();
  metadata["copy_expert_num"] = "-1";
  expect_error(metadata, {}, {"metadata 'copy_expert_num' is -1", "outside"});
  metadata["copy_expert_num"] = "one";
  expect_error(metadata, {}, {"metadata 'copy_expert_num' is 'one'", "not a decimal integer"});

  // A (BS, K) mask is a V2 input; in a V1 file the mask must be (BS,).
  expect_error(base_metadata(), {{"rank0.x_active_mask", &mask_2d}},
               {"'rank0.x_active_mask'", "shape [3, 2]", "must be (BS,) = (3,) in a V1 case", "V2 input",
                "'op' must be \"v2\""});
  const Tensor mask_3x3 = bool_tensor({3, 3}, std::vector<std::uint8_t>(9, 1));
  expect_error(v2_metadata(), {{"rank1.x_active_mask", &mask_3x3}},
               {"'rank1.x_active_mask'", "shape [3, 3]", "must be (BS,) = (3,) or (BS, K) = (3, 2)"});
  const Tensor mask_i8 = patterned(DType::int8, {3, 2}, 1);
  expect_error(v2_metadata(), {{"rank0.x_active_mask", &mask_i8}}, {"'rank0.x_active_mask'", "dtype must be BOOL"});

  // ori_x and shared_expert_x are (BS, H) in the case dtype.
  const Tensor ori_short = patterned(DType::bf16, {2, 8}, 1);
  expect_error(v2_metadata(), {{"rank1.ori_x", &ori_short}},
               {"'rank1.ori_x'", "shape [2, 8]", "must be (BS, H) = (3, 8)"});
  const Tensor ori_1d = patterned(DType::bf16, {24}, 1);
  expect_error(v2_metadata(), {{"rank0.shared_expert_x", &ori_1d}},
               {"'rank0.shared_expert_x'", "shape [24]", "must be (BS, H) = (3, 8)"});
  const Tensor ori_f16 = patterned(DType::fp16, {3, 8}, 1);
  expect_error(v2_metadata(), {{"rank0.ori_x", &ori_f16}},
               {"'rank0.ori_x'", "dtype F16 differs from the case dtype BF16"});

  // The const experts' tensors are (Q, H): a wrong Q, the older (Q,) alphas and a wrong H are refused.
  const Tensor two_rows = patterned(DType::bf16, {2, 8}, 1);
  expect_error(v2_metadata(), {{"rank0.const_expert_v", &two_rows}},
               {"'rank0.const_expert_v'", "shape [2, 8]", "must be (const_expert_num, H) = (1, 8)"});
  const Tensor alpha_1d = patterned(DType::bf16, {1}, 1);
  expect_error(v2_metadata(), {{"rank1.const_expert_alpha_1", &alpha_1d}},
               {"'rank1.const_expert_alpha_1'", "shape [1]", "must be (const_expert_num, H) = (1, 8)"});
  const Tensor alpha_narrow = patterned(DType::bf16, {1, 4}, 1);
  expect_error(v2_metadata(), {{"rank0.const_expert_alpha_2", &alpha_narrow}},
               {"'rank0.const_expert_alpha_2'", "shape [1, 4]", "(const_expert_num, H) = (1, 8)"});

  // Every V2 input in a V1 file is named.
  for (const auto& [name, tensor] : v2_inputs) {
    if (name.find("x_active_mask") != std::string::npos) continue;
    expect_error(base_metadata(), {{name, tensor}}, {"'" + name + "'", "is a V2 input", "the case is op v1"});
  }
  expect_error(v2_metadata(), {{"rank0.ori", &ori_x}}, {"unknown tensor 'rank0.ori'", ".ori_x"});
}

TEST_F(CaseFileTest, WriteCaseChecksTheOperator) {
  Case c = make_case(CaseShape{});
  c.zero_expert_num = 1;
  expect_case_file_error([&] { write_case(path("bad.safetensors"), c); },
                         {"zero_expert_num is 1", "the case is op v1", "op must be \"v2\""});
  c.zero_expert_num = 0;
  c.comm_alg = "fullmesh";
  expect_case_file_error([&] { write_case(path("bad.safetensors"), c); }, {"comm_alg is 'fullmesh'", "op v1"});
  c.comm_alg.clear();
  c.op = 3;
  expect_case_file_error([&] { write_case(path("bad.safetensors"), c); }, {"op is 3", "outside [1, 2]"});
  c.op = 1;
  c.ranks[1].const_expert_v = patterned(DType::bf16, {1, 8}, 1);
  expect_case_file_error([&] { write_case(path("bad.safetensors"), c); }, {"'rank1.const_expert_v'", "is a V2 input"});
  EXPECT_FALSE(fs::exists(path("bad.safetensors")));
}

TEST_F(CaseFileTest, WriteCaseChecksStructure) {
  Case c = make_case(CaseShape{});
  c.ranks.pop_back();
  expect_case_file_error([&] { write_case(path("bad.safetensors"), c); }, {"1 ranks", "= 2"});
  Case d = make_case(CaseShape{});
  d.ranks[1].x = Tensor();
  expect_case_file_error([&] { write_case(path("bad.safetensors"), d); }, {"missing tensor 'rank1.x'"});
  Case e = make_case(CaseShape{});
  e.dtype = DType::fp32;
  expect_case_file_error([&] { write_case(path("bad.safetensors"), e); }, {"bfloat16 or float16"});
  EXPECT_FALSE(fs::exists(path("bad.safetensors")));
}

TEST_F(CaseFileTest, ReadOutputsChecksItsFormat) {
  const Tensor t = patterned(DType::int32, {2}, 1);
  write_parts(path("case_like.safetensors"), base_metadata(), {{"rank0.expand_idx", &t}});
  expect_case_file_error([&] { (void)read_outputs(path("case_like.safetensors"), 1); },
                         {"not a replay output file"});
  write_parts(path("v2.safetensors"), {{"format", "moedist-replay-outputs"}, {"version", "2"}}, {});
  expect_case_file_error([&] { (void)read_outputs(path("v2.safetensors"), 1); }, {"version '2'"});
  write_parts(path("partial.safetensors"), {{"format", "moedist-replay-outputs"}, {"version", "1"}},
              {{"rank0.expand_idx", &t}});
  expect_case_file_error([&] { (void)read_outputs(path("partial.safetensors"), 1); },
                         {"missing tensor 'rank0.expand_x'"});
  // expand_idx (V1) or assist_info_for_combine (V2), never both or neither; triples come in threes.
  const Tensor x = patterned(DType::bf16, {1, 8}, 1);
  const Tensor counts = patterned(DType::int32, {2}, 1);
  const Tensor token_nums = patterned(DType::int64, {1}, 1);
  const Tensor triples = patterned(DType::int32, {3}, 1);
  const Tensor four = patterned(DType::int32, {4}, 1);
  const std::map<std::string, std::string> format = {{"format", "moedist-replay-outputs"}, {"version", "1"}};
  const std::vector<std::pair<std::string, const Tensor*>> common = {{"rank0.expand_x", &x},
                                                                     {"rank0.expert_token_nums", &token_nums},
                                                                     {"rank0.ep_recv_counts", &counts},
                                                                     {"rank0.combine_out", &x}};
  const auto with = [&](std::vector<std::pair<std::string, const Tensor*>> extra) {
    extra.insert(extra.end(), common.begin(), common.end());
    return extra;
  };
  write_parts(path("v2_out.safetensors"), format, with({{"rank0.assist_info_for_combine", &triples}}));
  EXPECT_EQ(read_outputs(path("v2_out.safetensors"), 1).front().assist_info_for_combine.rows(), 3);
  write_parts(path("both.safetensors"), format,
              with({{"rank0.assist_info_for_combine", &triples}, {"rank0.expand_idx", &counts}}));
  expect_case_file_error(
      [&] { (void)read_outputs(path("both.safetensors"), 1); },
      {"exactly one of tensors 'rank0.expand_idx' (V1) and 'rank0.assist_info_for_combine' (V2)", "got both"});
  write_parts(path("neither.safetensors"), format, with({}));
  expect_case_file_error([&] { (void)read_outputs(path("neither.safetensors"), 1); }, {"got neither"});
  write_parts(path("four.safetensors"), format, with({{"rank0.assist_info_for_combine", &four}}));
  expect_case_file_error([&] { (void)read_outputs(path("four.safetensors"), 1); },
                         {"'rank0.assist_info_for_combine' has 4 entries, not a multiple of 3"});
  try {
    (void)read_outputs(path("partial.safetensors"), 0);
    ADD_FAILURE() << "world_size 0 accepted";
  } catch (const Error& error) {
    EXPECT_EQ(error.code(), ErrorCode::invalid_argument);
  }
}

// ---- replay -------------------------------------------------------------------------------------

// write_case -> read_case -> run_case -> write_outputs -> read_outputs gives back exactly what run_case
// returned, and running the original case again gives the same bytes (replay is deterministic).
std::vector<RankOutputs> replay_round_trip(const Case& c, const std::string& case_file, const std::string& out_file) {
  write_case(case_file, c);
  const Case back = read_case(case_file);
  std::vector<RankOutputs> outputs = run_case(back);
  write_outputs(out_file, outputs);
  const std::vector<RankOutputs> reread = read_outputs(out_file, static_cast<int>(outputs.size()));
  expect_same_outputs(reread, outputs);
  expect_same_outputs(run_case(c), outputs);
  return outputs;
}

TEST_F(CaseFileTest, ReplayRoundTripIdentityExperts) {
  const Case c = make_case(CaseShape{});
  const auto outputs = replay_round_trip(c, path("case.safetensors"), path("out.safetensors"));
  ASSERT_EQ(outputs.size(), 2u);
  std::int64_t valid_total = 0;
  for (std::size_t g = 0; g < outputs.size(); ++g) {
    const RankOutputs& out = outputs[g];
    valid_total += out.expand_x.rows();
    EXPECT_FALSE(out.dynamic_scales.present());
    EXPECT_FALSE(out.expand_scales.present());
    EXPECT_FALSE(out.tp_recv_counts.present());
    EXPECT_EQ(out.expand_idx.rows(), 3 * 2);
    // Identity experts with unit weights and no shared expert: combine_out = K * x, exactly.
    const Tensor& x = c.ranks[g].x;
    ASSERT_EQ(out.combine_out.rows(), x.rows());
    for (std::int64_t i = 0; i < x.numel(); ++i) {
      const float expected = 2.0f * numeric::bf16_to_f32(x.data<std::uint16_t>()[i]);
      EXPECT_EQ(numeric::bf16_to_f32(out.combine_out.data<std::uint16_t>()[i]), expected) << "rank " << g << " i " << i;
    }
  }
  EXPECT_EQ(valid_total, 2 * 3 * 2);  // every (token, k) lands exactly once
}

// fp16, quant_mode 2, combine weights, and a rank without tokens.
Case quantized_case_with_empty_rank() {
  CaseShape shape;
  shape.dtype = DType::fp16;
  shape.quant_mode = 2;
  shape.expert_scales = true;
  shape.bs = {3, 0};
  shape.global_bs = 6;
  return make_case(shape);
}

// W 4 with one shared-expert rank, quant_mode 2 and smooth scales.
Case shared_expert_case_with_smooth_scales() {
  CaseShape shape;
  shape.ep_world_size = 4;
  shape.shared_expert_rank_num = 1;
  shape.moe_expert_num = 3;
  shape.quant_mode = 2;
  shape.scales = true;
  shape.bs = {4, 4, 4, 4};
  return make_case(shape);
}

TEST_F(CaseFileTest, ReplayRoundTripQuantizedWithWeightsAndEmptyRank) {
  const Case c = quantized_case_with_empty_rank();
  const auto outputs = replay_round_trip(c, path("case.safetensors"), path("out.safetensors"));
  for (const RankOutputs& out : outputs) {
    EXPECT_EQ(out.expand_x.dtype(), DType::int8);
    EXPECT_EQ(out.dynamic_scales.rows(), out.expand_x.rows());
    EXPECT_EQ(out.expand_scales.rows(), out.expand_x.rows());
    EXPECT_EQ(out.combine_out.dtype(), DType::fp16);
  }
  EXPECT_EQ(outputs[1].combine_out.rows(), 0);
}

// Token masks (rank 0: 2 of 4 tokens active, rank 2: none, rank 3: all) round-trip and replay with
// the oracle's results; the inactive tokens' combine rows are zero.
TEST_F(CaseFileTest, ReplayRoundTripTokenMasks) {
  Case c = shared_expert_case_with_smooth_scales();
  const std::int64_t active[] = {2, 4, 0, 4};
  for (std::size_t g = 0; g < 4; ++g) {
    c.ranks[g].x_active_mask = Tensor(DType::boolean, 4);
    for (std::int64_t b = 0; b < 4; ++b) c.ranks[g].x_active_mask.data<std::uint8_t>()[b] = b < active[g] ? 1 : 0;
  }
  const auto outputs = replay_round_trip(c, path("case.safetensors"), path("out.safetensors"));
  EXPECT_TRUE(read_case(path("case.safetensors")).ranks[0].x_active_mask.present());
  EXPECT_EQ(testing::compare_with_oracle(c, outputs, oracle::run(testing::to_oracle_case(c))), "");
  for (std::size_t g = 0; g < 4; ++g) {
    const Tensor& y = outputs[g].combine_out;
    for (std::int64_t i = active[g] * y.cols(); i < y.numel(); ++i)
      ASSERT_EQ(y.data<std::uint16_t>()[i], 0) << "rank " << g;
  }
}

TEST_F(CaseFileTest, ReplayRoundTripSharedExpertWithSmoothScales) {
  const Case c = shared_expert_case_with_smooth_scales();
  const auto outputs = replay_round_trip(c, path("case.safetensors"), path("out.safetensors"));
  EXPECT_EQ(outputs[0].expert_token_nums.rows(), 1);  // the shared-expert rank hosts one expert
}

// W 2 x TP 2 with uneven BS, combine weights and explicit expert outputs (combine_x).
Case tensor_parallel_case_with_expert_outputs() {
  CaseShape shape;
  shape.tp_world_size = 2;
  shape.moe_expert_num = 2;
  shape.bs = {2, 3, 1, 2};
  shape.global_bs = 6;
  shape.expert_scales = true;
  Case c = make_case(shape);
  // Learn each rank's valid rows from an identity run, then give explicit expert outputs.
  const auto identity = run_case(c);
  for (std::size_t g = 0; g < c.ranks.size(); ++g) {
    EXPECT_TRUE(identity[g].tp_recv_counts.present());
    EXPECT_EQ(identity[g].tp_recv_counts.rows(), 2);
    c.ranks[g].combine_x = Tensor(shape.dtype, identity[g].expand_x.rows(), shape.h);
    for (std::int64_t i = 0; i < c.ranks[g].combine_x.numel(); ++i) {
      c.ranks[g].combine_x.data<std::uint16_t>()[i] = to_half(shape.dtype, static_cast<float>(i % 7) - 3.0f);
    }
  }
  return c;
}

TEST_F(CaseFileTest, ReplayRoundTripTensorParallelWithExpertOutputs) {
  replay_round_trip(tensor_parallel_case_with_expert_outputs(), path("case.safetensors"), path("out.safetensors"));
}

TEST_F(CaseFileTest, ReplayRejectsCombineXWithWrongRowCount) {
  Case c = make_case(CaseShape{});
  const auto identity = run_case(c);
  c.ranks[1].combine_x = Tensor(c.dtype, identity[1].expand_x.rows() + 1, 8);
  expect_case_file_error([&] { (void)run_case(c); },
                         {"rank 1", "'rank1.combine_x'", std::to_string(identity[1].expand_x.rows() + 1) + " rows",
                          std::to_string(identity[1].expand_x.rows()) + " valid rows"});
}

TEST_F(CaseFileTest, ReplayReportsLibraryValidationErrors) {
  Case c = make_case(CaseShape{});
  c.ranks[1].expert_ids.data<std::int32_t>()[0] = 99;  // structurally fine, semantically out of range
  write_case(path("case.safetensors"), c);
  const Case back = read_case(path("case.safetensors"));
  try {
    (void)run_case(back);
    ADD_FAILURE() << "expert id 99 accepted";
  } catch (const Error& e) {
    EXPECT_NE(e.code(), ErrorCode::case_file) << e.what();
    EXPECT_NE(std::string(e.what()).find("rank "), std::string::npos) << e.what();
  }
}

// Random V2 cases replay through their case file (written, read back, run, outputs written and read back)
// with the V2 oracle's outputs bit for bit: the triples, zero rows for inactive tokens, the special experts.
TEST_F(CaseFileTest, ReplayV2MatchesTheOracle) {
  for (std::uint64_t seed = 1; seed <= 24; ++seed) {
    const Case c = random_v2_case(seed, 8);
    SCOPED_TRACE("seed " + std::to_string(seed) + ": " + testing::describe(c));
    const auto outputs = replay_round_trip(c, path("case.safetensors"), path("out.safetensors"));
    EXPECT_EQ(testing::oracle_diff(read_case(path("case.safetensors")), outputs), "");
    for (const RankOutputs& out : outputs) {
      EXPECT_FALSE(out.expand_idx.present());
      ASSERT_TRUE(out.assist_info_for_combine.present());
      EXPECT_EQ(out.assist_info_for_combine.rows() % 3, 0);
    }
  }
}

// A rule of the V2 operator the file's structure cannot see (a (BS,) mask that is not a prefix) is the
// library's error, named for its rank, not a case_file one.
TEST_F(CaseFileTest, ReplayReportsV2LibraryErrors) {
  Case c = v2_case_with([](const Case& v2) {
    return v2.ranks[0].x_active_mask.ndim() == 1 && v2.ranks[0].x.rows() >= 2 && v2.global_bs == 0;
  });
  std::uint8_t* mask = c.ranks[0].x_active_mask.data<std::uint8_t>();
  std::fill_n(mask, c.ranks[0].x.rows(), std::uint8_t{1});
  mask[0] = 0;
  write_case(path("case.safetensors"), c);
  try {
    (void)run_case(read_case(path("case.safetensors")));
    ADD_FAILURE() << "a (BS,) mask with a false before a true accepted";
  } catch (const Error& e) {
    EXPECT_NE(e.code(), ErrorCode::case_file) << e.what();
    EXPECT_NE(std::string(e.what()).find("rank 0 (ep_rank 0, tp_rank 0): "), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("x_active_mask"), std::string::npos) << e.what();
  }
}

TEST_F(CaseFileTest, ReplayRejectsV2CombineXWithWrongRowCount) {
  Case c = v2_case_with([](const Case& v2) { return v2.ranks[0].combine_x.present(); });
  const auto rows = c.ranks[0].combine_x.rows();
  c.ranks[0].combine_x = Tensor(c.dtype, rows + 1, c.ranks[0].x.cols());
  expect_case_file_error([&] { (void)run_case(c); }, {"rank 0", "'rank0.combine_x'", std::to_string(rows + 1) + " rows",
                                                      std::to_string(rows) + " valid rows"});
}

// ---- ranks as processes ---------------------------------------------------------------------------

// A worker process hands one rank's outputs to the parent in a file of their own.
TEST_F(CaseFileTest, RankOutputFilesRoundTrip) {
  std::vector<RankOutputs> outputs = run_case(tensor_parallel_case_with_expert_outputs());
  write_rank_outputs(path("rank2.safetensors"), 2, outputs[2]);
  std::vector<RankOutputs> back;
  back.push_back(read_rank_outputs(path("rank2.safetensors"), 2));
  std::vector<RankOutputs> expected;
  expected.push_back(std::move(outputs[2]));
  expect_same_outputs(back, expected);
  expect_case_file_error([&] { (void)read_rank_outputs(path("rank2.safetensors"), 1); },
                         {"names rank 2", "holds the outputs of rank 1 only"});
}

// run_rank_processes with `sh` as the worker program: what the parent says when a worker fails without
// writing an error, and that its private directory is gone afterwards.
void expect_rank_processes_fail(int ranks, const std::string& script, ErrorCode code,
                                std::initializer_list<std::string> fragments) {
  std::string dir;
  try {
    run_rank_processes(
        ranks, 0,
        [&](const std::string& private_dir) {
          dir = private_dir;
          return std::vector<std::string>{"sh", "-c", script};
        },
        [](int g, const std::string&) { ADD_FAILURE() << "read a result of rank " << g; });
    ADD_FAILURE() << "no error for: " << script;
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), code) << e.what();
    for (const std::string& fragment : fragments) {
      EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << "lacks '" << fragment << "': " << e.what();
    }
  }
  ASSERT_FALSE(dir.empty());
  EXPECT_FALSE(fs::exists(dir)) << dir << " outlived the run";
}

TEST_F(CaseFileTest, RankProcessesNameTheRankThatDied) {
  // The killed rank is named, not the ranks that exited 0 without a result.
  expect_rank_processes_fail(3, "[ \"$MOEDIST_RANK\" != 1 ] || kill -9 $$", ErrorCode::peer_lost,
                             {"rank 1 (pid ", "killed by signal 9", "without reporting an error"});
  expect_rank_processes_fail(3, "[ \"$MOEDIST_RANK\" != 2 ] || exit 3", ErrorCode::peer_lost,
                             {"rank 2 (pid ", "exited with status 3"});
  expect_rank_processes_fail(2, "exit 0", ErrorCode::internal,
                             {"rank 0 (ep_rank 0, tp_rank 0)", "exited 0 without writing"});
}

// `moedist replay` as a user runs it, over both transports. ctest runs these as cli.replay_shm with
// MOEDIST_CLI naming the binary (tools/CMakeLists.txt); run alone, they are skipped.
class ReplayCli : public CaseFileTest {
 protected:
  void SetUp() override {
    CaseFileTest::SetUp();
    const char* cli = std::getenv("MOEDIST_CLI");
    if (cli == nullptr || *cli == '\0') GTEST_SKIP() << "MOEDIST_CLI is unset; ctest sets it for cli.replay_shm";
    cli_ = cli;
  }

  // Runs `moedist replay FLAGS CASE OUT`; returns its exit status and leaves its stdout and stderr in *log.
  // `launcher` goes before the binary (an mpirun command line).
  int replay(const std::string& flags, const std::string& case_file, const std::string& out_file, std::string* log,
             const std::string& launcher = "") {
    const std::string log_file = path("replay.log");
    const std::string command = launcher + " '" + cli_ + "' replay " + flags + " '" + case_file + "' '" + out_file + "' > '" +
                                log_file + "' 2>&1";
    const int status = std::system(command.c_str());
    *log = read_bytes(log_file);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }

  // Replays every case over shm (a process per rank) and checks OUT against the in-process replay and run_case.
  void expect_shm_writes_the_same_bytes(const std::vector<std::pair<std::string, Case>>& cases);
  // Replays every case under mpirun on 1 and 2 virtual hosts and checks OUT against the in-process replay.
  void expect_mpi_writes_the_same_bytes(const std::vector<std::pair<std::string, Case>>& cases);

 private:
  std::string cli_;
};

using NamedCases = std::vector<std::pair<std::string, Case>>;

NamedCases v1_cli_cases() {
  NamedCases cases;
  cases.emplace_back("identity experts", make_case(CaseShape{}));
  cases.emplace_back("tensor parallel with expert outputs", tensor_parallel_case_with_expert_outputs());
  cases.emplace_back("shared expert with smooth scales", shared_expert_case_with_smooth_scales());
  cases.emplace_back("quantized, a rank without tokens", quantized_case_with_empty_rank());
  return cases;
}

// V2 cases of what V2 adds, each the first random case (v2_case_with) that has it.
NamedCases v2_cli_cases() {
  const auto any_rank = [](const Case& c, const std::function<bool(const RankInputs&)>& property) {
    return std::any_of(c.ranks.begin(), c.ranks.end(), property);
  };
  NamedCases cases;
  cases.emplace_back("v2: (BS, K) masks, zero, copy and const experts", v2_case_with([&](const Case& c) {
                       return c.zero_expert_num > 0 && c.copy_expert_num > 0 && c.const_expert_num > 0 &&
                              any_rank(c, [](const RankInputs& in) { return in.x_active_mask.ndim() == 2; });
                     }));
  cases.emplace_back("v2: (BS,) masks, 2 or more shared experts", v2_case_with([&](const Case& c) {
                       return c.shared_expert_num >= 2 &&
                              any_rank(c, [](const RankInputs& in) { return in.x_active_mask.ndim() == 1; });
                     }));
  cases.emplace_back("v2: tensor parallel", v2_case_with([](const Case& c) { return c.tp_world_size == 2; }));
  cases.emplace_back("v2: int8 with expert outputs and shared_expert_x", v2_case_with([](const Case& c) {
                       return c.quant_mode == 2 && c.ranks[0].combine_x.present() &&
                              c.ranks[0].shared_expert_x.present();
                     }));
  return cases;
}

void ReplayCli::expect_shm_writes_the_same_bytes(const NamedCases& cases) {
  for (const auto& [name, c] : cases) {
    SCOPED_TRACE(name);
    write_case(path("case.safetensors"), c);
    std::string log;
    ASSERT_EQ(replay("", path("case.safetensors"), path("inproc.safetensors"), &log), 0) << log;
    ASSERT_EQ(replay("--transport shm", path("case.safetensors"), path("shm.safetensors"), &log), 0) << log;
    EXPECT_NE(log.find("wrote the outputs of " + std::to_string(c.ranks.size()) + " ranks"), std::string::npos) << log;
    const std::string inproc = read_bytes(path("inproc.safetensors"));
    EXPECT_FALSE(inproc.empty());
    EXPECT_TRUE(read_bytes(path("shm.safetensors")) == inproc) << "the shm replay wrote other bytes";
    write_outputs(path("library.safetensors"), run_case(c));
    EXPECT_TRUE(read_bytes(path("library.safetensors")) == inproc) << "the CLI wrote other bytes than run_case";
  }
}

TEST_F(ReplayCli, ShmWritesTheSameBytesAsInproc) { expect_shm_writes_the_same_bytes(v1_cli_cases()); }

TEST_F(ReplayCli, ShmWritesTheSameBytesAsInprocV2) { expect_shm_writes_the_same_bytes(v2_cli_cases()); }

// mpirun with one process per rank, on `hosts` virtual hosts (cli.replay_mpi sets MOEDIST_MPIRUN). With TP pairs
// (tp_pairs) a host holds an even number of ranks, since a pair must share one.
std::string mpirun(std::size_t ranks, std::size_t hosts, bool tp_pairs = false) {
  const char* mpirun = std::getenv("MOEDIST_MPIRUN");
  std::size_t per_host = (ranks + hosts - 1) / hosts;
  if (tp_pairs) per_host += per_host % 2;
  return std::string(mpirun == nullptr ? "mpirun" : mpirun) + " --oversubscribe -np " + std::to_string(ranks) +
         " -x MOEDIST_RANKS_PER_NODE=" + std::to_string(per_host);
}

void ReplayCli::expect_mpi_writes_the_same_bytes(const NamedCases& cases) {
  for (const auto& [name, c] : cases) {
    for (const std::size_t hosts : {std::size_t{1}, std::size_t{2}}) {
      SCOPED_TRACE(name + ", " + std::to_string(hosts) + " virtual hosts");
      write_case(path("case.safetensors"), c);
      std::string log;
      ASSERT_EQ(replay("", path("case.safetensors"), path("inproc.safetensors"), &log), 0) << log;
      ASSERT_EQ(replay("--transport mpi", path("case.safetensors"), path("mpi.safetensors"), &log,
                       mpirun(c.ranks.size(), hosts, c.tp_world_size == 2)),
                0)
          << log;
      EXPECT_NE(log.find("wrote the outputs of " + std::to_string(c.ranks.size()) + " ranks"), std::string::npos) << log;
      const std::string inproc = read_bytes(path("inproc.safetensors"));
      EXPECT_FALSE(inproc.empty());
      EXPECT_TRUE(read_bytes(path("mpi.safetensors")) == inproc) << "the mpi replay wrote other bytes";
    }
  }
}

TEST_F(ReplayCli, MpiWritesTheSameBytesAsInproc) { expect_mpi_writes_the_same_bytes(v1_cli_cases()); }

TEST_F(ReplayCli, MpiWritesTheSameBytesAsInprocV2) { expect_mpi_writes_the_same_bytes(v2_cli_cases()); }

TEST_F(ReplayCli, MpiNamesTheFailingRank) {
  Case bad_id = make_case(CaseShape{});
  bad_id.ranks[1].expert_ids.data<std::int32_t>()[0] = 99;
  write_case(path("bad_id.safetensors"), bad_id);
  std::string log;
  EXPECT_EQ(replay("--transport mpi", path("bad_id.safetensors"), path("out.safetensors"), &log, mpirun(bad_id.ranks.size(), 2)), 2) << log;
  EXPECT_NE(log.find("rank 1 (ep_rank 1, tp_rank 0): expert_ids"), std::string::npos) << log;
  EXPECT_FALSE(fs::exists(path("out.safetensors")));
  // mpirun with the wrong number of processes.
  write_case(path("case.safetensors"), make_case(CaseShape{}));
  EXPECT_EQ(replay("--transport mpi", path("case.safetensors"), path("out.safetensors"), &log, mpirun(bad_id.ranks.size() + 1, 1)), 2) << log;
  EXPECT_NE(log.find("mpirun -np = " + std::to_string(bad_id.ranks.size() + 1) + ": must equal"), std::string::npos) << log;
}

TEST_F(ReplayCli, ShmNamesTheFailingRank) {
  Case bad_id = make_case(CaseShape{});
  bad_id.ranks[1].expert_ids.data<std::int32_t>()[0] = 99;
  write_case(path("bad_id.safetensors"), bad_id);
  std::string log;
  EXPECT_EQ(replay("--transport shm", path("bad_id.safetensors"), path("out.safetensors"), &log), 2) << log;
  EXPECT_NE(log.find("rank 1 (ep_rank 1, tp_rank 0): expert_ids"), std::string::npos) << log;
  EXPECT_FALSE(fs::exists(path("out.safetensors")));

  // Rank 1 fails between dispatch and combine, so the others lose it in combine: its own error is reported.
  Case bad_rows = make_case(CaseShape{});
  const auto identity = run_case(bad_rows);
  bad_rows.ranks[1].combine_x = Tensor(bad_rows.dtype, identity[1].expand_x.rows() + 1, 8);
  write_case(path("bad_rows.safetensors"), bad_rows);
  EXPECT_EQ(replay("--transport shm --timeout-ms 20000", path("bad_rows.safetensors"), path("out.safetensors"), &log),
            2)
      << log;
  EXPECT_NE(log.find("error (case_file): rank 1 (ep_rank 1, tp_rank 0): tensor 'rank1.combine_x'"), std::string::npos)
      << log;
}

}  // namespace
}  // namespace moedist::casefile
