#include "call_tensors.h"

#include "common/format.h"
#include "moedist/error.h"

namespace moedist::python {

namespace py = pybind11;

Borrowed Placement::take(py::handle obj, const char* name) const {
  if (memory == Memory::host) {
    const ViewAs as = views != nullptr && views->contains(name) ? (*views)[name].cast<ViewAs>() : ViewAs::native;
    return borrow(obj, name, as);
  }
  Borrowed b = borrow(obj, name, ViewAs::native, Memory::cuda);
  if (b.view.present() && b.device != device)
    fail(ErrorCode::invalid_argument, concat(name, ".device"), concat("cuda:", b.device),
         concat("must be the device of the call's x and of its CUDA group, cuda:", device));
  return b;
}

DispatchTensors::DispatchTensors(const Placement& at, py::handle x_, py::handle expert_ids_, py::handle scales_,
                                 py::handle x_active_mask_, py::handle expert_scales_)
    : x(at.take(x_, "x")),
      expert_ids(at.take(expert_ids_, "expert_ids")),
      scales(at.take(scales_, "scales")),
      x_active_mask(at.take(x_active_mask_, "x_active_mask")),
      expert_scales(at.take(expert_scales_, "expert_scales")) {}

DispatchOptions DispatchTensors::options(int quant_mode, int expert_token_nums_type) const {
  DispatchOptions o;
  o.scales = scales.view;
  o.x_active_mask = x_active_mask.view;
  o.expert_scales = expert_scales.view;
  o.quant_mode = quant_mode;
  o.expert_token_nums_type = expert_token_nums_type;
  return o;
}

CombineTensors::CombineTensors(const Placement& at, py::handle expand_x_, py::handle expert_ids_,
                               py::handle expand_idx_, py::handle ep_send_counts_, py::handle expert_scales_,
                               py::handle tp_send_counts_, py::handle x_active_mask_, py::handle activation_scale_,
                               py::handle weight_scale_, py::handle group_list_, py::handle expand_scales_,
                               py::handle shared_expert_x_)
    : expand_x(at.take(expand_x_, "expand_x")),
      expert_ids(at.take(expert_ids_, "expert_ids")),
      expand_idx(at.take(expand_idx_, "expand_idx")),
      ep_send_counts(at.take(ep_send_counts_, "ep_send_counts")),
      expert_scales(at.take(expert_scales_, "expert_scales")),
      tp_send_counts(at.take(tp_send_counts_, "tp_send_counts")),
      x_active_mask(at.take(x_active_mask_, "x_active_mask")),
      activation_scale(at.take(activation_scale_, "activation_scale")),
      weight_scale(at.take(weight_scale_, "weight_scale")),
      group_list(at.take(group_list_, "group_list")),
      expand_scales(at.take(expand_scales_, "expand_scales")),
      shared_expert_x(at.take(shared_expert_x_, "shared_expert_x")) {}

CombineOptions CombineTensors::options(int out_dtype, int comm_quant_mode, int group_list_type) const {
  CombineOptions o;
  o.tp_send_counts = tp_send_counts.view;
  o.x_active_mask = x_active_mask.view;
  o.activation_scale = activation_scale.view;
  o.weight_scale = weight_scale.view;
  o.group_list = group_list.view;
  o.expand_scales = expand_scales.view;
  o.shared_expert_x = shared_expert_x.view;
  o.out_dtype = out_dtype;
  o.comm_quant_mode = comm_quant_mode;
  o.group_list_type = group_list_type;
  return o;
}

DispatchV2Tensors::DispatchV2Tensors(const Placement& at, py::handle x_, py::handle expert_ids_, py::handle scales_,
                                     py::handle x_active_mask_, py::handle expert_scales_, py::handle elastic_info_,
                                     py::handle performance_info_)
    : x(at.take(x_, "x")),
      expert_ids(at.take(expert_ids_, "expert_ids")),
      scales(at.take(scales_, "scales")),
      x_active_mask(at.take(x_active_mask_, "x_active_mask")),
      expert_scales(at.take(expert_scales_, "expert_scales")),
      elastic_info(at.take(elastic_info_, "elastic_info")),
      performance_info(at.take(performance_info_, "performance_info")) {}

DispatchV2Options DispatchV2Tensors::options(int quant_mode, int expert_token_nums_type, int zero_expert_num,
                                             int copy_expert_num, int const_expert_num,
                                             const std::string& comm_alg) const {
  DispatchV2Options o;
  o.scales = scales.view;
  o.x_active_mask = x_active_mask.view;
  o.expert_scales = expert_scales.view;
  o.elastic_info = elastic_info.view;
  o.performance_info = performance_info.view;  // the caller's tensor, raised in place
  o.quant_mode = quant_mode;
  o.expert_token_nums_type = expert_token_nums_type;
  o.zero_expert_num = zero_expert_num;
  o.copy_expert_num = copy_expert_num;
  o.const_expert_num = const_expert_num;
  o.comm_alg = comm_alg;
  return o;
}

CombineV2Tensors::CombineV2Tensors(const Placement& at, py::handle expand_x_, py::handle expert_ids_,
                                   py::handle assist_info_for_combine_, py::handle ep_send_counts_,
                                   py::handle expert_scales_, py::handle tp_send_counts_, py::handle x_active_mask_,
                                   py::handle expand_scales_, py::handle shared_expert_x_, py::handle elastic_info_,
                                   py::handle ori_x_, py::handle const_expert_alpha_1_,
                                   py::handle const_expert_alpha_2_, py::handle const_expert_v_,
                                   py::handle performance_info_)
    : expand_x(at.take(expand_x_, "expand_x")),
      expert_ids(at.take(expert_ids_, "expert_ids")),
      assist_info_for_combine(at.take(assist_info_for_combine_, "assist_info_for_combine")),
      ep_send_counts(at.take(ep_send_counts_, "ep_send_counts")),
      expert_scales(at.take(expert_scales_, "expert_scales")),
      tp_send_counts(at.take(tp_send_counts_, "tp_send_counts")),
      x_active_mask(at.take(x_active_mask_, "x_active_mask")),
      expand_scales(at.take(expand_scales_, "expand_scales")),
      shared_expert_x(at.take(shared_expert_x_, "shared_expert_x")),
      elastic_info(at.take(elastic_info_, "elastic_info")),
      ori_x(at.take(ori_x_, "ori_x")),
      const_expert_alpha_1(at.take(const_expert_alpha_1_, "const_expert_alpha_1")),
      const_expert_alpha_2(at.take(const_expert_alpha_2_, "const_expert_alpha_2")),
      const_expert_v(at.take(const_expert_v_, "const_expert_v")),
      performance_info(at.take(performance_info_, "performance_info")) {}

CombineV2Options CombineV2Tensors::options(int comm_quant_mode, int zero_expert_num, int copy_expert_num,
                                           int const_expert_num, const std::string& comm_alg) const {
  CombineV2Options o;
  o.tp_send_counts = tp_send_counts.view;
  o.x_active_mask = x_active_mask.view;
  o.expand_scales = expand_scales.view;
  o.shared_expert_x = shared_expert_x.view;
  o.elastic_info = elastic_info.view;
  o.ori_x = ori_x.view;
  o.const_expert_alpha_1 = const_expert_alpha_1.view;
  o.const_expert_alpha_2 = const_expert_alpha_2.view;
  o.const_expert_v = const_expert_v.view;
  o.performance_info = performance_info.view;  // the caller's tensor, raised in place
  o.comm_quant_mode = comm_quant_mode;
  o.zero_expert_num = zero_expert_num;
  o.copy_expert_num = copy_expert_num;
  o.const_expert_num = const_expert_num;
  o.comm_alg = comm_alg;
  return o;
}

}  // namespace moedist::python
