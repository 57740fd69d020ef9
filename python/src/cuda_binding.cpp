// moedist._moedist.CudaGroup: the CUDA group (include/moedist/cuda.h) for the package's CUDA tensors
// (python/moedist/_cuda.py). Tensors come through DLPack (torch CUDA tensors, or any producer of CUDA
// DLPack tensors) and are read in place; a call enqueues its kernels on the stream the package passes
// (torch's current stream) and copies the group's results into the output tensors the package made, on
// that stream, so that they outlive the next call as torch_npu's results do. Nothing waits for the GPU
// except synchronize().
//
// Built into the extension when the build has the CUDA backend, and into the emulated twin of the
// extension (MOEDIST_PYTHON_CUDA_EMULATION: the kernels on the CPU, tests/cuda_emulation), which also
// gets EmulatedDeviceArray, a DLPack producer of the fake runtime's device memory for the tests.
#include <cuda_runtime_api.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "call_tensors.h"
#include "common/format.h"
#include "cuda/device_guard.h"
#include "dlpack.h"
#include "dlpack_view.h"
#include "moedist/cuda.h"
#include "moedist/error.h"
#include "python_support.h"

namespace py = pybind11;

namespace moedist::python {

namespace {

cuda::Stream stream_of(std::uintptr_t handle) {
  return reinterpret_cast<cuda::Stream>(handle);  // NOLINT: torch's cuda_stream is the cudaStream_t as an int
}

void check_enqueue(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw Error(ErrorCode::internal, concat("CUDA error while enqueuing ", what, ": ", cudaGetErrorName(err), " (",
                                            cudaGetErrorString(err), ")"));
  }
}

// An output tensor the package made for a call: C-contiguous, as torch.empty makes them (checked before
// anything is enqueued).
void require_compact(const MutableTensorView& to, const char* name) {
  const bool compact = to.ndim == 1 ? to.strides[0] == 1 : (to.strides[1] == 1 && to.strides[0] == to.cols());
  if (to.present() && to.numel() > 0 && !compact)
    fail(ErrorCode::invalid_argument, concat(name, ".stride()"), "non-contiguous", "an output must be contiguous");
}

// Copies the first rows of a group-owned result into a compact output tensor of the call, on the call's
// stream; zeros the output where the group has no such result (e.g. expand_scales without
// expert_scales), as the CPU paths' outputs are.
void copy_result(const TensorView& from, const MutableTensorView& to, const char* name, cudaStream_t stream) {
  if (!to.present() || to.numel() == 0) return;
  const std::size_t element = dtype_size(to.dtype);
  const std::size_t row_bytes = static_cast<std::size_t>(to.cols()) * element;
  if (!from.present()) {
    check_enqueue(cudaMemsetAsync(to.data, 0, static_cast<std::size_t>(to.numel()) * element, stream), name);
    return;
  }
  const auto rows = static_cast<std::size_t>(std::max<std::int64_t>(std::min(to.rows(), from.rows()), 0));
  if (rows < static_cast<std::size_t>(to.rows())) {  // an output longer than the group's result: zeros past it
    check_enqueue(cudaMemsetAsync(static_cast<std::byte*>(to.data) + rows * row_bytes, 0,
                                  (static_cast<std::size_t>(to.rows()) - rows) * row_bytes, stream),
                  name);
  }
  if (rows == 0) return;
  const std::size_t from_pitch = static_cast<std::size_t>(from.strides[0]) * element;
  const bool rows_compact = from.ndim == 1 ? from.strides[0] == 1 : from_pitch == row_bytes;
  if (rows_compact) {  // one linear copy (1-D results, and windows whose rows are packed)
    check_enqueue(cudaMemcpyAsync(to.data, from.data, rows * row_bytes, cudaMemcpyDeviceToDevice, stream), name);
  } else {
    check_enqueue(
        cudaMemcpy2DAsync(to.data, row_bytes, from.data, from_pitch, row_bytes, rows, cudaMemcpyDeviceToDevice, stream),
        name);
  }
}

// The CUDA group as the package holds it. Calls are serialized by its lock (they share the group's
// device state and must reach the stream in order); close() destroys the group under it.
class PyCudaGroup {
 public:
  PyCudaGroup(std::unique_ptr<cuda::CudaGroup> g, std::int64_t max_bs, std::int64_t k, std::int64_t h)
      : group_(std::move(g)), device_(group_->device()), max_bs_(max_bs), k_(k), h_(h) {}
  ~PyCudaGroup() {
    if (order_event_ != nullptr) cudaEventDestroy(order_event_);
  }
  PyCudaGroup(const PyCudaGroup&) = delete;
  PyCudaGroup& operator=(const PyCudaGroup&) = delete;

  static std::unique_ptr<PyCudaGroup> join(const py::dict& config, const std::string& job, int device,
                                           std::int64_t max_bs, std::int64_t k, std::int64_t h, long long timeout_ms) {
    cuda::CudaGroupOptions o;
    o.device = device;
    o.max_bs = max_bs;
    o.k = k;
    o.h = h;
    o.wait.timeout = std::chrono::milliseconds(timeout_ms);
    const GroupConfig c = config_from(config);
    std::unique_ptr<cuda::CudaGroup> g;
    {
      const WithoutGil unlocked;
      g = cuda::CudaGroup::join(c, job, o);
    }
    const std::int64_t sized = max_bs != 0 ? max_bs : (c.global_bs != 0 ? c.global_bs / c.ep_world_size : 0);
    return std::make_unique<PyCudaGroup>(std::move(g), sized, k, h);
  }

  // dispatch into `outputs`, the seven tensors the package made with the registered op's shapes.
  void dispatch(std::uintptr_t stream, py::handle x, py::handle expert_ids, py::handle scales, py::handle x_active_mask,
                py::handle expert_scales, int quant_mode, int expert_token_nums_type, const py::tuple& outputs) {
    const DispatchTensors a(Placement::cuda(device_), x, expert_ids, scales, x_active_mask, expert_scales);
    const std::vector<Borrowed> outs = borrow_outputs(outputs, kDispatchOutputs);
    const DispatchOptions o = a.options(quant_mode, expert_token_nums_type);
    const WithoutGil unlocked;
    const std::lock_guard<std::mutex> serial(*mutex_);
    const cuda::CudaDispatchResult r =
        begin_call("dispatch", stream).dispatch(a.x.view, a.expert_ids.view, o, stream_of(stream));
    deliver(r, r.expand_idx, outs, kDispatchOutputs, stream);
  }

  // dispatch_v2 into `outputs`, as dispatch; performance_info (the caller's, on the device) is raised in place.
  void dispatch_v2(std::uintptr_t stream, py::handle x, py::handle expert_ids, py::handle scales,
                   py::handle x_active_mask, py::handle expert_scales, py::handle elastic_info,
                   py::handle performance_info, int quant_mode, int expert_token_nums_type, int zero_expert_num,
                   int copy_expert_num, int const_expert_num, const std::string& comm_alg, const py::tuple& outputs) {
    const DispatchV2Tensors a(Placement::cuda(device_), x, expert_ids, scales, x_active_mask, expert_scales,
                              elastic_info, performance_info);
    const std::vector<Borrowed> outs = borrow_outputs(outputs, kDispatchV2Outputs);
    const DispatchV2Options o =
        a.options(quant_mode, expert_token_nums_type, zero_expert_num, copy_expert_num, const_expert_num, comm_alg);
    const WithoutGil unlocked;
    const std::lock_guard<std::mutex> serial(*mutex_);
    const cuda::CudaDispatchResult r =
        begin_call("dispatch_v2", stream).dispatch_v2(a.x.view, a.expert_ids.view, o, stream_of(stream));
    deliver(r, r.assist_info_for_combine, outs, kDispatchV2Outputs, stream);
  }

  // combine into `out`, the (BS, H) tensor the package made.
  void combine(std::uintptr_t stream, py::handle expand_x, py::handle expert_ids, py::handle expand_idx,
               py::handle ep_send_counts, py::handle expert_scales, py::handle tp_send_counts, py::handle x_active_mask,
               py::handle activation_scale, py::handle weight_scale, py::handle group_list, py::handle expand_scales,
               py::handle shared_expert_x, int out_dtype, int comm_quant_mode, int group_list_type, py::handle out) {
    const CombineTensors a(Placement::cuda(device_), expand_x, expert_ids, expand_idx, ep_send_counts, expert_scales,
                           tp_send_counts, x_active_mask, activation_scale, weight_scale, group_list, expand_scales,
                           shared_expert_x);
    const Borrowed bout = Placement::cuda(device_).take(out, "out");
    CombineOptions o = a.options(out_dtype, comm_quant_mode, group_list_type);
    o.out = bout.view;
    const WithoutGil unlocked;
    const std::lock_guard<std::mutex> serial(*mutex_);
    begin_call("combine", stream)
        .combine(a.expand_x.view, a.expert_ids.view, a.expand_idx.view, a.ep_send_counts.view, a.expert_scales.view, o,
                 stream_of(stream));
  }

  // combine_v2 into `out`, the (BS, H) tensor the package made.
  void combine_v2(std::uintptr_t stream, py::handle expand_x, py::handle expert_ids, py::handle assist_info_for_combine,
                  py::handle ep_send_counts, py::handle expert_scales, py::handle tp_send_counts,
                  py::handle x_active_mask, py::handle expand_scales, py::handle shared_expert_x,
                  py::handle elastic_info, py::handle ori_x, py::handle const_expert_alpha_1,
                  py::handle const_expert_alpha_2, py::handle const_expert_v, py::handle performance_info,
                  int comm_quant_mode, int zero_expert_num, int copy_expert_num, int const_expert_num,
                  const std::string& comm_alg, py::handle out) {
    const CombineV2Tensors a(Placement::cuda(device_), expand_x, expert_ids, assist_info_for_combine, ep_send_counts,
                             expert_scales, tp_send_counts, x_active_mask, expand_scales, shared_expert_x, elastic_info,
                             ori_x, const_expert_alpha_1, const_expert_alpha_2, const_expert_v, performance_info);
    const Borrowed bout = Placement::cuda(device_).take(out, "out");
    CombineV2Options o = a.options(comm_quant_mode, zero_expert_num, copy_expert_num, const_expert_num, comm_alg);
    o.out = bout.view;
    const WithoutGil unlocked;
    const std::lock_guard<std::mutex> serial(*mutex_);
    begin_call("combine_v2", stream)
        .combine_v2(a.expand_x.view, a.expert_ids.view, a.assist_info_for_combine.view, a.ep_send_counts.view,
                    a.expert_scales.view, o, stream_of(stream));
  }

  // Waits for `stream` (default: the stream of the group's latest call) and raises the first error the GPU
  // recorded.
  void synchronize(std::optional<std::uintptr_t> stream) {
    const WithoutGil unlocked;
    const std::lock_guard<std::mutex> serial(*mutex_);
    cuda::CudaGroup& g = open_group("synchronize");
    g.synchronize(stream_of(stream.value_or(last_stream_)));
  }

  std::int64_t last_valid_rows() {
    const WithoutGil unlocked;
    const std::lock_guard<std::mutex> serial(*mutex_);
    return open_group("last_valid_rows").last_valid_rows();
  }

  // Releases the group (its device memory and IPC mappings) once no call runs, as Group.close() does:
  // with wait = false, a group whose lock another thread holds (a call in progress) is only marked closed
  // and left to that call and the process's exit. Later calls raise.
  bool close(bool wait) {
    std::unique_ptr<cuda::CudaGroup> doomed;
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
      if (order_event_ != nullptr) {
        const cuda::DeviceGuard on(device_);
        cudaEventDestroy(order_event_);
        order_event_ = nullptr;
      }
      doomed = std::move(group_);
      doomed.reset();  // destruction waits for the device and meets the peers: without the GIL
    }
    return true;
  }

  bool closed() const { return closed_; }
  int device() const { return device_; }
  std::int64_t max_bs() const { return max_bs_; }
  std::int64_t k() const { return k_; }
  std::int64_t h() const { return h_; }

 private:
  // The seven outputs of a dispatch, by name: the third is expand_idx (V1) or assist_info_for_combine (V2).
  using OutputNames = std::array<const char*, 7>;
  static constexpr OutputNames kDispatchOutputs{"expand_x",       "dynamic_scales", "expand_idx",   "expert_token_nums",
                                                "ep_recv_counts", "tp_recv_counts", "expand_scales"};
  static constexpr OutputNames kDispatchV2Outputs{"expand_x",          "dynamic_scales", "assist_info_for_combine",
                                                  "expert_token_nums", "ep_recv_counts", "tp_recv_counts",
                                                  "expand_scales"};

  std::vector<Borrowed> borrow_outputs(const py::tuple& outputs, const OutputNames& names) const {
    if (outputs.size() != names.size())
      fail(ErrorCode::internal, "outputs", concat(outputs.size(), " tensors"), "must be dispatch's seven outputs");
    std::vector<Borrowed> outs;
    for (std::size_t i = 0; i < names.size(); ++i) {
      outs.push_back(Placement::cuda(device_).take(outputs[i], names[i]));
      require_compact(outs.back().view, names[i]);
    }
    return outs;
  }

  static void copy_results(const cuda::CudaDispatchResult& r, const TensorView& third,
                           const std::vector<Borrowed>& outs, const OutputNames& names, cudaStream_t stream) {
    const std::array<const TensorView*, 7> results{&r.expand_x,          &r.dynamic_scales, &third,
                                                   &r.expert_token_nums, &r.ep_recv_counts, &r.tp_recv_counts,
                                                   &r.expand_scales};
    for (std::size_t i = 0; i < names.size(); ++i) copy_result(*results[i], outs[i].view, names[i], stream);
  }

  cuda::CudaGroup& open_group(const char* call) {
    if (closed_ || !group_) throw Error(ErrorCode::invalid_argument, concat(call, " on a closed CUDA group"));
    if (!broken_.empty()) throw Error(ErrorCode::internal, broken_);
    return *group_;
  }

  // The group for a call on `stream`, its work ordered after the group's previous call: the call counter,
  // handle and status live on the GPU and need the calls in order (cuda.h), so a call on another stream
  // than the last one first waits for that one (an event), unless either stream is being captured into a
  // CUDA graph, where a dependency on work outside the capture is not allowed (the caller orders them).
  cuda::CudaGroup& begin_call(const char* call, std::uintptr_t stream) {
    cuda::CudaGroup& g = open_group(call);
    if (has_last_ && stream != last_stream_ && !capturing(stream) && !capturing(last_stream_)) {
      const cuda::DeviceGuard on(device_);
      if (order_event_ == nullptr) check_enqueue(cudaEventCreateWithFlags(&order_event_, cudaEventDisableTiming), call);
      check_enqueue(cudaEventRecord(order_event_, stream_of(last_stream_)), call);
      check_enqueue(cudaStreamWaitEvent(stream_of(stream), order_event_, 0), call);
    }
    last_stream_ = stream;
    has_last_ = true;
    return g;
  }

  static bool capturing(std::uintptr_t stream) {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    return cudaStreamIsCapturing(stream_of(stream), &status) == cudaSuccess && status != cudaStreamCaptureStatusNone;
  }

  // Copies a dispatch's results into the call's outputs, on the call's stream of the group's device (the
  // group restored the caller's device when it returned). The dispatch is enqueued by then: a copy that
  // cannot be enqueued leaves outputs half written, so the group is marked unusable.
  void deliver(const cuda::CudaDispatchResult& r, const TensorView& third, const std::vector<Borrowed>& outs,
               const OutputNames& names, std::uintptr_t stream) {
    try {
      const cuda::DeviceGuard on(device_);
      copy_results(r, third, outs, names, stream_of(stream));
    } catch (const Error& e) {
      broken_ = concat("copying a dispatch's results failed after its kernels were enqueued (", e.what(),
                       "); this CUDA group is unusable: create a new one");
      throw Error(ErrorCode::internal, broken_);
    }
  }

  std::unique_ptr<cuda::CudaGroup> group_;
  std::atomic<bool> closed_{false};
  std::string broken_;              // why the group cannot go on, once a copy failed mid-call
  std::uintptr_t last_stream_ = 0;  // the stream of the latest call
  bool has_last_ = false;
  cudaEvent_t order_event_ = nullptr;  // orders a call after the previous one on another stream
  int device_;
  std::int64_t max_bs_, k_, h_;
  std::unique_ptr<std::mutex> mutex_ = std::make_unique<std::mutex>();
};

#ifdef MOEDIST_PYTHON_CUDA_EMULATION
// Device memory of the fake CUDA runtime as a DLPack producer, for the tests of the emulated twin:
// made from a numpy array (or empty), exported as a CUDA tensor of its device (0 unless a test asks it
// to claim another, to be refused), copied back by numpy().
class EmulatedDeviceArray {
 public:
  EmulatedDeviceArray(std::vector<std::int64_t> shape, const std::string& dtype)
      : shape_(std::move(shape)), dtype_(dtype_named(dtype)), dtype_name_(dtype) {
    std::size_t n = 1;
    for (const std::int64_t d : shape_) n *= static_cast<std::size_t>(d);
    bytes_ = n * dtype_.bits / 8;
    if (cudaMalloc(&data_, std::max<std::size_t>(bytes_, 1)) != cudaSuccess) throw std::bad_alloc();
    cudaMemset(data_, 0, std::max<std::size_t>(bytes_, 1));
  }
  ~EmulatedDeviceArray() { cudaFree(data_); }
  EmulatedDeviceArray(const EmulatedDeviceArray&) = delete;
  EmulatedDeviceArray& operator=(const EmulatedDeviceArray&) = delete;

  // dtype: "bfloat16", "float16", "float32", "int8", "int32", "int64" or "bool".
  static dlpack::DLDataType dtype_named(const std::string& name) {
    if (name == "bfloat16") return {dlpack::kDLBfloat, 16, 1};
    if (name == "float16") return {dlpack::kDLFloat, 16, 1};
    if (name == "float32") return {dlpack::kDLFloat, 32, 1};
    if (name == "int8") return {dlpack::kDLInt, 8, 1};
    if (name == "int32") return {dlpack::kDLInt, 32, 1};
    if (name == "int64") return {dlpack::kDLInt, 64, 1};
    if (name == "bool") return {dlpack::kDLBool, 8, 1};
    throw std::invalid_argument("EmulatedDeviceArray: unknown dtype " + name);
  }

  static std::shared_ptr<EmulatedDeviceArray> from_numpy(const py::array& a, const std::string& dtype, int device) {
    const py::array c = py::array::ensure(a, py::array::c_style);
    std::vector<std::int64_t> shape(c.shape(), c.shape() + c.ndim());
    auto out = std::make_shared<EmulatedDeviceArray>(shape, dtype);
    out->device_ = device;
    if (static_cast<std::size_t>(c.nbytes()) != out->bytes_)
      throw std::invalid_argument("EmulatedDeviceArray: the array's element size is not the dtype's");
    cudaMemcpy(out->data_, c.data(), out->bytes_, cudaMemcpyHostToDevice);
    return out;
  }

  // The contents as a numpy array of the same size in bytes (16-bit floats as uint16 bit patterns).
  py::array numpy() const {
    const std::string format = dtype_.code == dlpack::kDLFloat && dtype_.bits == 32 ? "float32"
                               : dtype_.bits == 64                                  ? "int64"
                               : dtype_.bits == 32                                  ? "int32"
                               : dtype_.bits == 16                                  ? "uint16"
                               : dtype_.code == dlpack::kDLBool                     ? "bool"
                                                                                    : "int8";
    py::array out(py::dtype(format), std::vector<py::ssize_t>(shape_.begin(), shape_.end()));
    cudaMemcpy(out.mutable_data(), data_, bytes_, cudaMemcpyDeviceToHost);
    return out;
  }

  // A DLPack capsule of the whole array; the capsule holds a reference to `self` until it is destroyed.
  static py::capsule dlpack(const std::shared_ptr<EmulatedDeviceArray>& self) {
    struct Context {
      std::shared_ptr<EmulatedDeviceArray> owner;
      std::vector<std::int64_t> shape;
    };
    auto* managed = new dlpack::DLManagedTensor{};
    auto* ctx = new Context{self, self->shape_};
    managed->dl_tensor.data = self->data_;
    managed->dl_tensor.device = {dlpack::kDLCUDA, self->device_};
    managed->dl_tensor.ndim = static_cast<std::int32_t>(ctx->shape.size());
    managed->dl_tensor.dtype = self->dtype_;
    managed->dl_tensor.shape = ctx->shape.data();
    managed->dl_tensor.strides = nullptr;
    managed->manager_ctx = ctx;
    managed->deleter = [](dlpack::DLManagedTensor* m) {
      delete static_cast<Context*>(m->manager_ctx);
      delete m;
    };
    return py::capsule(managed, dlpack::kCapsuleName, [](PyObject* capsule) {
      if (PyCapsule_IsValid(capsule, dlpack::kCapsuleName) == 0) return;  // consumed: the consumer deletes
      auto* m = static_cast<dlpack::DLManagedTensor*>(PyCapsule_GetPointer(capsule, dlpack::kCapsuleName));
      m->deleter(m);
    });
  }

  const std::vector<std::int64_t>& shape() const { return shape_; }
  const std::string& dtype() const { return dtype_name_; }
  int device() const { return device_; }

 private:
  std::vector<std::int64_t> shape_;
  dlpack::DLDataType dtype_;
  std::string dtype_name_;
  int device_ = 0;
  std::size_t bytes_ = 0;
  void* data_ = nullptr;
};
#endif

}  // namespace

void bind_cuda(py::module_& m) {
  m.attr("has_cuda") = true;
  m.def(
      "cuda_available",
      [] {
        std::string reason;
        const bool ok = cuda::available(&reason);
        return py::make_tuple(ok, reason);
      },
      "(whether a CUDA group can be joined here, why not)");
  py::class_<PyCudaGroup>(m, "CudaGroup")
      .def_static("join", &PyCudaGroup::join, py::arg("config"), py::arg("job"), py::arg("device"), py::arg("max_bs"),
                  py::arg("k"), py::arg("h"), py::arg("timeout_ms"))
      .def("dispatch", &PyCudaGroup::dispatch, py::arg("stream"), py::arg("x"), py::arg("expert_ids"),
           py::arg("scales"), py::arg("x_active_mask"), py::arg("expert_scales"), py::arg("quant_mode"),
           py::arg("expert_token_nums_type"), py::arg("outputs"))
      .def("combine", &PyCudaGroup::combine, py::arg("stream"), py::arg("expand_x"), py::arg("expert_ids"),
           py::arg("expand_idx"), py::arg("ep_send_counts"), py::arg("expert_scales"), py::arg("tp_send_counts"),
           py::arg("x_active_mask"), py::arg("activation_scale"), py::arg("weight_scale"), py::arg("group_list"),
           py::arg("expand_scales"), py::arg("shared_expert_x"), py::arg("out_dtype"), py::arg("comm_quant_mode"),
           py::arg("group_list_type"), py::arg("out"))
      .def("dispatch_v2", &PyCudaGroup::dispatch_v2, py::arg("stream"), py::arg("x"), py::arg("expert_ids"),
           py::arg("scales"), py::arg("x_active_mask"), py::arg("expert_scales"), py::arg("elastic_info"),
           py::arg("performance_info"), py::arg("quant_mode"), py::arg("expert_token_nums_type"),
           py::arg("zero_expert_num"), py::arg("copy_expert_num"), py::arg("const_expert_num"), py::arg("comm_alg"),
           py::arg("outputs"))
      .def("combine_v2", &PyCudaGroup::combine_v2, py::arg("stream"), py::arg("expand_x"), py::arg("expert_ids"),
           py::arg("assist_info_for_combine"), py::arg("ep_send_counts"), py::arg("expert_scales"),
           py::arg("tp_send_counts"), py::arg("x_active_mask"), py::arg("expand_scales"), py::arg("shared_expert_x"),
           py::arg("elastic_info"), py::arg("ori_x"), py::arg("const_expert_alpha_1"), py::arg("const_expert_alpha_2"),
           py::arg("const_expert_v"), py::arg("performance_info"), py::arg("comm_quant_mode"),
           py::arg("zero_expert_num"), py::arg("copy_expert_num"), py::arg("const_expert_num"), py::arg("comm_alg"),
           py::arg("out"))
      .def("synchronize", &PyCudaGroup::synchronize, py::arg("stream") = py::none())
      .def_property_readonly("last_valid_rows", &PyCudaGroup::last_valid_rows)
      .def_property_readonly("device", &PyCudaGroup::device)
      .def_property_readonly("max_bs", &PyCudaGroup::max_bs)
      .def_property_readonly("k", &PyCudaGroup::k)
      .def_property_readonly("h", &PyCudaGroup::h)
      .def("close", &PyCudaGroup::close, py::arg("wait") = true)
      .def_property_readonly("closed", &PyCudaGroup::closed);
#ifdef MOEDIST_PYTHON_CUDA_EMULATION
  m.attr("cuda_emulated") = true;
  py::class_<EmulatedDeviceArray, std::shared_ptr<EmulatedDeviceArray>>(m, "EmulatedDeviceArray")
      .def_static("from_numpy", &EmulatedDeviceArray::from_numpy, py::arg("array"), py::arg("dtype"),
                  py::arg("device") = 0)
      .def_static(
          "empty",
          [](const std::vector<std::int64_t>& shape, const std::string& dtype) {
            return std::make_shared<EmulatedDeviceArray>(shape, dtype);
          },
          py::arg("shape"), py::arg("dtype"))
      .def("numpy", &EmulatedDeviceArray::numpy)
      .def_property_readonly("shape", [](const EmulatedDeviceArray& a) { return py::tuple(py::cast(a.shape())); })
      .def_property_readonly("dtype", &EmulatedDeviceArray::dtype)
      .def(
          "__dlpack__",
          [](const std::shared_ptr<EmulatedDeviceArray>& self, const py::object& /*stream*/) {
            return EmulatedDeviceArray::dlpack(self);
          },
          py::arg("stream") = py::none())
      .def("__dlpack_device__",
           [](const EmulatedDeviceArray& a) { return py::make_tuple(dlpack::kDLCUDA, a.device()); });
#else
  m.attr("cuda_emulated") = false;
#endif
}

}  // namespace moedist::python
