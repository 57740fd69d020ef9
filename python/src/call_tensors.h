// The tensor arguments of one operator call, borrowed (dlpack_view.h) for where the call runs, and the
// C++ options they fill: shared by the CPU groups' binding (module.cpp) and the CUDA group's
// (cuda_binding.cpp), which differ in where the tensors must live, not in what the operators take.
#pragma once

#include <pybind11/pybind11.h>

#include <string>

#include "dlpack_view.h"
#include "moedist/group.h"

namespace moedist::python {

// Where a call's tensors must be: host memory, read as the package's `views` dict says ({parameter:
// ViewAs}); or CUDA memory of `device`, read as their own dtypes.
struct Placement {
  Memory memory = Memory::host;
  const pybind11::dict* views = nullptr;  // host only
  int device = -1;                        // cuda only

  static Placement host(const pybind11::dict& views) { return {Memory::host, &views, -1}; }
  static Placement cuda(int device) { return {Memory::cuda, nullptr, device}; }

  // One tensor argument (None: absent). A CUDA tensor of another device is a ValidationError naming it.
  Borrowed take(pybind11::handle obj, const char* name) const;
};

struct DispatchTensors {
  Borrowed x, expert_ids, scales, x_active_mask, expert_scales;
  DispatchTensors(const Placement& at, pybind11::handle x, pybind11::handle expert_ids, pybind11::handle scales,
                  pybind11::handle x_active_mask, pybind11::handle expert_scales);
  DispatchOptions options(int quant_mode, int expert_token_nums_type) const;
};

struct CombineTensors {
  Borrowed expand_x, expert_ids, expand_idx, ep_send_counts, expert_scales, tp_send_counts, x_active_mask,
      activation_scale, weight_scale, group_list, expand_scales, shared_expert_x;
  CombineTensors(const Placement& at, pybind11::handle expand_x, pybind11::handle expert_ids,
                 pybind11::handle expand_idx, pybind11::handle ep_send_counts, pybind11::handle expert_scales,
                 pybind11::handle tp_send_counts, pybind11::handle x_active_mask, pybind11::handle activation_scale,
                 pybind11::handle weight_scale, pybind11::handle group_list, pybind11::handle expand_scales,
                 pybind11::handle shared_expert_x);
  // Without `out`: the bindings give it themselves.
  CombineOptions options(int out_dtype, int comm_quant_mode, int group_list_type) const;
};

struct DispatchV2Tensors {
  Borrowed x, expert_ids, scales, x_active_mask, expert_scales, elastic_info, performance_info;
  DispatchV2Tensors(const Placement& at, pybind11::handle x, pybind11::handle expert_ids, pybind11::handle scales,
                    pybind11::handle x_active_mask, pybind11::handle expert_scales, pybind11::handle elastic_info,
                    pybind11::handle performance_info);
  DispatchV2Options options(int quant_mode, int expert_token_nums_type, int zero_expert_num, int copy_expert_num,
                            int const_expert_num, const std::string& comm_alg) const;
};

struct CombineV2Tensors {
  Borrowed expand_x, expert_ids, assist_info_for_combine, ep_send_counts, expert_scales, tp_send_counts, x_active_mask,
      expand_scales, shared_expert_x, elastic_info, ori_x, const_expert_alpha_1, const_expert_alpha_2, const_expert_v,
      performance_info;
  CombineV2Tensors(const Placement& at, pybind11::handle expand_x, pybind11::handle expert_ids,
                   pybind11::handle assist_info_for_combine, pybind11::handle ep_send_counts,
                   pybind11::handle expert_scales, pybind11::handle tp_send_counts, pybind11::handle x_active_mask,
                   pybind11::handle expand_scales, pybind11::handle shared_expert_x, pybind11::handle elastic_info,
                   pybind11::handle ori_x, pybind11::handle const_expert_alpha_1, pybind11::handle const_expert_alpha_2,
                   pybind11::handle const_expert_v, pybind11::handle performance_info);
  // Without `out`: the bindings give it themselves.
  CombineV2Options options(int comm_quant_mode, int zero_expert_num, int copy_expert_num, int const_expert_num,
                           const std::string& comm_alg) const;
};

}  // namespace moedist::python
