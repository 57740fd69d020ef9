// A CPU stand-in for the parts of the CUDA runtime that src/cuda/cuda_group.cpp and the CUDA group
// tests call, so that the whole CudaGroup (join, IPC windows, calls, errors, teardown) runs on a CPU:
// "device" memory is shared host memory (a memfd per allocation, so another process can open it as a
// CUDA IPC handle through /proc/<pid>/fd/<fd>), copies are memcpy, kernels run when launched (the
// emulated kernels of host_cuda.h), so every stream is always idle. One device, number 0, unless
// MOEDIST_FAKE_CUDA_DEVICES says more (all the same CPU memory); the current device is per thread, as in
// CUDA, and the device every synchronize and free applies to is logged (emu::device_log) so that tests
// can check which device the group's host code targets.
//
// Linked instead of libcudart into cuda_group_emulation_test only; not a CUDA implementation.
#include <cuda_runtime_api.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace {

struct Allocation {
  std::size_t bytes = 0;
  int device = 0;    // the current device of the allocating thread
  int fd = -1;       // the memfd behind it (its IPC handle names it)
  bool opened = false;  // mapped from another process's handle
};

std::mutex mutex;
std::map<const void*, Allocation>& allocations() {
  static std::map<const void*, Allocation> a;
  return a;
}
thread_local int current_device = 0;
thread_local cudaError_t last_error = cudaSuccess;
std::vector<std::string>& device_log() {  // guarded by mutex
  static std::vector<std::string> log;
  return log;
}
void log_call(const char* what, int device) {
  std::lock_guard<std::mutex> lock(mutex);
  device_log().push_back(std::string(what) + " device " + std::to_string(device));
}
int device_count() {
  const char* n = std::getenv("MOEDIST_FAKE_CUDA_DEVICES");
  return n != nullptr && std::atoi(n) > 0 ? std::atoi(n) : 1;
}
// MOEDIST_FAKE_CUDA_REFUSE_DEVICE_COPIES: copies from device to device fail (the Python binding's copies
// of results into the caller's tensors; the group's own copies go to or from the host).
bool refuse_device_copy(enum cudaMemcpyKind kind) {
  return kind == cudaMemcpyDeviceToDevice && std::getenv("MOEDIST_FAKE_CUDA_REFUSE_DEVICE_COPIES") != nullptr;
}

cudaError_t fail(cudaError_t e) {
  last_error = e;
  return e;
}

// The allocation holding p, if any.
const Allocation* find(const void* p, const void** base) {
  auto& a = allocations();
  auto it = a.upper_bound(p);
  if (it == a.begin()) return nullptr;
  --it;
  if (static_cast<const char*>(p) >= static_cast<const char*>(it->first) + it->second.bytes) return nullptr;
  *base = it->first;
  return &it->second;
}

struct IpcHandle {  // what cudaIpcGetMemHandle puts in the 64 bytes
  pid_t pid;
  int fd;
  std::size_t bytes;
};
static_assert(sizeof(IpcHandle) <= sizeof(cudaIpcMemHandle_t));

using Work = std::vector<std::function<void()>>;
thread_local Work* capturing = nullptr;

}  // namespace

namespace emu {
// The capture state of host_cuda.h's enqueue(): the graph being recorded on this thread, or null.
std::vector<std::function<void()>>*& capture_target() { return capturing; }
// Every cudaDeviceSynchronize ("sync device D", D the calling thread's current device) and cudaFree /
// cudaFreeHost / cudaIpcCloseMemHandle ("free device D", D the allocating thread's device; the current
// device for host memory) since the last call, which clears it.
std::vector<std::string> take_device_log() {
  std::lock_guard<std::mutex> lock(mutex);
  std::vector<std::string> out;
  out.swap(device_log());
  return out;
}
}  // namespace emu

extern "C" {

const char* cudaGetErrorName(cudaError_t e) { return e == cudaSuccess ? "cudaSuccess" : "cudaErrorEmulated"; }
const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "an error of the emulated CUDA runtime"; }
cudaError_t cudaGetLastError(void) {
  const cudaError_t e = last_error;
  last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError(void) { return last_error; }
cudaError_t cudaGetDeviceCount(int* count) {
  *count = device_count();
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int* device) {
  *device = current_device;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) {
  return device >= 0 && device < device_count() ? (current_device = device, cudaSuccess) : fail(cudaErrorInvalidDevice);
}
cudaError_t cudaDeviceSynchronize(void) {
  log_call("sync", current_device);
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaStreamCreate(cudaStream_t* s) {
  *s = nullptr;
  return cudaSuccess;
}
cudaError_t cudaStreamDestroy(cudaStream_t) { return cudaSuccess; }

cudaError_t cudaMalloc(void** p, size_t bytes) {
  // A test's way to make one rank's allocation fail (a device out of memory): allocations of at least
  // this many bytes are refused.
  if (const char* limit = std::getenv("MOEDIST_FAKE_CUDA_REFUSE_MALLOC_FROM"); limit != nullptr && bytes >= std::strtoull(limit, nullptr, 10))
    return fail(cudaErrorMemoryAllocation);
  const int fd = memfd_create("moedist-fake-cuda", MFD_CLOEXEC);
  if (fd < 0 || ftruncate(fd, static_cast<off_t>(bytes == 0 ? 1 : bytes)) != 0) return fail(cudaErrorMemoryAllocation);
  void* m = mmap(nullptr, bytes == 0 ? 1 : bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (m == MAP_FAILED) return fail(cudaErrorMemoryAllocation);
  std::lock_guard<std::mutex> lock(mutex);
  allocations()[m] = Allocation{bytes == 0 ? 1 : bytes, current_device, fd, false};
  *p = m;
  return cudaSuccess;
}
cudaError_t cudaFree(void* p) {
  if (p == nullptr) return cudaSuccess;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = allocations().find(p);
  if (it == allocations().end() || it->second.opened) return fail(cudaErrorInvalidValue);
  device_log().push_back("free device " + std::to_string(it->second.device));
  munmap(p, it->second.bytes);
  close(it->second.fd);
  allocations().erase(it);
  return cudaSuccess;
}
cudaError_t cudaHostAlloc(void** p, size_t bytes, unsigned int) {
  *p = std::calloc(1, bytes == 0 ? 1 : bytes);
  return *p != nullptr ? cudaSuccess : fail(cudaErrorMemoryAllocation);
}
cudaError_t cudaFreeHost(void* p) {
  log_call("free", current_device);
  std::free(p);
  return cudaSuccess;
}
cudaError_t cudaMemset(void* p, int value, size_t bytes) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
  if (capturing != nullptr) {
    capturing->push_back([p, value, bytes] { std::memset(p, value, bytes); });
  } else {
    std::memset(p, value, bytes);
  }
  return cudaSuccess;
}
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, enum cudaMemcpyKind) {
  std::memcpy(dst, src, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, enum cudaMemcpyKind kind, cudaStream_t) {
  if (refuse_device_copy(kind)) return fail(cudaErrorInvalidValue);
  if (capturing != nullptr) {
    capturing->push_back([dst, src, bytes] { std::memcpy(dst, src, bytes); });
  } else {
    std::memcpy(dst, src, bytes);
  }
  return cudaSuccess;
}
cudaError_t cudaMemcpy2DAsync(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width, size_t height,
                              enum cudaMemcpyKind kind, cudaStream_t) {
  if (refuse_device_copy(kind)) return fail(cudaErrorInvalidValue);
  if (width > dpitch || width > spitch) return fail(cudaErrorInvalidPitchValue);
  const auto copy = [=] {
    for (size_t r = 0; r < height; ++r)
      std::memcpy(static_cast<char*>(dst) + r * dpitch, static_cast<const char*>(src) + r * spitch, width);
  };
  if (capturing != nullptr) {
    capturing->push_back(copy);
  } else {
    copy();
  }
  return cudaSuccess;
}

// Graphs: a captured stream records its work (host_cuda.h's enqueue and cudaMemcpyAsync above); an
// instantiated graph is a copy of that list; launching runs it.
cudaError_t cudaStreamBeginCapture(cudaStream_t, enum cudaStreamCaptureMode) {
  if (capturing != nullptr) return fail(cudaErrorIllegalState);
  capturing = new Work;
  return cudaSuccess;
}
cudaError_t cudaStreamEndCapture(cudaStream_t, cudaGraph_t* graph) {
  if (capturing == nullptr) return fail(cudaErrorIllegalState);
  *graph = reinterpret_cast<cudaGraph_t>(capturing);
  capturing = nullptr;
  return cudaSuccess;
}
cudaError_t cudaGraphInstantiate(cudaGraphExec_t* exec, cudaGraph_t graph, unsigned long long) {
  *exec = reinterpret_cast<cudaGraphExec_t>(new Work(*reinterpret_cast<Work*>(graph)));
  return cudaSuccess;
}
cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t) {
  for (const auto& work : *reinterpret_cast<Work*>(exec)) work();
  return cudaSuccess;
}
cudaError_t cudaGraphDestroy(cudaGraph_t graph) {
  delete reinterpret_cast<Work*>(graph);
  return cudaSuccess;
}
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec) {
  delete reinterpret_cast<Work*>(exec);
  return cudaSuccess;
}
cudaError_t cudaMemcpy2D(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width, size_t height, enum cudaMemcpyKind) {
  for (size_t r = 0; r < height; ++r) std::memcpy(static_cast<char*>(dst) + r * dpitch, static_cast<const char*>(src) + r * spitch, width);
  return cudaSuccess;
}

cudaError_t cudaPointerGetAttributes(struct cudaPointerAttributes* attr, const void* p) {
  std::memset(attr, 0, sizeof(*attr));
  std::lock_guard<std::mutex> lock(mutex);
  const void* base = nullptr;
  if (const Allocation* a = find(p, &base); a != nullptr) {
    attr->type = cudaMemoryTypeDevice;
    attr->device = a->device;
    attr->devicePointer = const_cast<void*>(p);
  } else {
    attr->type = cudaMemoryTypeUnregistered;
    attr->device = -2;
  }
  return cudaSuccess;
}

cudaError_t cudaIpcGetMemHandle(cudaIpcMemHandle_t* handle, void* p) {
  std::lock_guard<std::mutex> lock(mutex);
  auto it = allocations().find(p);
  if (it == allocations().end()) return fail(cudaErrorInvalidValue);
  std::memset(handle, 0, sizeof(*handle));
  const IpcHandle h{getpid(), it->second.fd, it->second.bytes};
  std::memcpy(handle, &h, sizeof(h));
  return cudaSuccess;
}
cudaError_t cudaIpcOpenMemHandle(void** p, cudaIpcMemHandle_t handle, unsigned int) {
  IpcHandle h;
  std::memcpy(&h, &handle, sizeof(h));
  if (h.pid == getpid()) return fail(cudaErrorInvalidResourceHandle);  // as CUDA: not from the exporting process
  // A test's way to make one rank's GPUs lack peer access.
  if (std::getenv("MOEDIST_FAKE_CUDA_REFUSE_IPC") != nullptr) return fail(cudaErrorPeerAccessUnsupported);
  char path[64];
  std::snprintf(path, sizeof path, "/proc/%d/fd/%d", static_cast<int>(h.pid), h.fd);
  const int fd = open(path, O_RDWR | O_CLOEXEC);
  if (fd < 0) return fail(cudaErrorInvalidResourceHandle);
  void* m = mmap(nullptr, h.bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (m == MAP_FAILED) return fail(cudaErrorMapBufferObjectFailed);
  std::lock_guard<std::mutex> lock(mutex);
  allocations()[m] = Allocation{h.bytes, current_device, -1, true};
  *p = m;
  return cudaSuccess;
}
cudaError_t cudaIpcCloseMemHandle(void* p) {
  std::lock_guard<std::mutex> lock(mutex);
  auto it = allocations().find(p);
  if (it == allocations().end() || !it->second.opened) return fail(cudaErrorInvalidValue);
  device_log().push_back("free device " + std::to_string(it->second.device));
  munmap(p, it->second.bytes);
  allocations().erase(it);
  return cudaSuccess;
}

// Events: the host clock when recorded (every stream is idle, so that is when the work before it ended).
cudaError_t cudaEventCreate(cudaEvent_t* event) {
  *event = reinterpret_cast<cudaEvent_t>(new double(0.0));
  return cudaSuccess;
}
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned int) { return cudaEventCreate(event); }
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t) {
  *reinterpret_cast<double*>(event) = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
  return cudaSuccess;
}
cudaError_t cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }
cudaError_t cudaStreamWaitEvent(cudaStream_t, cudaEvent_t, unsigned int) { return cudaSuccess; }  // streams are idle
cudaError_t cudaStreamIsCapturing(cudaStream_t, enum cudaStreamCaptureStatus* status) {
  *status = capturing != nullptr ? cudaStreamCaptureStatusActive : cudaStreamCaptureStatusNone;
  return cudaSuccess;
}
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) {
  *ms = static_cast<float>(*reinterpret_cast<double*>(end) - *reinterpret_cast<double*>(start));
  return cudaSuccess;
}
cudaError_t cudaEventDestroy(cudaEvent_t event) {
  delete reinterpret_cast<double*>(event);
  return cudaSuccess;
}
cudaError_t cudaGetDeviceProperties(struct cudaDeviceProp* prop, int device) {
  if (device < 0 || device >= device_count()) return fail(cudaErrorInvalidDevice);
  std::memset(prop, 0, sizeof(*prop));
  std::snprintf(prop->name, sizeof prop->name, "emulated on the CPU (tests/cuda_emulation)");
  prop->multiProcessorCount = 1;
  return cudaSuccess;
}

}  // extern "C"
