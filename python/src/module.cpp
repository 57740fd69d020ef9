// moedist._moedist: the C++ groups and operators for the Python package (python/moedist). The Python
// layer gives them torch_npu's call signatures; this layer views tensors in place, releases the GIL
// for the collective calls, returns fresh results, and turns moedist errors into the Python exceptions
// of moedist._errors with the same message.
//
// Two ways in. dispatch_call / combine_call, the fast path, take a call's arguments as torch_npu orders
// them and run the plain call -- torch tensors on the CPU, int arguments that are Python ints, a group
// and configuration the package has resolved before -- reading each tensor in place (torch_fast.h),
// the C++ call writing the results into fresh torch tensors (caller buffers), no Python in between; for any
// other call they return None and the package takes the general path, Group.dispatch / combine, which
// reads any tensor it can (DLPack, the buffer protocol) and returns numpy arrays.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <string>

#include "call_tensors.h"
#include "dlpack_view.h"
#include "moedist/config.h"
#include "moedist/dtype.h"
#include "moedist/error.h"
#include "moedist/group.h"
#include "moedist/launch.h"
#include "moedist/shm.h"
#include "moedist/version.h"
#include "moedist/wait.h"
#include "python_support.h"
#include "torch_fast.h"
#include "transport/registry.h"
#ifdef MOEDIST_HAVE_MPI
#include "moedist/mpi.h"
#endif

namespace py = pybind11;

namespace moedist::python {

void bind_oracle(py::module_& m);  // oracle_binding.cpp
#ifdef MOEDIST_PYTHON_WITH_CUDA
void bind_cuda(py::module_& m);  // cuda_binding.cpp
#endif

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

namespace {

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

// A fresh (rows,) or (rows, cols) array holding the first `valid` rows of a group-owned view (the rest
// zero): results must outlive the next call, which reuses the group's buffers. Rows past the valid ones
// are zero whatever the group's buffers hold there, as the fast path's results are (the C++ call writes
// the valid rows of caller buffers only).
py::array fresh_copy(const TensorView& v, DType dtype, std::int64_t rows, std::int64_t cols, bool matrix,
                     std::int64_t valid) {
  py::array out = zeros(dtype, rows, cols, matrix);
  if (!v.present()) return out;
  const std::size_t row_bytes = static_cast<std::size_t>(matrix ? cols : 1) * dtype_size(dtype);
  auto* dst = static_cast<std::byte*>(out.mutable_data());
  const auto* src = static_cast<const std::byte*>(v.data);
  const std::size_t src_stride = static_cast<std::size_t>(v.strides[0]) * dtype_size(dtype);
  for (std::int64_t r = 0; r < std::min({rows, v.rows(), valid}); ++r) {
    std::memcpy(dst + static_cast<std::size_t>(r) * row_bytes, src + static_cast<std::size_t>(r) * src_stride,
                row_bytes);
  }
  return out;
}

// Every row of a group-owned result (the count tensors): all of them are valid.
std::int64_t all_rows(const TensorView& v) { return v.rows(); }

// A C++ group as the package holds it. Its calls are serialized by its lock; close() destroys the group
// under that lock, so a call running on another thread finishes first, and every call after close()
// raises a moedist Error that says the group is closed.
class PyGroup {
 public:
  explicit PyGroup(std::unique_ptr<Group> g) : config_(g->config()), group_(std::move(g)) {}

  py::tuple dispatch(py::handle x, py::handle expert_ids, py::handle scales, py::handle x_active_mask,
                     py::handle expert_scales, int quant_mode, int expert_token_nums_type, const py::dict& views) {
    const DispatchTensors a(Placement::host(views), x, expert_ids, scales, x_active_mask, expert_scales);
    const DispatchOptions o = a.options(quant_mode, expert_token_nums_type);
    DispatchResult r;
    std::unique_lock<std::mutex> serial(*mutex_, std::defer_lock);
    {
      const WithoutGil unlocked;
      serial.lock();  // taken without the GIL, so that a thread waiting here never blocks the holder
      const Timed timed(call_ns_);
      r = open_group("dispatch").dispatch(a.x.view, a.expert_ids.view, o);
    }
    // Still locked while the results are copied: they are group-owned buffers the next call reuses.
    // Row counts are a function of the arguments alone (capacity().max_receive_rows: torch_npu's
    // A * max(T, 1), more only on a shared-expert rank of ranks with different BS, where A can be
    // exceeded), so that the registered operator's fake gives the same static shapes (_custom_ops.py).
    const GroupConfig& c = group_->config();
    const std::int64_t rows = r.expand_x.rows();
    const std::int64_t h = r.expand_x.cols();
    return py::make_tuple(
        fresh_copy(r.expand_x, r.expand_x.dtype, rows, h, true, r.valid_rows),
        fresh_copy(r.dynamic_scales, DType::fp32, rows, 1, false, r.valid_rows),
        fresh_copy(r.expand_idx, DType::int32, all_rows(r.expand_idx), 1, false, all_rows(r.expand_idx)),
        fresh_copy(r.expert_token_nums, DType::int64, all_rows(r.expert_token_nums), 1, false,
                   all_rows(r.expert_token_nums)),
        fresh_copy(r.ep_recv_counts, DType::int32, all_rows(r.ep_recv_counts), 1, false, all_rows(r.ep_recv_counts)),
        fresh_copy(r.tp_recv_counts, DType::int32, std::max(c.tp_world_size, 0), 1, false, all_rows(r.tp_recv_counts)),
        fresh_copy(r.expand_scales, DType::fp32, rows, 1, false, r.valid_rows), r.valid_rows);
  }

  py::array combine(py::handle expand_x, py::handle expert_ids, py::handle expand_idx, py::handle ep_send_counts,
                    py::handle expert_scales, py::handle tp_send_counts, py::handle x_active_mask,
                    py::handle activation_scale, py::handle weight_scale, py::handle group_list,
                    py::handle expand_scales, py::handle shared_expert_x, int out_dtype, int comm_quant_mode,
                    int group_list_type, const py::dict& views) {
    const CombineTensors a(Placement::host(views), expand_x, expert_ids, expand_idx, ep_send_counts, expert_scales,
                           tp_send_counts, x_active_mask, activation_scale, weight_scale, group_list, expand_scales,
                           shared_expert_x);
    CombineOptions o = a.options(out_dtype, comm_quant_mode, group_list_type);
    // The output, (BS, H) in expand_x's dtype, written by combine itself. Shapes that cannot give it are
    // left to combine's own checks, which name the parameter.
    py::array out;
    const TensorView& x = a.expand_x.view;
    if (x.ndim == 2 && a.expert_ids.view.ndim == 2 && (x.dtype == DType::bf16 || x.dtype == DType::fp16)) {
      out = zeros(x.dtype, a.expert_ids.view.rows(), x.cols(), true);
      o.out = matrix_view(out.mutable_data(), x.dtype, a.expert_ids.view.rows(), x.cols());
    }
    {
      const WithoutGil unlocked;
      const std::lock_guard<std::mutex> serial(*mutex_);
      const Timed timed(call_ns_);
      open_group("combine").combine(x, a.expert_ids.view, a.expand_idx.view, a.ep_send_counts.view,
                                    a.expert_scales.view, o);
    }
    return out;
  }

  // The V2 pair. performance_info is a tensor the caller owns and the call updates in place.
  py::tuple dispatch_v2(py::handle x, py::handle expert_ids, py::handle scales, py::handle x_active_mask,
                        py::handle expert_scales, py::handle elastic_info, py::handle performance_info, int quant_mode,
                        int expert_token_nums_type, int zero_expert_num, int copy_expert_num, int const_expert_num,
                        const std::string& comm_alg, const py::dict& views) {
    const DispatchV2Tensors a(Placement::host(views), x, expert_ids, scales, x_active_mask, expert_scales, elastic_info,
                              performance_info);
    const DispatchV2Options o =
        a.options(quant_mode, expert_token_nums_type, zero_expert_num, copy_expert_num, const_expert_num, comm_alg);
    DispatchResult r;
    std::unique_lock<std::mutex> serial(*mutex_, std::defer_lock);
    {
      const WithoutGil unlocked;
      serial.lock();
      const Timed timed(call_ns_);
      r = open_group("dispatch_v2").dispatch_v2(a.x.view, a.expert_ids.view, o);
    }
    // torch_npu's shapes (V2 §1.4, _custom_ops.py): expand_x and dynamic_scales A * max(T, 1) rows,
    // assist_info_for_combine max(BS * K, 128 * A) entries (3 per own row written, the rest zero),
    // expand_scales A entries.
    const GroupConfig& c = group_->config();
    const std::int64_t rows = r.expand_x.rows();
    const std::int64_t h = r.expand_x.cols();
    const std::int64_t bsk = a.expert_ids.view.rows() * a.expert_ids.view.cols();
    const std::int64_t own_rows =
        r.valid_rows - (c.tp_world_size == 2 ? r.tp_recv_counts.at<std::int32_t>(1 - c.tp_rank_id) : 0);
    py::array assist = zeros(DType::int32, std::max(bsk, 128 * r.A), 1, false);
    std::memcpy(assist.mutable_data(), r.assist_info_for_combine.data, static_cast<std::size_t>(3 * own_rows) * 4);
    return py::make_tuple(
        fresh_copy(r.expand_x, r.expand_x.dtype, rows, h, true, r.valid_rows),
        fresh_copy(r.dynamic_scales, DType::fp32, rows, 1, false, r.valid_rows), assist,
        fresh_copy(r.expert_token_nums, DType::int64, all_rows(r.expert_token_nums), 1, false,
                   all_rows(r.expert_token_nums)),
        fresh_copy(r.ep_recv_counts, DType::int32, all_rows(r.ep_recv_counts), 1, false, all_rows(r.ep_recv_counts)),
        fresh_copy(r.tp_recv_counts, DType::int32, std::max(c.tp_world_size, 0), 1, false, all_rows(r.tp_recv_counts)),
        fresh_copy(r.expand_scales, DType::fp32, r.A, 1, false, r.valid_rows), r.valid_rows);
  }

  py::array combine_v2(py::handle expand_x, py::handle expert_ids, py::handle assist_info_for_combine,
                       py::handle ep_send_counts, py::handle expert_scales, py::handle tp_send_counts,
                       py::handle x_active_mask, py::handle expand_scales, py::handle shared_expert_x,
                       py::handle elastic_info, py::handle ori_x, py::handle const_expert_alpha_1,
                       py::handle const_expert_alpha_2, py::handle const_expert_v, py::handle performance_info,
                       int comm_quant_mode, int zero_expert_num, int copy_expert_num, int const_expert_num,
                       const std::string& comm_alg, const py::dict& views) {
    const CombineV2Tensors a(Placement::host(views), expand_x, expert_ids, assist_info_for_combine, ep_send_counts,
                             expert_scales, tp_send_counts, x_active_mask, expand_scales, shared_expert_x, elastic_info,
                             ori_x, const_expert_alpha_1, const_expert_alpha_2, const_expert_v, performance_info);
    CombineV2Options o = a.options(comm_quant_mode, zero_expert_num, copy_expert_num, const_expert_num, comm_alg);
    py::array out;
    const TensorView& x = a.expand_x.view;
    if (x.ndim == 2 && a.expert_ids.view.ndim == 2 && (x.dtype == DType::bf16 || x.dtype == DType::fp16)) {
      out = zeros(x.dtype, a.expert_ids.view.rows(), x.cols(), true);
      o.out = matrix_view(out.mutable_data(), x.dtype, a.expert_ids.view.rows(), x.cols());
    }
    {
      const WithoutGil unlocked;
      const std::lock_guard<std::mutex> serial(*mutex_);
      const Timed timed(call_ns_);
      open_group("combine_v2")
          .combine_v2(x, a.expert_ids.view, a.assist_info_for_combine.view, a.ep_send_counts.view, a.expert_scales.view,
                      o);
    }
    return out;
  }

  // ---- for the fast path (dispatch_call, combine_call) ----

  // The sizes of dispatch's results for a call shape, as the registered ops' fakes give them
  // (moedist::capacity(): rows = max_receive_rows), or false where capacity() refuses the shape (the
  // general path then names what is wrong). Called with the GIL, which guards the one-entry cache.
  struct DispatchSizes {
    std::int64_t rows = 0;           // of expand_x, dynamic_scales, expand_scales
    std::int64_t local_experts = 0;  // of expert_token_nums
    std::int64_t recv_counts = 0;    // of ep_recv_counts
  };
  bool dispatch_sizes(std::int64_t bs, std::int64_t k, std::int64_t h, int quant_mode, DType x_dtype,
                      DispatchSizes* sizes) {
    const SizesKey key{bs, k, h, quant_mode, x_dtype};
    if (!(sizes_key_ == key)) {
      CapacityQuery q;
      q.bs = bs;
      q.k = k;
      q.h = h;
      q.x_dtype = x_dtype;
      q.quant_mode = quant_mode;
      try {
        const CapacityReport r = capacity(config_, q);
        const std::int64_t local = local_expert_num(config_);
        sizes_ = DispatchSizes{
            r.max_receive_rows, local,
            static_cast<std::int64_t>(config_.ep_world_size) * local * (config_.tp_world_size == 2 ? 2 : 1)};
      } catch (const Error&) {
        return false;
      }
      sizes_key_ = key;
    }
    *sizes = sizes_;
    return true;
  }

  // The C++ calls with everything ready; called without the GIL.
  DispatchResult dispatch_unlocked(const TensorView& x, const TensorView& expert_ids, const DispatchOptions& o) {
    const std::lock_guard<std::mutex> serial(*mutex_);
    const Timed timed(call_ns_);
    return open_group("dispatch").dispatch(x, expert_ids, o);
  }
  void combine_unlocked(const TensorView& expand_x, const TensorView& expert_ids, const TensorView& expand_idx,
                        const TensorView& ep_send_counts, const TensorView& expert_scales, const CombineOptions& o) {
    const std::lock_guard<std::mutex> serial(*mutex_);
    const Timed timed(call_ns_);
    open_group("combine").combine(expand_x, expert_ids, expand_idx, ep_send_counts, expert_scales, o);
  }

  const GroupConfig& config_at_join() const { return config_; }

  // Nanoseconds spent in the C++ group's dispatch and combine calls so far (the Python layer's bench
  // subtracts them from a call's time to see what the layer adds), and of that layer's time, in zeroing
  // the fast path's rows past the valid ones (a cost per byte of A * H, not per call).
  long long call_ns() const { return call_ns_.load(std::memory_order_relaxed); }
  long long fill_ns() const { return fill_ns_.load(std::memory_order_relaxed); }
  void add_fill_ns(long long ns) { fill_ns_.fetch_add(ns, std::memory_order_relaxed); }

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

  // GroupOptions::worker_threads as the group holds it: what the package asked for, seen from C++.
  int worker_threads() const {
    const WithoutGil unlocked;
    const std::lock_guard<std::mutex> serial(*mutex_);
    return open_group("worker_threads").options().worker_threads;
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
  // Adds the time of its scope to a counter (the scope of a C++ call, under the group's lock).
  class Timed {
   public:
    explicit Timed(std::atomic<long long>& total) : total_(total), start_(std::chrono::steady_clock::now()) {}
    Timed(const Timed&) = delete;
    Timed& operator=(const Timed&) = delete;
    ~Timed() {
      const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start_);
      total_.fetch_add(ns.count(), std::memory_order_relaxed);
    }

   private:
    std::atomic<long long>& total_;
    std::chrono::steady_clock::time_point start_;
  };

  struct SizesKey {
    std::int64_t bs = -1, k = -1, h = -1;
    int quant_mode = -1;
    DType x_dtype = DType::bf16;
    bool operator==(const SizesKey& o) const {
      return bs == o.bs && k == o.k && h == o.h && quant_mode == o.quant_mode && x_dtype == o.x_dtype;
    }
  };

  // The group, for a call made under the lock; a moedist Error once the group is closed.
  Group& open_group(const char* call) const {
    if (closed_ || !group_) {
      throw Error(ErrorCode::invalid_argument, std::string("moedist group: ") + call +
                                                   " on a closed group (closed by Group.close(), a with block's end "
                                                   "or interpreter exit): create the group again to use it");
    }
    return *group_;
  }

  const GroupConfig config_;  // the group's, for the fast path's result sizes (without the lock)
  std::unique_ptr<Group> group_;
  std::atomic<bool> closed_{false};
  std::atomic<long long> call_ns_{0};
  std::atomic<long long> fill_ns_{0};
  SizesKey sizes_key_;
  DispatchSizes sizes_;
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

// ---- the fast path: dispatch_call and combine_call ----

// moedist._groups._resolved, the calls the package has resolved: (group_ep, group_tp, (the nine
// configuration ints in _ops._CONFIG's order)) -> Group. Emptied whenever a group is closed.
PyObject* g_resolved_calls = nullptr;

// An int argument of the plain kind: exactly a Python int, in int32's range (every other form -- numpy
// integers, 0-d tensors, bools, out-of-range values -- takes the general path, which reads or names it).
bool plain_int(PyObject* value, int* out) {
  if (!PyLong_CheckExact(value)) return false;
  int overflow = 0;
  const long v = PyLong_AsLongAndOverflow(value, &overflow);
  if (overflow != 0 || v < std::numeric_limits<std::int32_t>::min() || v > std::numeric_limits<std::int32_t>::max()) {
    PyErr_Clear();
    return false;
  }
  *out = static_cast<int>(v);
  return true;
}

// The C++ group of a call, and a reference that keeps it alive (a close() on another thread may drop
// the package's).
struct Resolved {
  py::object held;
  PyGroup* group = nullptr;
};

// The last calls found in _resolved, found again without building its key: their names (held, so that
// the same address is the same string) and configuration. An entry serves only while its group is open:
// close() empties _resolved and closes every C++ group it releases; a group that stays open is the one
// the package would resolve the call to again. Guarded by the GIL; never destroyed (the fast path may run
// until the interpreter's end).
struct RecentCall {
  PyObject* group_ep = nullptr;  // strong references
  PyObject* group_tp = nullptr;
  PyObject* held = nullptr;
  PyGroup* group = nullptr;
  int config[9] = {};
};
RecentCall g_recent[4];
std::size_t g_next_recent = 0;

// The Group the package resolved for these names and configuration (`ints` holds the call's int
// arguments by position), or an empty Resolved where it resolved none.
Resolved resolved_group(PyObject* group_ep, PyObject* group_tp, PyObject* const* args, const int* ints,
                        const int (&config)[9]) {
  const auto same_config = [&](const RecentCall& r) {
    for (std::size_t i = 0; i < 9; ++i) {
      if (r.config[i] != ints[config[i]]) return false;
    }
    return true;
  };
  for (const RecentCall& r : g_recent) {
    if (r.group != nullptr && r.group_ep == group_ep && r.group_tp == group_tp && same_config(r) && !r.group->closed())
      return {py::reinterpret_borrow<py::object>(r.held), r.group};
  }
  if (g_resolved_calls == nullptr || !PyUnicode_CheckExact(group_ep) || !PyUnicode_CheckExact(group_tp)) return {};
  PyObject* values = PyTuple_New(9);
  if (values == nullptr) throw py::error_already_set();
  for (Py_ssize_t i = 0; i < 9; ++i) {
    Py_INCREF(args[config[i]]);
    PyTuple_SET_ITEM(values, i, args[config[i]]);
  }
  const py::object key = py::reinterpret_steal<py::object>(PyTuple_Pack(3, group_ep, group_tp, values));
  Py_DECREF(values);
  if (!key) throw py::error_already_set();
  PyObject* found = PyDict_GetItemWithError(g_resolved_calls, key.ptr());  // borrowed
  if (found == nullptr) {
    if (PyErr_Occurred()) throw py::error_already_set();
    return {};
  }
  Resolved resolved{py::reinterpret_borrow<py::object>(found), nullptr};
  resolved.group = &resolved.held.cast<PyGroup&>();
  RecentCall& r = g_recent[g_next_recent++ % std::size(g_recent)];
  const RecentCall old = r;
  Py_INCREF(group_ep);
  Py_INCREF(group_tp);
  Py_INCREF(found);
  r.group_ep = group_ep;
  r.group_tp = group_tp;
  r.held = found;
  r.group = resolved.group;
  for (std::size_t i = 0; i < 9; ++i) r.config[i] = ints[config[i]];
  Py_XDECREF(old.group_ep);  // last: a string's or group's finalizer may run Python code
  Py_XDECREF(old.group_tp);
  Py_XDECREF(old.held);
  return resolved;
}

// Runs a fast-path entry: C++ exceptions become the Python exceptions the general path raises.
template <class F>
PyObject* guarded(F&& body) noexcept {
  try {
    return body();
  } catch (py::error_already_set& e) {
    e.restore();
  } catch (...) {
    try {
      translate(std::current_exception());
    } catch (const std::bad_alloc&) {
      PyErr_NoMemory();
    } catch (const std::exception& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    } catch (...) {
      PyErr_SetString(PyExc_RuntimeError, "moedist: unknown C++ exception");
    }
  }
  return nullptr;
}

// A tuple of the results as torch tensors (a new reference), or nullptr with a Python error set.
template <std::size_t N>
PyObject* torch_tuple(const TorchApi& torch, TorchResult (&results)[N]) {
  PyObject* tuple = PyTuple_New(N);
  if (tuple == nullptr) return nullptr;
  for (std::size_t i = 0; i < N; ++i) {
    PyObject* tensor = results[i].release_to_torch(torch);
    if (tensor == nullptr) {
      Py_DECREF(tuple);
      return nullptr;
    }
    PyTuple_SET_ITEM(tuple, static_cast<Py_ssize_t>(i), tensor);
  }
  return tuple;
}

// dispatch_call's arguments: npu_moe_distribute_dispatch's, in its order.
enum DispatchArg : int {
  kDX,
  kDExpertIds,
  kDGroupEp,
  kDEpWorldSize,
  kDEpRankId,
  kDMoeExpertNum,
  kDScales,
  kDXActiveMask,
  kDExpertScales,
  kDGroupTp,
  kDTpWorldSize,
  kDTpRankId,
  kDExpertShardType,
  kDSharedExpertNum,
  kDSharedExpertRankNum,
  kDQuantMode,
  kDGlobalBs,
  kDExpertTokenNumsType,
  kDispatchArgs
};
constexpr int kDispatchConfig[9] = {kDEpWorldSize, kDEpRankId,        kDMoeExpertNum,    kDTpWorldSize,
                                    kDTpRankId,    kDExpertShardType, kDSharedExpertNum, kDSharedExpertRankNum,
                                    kDGlobalBs};

PyObject* dispatch_call(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  return guarded([&]() -> PyObject* {
    if (nargs != kDispatchArgs) {
      PyErr_Format(PyExc_TypeError, "dispatch_call takes %d arguments (%zd given)", static_cast<int>(kDispatchArgs),
                   nargs);
      return nullptr;
    }
    const TorchApi* torch = torch_api();
    if (torch == nullptr || !plain_eager(*torch)) Py_RETURN_NONE;
    int ints[kDispatchArgs] = {};
    for (const int i : kDispatchConfig) {
      if (!plain_int(args[i], &ints[i])) Py_RETURN_NONE;
    }
    if (!plain_int(args[kDQuantMode], &ints[kDQuantMode]) ||
        !plain_int(args[kDExpertTokenNumsType], &ints[kDExpertTokenNumsType])) {
      Py_RETURN_NONE;
    }
    const Resolved resolved = resolved_group(args[kDGroupEp], args[kDGroupTp], args, ints, kDispatchConfig);
    if (resolved.group == nullptr) Py_RETURN_NONE;
    PyGroup& group = *resolved.group;
    TensorView x, ids;
    DispatchOptions o;
    if (args[kDX] == Py_None || args[kDExpertIds] == Py_None || !read_plain_tensor(*torch, args[kDX], &x) ||
        !read_plain_tensor(*torch, args[kDExpertIds], &ids) || !read_plain_tensor(*torch, args[kDScales], &o.scales) ||
        !read_plain_tensor(*torch, args[kDXActiveMask], &o.x_active_mask) ||
        !read_plain_tensor(*torch, args[kDExpertScales], &o.expert_scales)) {
      Py_RETURN_NONE;
    }
    o.quant_mode = ints[kDQuantMode];
    o.expert_token_nums_type = ints[kDExpertTokenNumsType];
    PyGroup::DispatchSizes sizes;
    if (x.ndim != 2 || ids.ndim != 2 || ids.rows() != x.rows() ||
        !group.dispatch_sizes(x.rows(), ids.cols(), x.cols(), o.quant_mode, x.dtype, &sizes)) {
      Py_RETURN_NONE;
    }
    // The seven results, written by the C++ call (caller buffers) but for the rows past the valid ones
    // and the results this configuration does not produce, which are zero.
    const int t = group.config_at_join().tp_world_size;
    TorchResult out[7];
    try {
      out[0] = TorchResult(o.quant_mode == 2 ? DType::int8 : x.dtype, sizes.rows, x.cols(), true);
      out[1] = TorchResult(DType::fp32, sizes.rows, 1, false);
      out[2] = TorchResult(DType::int32, x.rows() * ids.cols(), 1, false);
      out[3] = TorchResult(DType::int64, sizes.local_experts, 1, false);
      out[4] = TorchResult(DType::int32, sizes.recv_counts, 1, false);
      out[5] = TorchResult(DType::int32, std::max(t, 0), 1, false);
      out[6] = TorchResult(DType::fp32, sizes.rows, 1, false);
    } catch (const std::bad_alloc&) {
      Py_RETURN_NONE;  // the general path checks the arguments before it allocates
    }
    o.out.expand_x = out[0].view();
    o.out.dynamic_scales = out[1].view();
    o.out.expand_idx = out[2].view();
    o.out.expert_token_nums = out[3].view();
    o.out.ep_recv_counts = out[4].view();
    if (t == 2) o.out.tp_recv_counts = out[5].view();
    if (o.expert_scales.present()) o.out.expand_scales = out[6].view();
    {
      const WithoutGil unlocked;
      const DispatchResult r = group.dispatch_unlocked(x, ids, o);
      const auto start = std::chrono::steady_clock::now();
      for (const int i : {0, 1, 6}) out[i].zero_rows_from(i == 6 && !o.expert_scales.present() ? 0 : r.valid_rows);
      if (t != 2) out[5].zero_rows_from(0);
      group.add_fill_ns(
          std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start).count());
    }
    return torch_tuple(*torch, out);
  });
}

// combine_call's arguments: npu_moe_distribute_combine's, in its order.
enum CombineArg : int {
  kCExpandX,
  kCExpertIds,
  kCExpandIdx,
  kCEpSendCounts,
  kCExpertScales,
  kCGroupEp,
  kCEpWorldSize,
  kCEpRankId,
  kCMoeExpertNum,
  kCTpSendCounts,
  kCXActiveMask,
  kCActivationScale,
  kCWeightScale,
  kCGroupList,
  kCExpandScales,
  kCSharedExpertX,
  kCGroupTp,
  kCTpWorldSize,
  kCTpRankId,
  kCExpertShardType,
  kCSharedExpertNum,
  kCSharedExpertRankNum,
  kCGlobalBs,
  kCOutDtype,
  kCCommQuantMode,
  kCGroupListType,
  kCombineArgs
};
constexpr int kCombineConfig[9] = {kCEpWorldSize, kCEpRankId,        kCMoeExpertNum,    kCTpWorldSize,
                                   kCTpRankId,    kCExpertShardType, kCSharedExpertNum, kCSharedExpertRankNum,
                                   kCGlobalBs};

PyObject* combine_call(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  return guarded([&]() -> PyObject* {
    if (nargs != kCombineArgs) {
      PyErr_Format(PyExc_TypeError, "combine_call takes %d arguments (%zd given)", static_cast<int>(kCombineArgs),
                   nargs);
      return nullptr;
    }
    const TorchApi* torch = torch_api();
    if (torch == nullptr || !plain_eager(*torch)) Py_RETURN_NONE;
    int ints[kCombineArgs] = {};
    for (const int i : kCombineConfig) {
      if (!plain_int(args[i], &ints[i])) Py_RETURN_NONE;
    }
    for (const int i : {kCOutDtype, kCCommQuantMode, kCGroupListType}) {
      if (!plain_int(args[i], &ints[i])) Py_RETURN_NONE;
    }
    const Resolved resolved = resolved_group(args[kCGroupEp], args[kCGroupTp], args, ints, kCombineConfig);
    if (resolved.group == nullptr) Py_RETURN_NONE;
    PyGroup& group = *resolved.group;
    TensorView x, ids, idx, counts, weights;
    CombineOptions o;
    for (const int i : {kCExpandX, kCExpertIds, kCExpandIdx, kCEpSendCounts, kCExpertScales}) {
      if (args[i] == Py_None) Py_RETURN_NONE;
    }
    // tp_send_counts is ignored without TP, as on the NPU: not even read.
    PyObject* tp_send_counts = ints[kCTpWorldSize] == 2 ? args[kCTpSendCounts] : Py_None;
    if (!read_plain_tensor(*torch, args[kCExpandX], &x) || !read_plain_tensor(*torch, args[kCExpertIds], &ids) ||
        !read_plain_tensor(*torch, args[kCExpandIdx], &idx) ||
        !read_plain_tensor(*torch, args[kCEpSendCounts], &counts) ||
        !read_plain_tensor(*torch, args[kCExpertScales], &weights) ||
        !read_plain_tensor(*torch, tp_send_counts, &o.tp_send_counts) ||
        !read_plain_tensor(*torch, args[kCXActiveMask], &o.x_active_mask) ||
        !read_plain_tensor(*torch, args[kCActivationScale], &o.activation_scale) ||
        !read_plain_tensor(*torch, args[kCWeightScale], &o.weight_scale) ||
        !read_plain_tensor(*torch, args[kCGroupList], &o.group_list) ||
        !read_plain_tensor(*torch, args[kCExpandScales], &o.expand_scales) ||
        !read_plain_tensor(*torch, args[kCSharedExpertX], &o.shared_expert_x)) {
      Py_RETURN_NONE;
    }
    o.out_dtype = ints[kCOutDtype];
    o.comm_quant_mode = ints[kCCommQuantMode];
    o.group_list_type = ints[kCGroupListType];
    // The output, (BS, H) in expand_x's dtype, every element written by combine (inactive tokens' rows zero).
    if (x.ndim != 2 || ids.ndim != 2 || (x.dtype != DType::bf16 && x.dtype != DType::fp16)) Py_RETURN_NONE;
    TorchResult out[1];
    try {
      out[0] = TorchResult(x.dtype, ids.rows(), x.cols(), true);
    } catch (const std::bad_alloc&) {
      Py_RETURN_NONE;
    }
    o.out = out[0].view();
    {
      const WithoutGil unlocked;
      group.combine_unlocked(x, ids, idx, counts, weights, o);
    }
    PyObject* results = torch_tuple(*torch, out);
    if (results == nullptr) return nullptr;
    PyObject* tensor = PyTuple_GET_ITEM(results, 0);
    Py_INCREF(tensor);
    Py_DECREF(results);
    return tensor;
  });
}

PyMethodDef g_fast_calls[] = {
    {"dispatch_call", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&dispatch_call)), METH_FASTCALL,
     "dispatch_call(<npu_moe_distribute_dispatch's 18 arguments, positional>): its results as torch tensors, or "
     "None when the call is not a plain one (the package then takes the general path)"},
    {"combine_call", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&combine_call)), METH_FASTCALL,
     "combine_call(<npu_moe_distribute_combine's 26 arguments, positional>): its result as a torch tensor, or None "
     "when the call is not a plain one (the package then takes the general path)"},
    {nullptr, nullptr, 0, nullptr}};

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
  m.attr("max_worker_threads") = GroupOptions::kMaxWorkerThreads;  // the package checks worker_threads against it

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
      .def_property_readonly("worker_threads", &PyGroup::worker_threads)
      .def_property_readonly("call_ns", &PyGroup::call_ns)
      .def_property_readonly("fill_ns", &PyGroup::fill_ns)
      .def("traffic", &PyGroup::traffic)
      .def("close", &PyGroup::close, py::arg("wait") = true)
      .def_property_readonly("closed", &PyGroup::closed);

  m.def(
      "join_shm",
      [](const py::dict& config, const std::string& job, long long timeout_ms, int worker_threads) {
        ShmOptions o;
        o.wait.timeout = std::chrono::milliseconds(timeout_ms);
        o.group.worker_threads = worker_threads;
        const GroupConfig c = config_from(config);
        std::unique_ptr<Group> g;
        {
          const WithoutGil unlocked;
          g = join_shm(c, job, o);
        }
        return std::make_unique<PyGroup>(std::move(g));
      },
      py::arg("config"), py::arg("job"), py::arg("timeout_ms"), py::arg("worker_threads"));
#ifdef MOEDIST_HAVE_MPI
  m.def(
      "join_mpi",
      [](std::uintptr_t comm_handle, const py::dict& config, long long timeout_ms, int worker_threads) {
        MpiOptions o;
        o.wait.timeout = std::chrono::milliseconds(timeout_ms);
        o.group.worker_threads = worker_threads;
        const GroupConfig c = config_from(config);
        std::unique_ptr<Group> g;
        {
          const WithoutGil unlocked;
          g = join_mpi(reinterpret_cast<MPI_Comm>(comm_handle), c, o);  // NOLINT: an mpi4py handle is the C MPI_Comm
        }
        return std::make_unique<PyGroup>(std::move(g));
      },
      py::arg("comm_handle"), py::arg("config"), py::arg("timeout_ms"), py::arg("worker_threads"));
#endif
  // The fast path (dispatch_call, combine_call): plain functions of the C API, without pybind11's
  // argument conversion.
  for (PyMethodDef* def = g_fast_calls; def->ml_name != nullptr; ++def) {
    PyObject* fn = PyCFunction_NewEx(def, nullptr, m.attr("__name__").ptr());
    if (fn == nullptr) throw py::error_already_set();
    m.add_object(def->ml_name, py::reinterpret_steal<py::object>(fn));
  }
  m.def(
      "set_resolved_calls",
      [](const py::dict& calls) {
        Py_XDECREF(g_resolved_calls);
        g_resolved_calls = calls.inc_ref().ptr();  // held for the life of the process
      },
      py::arg("calls"));
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
#ifdef MOEDIST_PYTHON_WITH_CUDA
  bind_cuda(m);
#else
  m.attr("has_cuda") = false;
  m.attr("cuda_emulated") = false;
#endif
}
