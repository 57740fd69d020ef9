// moedist._moedist: the C++ groups and operators for the Python package (python/moedist). The Python
// layer gives them torch_npu's call signatures; this layer views tensors in place, releases the GIL
// for the collective calls, returns fresh numpy arrays, and turns moedist errors into the Python
// exceptions of moedist._errors with the same message.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>

#include "dlpack_view.h"
#include "moedist/config.h"
#include "moedist/dtype.h"
#include "moedist/error.h"
#include "moedist/group.h"
#include "moedist/launch.h"
#include "moedist/shm.h"
#include "moedist/version.h"
#include "moedist/wait.h"
#include "transport/registry.h"
#ifdef MOEDIST_HAVE_MPI
#include "moedist/mpi.h"
#endif

namespace py = pybind11;

namespace moedist::python {

void bind_oracle(py::module_& m);  // oracle_binding.cpp

namespace {

// Releases the GIL for a collective call, as py::gil_scoped_release does, and takes it back at the end of
// the scope -- except on a daemon thread whose interpreter is finalizing: CPython then ends the thread
// inside PyEval_RestoreThread with pthread_exit, whose forced unwinding may not leave a destructor (that
// is std::terminate: the whole process aborts at exit). Such a thread is parked instead, holding nothing
// of Python's, until the main thread's exit ends the process.
class WithoutGil {
 public:
  WithoutGil() : state_(PyEval_SaveThread()) {}
  WithoutGil(const WithoutGil&) = delete;
  WithoutGil& operator=(const WithoutGil&) = delete;
  ~WithoutGil() {
    try {
      PyEval_RestoreThread(state_);
    } catch (abi::__forced_unwind&) {  // never leaves the handler: the process is exiting
      for (;;) pause();
    }
  }

 private:
  PyThreadState* state_;
};

GroupConfig config_from(const py::dict& d) {
  GroupConfig c;
  const auto get = [&](const char* key, auto* field) {
    if (!d.contains(key)) return;
    const py::object value = d[key];
    const long long v = value.cast<long long>();
    using T = std::remove_pointer_t<decltype(field)>;
    if (v < static_cast<long long>(std::numeric_limits<T>::min()) ||
        v > static_cast<long long>(std::numeric_limits<T>::max())) {
      throw ValidationError(ErrorCode::invalid_argument, key, std::to_string(v), "is out of range");
    }
    *field = static_cast<T>(v);
  };
  get("ep_world_size", &c.ep_world_size);
  get("ep_rank_id", &c.ep_rank_id);
  get("moe_expert_num", &c.moe_expert_num);
  get("tp_world_size", &c.tp_world_size);
  get("tp_rank_id", &c.tp_rank_id);
  get("expert_shard_type", &c.expert_shard_type);
  get("shared_expert_num", &c.shared_expert_num);
  get("shared_expert_rank_num", &c.shared_expert_rank_num);
  get("global_bs", &c.global_bs);
  return c;
}

py::dtype numpy_dtype(DType dtype) {
  switch (dtype) {
    case DType::bf16:
      return py::dtype::of<std::uint16_t>();  // numpy has no bfloat16: the bit patterns
    case DType::fp16:
      return py::dtype("float16");
    case DType::fp32:
      return py::dtype::of<float>();
    case DType::int8:
      return py::dtype::of<std::int8_t>();
    case DType::int32:
      return py::dtype::of<std::int32_t>();
    case DType::int64:
      return py::dtype::of<std::int64_t>();
    case DType::boolean:
      return py::dtype::of<bool>();
  }
  return py::dtype::of<std::uint8_t>();
}

// A zero-filled C-contiguous (rows,) or (rows, cols) array. Its strides and size come from moedist's
// element sizes, never from the numpy dtype's itemsize: pybind11 before 2.12 (Debian 12 has 2.10) reads
// that from numpy 1's PyArray_Descr layout, which numpy 2 changed, so under numpy 2 it is garbage.
py::array zeros(DType dtype, std::int64_t rows, std::int64_t cols, bool matrix) {
  const auto element = static_cast<py::ssize_t>(dtype_size(dtype));
  const std::vector<py::ssize_t> shape = matrix ? std::vector<py::ssize_t>{rows, cols} : std::vector<py::ssize_t>{rows};
  const std::vector<py::ssize_t> strides =
      matrix ? std::vector<py::ssize_t>{cols * element, element} : std::vector<py::ssize_t>{element};
  py::array out(numpy_dtype(dtype), shape, strides);
  std::memset(out.mutable_data(), 0, static_cast<std::size_t>(rows * (matrix ? cols : 1) * element));
  return out;
}

// A fresh array holding the first `rows` rows of a contiguous group-owned view (the rest zero): results
// must outlive the next call, which reuses the group's buffers.
py::array fresh_copy(const TensorView& v, DType dtype, std::int64_t rows, std::int64_t cols, bool matrix) {
  py::array out = zeros(dtype, rows, cols, matrix);
  if (!v.present()) return out;
  const std::size_t row_bytes = static_cast<std::size_t>(matrix ? cols : 1) * dtype_size(dtype);
  auto* dst = static_cast<std::byte*>(out.mutable_data());
  const auto* src = static_cast<const std::byte*>(v.data);
  const std::size_t src_stride = static_cast<std::size_t>(v.strides[0]) * dtype_size(dtype);
  for (std::int64_t r = 0; r < std::min(rows, v.rows()); ++r) {
    std::memcpy(dst + static_cast<std::size_t>(r) * row_bytes, src + static_cast<std::size_t>(r) * src_stride,
                row_bytes);
  }
  return out;
}

// A tensor the call writes in place (performance_info): the caller's own memory, viewed as writable.
MutableTensorView writable(const TensorView& v) {
  MutableTensorView m;
  static_cast<Layout&>(m) = v;
  m.data = const_cast<void*>(v.data);
  m.dtype = v.dtype;
  return m;
}

// How the package asks that a parameter's tensor be read (dlpack_view.h): {parameter name: ViewAs}.
ViewAs view_as(const py::dict& views, const char* name) {
  return views.contains(name) ? views[name].cast<ViewAs>() : ViewAs::native;
}

// A C++ group as the package holds it. Its calls are serialized by its lock; close() destroys the group
// under that lock, so a call running on another thread finishes first, and every call after close()
// raises a moedist Error that says the group is closed.
class PyGroup {
 public:
  explicit PyGroup(std::unique_ptr<Group> g) : group_(std::move(g)) {}

  py::tuple dispatch(py::handle x, py::handle expert_ids, py::handle scales, py::handle x_active_mask,
                     py::handle expert_scales, int quant_mode, int expert_token_nums_type, const py::dict& views) {
    const Borrowed bx = borrow(x, "x", view_as(views, "x")), bids = borrow(expert_ids, "expert_ids"),
                   bscales = borrow(scales, "scales"),
                   bmask = borrow(x_active_mask, "x_active_mask", view_as(views, "x_active_mask")),
                   bweights = borrow(expert_scales, "expert_scales");
    DispatchOptions o;
    o.scales = bscales.view;
    o.x_active_mask = bmask.view;
    o.expert_scales = bweights.view;
    o.quant_mode = quant_mode;
    o.expert_token_nums_type = expert_token_nums_type;
    DispatchResult r;
    std::unique_lock<std::mutex> serial(*mutex_, std::defer_lock);
    {
      const WithoutGil unlocked;
      serial.lock();  // taken without the GIL, so that a thread waiting here never blocks the holder
      r = open_group("dispatch").dispatch(bx.view, bids.view, o);
    }
    // Still locked while the results are copied: they are group-owned buffers the next call reuses.
    // Row counts are a function of the arguments alone (capacity().max_receive_rows: torch_npu's
    // A * max(T, 1), more only on a shared-expert rank of ranks with different BS, where A can be
    // exceeded), so that the registered operator's fake gives the same static shapes (_custom_ops.py).
    const GroupConfig& c = group_->config();
    const std::int64_t rows = r.expand_x.rows();
    const std::int64_t h = r.expand_x.cols();
    return py::make_tuple(fresh_copy(r.expand_x, r.expand_x.dtype, rows, h, true),
                          fresh_copy(r.dynamic_scales, DType::fp32, rows, 1, false),
                          fresh_copy(r.expand_idx, DType::int32, r.expand_idx.rows(), 1, false),
                          fresh_copy(r.expert_token_nums, DType::int64, r.expert_token_nums.rows(), 1, false),
                          fresh_copy(r.ep_recv_counts, DType::int32, r.ep_recv_counts.rows(), 1, false),
                          fresh_copy(r.tp_recv_counts, DType::int32, std::max(c.tp_world_size, 0), 1, false),
                          fresh_copy(r.expand_scales, DType::fp32, rows, 1, false), r.valid_rows);
  }

  py::array combine(py::handle expand_x, py::handle expert_ids, py::handle expand_idx, py::handle ep_send_counts,
                    py::handle expert_scales, py::handle tp_send_counts, py::handle x_active_mask,
                    py::handle activation_scale, py::handle weight_scale, py::handle group_list,
                    py::handle expand_scales, py::handle shared_expert_x, int out_dtype, int comm_quant_mode,
                    int group_list_type, const py::dict& views) {
    const Borrowed bx = borrow(expand_x, "expand_x", view_as(views, "expand_x")),
                   bids = borrow(expert_ids, "expert_ids"), bidx = borrow(expand_idx, "expand_idx"),
                   bcounts = borrow(ep_send_counts, "ep_send_counts"),
                   bweights = borrow(expert_scales, "expert_scales"), btp = borrow(tp_send_counts, "tp_send_counts"),
                   bmask = borrow(x_active_mask, "x_active_mask", view_as(views, "x_active_mask")),
                   bact = borrow(activation_scale, "activation_scale"), bws = borrow(weight_scale, "weight_scale"),
                   bgl = borrow(group_list, "group_list"), bes = borrow(expand_scales, "expand_scales"),
                   bsx = borrow(shared_expert_x, "shared_expert_x");
    CombineOptions o;
    o.tp_send_counts = btp.view;
    o.x_active_mask = bmask.view;
    o.activation_scale = bact.view;
    o.weight_scale = bws.view;
    o.group_list = bgl.view;
    o.expand_scales = bes.view;
    o.shared_expert_x = bsx.view;
    o.out_dtype = out_dtype;
    o.comm_quant_mode = comm_quant_mode;
    o.group_list_type = group_list_type;
    // The output, (BS, H) in expand_x's dtype, written by combine itself. Shapes that cannot give it are
    // left to combine's own checks, which name the parameter.
    py::array out;
    const TensorView& x = bx.view;
    if (x.ndim == 2 && bids.view.ndim == 2 && (x.dtype == DType::bf16 || x.dtype == DType::fp16)) {
      out = zeros(x.dtype, bids.view.rows(), x.cols(), true);
      o.out = matrix_view(out.mutable_data(), x.dtype, bids.view.rows(), x.cols());
    }
    {
      const WithoutGil unlocked;
      const std::lock_guard<std::mutex> serial(*mutex_);
      open_group("combine").combine(x, bids.view, bidx.view, bcounts.view, bweights.view, o);
    }
    return out;
  }

  // The V2 pair. performance_info is a tensor the caller owns and the call updates in place.
  py::tuple dispatch_v2(py::handle x, py::handle expert_ids, py::handle scales, py::handle x_active_mask,
                        py::handle expert_scales, py::handle elastic_info, py::handle performance_info, int quant_mode,
                        int expert_token_nums_type, int zero_expert_num, int copy_expert_num, int const_expert_num,
                        const std::string& comm_alg, const py::dict& views) {
    const Borrowed bx = borrow(x, "x", view_as(views, "x")), bids = borrow(expert_ids, "expert_ids"),
                   bscales = borrow(scales, "scales"),
                   bmask = borrow(x_active_mask, "x_active_mask", view_as(views, "x_active_mask")),
                   bweights = borrow(expert_scales, "expert_scales"), belastic = borrow(elastic_info, "elastic_info"),
                   bperf = borrow(performance_info, "performance_info");
    DispatchV2Options o;
    o.scales = bscales.view;
    o.x_active_mask = bmask.view;
    o.expert_scales = bweights.view;
    o.elastic_info = belastic.view;
    o.performance_info = writable(bperf.view);
    o.quant_mode = quant_mode;
    o.expert_token_nums_type = expert_token_nums_type;
    o.zero_expert_num = zero_expert_num;
    o.copy_expert_num = copy_expert_num;
    o.const_expert_num = const_expert_num;
    o.comm_alg = comm_alg;
    DispatchResult r;
    std::unique_lock<std::mutex> serial(*mutex_, std::defer_lock);
    {
      const WithoutGil unlocked;
      serial.lock();
      r = open_group("dispatch_v2").dispatch_v2(bx.view, bids.view, o);
    }
    // torch_npu's shapes (V2 §1.4, _custom_ops.py): expand_x and dynamic_scales A * max(T, 1) rows,
    // assist_info_for_combine max(BS * K, 128 * A) entries (3 per own row written, the rest zero),
    // expand_scales A entries.
    const GroupConfig& c = group_->config();
    const std::int64_t rows = r.expand_x.rows();
    const std::int64_t h = r.expand_x.cols();
    const std::int64_t bsk = bids.view.rows() * bids.view.cols();
    const std::int64_t own_rows =
        r.valid_rows - (c.tp_world_size == 2 ? r.tp_recv_counts.at<std::int32_t>(1 - c.tp_rank_id) : 0);
    py::array assist = zeros(DType::int32, std::max(bsk, 128 * r.A), 1, false);
    std::memcpy(assist.mutable_data(), r.assist_info_for_combine.data, static_cast<std::size_t>(3 * own_rows) * 4);
    return py::make_tuple(fresh_copy(r.expand_x, r.expand_x.dtype, rows, h, true),
                          fresh_copy(r.dynamic_scales, DType::fp32, rows, 1, false), assist,
                          fresh_copy(r.expert_token_nums, DType::int64, r.expert_token_nums.rows(), 1, false),
                          fresh_copy(r.ep_recv_counts, DType::int32, r.ep_recv_counts.rows(), 1, false),
                          fresh_copy(r.tp_recv_counts, DType::int32, std::max(c.tp_world_size, 0), 1, false),
                          fresh_copy(r.expand_scales, DType::fp32, r.A, 1, false), r.valid_rows);
  }

  py::array combine_v2(py::handle expand_x, py::handle expert_ids, py::handle assist_info_for_combine,
                       py::handle ep_send_counts, py::handle expert_scales, py::handle tp_send_counts,
                       py::handle x_active_mask, py::handle expand_scales, py::handle shared_expert_x,
                       py::handle elastic_info, py::handle ori_x, py::handle const_expert_alpha_1,
                       py::handle const_expert_alpha_2, py::handle const_expert_v, py::handle performance_info,
                       int comm_quant_mode, int zero_expert_num, int copy_expert_num, int const_expert_num,
                       const std::string& comm_alg, const py::dict& views) {
    const Borrowed bx = borrow(expand_x, "expand_x", view_as(views, "expand_x")),
                   bids = borrow(expert_ids, "expert_ids"),
                   bassist = borrow(assist_info_for_combine, "assist_info_for_combine"),
                   bcounts = borrow(ep_send_counts, "ep_send_counts"),
                   bweights = borrow(expert_scales, "expert_scales"), btp = borrow(tp_send_counts, "tp_send_counts"),
                   bmask = borrow(x_active_mask, "x_active_mask", view_as(views, "x_active_mask")),
                   bes = borrow(expand_scales, "expand_scales"),
                   bsx = borrow(shared_expert_x, "shared_expert_x", view_as(views, "shared_expert_x")),
                   belastic = borrow(elastic_info, "elastic_info"),
                   bori = borrow(ori_x, "ori_x", view_as(views, "ori_x")),
                   ba1 = borrow(const_expert_alpha_1, "const_expert_alpha_1", view_as(views, "const_expert_alpha_1")),
                   ba2 = borrow(const_expert_alpha_2, "const_expert_alpha_2", view_as(views, "const_expert_alpha_2")),
                   bv = borrow(const_expert_v, "const_expert_v", view_as(views, "const_expert_v")),
                   bperf = borrow(performance_info, "performance_info");
    CombineV2Options o;
    o.tp_send_counts = btp.view;
    o.x_active_mask = bmask.view;
    o.expand_scales = bes.view;
    o.shared_expert_x = bsx.view;
    o.elastic_info = belastic.view;
    o.ori_x = bori.view;
    o.const_expert_alpha_1 = ba1.view;
    o.const_expert_alpha_2 = ba2.view;
    o.const_expert_v = bv.view;
    o.performance_info = writable(bperf.view);
    o.comm_quant_mode = comm_quant_mode;
    o.zero_expert_num = zero_expert_num;
    o.copy_expert_num = copy_expert_num;
    o.const_expert_num = const_expert_num;
    o.comm_alg = comm_alg;
    py::array out;
    const TensorView& x = bx.view;
    if (x.ndim == 2 && bids.view.ndim == 2 && (x.dtype == DType::bf16 || x.dtype == DType::fp16)) {
      out = zeros(x.dtype, bids.view.rows(), x.cols(), true);
      o.out = matrix_view(out.mutable_data(), x.dtype, bids.view.rows(), x.cols());
    }
    {
      const WithoutGil unlocked;
      const std::lock_guard<std::mutex> serial(*mutex_);
      open_group("combine_v2").combine_v2(x, bids.view, bassist.view, bcounts.view, bweights.view, o);
    }
    return out;
  }

  py::dict config() const {
    GroupConfig c;
    {
      const WithoutGil unlocked;
      const std::lock_guard<std::mutex> serial(*mutex_);
      c = open_group("config").config();
    }
    py::dict d;
    d["ep_world_size"] = c.ep_world_size;
    d["ep_rank_id"] = c.ep_rank_id;
    d["moe_expert_num"] = c.moe_expert_num;
    d["tp_world_size"] = c.tp_world_size;
    d["tp_rank_id"] = c.tp_rank_id;
    d["expert_shard_type"] = c.expert_shard_type;
    d["shared_expert_num"] = c.shared_expert_num;
    d["shared_expert_rank_num"] = c.shared_expert_rank_num;
    d["global_bs"] = c.global_bs;
    return d;
  }

  py::dict traffic() const {
    TrafficCounters t;
    {
      const WithoutGil unlocked;
      const std::lock_guard<std::mutex> serial(*mutex_);
      t = open_group("traffic").traffic();
    }
    py::dict d;
    d["dispatch_rows_sent"] = t.dispatch_rows_sent;
    d["dispatch_bytes_sent"] = t.dispatch_bytes_sent;
    d["combine_rows_read"] = t.combine_rows_read;
    d["combine_bytes_read"] = t.combine_bytes_read;
    d["dispatch_bytes_between_hosts"] = t.dispatch_bytes_between_hosts;
    d["dispatch_bytes_between_hosts_flat"] = t.dispatch_bytes_between_hosts_flat;
    d["combine_bytes_between_hosts"] = t.combine_bytes_between_hosts;
    d["combine_bytes_between_hosts_flat"] = t.combine_bytes_between_hosts_flat;
    return d;
  }

  // Destroys the C++ group (its buffers, shared memory and connections) and returns true. With wait, a
  // call running on another thread finishes first. Without wait (interpreter exit, when a daemon thread
  // may be stuck in a collective call for its timeout), a group in use is not destroyed: it is marked
  // closed for later calls and false is returned; the call that holds it keeps it to the end, and the
  // process's exit reclaims it. Closing a closed group does nothing.
  bool close(bool wait) {
    std::unique_ptr<Group> doomed;
    {
      const WithoutGil unlocked;
      std::unique_lock<std::mutex> serial(*mutex_, std::defer_lock);
      if (wait) {
        serial.lock();
      } else if (!serial.try_lock()) {
        closed_ = true;
        return false;
      }
      closed_ = true;
      doomed = std::move(group_);
      doomed.reset();  // still under the lock and without the GIL: a peer's last message may be awaited
    }
    return true;
  }

  bool closed() const { return closed_; }

 private:
  // The group, for a call made under the lock; a moedist Error once the group is closed.
  Group& open_group(const char* call) const {
    if (closed_ || !group_) {
      throw Error(ErrorCode::invalid_argument, std::string("moedist group: ") + call +
                                                   " on a closed group (closed by Group.close(), a with block's end "
                                                   "or interpreter exit): create the group again to use it");
    }
    return *group_;
  }

  std::unique_ptr<Group> group_;
  std::atomic<bool> closed_{false};
  // One C++ group serves every Python thread of the process that names it (group_for caches it per
  // world, members and config), and the GIL is released during its calls: this serializes them, since a Group's
  // calls must not overlap (they share its buffers, call counter and transport).
  std::unique_ptr<std::mutex> mutex_ = std::make_unique<std::mutex>();
};

// moedist errors as moedist._errors exceptions, with the C++ message and fields.
// pybind11 calls exception translators through void(*)(std::exception_ptr): by value.
void translate(std::exception_ptr e) {  // NOLINT(performance-unnecessary-value-param)
  try {
    if (e) std::rethrow_exception(e);
  } catch (const ValidationError& err) {
    const py::object cls = py::module_::import("moedist._errors").attr("ValidationError");
    const py::object obj = cls(err.what(), error_code_name(err.code()), err.parameter(), err.value(), err.rule());
    PyErr_SetObject(cls.ptr(), obj.ptr());
  } catch (const PeerError& err) {
    const py::object cls = py::module_::import("moedist._errors").attr("PeerError");
    const py::object obj = cls(err.what(), error_code_name(err.code()), err.peer(), err.phase());
    PyErr_SetObject(cls.ptr(), obj.ptr());
  } catch (const Error& err) {
    const py::object cls = py::module_::import("moedist._errors").attr("Error");
    const py::object obj = cls(err.what(), error_code_name(err.code()));
    PyErr_SetObject(cls.ptr(), obj.ptr());
  }
}

}  // namespace
}  // namespace moedist::python

PYBIND11_MODULE(_moedist, m) {
  using namespace moedist;
  using namespace moedist::python;
  m.doc() = "moedist's C++ groups and operators (use the moedist package, not this module)";
  m.attr("version") = version_string();
#ifdef MOEDIST_HAVE_MPI
  m.attr("has_mpi") = true;
#else
  m.attr("has_mpi") = false;
#endif
  py::register_exception_translator(&translate);
  // WaitOptions' default, so that the package's timeout_ms defaults are the C++ one.
  m.attr("default_timeout_ms") = static_cast<long long>(WaitOptions{}.timeout.count());

  // The transport registry (src/transport/registry.h): the package picks transports by these ids and
  // names rather than by literals of its own.
  py::enum_<TransportId> ids(m, "TransportId");
  for (const TransportKind& kind : transport_kinds()) ids.value(std::string(kind.name).c_str(), kind.id);
  m.def(
      "transport_name", [](TransportId id) { return std::string(transport_name(id)); }, py::arg("id"));
  m.def("transports", [] {
    py::list list;
    for (const TransportKind& kind : transport_kinds()) {
      py::dict d;
      d["id"] = kind.id;
      d["name"] = std::string(kind.name);
      d["description"] = std::string(kind.description);
      d["available"] = kind.available;
      d["why_unavailable"] = std::string(kind.why_unavailable);
      list.append(d);
    }
    return list;
  });

  py::enum_<ViewAs>(m, "ViewAs")
      .value("native", ViewAs::native)
      .value("bfloat16", ViewAs::bfloat16)
      .value("boolean", ViewAs::boolean);

  py::class_<PyGroup>(m, "Group")
      .def("dispatch", &PyGroup::dispatch, py::arg("x"), py::arg("expert_ids"), py::arg("scales"),
           py::arg("x_active_mask"), py::arg("expert_scales"), py::arg("quant_mode"), py::arg("expert_token_nums_type"),
           py::arg("views"))
      .def("combine", &PyGroup::combine, py::arg("expand_x"), py::arg("expert_ids"), py::arg("expand_idx"),
           py::arg("ep_send_counts"), py::arg("expert_scales"), py::arg("tp_send_counts"), py::arg("x_active_mask"),
           py::arg("activation_scale"), py::arg("weight_scale"), py::arg("group_list"), py::arg("expand_scales"),
           py::arg("shared_expert_x"), py::arg("out_dtype"), py::arg("comm_quant_mode"), py::arg("group_list_type"),
           py::arg("views"))
      .def("dispatch_v2", &PyGroup::dispatch_v2, py::arg("x"), py::arg("expert_ids"), py::arg("scales"),
           py::arg("x_active_mask"), py::arg("expert_scales"), py::arg("elastic_info"), py::arg("performance_info"),
           py::arg("quant_mode"), py::arg("expert_token_nums_type"), py::arg("zero_expert_num"),
           py::arg("copy_expert_num"), py::arg("const_expert_num"), py::arg("comm_alg"), py::arg("views"))
      .def("combine_v2", &PyGroup::combine_v2, py::arg("expand_x"), py::arg("expert_ids"),
           py::arg("assist_info_for_combine"), py::arg("ep_send_counts"), py::arg("expert_scales"),
           py::arg("tp_send_counts"), py::arg("x_active_mask"), py::arg("expand_scales"), py::arg("shared_expert_x"),
           py::arg("elastic_info"), py::arg("ori_x"), py::arg("const_expert_alpha_1"), py::arg("const_expert_alpha_2"),
           py::arg("const_expert_v"), py::arg("performance_info"), py::arg("comm_quant_mode"),
           py::arg("zero_expert_num"), py::arg("copy_expert_num"), py::arg("const_expert_num"), py::arg("comm_alg"),
           py::arg("views"))
      .def_property_readonly("config", &PyGroup::config)
      .def("traffic", &PyGroup::traffic)
      .def("close", &PyGroup::close, py::arg("wait") = true)
      .def_property_readonly("closed", &PyGroup::closed);

  m.def(
      "join_shm",
      [](const py::dict& config, const std::string& job, long long timeout_ms) {
        ShmOptions o;
        o.wait.timeout = std::chrono::milliseconds(timeout_ms);
        const GroupConfig c = config_from(config);
        std::unique_ptr<Group> g;
        {
          const WithoutGil unlocked;
          g = join_shm(c, job, o);
        }
        return std::make_unique<PyGroup>(std::move(g));
      },
      py::arg("config"), py::arg("job"), py::arg("timeout_ms"));
#ifdef MOEDIST_HAVE_MPI
  m.def(
      "join_mpi",
      [](std::uintptr_t comm_handle, const py::dict& config, long long timeout_ms) {
        MpiOptions o;
        o.wait.timeout = std::chrono::milliseconds(timeout_ms);
        const GroupConfig c = config_from(config);
        std::unique_ptr<Group> g;
        {
          const WithoutGil unlocked;
          g = join_mpi(reinterpret_cast<MPI_Comm>(comm_handle), c, o);  // NOLINT: an mpi4py handle is the C MPI_Comm
        }
        return std::make_unique<PyGroup>(std::move(g));
      },
      py::arg("comm_handle"), py::arg("config"), py::arg("timeout_ms"));
#endif
  m.def("new_job_name", &new_job_name);
  // The view the operators would read of a tensor (dtype, shape, strides in elements, address of the
  // first element), for the tests that show how each kind of tensor is read, and that no copy is made.
  m.def(
      "describe_view",
      [](py::handle obj, const std::string& name, ViewAs as) {
        const Borrowed b = borrow(obj, name, as);
        py::dict d;
        d["dtype"] = std::string(dtype_name(b.view.dtype));
        py::list shape, strides;
        for (int i = 0; i < b.view.ndim; ++i) {
          shape.append(b.view.shape[i]);
          strides.append(b.view.strides[i]);
        }
        d["shape"] = py::tuple(shape);
        d["strides"] = py::tuple(strides);
        d["address"] = reinterpret_cast<std::uintptr_t>(b.view.data);
        return d;
      },
      py::arg("tensor"), py::arg("name") = "tensor", py::arg("view_as") = ViewAs::native);
  // moedist::capacity() of a configuration and call shape: the static output shapes of the registered
  // operators' fakes (A, expand_x_rows = A * max(T, 1), max_receive_rows: the rows dispatch returns).
  m.def(
      "capacity",
      [](const py::dict& config, std::int64_t bs, std::int64_t k, std::int64_t h, int quant_mode, int version) {
        const GroupConfig c = config_from(config);
        CapacityQuery q;
        q.bs = bs;
        q.k = k;
        q.h = h;
        q.quant_mode = quant_mode;
        q.version = version;
        const CapacityReport r = capacity(c, q);
        py::dict d;
        d["A"] = r.A;
        d["expand_x_rows"] = r.expand_x_rows;
        d["max_receive_rows"] = r.max_receive_rows;
        d["local_expert_num"] = local_expert_num(c);
        d["ep_recv_counts_len"] =
            static_cast<std::int64_t>(c.ep_world_size) * local_expert_num(c) * (c.tp_world_size == 2 ? 2 : 1);
        return d;
      },
      py::arg("config"), py::arg("bs"), py::arg("k"), py::arg("h"), py::arg("quant_mode"), py::arg("version") = 1);
  // The configuration's rules (moedist::validate_config), checked before a group is looked for or joined.
  m.def(
      "validate_config", [](const py::dict& config) { validate_config(config_from(config)); }, py::arg("config"));
  m.def("launch_environment", [] {
    const LaunchEnvironment env = launch_environment();
    py::dict d;
    d["rank"] = env.rank;
    d["world_size"] = env.world_size;
    d["tp_world_size"] = env.tp_world_size;
    d["job"] = env.job;
    return d;
  });
  bind_oracle(m);
}
