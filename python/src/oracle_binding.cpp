// moedist._moedist.oracle_run: the reference oracle (src/oracle), for the package's tests to compare
// the Python operators with, bit for bit.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>
#include <vector>

#include "oracle/oracle.h"
#include "oracle/oracle_v2.h"

namespace py = pybind11;

namespace moedist::python {
namespace {

template <class T>
std::vector<T> flat(const py::handle& obj) {
  if (obj.is_none()) return {};
  const auto a = py::array_t<T, py::array::c_style | py::array::forcecast>::ensure(obj);
  if (!a) throw std::invalid_argument("oracle_run: an input is not an array");
  return std::vector<T>(a.data(), a.data() + a.size());
}

template <class T>
py::array_t<T> array_of(const std::vector<T>& v, std::int64_t rows, std::int64_t cols) {
  py::array_t<T> a(cols > 0 ? std::vector<py::ssize_t>{rows, cols} : std::vector<py::ssize_t>{static_cast<py::ssize_t>(v.size())});
  std::copy(v.begin(), v.end(), a.mutable_data());
  return a;
}

// d[key], or None when the key is missing.
py::object get(const py::dict& d, const char* key) { return d.contains(key) ? py::object(d[key]) : py::object(py::none()); }

}  // namespace

void bind_oracle(py::module_& m) {
  m.def(
      "oracle_run",
      [](const py::dict& d) {
        oracle::Case c;
        c.ep_world_size = d["ep_world_size"].cast<int>();
        c.tp_world_size = d["tp_world_size"].cast<int>();
        c.moe_expert_num = d["moe_expert_num"].cast<int>();
        c.shared_expert_rank_num = d["shared_expert_rank_num"].cast<int>();
        c.global_bs = d["global_bs"].cast<std::int64_t>();
        c.quant_mode = d["quant_mode"].cast<int>();
        c.expert_token_nums_type = d["expert_token_nums_type"].cast<int>();
        c.comm_quant_mode = d["comm_quant_mode"].cast<int>();
        c.dtype = d["dtype"].cast<std::string>() == "float16" ? numeric::Half::fp16 : numeric::Half::bf16;
        c.h = d["h"].cast<std::int64_t>();
        c.k = d["k"].cast<std::int64_t>();
        for (const py::handle r : d["ranks"]) {
          const py::dict rank = py::reinterpret_borrow<py::dict>(r);
          oracle::RankInput in;
          in.x = flat<std::uint16_t>(rank["x"]);
          in.bs = static_cast<std::int64_t>(in.x.size()) / c.h;
          in.expert_ids = flat<std::int32_t>(rank["expert_ids"]);
          in.scales = flat<float>(get(rank, "scales"));
          in.expert_scales = flat<float>(get(rank, "expert_scales"));
          in.x_active_mask = flat<std::uint8_t>(get(rank, "x_active_mask"));  // bool arrays cast to 0/1
          in.has_combine_x = !get(rank, "combine_x").is_none();
          in.combine_x = flat<std::uint16_t>(get(rank, "combine_x"));
          c.ranks.push_back(std::move(in));
        }
        const std::vector<oracle::RankOutput> outs = oracle::run(c);
        py::list result;
        for (std::size_t g = 0; g < outs.size(); ++g) {
          const oracle::RankOutput& o = outs[g];
          py::dict r;
          r["valid_rows"] = o.valid_rows;
          if (c.quant_mode == 2) {
            r["expand_x"] = array_of(o.expand_x_int8, o.valid_rows, c.h);
          } else {
            r["expand_x"] = array_of(o.expand_x, o.valid_rows, c.h);
          }
          r["dynamic_scales"] = array_of(o.dynamic_scales, 0, 0);
          r["expand_scales"] = array_of(o.expand_scales, 0, 0);
          r["expand_idx"] = array_of(o.expand_idx, 0, 0);
          r["expert_token_nums"] = array_of(o.expert_token_nums, 0, 0);
          r["ep_recv_counts"] = array_of(o.ep_recv_counts, 0, 0);
          r["tp_recv_counts"] = array_of(o.tp_recv_counts, 0, 0);
          r["combine_out"] = array_of(o.combine_out, c.ranks[g].bs, c.h);
          result.append(r);
        }
        return result;
      },
      py::arg("case"), "Runs the reference oracle on every rank's inputs (testing only).");
  m.def(
      "oracle_v2_run",
      [](const py::dict& d) {
        oracle::v2::Case c;
        c.ep_world_size = d["ep_world_size"].cast<int>();
        c.tp_world_size = d["tp_world_size"].cast<int>();
        c.moe_expert_num = d["moe_expert_num"].cast<int>();
        c.shared_expert_rank_num = d["shared_expert_rank_num"].cast<int>();
        c.shared_expert_num = d["shared_expert_num"].cast<int>();
        c.zero_expert_num = d["zero_expert_num"].cast<int>();
        c.copy_expert_num = d["copy_expert_num"].cast<int>();
        c.const_expert_num = d["const_expert_num"].cast<int>();
        c.global_bs = d["global_bs"].cast<std::int64_t>();
        c.quant_mode = d["quant_mode"].cast<int>();
        c.expert_token_nums_type = d["expert_token_nums_type"].cast<int>();
        c.comm_quant_mode = d["comm_quant_mode"].cast<int>();
        c.dtype = d["dtype"].cast<std::string>() == "float16" ? numeric::Half::fp16 : numeric::Half::bf16;
        c.h = d["h"].cast<std::int64_t>();
        c.k = d["k"].cast<std::int64_t>();
        for (const py::handle r : d["ranks"]) {
          const py::dict rank = py::reinterpret_borrow<py::dict>(r);
          oracle::v2::RankInput in;
          in.x = flat<std::uint16_t>(rank["x"]);
          in.bs = static_cast<std::int64_t>(in.x.size()) / c.h;
          in.expert_ids = flat<std::int32_t>(rank["expert_ids"]);
          in.scales = flat<float>(get(rank, "scales"));
          in.expert_scales = flat<float>(get(rank, "expert_scales"));
          const py::object mask = get(rank, "x_active_mask");
          in.x_active_mask = flat<std::uint8_t>(mask);
          in.mask_2d = !mask.is_none() && mask.attr("ndim").cast<int>() == 2;
          in.ori_x = flat<std::uint16_t>(get(rank, "ori_x"));
          in.shared_expert_x = flat<std::uint16_t>(get(rank, "shared_expert_x"));
          in.const_expert_alpha_1 = flat<std::uint16_t>(get(rank, "const_expert_alpha_1"));
          in.const_expert_alpha_2 = flat<std::uint16_t>(get(rank, "const_expert_alpha_2"));
          in.const_expert_v = flat<std::uint16_t>(get(rank, "const_expert_v"));
          in.has_combine_x = !get(rank, "combine_x").is_none();
          in.combine_x = flat<std::uint16_t>(get(rank, "combine_x"));
          c.ranks.push_back(std::move(in));
        }
        const std::vector<oracle::v2::RankOutput> outs = oracle::v2::run(c);
        py::list result;
        for (std::size_t g = 0; g < outs.size(); ++g) {
          const oracle::v2::RankOutput& o = outs[g];
          py::dict r;
          r["valid_rows"] = o.valid_rows;
          r["own_rows"] = o.own_rows;
          if (c.quant_mode == 2) {
            r["expand_x"] = array_of(o.expand_x_int8, o.valid_rows, c.h);
          } else {
            r["expand_x"] = array_of(o.expand_x, o.valid_rows, c.h);
          }
          r["dynamic_scales"] = array_of(o.dynamic_scales, 0, 0);
          r["expand_scales"] = array_of(o.expand_scales, 0, 0);
          r["assist_info_for_combine"] = array_of(o.assist_info, 0, 0);
          r["expert_token_nums"] = array_of(o.expert_token_nums, 0, 0);
          r["ep_recv_counts"] = array_of(o.ep_recv_counts, 0, 0);
          r["tp_recv_counts"] = array_of(o.tp_recv_counts, 0, 0);
          r["combine_out"] = array_of(o.combine_out, c.ranks[g].bs, c.h);
          result.append(r);
        }
        return result;
      },
      py::arg("case"), "Runs the V2 reference oracle on every rank's inputs (testing only).");
}

}  // namespace moedist::python
