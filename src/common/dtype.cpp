#include "moedist/dtype.h"

namespace moedist {

std::size_t dtype_size(DType dtype) noexcept {
  switch (dtype) {
    case DType::bf16:
    case DType::fp16:
      return 2;
    case DType::fp32:
    case DType::int32:
      return 4;
    case DType::int8:
    case DType::boolean:
      return 1;
    case DType::int64:
      return 8;
  }
  return 0;
}

std::string_view dtype_name(DType dtype) noexcept {
  switch (dtype) {
    case DType::bf16:
      return "bfloat16";
    case DType::fp16:
      return "float16";
    case DType::fp32:
      return "float32";
    case DType::int8:
      return "int8";
    case DType::int32:
      return "int32";
    case DType::int64:
      return "int64";
    case DType::boolean:
      return "bool";
  }
  return "unknown";
}

bool dtype_from_name(std::string_view name, DType* out) noexcept {
  struct Entry {
    std::string_view a, b, c;
    DType t;
  };
  static constexpr Entry kNames[] = {{"bfloat16", "BF16", "bf16", DType::bf16}, {"float16", "F16", "fp16", DType::fp16},
                                     {"float32", "F32", "fp32", DType::fp32},   {"int8", "I8", "i8", DType::int8},
                                     {"int32", "I32", "i32", DType::int32},     {"int64", "I64", "i64", DType::int64},
                                     {"bool", "BOOL", "b8", DType::boolean}};
  for (const Entry& e : kNames) {
    if (name == e.a || name == e.b || name == e.c) {
      *out = e.t;
      return true;
    }
  }
  return false;
}

}  // namespace moedist
