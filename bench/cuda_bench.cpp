// moedist_cuda_bench: the CUDA backend's dispatch and combine against their HBM byte floor, on one GPU.
//
// The floor of a call is the fewest bytes it must move through device memory (each input read once,
// each output written once) over the device-to-device copy bandwidth measured in the same run (bytes
// read plus bytes written). Dispatch (quant_mode 2): read x, write K int8 rows and their scales per
// token; (quant_mode 0): write K 16-bit rows. Combine: read K expert rows per token, write the token.
// Each number is the median of --iters calls timed with CUDA events after --warmup calls.
//
// Ranks: 1 (one process; every expert local, so the call is the fused kernels plus the protocol's small
// steps) and then W processes sharing the GPU, the tokens split evenly (each process times its own calls;
// the reported time is the slowest rank's median). Without MPS the processes time-share the GPU, so the
// W > 1 times include the driver's time slices: they are latencies of ranks sharing one GPU, not kernel
// speed (bench/cuda_report.py gives their "x floor" only for W = 1).
//
// The PyTorch eager equivalent is bench/torch_eager_baseline.py; scripts/gpu_session.sh runs both in one
// call and bench/cuda_report.py prints the ratios. Exit 77 without a usable CUDA device.
#include <cuda_runtime_api.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "common/child_processes.h"
#include "moedist/cuda.h"
#include "moedist/error.h"
#include "numeric/convert.h"

namespace {

using namespace moedist;

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

struct Settings {
  std::int64_t tokens = 4096, h = 7168, k = 8;
  int experts = 256, iters = 20, warmup = 20;
  std::vector<int> ranks{1, 2, 4, 8};
  std::string json;
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

// Times `body` on `stream` with events, in milliseconds per run: the median over `iters` batches of
// kBatch back-to-back runs, so the host's enqueueing overlaps the GPU's work as in a steady stream of
// calls. Warm-up first: `warmup` runs, and more until `min_warm_up` has passed. A collective body must
// pass zero: its runs are calls of a group, and a count that depends on each rank's clock would send
// the ranks into different calls (warm_up_clocks ramps the clocks up without the group instead).
constexpr int kBatch = 10;
double time_ms(cudaStream_t stream, int warmup, int iters, std::chrono::milliseconds min_warm_up, const std::function<void()>& body) {
  cudaEvent_t start, stop;
  check(cudaEventCreate(&start), "cudaEventCreate");
  check(cudaEventCreate(&stop), "cudaEventCreate");
  const auto warm_start = std::chrono::steady_clock::now();
  for (int i = 0; i < warmup || std::chrono::steady_clock::now() - warm_start < min_warm_up; ++i) {
    body();
    if (i % kBatch == kBatch - 1) check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  }
  check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  std::vector<double> ms;
  for (int i = 0; i < iters; ++i) {
    check(cudaEventRecord(start, stream), "cudaEventRecord");
    for (int b = 0; b < kBatch; ++b) body();
    check(cudaEventRecord(stop, stream), "cudaEventRecord");
    check(cudaEventSynchronize(stop), "cudaEventSynchronize");
    float t = 0;
    check(cudaEventElapsedTime(&t, start, stop), "cudaEventElapsedTime");
    ms.push_back(static_cast<double>(t) / kBatch);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return median(ms);
}

// The copy ceiling: bytes read plus written per second by a 1 GiB device-to-device copy.
double copy_bandwidth(int warmup, int iters) {
  const std::size_t bytes = std::size_t{1} << 30;
  void *a = nullptr, *b = nullptr;
  check(cudaMalloc(&a, bytes), "cudaMalloc");
  check(cudaMalloc(&b, bytes), "cudaMalloc");
  check(cudaMemset(a, 1, bytes), "cudaMemset");
  cudaStream_t s;
  check(cudaStreamCreate(&s), "cudaStreamCreate");
  const double ms = time_ms(s, warmup, iters, std::chrono::milliseconds(200),
                            [&] { check(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, s), "cudaMemcpyAsync"); });
  cudaStreamDestroy(s);
  cudaFree(a);
  cudaFree(b);
  return 2.0 * static_cast<double>(bytes) / (ms * 1e-3);
}

struct RankTimes {
  double dispatch_q2 = 0, dispatch_q0 = 0, combine = 0;  // combine: (dispatch quant 0 + combine) - dispatch quant 0
};

// One rank of a W-rank group on device 0: times dispatch (quant 2 and 0) and combine on its tokens.
RankTimes run_rank(const Settings& st, int world, int rank, const std::string& job) {
  check(cudaSetDevice(0), "cudaSetDevice");
  const std::int64_t bs = st.tokens / world, h = st.h, k = st.k;
  GroupConfig cfg;
  cfg.ep_world_size = world;
  cfg.ep_rank_id = rank;
  cfg.moe_expert_num = st.experts;
  cuda::CudaGroupOptions opt;
  opt.device = 0;
  opt.max_bs = bs;
  opt.k = k;
  opt.h = h;
  opt.wait.timeout = std::chrono::milliseconds(20000);  // a hang costs one W, not the whole run
  auto group = cuda::CudaGroup::join(cfg, job, opt);

  // Random inputs (never zeros): x in [-4, 4), K distinct experts per token, random weights.
  std::mt19937_64 rng(1234 + static_cast<std::uint64_t>(rank));
  std::uniform_real_distribution<float> value(-4.0f, 4.0f);
  std::vector<std::uint16_t> x(static_cast<std::size_t>(bs * h));
  for (auto& v : x) v = numeric::f32_to_bf16_rne(value(rng));
  std::vector<std::int32_t> ids(static_cast<std::size_t>(bs * k));
  std::vector<int> experts(static_cast<std::size_t>(st.experts));
  for (std::int64_t b = 0; b < bs; ++b) {
    for (int e = 0; e < st.experts; ++e) experts[static_cast<std::size_t>(e)] = e;
    for (std::int64_t j = 0; j < k; ++j) {
      std::swap(experts[static_cast<std::size_t>(j)], experts[static_cast<std::size_t>(j + static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(st.experts - j)))]);
      ids[static_cast<std::size_t>(b * k + j)] = experts[static_cast<std::size_t>(j)];
    }
  }
  std::vector<float> weights(static_cast<std::size_t>(bs * k));
  for (auto& w : weights) w = value(rng) / 4.0f;
  void *dx = nullptr, *dids = nullptr, *dw = nullptr;
  check(cudaMalloc(&dx, x.size() * 2), "cudaMalloc");
  check(cudaMalloc(&dids, ids.size() * 4), "cudaMalloc");
  check(cudaMalloc(&dw, weights.size() * 4), "cudaMalloc");
  check(cudaMemcpy(dx, x.data(), x.size() * 2, cudaMemcpyHostToDevice), "cudaMemcpy");
  check(cudaMemcpy(dids, ids.data(), ids.size() * 4, cudaMemcpyHostToDevice), "cudaMemcpy");
  check(cudaMemcpy(dw, weights.data(), weights.size() * 4, cudaMemcpyHostToDevice), "cudaMemcpy");
  const TensorView xv = matrix_view(dx, DType::bf16, bs, h);
  const TensorView idv = matrix_view(dids, DType::int32, bs, k);
  const TensorView wv = matrix_view(dw, DType::fp32, bs, k);
  cudaStream_t stream;
  check(cudaStreamCreate(&stream), "cudaStreamCreate");
  const auto s = reinterpret_cast<cuda::Stream>(stream);

  // Clocks up first, each rank on its own (200 ms of memsets on its buffers); then every timed call
  // is a call of the group, the same number on every rank.
  time_ms(stream, 0, 1, std::chrono::milliseconds(200), [&] { check(cudaMemsetAsync(dx, 0, x.size() * 2, stream), "cudaMemsetAsync"); });
  check(cudaMemcpy(dx, x.data(), x.size() * 2, cudaMemcpyHostToDevice), "cudaMemcpy");

  RankTimes t;
  DispatchOptions q2;
  q2.quant_mode = 2;
  DispatchOptions q0;
  cuda::CudaDispatchResult d;
  t.dispatch_q2 = time_ms(stream, st.warmup, st.iters, {}, [&] { d = group->dispatch(xv, idv, q2, s); });
  group->synchronize(s);
  t.dispatch_q0 = time_ms(stream, st.warmup, st.iters, {}, [&] { d = group->dispatch(xv, idv, q0, s); });
  group->synchronize(s);

  // Combine: the experts' outputs sit in the combine buffer (random values in the valid rows), read in
  // place. One combine per dispatch, so the pair is timed and the dispatch's own time subtracted.
  const MutableTensorView rows = group->combine_buffer(DType::bf16);
  const std::int64_t valid = group->last_valid_rows();
  std::vector<std::uint16_t> y(static_cast<std::size_t>(valid * rows.strides[0]));
  std::uint64_t state = 0x9e3779b97f4a7c15ull + static_cast<std::uint64_t>(rank);
  for (auto& v : y) {  // xorshift: random, never zero, and fast for hundreds of MB
    state ^= state << 13, state ^= state >> 7, state ^= state << 17;
    v = numeric::f32_to_bf16_rne(static_cast<float>(static_cast<std::int64_t>(state % 2001) - 1000) / 256.0f + 0.001f);
  }
  check(cudaMemcpy(rows.data, y.data(), y.size() * 2, cudaMemcpyHostToDevice), "cudaMemcpy");
  const TensorView expand_x = matrix_view(rows.data, DType::bf16, d.expand_x.rows(), h, rows.strides[0]);
  const double pair = time_ms(stream, st.warmup, st.iters, {}, [&] {
    d = group->dispatch(xv, idv, q0, s);
    group->combine(expand_x, idv, d.expand_idx, d.ep_recv_counts, wv, {}, s);
  });
  t.combine = pair - t.dispatch_q0;
  group->synchronize(s);
  cudaStreamDestroy(stream);
  cudaFree(dx);
  cudaFree(dids);
  cudaFree(dw);
  return t;
}

// Runs body(i) in n child processes and returns their answers ("error: ..." for one that died).
std::vector<std::string> in_children(int n, const std::function<std::string(int)>& body) {
  std::vector<std::string> out;
  for (const ChildResult& r : run_in_children(n, body)) out.push_back(r.finished ? r.text : "error: the process died");
  return out;
}

std::vector<int> parse_list(const std::string& text) {
  std::vector<int> out;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) out.push_back(std::stoi(item));
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  Settings st;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const auto next = [&]() -> std::string {
      if (i + 1 >= argc) throw std::runtime_error(a + " needs a value");
      return argv[++i];
    };
    if (a == "--tokens") st.tokens = std::stoll(next());
    else if (a == "--h") st.h = std::stoll(next());
    else if (a == "--k") st.k = std::stoll(next());
    else if (a == "--experts") st.experts = std::stoi(next());
    else if (a == "--ranks") st.ranks = parse_list(next());
    else if (a == "--iters") st.iters = std::stoi(next());
    else if (a == "--warmup") st.warmup = std::stoi(next());
    else if (a == "--json") st.json = next();
    else {
      std::fprintf(stderr, "usage: %s [--tokens N] [--h H] [--k K] [--experts E] [--ranks 1,2,4,8] [--iters N] [--warmup N] [--json FILE]\n", argv[0]);
      return 2;
    }
  }
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // a run cut off at its time limit keeps every finished line
  const std::string probe = in_children(1, [](int) {
    std::string why;
    return cuda::available(&why) ? std::string("ok") : why;
  })[0];
  if (probe != "ok") {
    std::printf("SKIPPED: no usable CUDA device (%s)\n", probe.c_str());
    return 77;
  }
  const std::string device = in_children(1, [&](int) {
    cudaDeviceProp p{};
    check(cudaGetDeviceProperties(&p, 0), "cudaGetDeviceProperties");
    char line[512];
    std::snprintf(line, sizeof line, "%s|%d|%.17g", p.name, p.multiProcessorCount, copy_bandwidth(st.warmup, st.iters));
    return std::string(line);
  })[0];
  if (device.rfind("error:", 0) == 0 || device.rfind("exception:", 0) == 0) {
    std::printf("%s\n", device.c_str());
    return 1;
  }
  const std::string name = device.substr(0, device.find('|'));
  const double bw = std::stod(device.substr(device.rfind('|') + 1));
  const double tokens = static_cast<double>(st.tokens), h = static_cast<double>(st.h), k = static_cast<double>(st.k);
  const double floor_q2 = tokens * h * 2 + tokens * k * (h + 4);
  const double floor_q0 = tokens * h * 2 + tokens * k * h * 2;
  const double floor_combine = tokens * k * h * 2 + tokens * h * 2;
  std::printf("device: %s; copy bandwidth %.0f GB/s (read + write)\n", name.c_str(), bw / 1e9);
  std::printf("shape: %lld tokens, H %lld, K %lld, %d experts, bf16; median of %d calls\n", static_cast<long long>(st.tokens),
              static_cast<long long>(st.h), static_cast<long long>(st.k), st.experts, st.iters);
  std::printf("%-6s %-22s %10s %10s %8s\n", "ranks", "call", "ms", "floor ms", "x floor");
  nlohmann::json report = {{"device", name}, {"copy_bandwidth_bytes_per_s", bw}, {"tokens", st.tokens}, {"h", st.h}, {"k", st.k},
                           {"experts", st.experts}, {"iters", st.iters}, {"results", nlohmann::json::array()}};
  int failures = 0;
  for (const int world : st.ranks) {
    if (st.experts % world != 0 || st.tokens % world != 0) continue;
    const std::string job = "cuda-bench-" + std::to_string(getpid()) + "-" + std::to_string(world);
    const auto outs = in_children(world, [&](int rank) {
      const RankTimes t = run_rank(st, world, rank, job);
      char line[256];
      std::snprintf(line, sizeof line, "%.17g %.17g %.17g", t.dispatch_q2, t.dispatch_q0, t.combine);
      return std::string(line);
    });
    RankTimes worst;
    bool ok = true;
    for (const auto& o : outs) {
      double a = 0, b = 0, c = 0;
      if (std::sscanf(o.c_str(), "%lf %lf %lf", &a, &b, &c) != 3) {
        std::printf("ranks %d: %s\n", world, o.c_str());
        ok = false;
        continue;
      }
      worst.dispatch_q2 = std::max(worst.dispatch_q2, a);
      worst.dispatch_q0 = std::max(worst.dispatch_q0, b);
      worst.combine = std::max(worst.combine, c);
    }
    if (!ok) {
      ++failures;
      continue;
    }
    for (const auto& [call, ms, bytes] : {std::tuple<const char*, double, double>{"dispatch quant_mode 2", worst.dispatch_q2, floor_q2},
                                          {"dispatch quant_mode 0", worst.dispatch_q0, floor_q0}, {"combine", worst.combine, floor_combine}}) {
      const double floor_ms = bytes / bw * 1e3;
      std::printf("%-6d %-22s %10.3f %10.3f %8.2f\n", world, call, ms, floor_ms, ms / floor_ms);
      report["results"].push_back({{"ranks", world}, {"call", call}, {"ms", ms}, {"floor_ms", floor_ms}, {"floor_bytes", bytes}});
    }
    // Written after every W: a later W that hangs (and is cut off) loses only itself.
    if (!st.json.empty()) std::ofstream(st.json) << report.dump(2) << "\n";
  }
  return failures == 0 ? 0 : 1;
}
