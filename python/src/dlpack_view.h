// Tensors from Python without a compile-time dependency on torch: any object with __dlpack__ (torch
// tensors, numpy arrays) is read through the DLPack ABI and viewed in place, strides and all.
#pragma once

#include <pybind11/pybind11.h>

#include <string>

#include "moedist/tensor.h"

namespace moedist::python {

// How to read the elements of a borrowed tensor. Some dtypes cannot cross as themselves: numpy has no
// bfloat16 (callers pass uint16 bit patterns) and torch 1.13's DLPack refuses bool (the package passes
// the tensor's bytes, viewed as uint8). The package says which parameter holds which.
enum class ViewAs : std::uint8_t {
  native,    // the producer's own dtype
  bfloat16,  // 16-bit integers that are bfloat16 bit patterns
  boolean,   // bytes that are bools (0 = false)
};

// Where a call's tensors must live: host memory (the CPU groups), or a CUDA device (the CUDA group).
enum class Memory : std::uint8_t { host, cuda };

// A borrowed view of a Python tensor; the capsule keeps the producer's memory alive while it is held.
struct Borrowed {
  pybind11::object capsule;
  MutableTensorView view;  // writable only where the producer's memory is
  int device = -1;         // the CUDA device of a Memory::cuda view (DLPack's device_id); -1 for host memory
};

// Views `obj` (None gives an absent view). `name` is the torch_npu parameter name for errors.
// Raises ValidationError for an object that is no tensor or cannot be exported, memory other than
// `where` asks for (the CPU; or a CUDA device, whose tensors come through DLPack only), a dtype moedist
// does not know, more than two dimensions, negative strides or vector lanes.
Borrowed borrow(pybind11::handle obj, const std::string& name, ViewAs as = ViewAs::native, Memory where = Memory::host);

}  // namespace moedist::python
