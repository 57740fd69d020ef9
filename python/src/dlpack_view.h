// Tensors from Python without a compile-time dependency on torch: any object with __dlpack__ (torch
// tensors, numpy arrays) is read through the DLPack ABI and viewed in place, strides and all.
#pragma once

#include <pybind11/pybind11.h>

#include <string>

#include "moedist/tensor.h"

namespace moedist::python {

// A borrowed view of a Python tensor; the capsule keeps the producer's memory alive while it is held.
struct Borrowed {
  pybind11::object capsule;
  MutableTensorView view;  // writable only where the producer's memory is
};

// Views `obj` (None gives an absent view). `name` is the torch_npu parameter name for errors.
// as_bfloat16: the object holds uint16 bit patterns that are bfloat16 values (numpy has no bfloat16).
// Raises ValidationError for a device other than the CPU, a dtype moedist does not know, more than two
// dimensions, or vector lanes.
Borrowed borrow(pybind11::handle obj, const std::string& name, bool as_bfloat16 = false);

}  // namespace moedist::python
