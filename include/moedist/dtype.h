// Element types of the tensors moedist reads and writes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace moedist {

// boolean: one byte per element, 0 = false, anything else = true (torch.bool, numpy bool_: x_active_mask).
enum class DType : std::uint8_t { bf16, fp16, fp32, int8, int32, int64, boolean };

// Size of one element in bytes.
std::size_t dtype_size(DType dtype) noexcept;

// torch-style name: "bfloat16", "float16", "float32", "int8", "int32", "int64", "bool".
std::string_view dtype_name(DType dtype) noexcept;

// Inverse of dtype_name; also accepts safetensors' names ("BF16", "F16", "F32", "I8", "I32", "I64", "BOOL")
// and the short forms "bf16", "fp16", "fp32", "i8", "i32", "i64", "b8".
// Returns false for an unknown name.
bool dtype_from_name(std::string_view name, DType* out) noexcept;

}  // namespace moedist
