// The layer behind `moedist demo`; see demo_layer.h.
//
// Every rank (a thread of one InProcessWorld, or a process over shared memory) builds its inputs from the seed and
// its global rank, routes its tokens with a softmax top-K router, dispatches them, runs the MLP of each of its
// experts over the rows dispatch gave it, and combines. Afterwards a dense fp64 computation of the same layer, made without any moedist call from
// the inputs the ranks used, is compared with every rank's combine output.
#include "demo_layer.h"

#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <memory>
#include <numeric>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

#include "moedist/error.h"
#include "moedist/group.h"
#include "moedist/inproc.h"
#include "moedist/shm.h"
#ifdef MOEDIST_HAVE_MPI
#include "moedist/mpi.h"
#endif
#include "moedist/tensor.h"
#include "numeric/convert.h"
#include "transport/registry.h"

namespace moedist::demo {

namespace {

constexpr Fault kAllFaults[] = {Fault::none, Fault::drop_expert, Fault::swap_rows, Fault::swap_weights};

// One thread or process per rank: far beyond this the demo would only measure the scheduler.
constexpr std::int64_t kMaxWorldSize = 1024;

using Clock = std::chrono::steady_clock;

double ms_since(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

// OpenBLAS on one thread while it lives: the ranks (threads or processes) already outnumber the cores. The
// previous setting comes back afterwards, so that the reference may use every core.
class SingleThreadedBlas {
 public:
  SingleThreadedBlas() : previous_(openblas_get_num_threads()) { openblas_set_num_threads(1); }
  ~SingleThreadedBlas() { openblas_set_num_threads(previous_); }
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

 private:
  int previous_;
};

__attribute__((format(printf, 1, 2))) std::string format(const char* fmt, ...) {
  char buf[512];
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(buf, sizeof buf, fmt, args);
  va_end(args);
  return buf;
}

[[noreturn]] void reject(ErrorCode code, const char* parameter, const std::string& value, const char* rule) {
  throw ValidationError(code, parameter, value, rule);
}

// ---- deterministic inputs ----

// The splitmix64 finalizer. Used as a counter-based generator (hash of key + index), so each rank and the reference
// can produce any element of any tensor on its own and get the same value.
constexpr std::uint64_t mix64(std::uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

enum class Stream : std::uint64_t { tokens = 1, gate = 2, smooth = 3, w1 = 4, w2 = 5 };

class Random {
 public:
  Random(std::uint64_t seed, Stream stream, std::uint64_t id)
      : key_(mix64(seed ^ mix64((static_cast<std::uint64_t>(stream) << 40) ^ id))) {}

  double uniform(std::uint64_t i) const {  // [0, 1), 53 random bits
    return static_cast<double>(mix64(key_ + i * 0xd1b54a32d192ed03ull) >> 11) * 0x1p-53;
  }
  double symmetric(std::uint64_t i) const { return 2.0 * uniform(i) - 1.0; }  // [-1, 1)
  double normal(std::uint64_t i) const {  // Box-Muller over the pair of draws (i & ~1, i | 1)
    const double radius = std::sqrt(-2.0 * std::log(1.0 - uniform(i & ~std::uint64_t{1})));
    const double angle = 6.283185307179586 * uniform(i | 1);
    return radius * ((i & 1) ? std::sin(angle) : std::cos(angle));
  }

 private:
  std::uint64_t key_;
};

// The facts about a run that every part needs, derived once from the options.
//
// The model's experts are numbered m: MoE expert m for m < E, shared expert j for m = E + j (V1 has one, E). The
// router's ids are the operators': [0, E) MoE experts, then (op 2) Z zero and C copy experts.
struct Shape {
  int W = 0, T = 1, S = 0, E = 0, L = 0, K = 0;  // T: TP domain size max(tp_world_size, 1); L: experts per MoE rank
  int op = 1;
  int Z = 0, C = 0;  // op 2: zero and copy experts
  int shared = 0;    // shared experts: V1 1 when S > 0; V2 Sn (0 without shared-expert ranks)
  int R = 1;         // shared-expert ranks per shared expert, S / shared
  std::int64_t BS = 0, H = 0, I = 0;
  std::int64_t active = 0;  // tokens [0, active) of each rank take part; the rest are padding (op 2)
  int world = 0;
  bool scales = false;  // smooth scales are passed to dispatch
  int scale_rows = 0;   // V1: E + 1 with shared experts, else E; V2: shared + E
  numeric::Half half = numeric::Half::bf16;

  explicit Shape(const DemoOptions& o)
      : W(o.ep_world_size),
        T(std::max(o.tp_world_size, 1)),
        S(o.shared_expert_rank_num),
        E(o.moe_expert_num),
        L(o.moe_expert_num / (o.ep_world_size - o.shared_expert_rank_num)),
        K(o.topk),
        op(o.op),
        Z(o.op == 2 ? o.zero_expert_num : 0),
        C(o.op == 2 ? o.copy_expert_num : 0),
        shared(o.shared_expert_rank_num == 0 ? 0 : (o.op == 2 ? o.shared_expert_num : 1)),
        R(shared > 0 ? o.shared_expert_rank_num / shared : 1),
        BS(o.bs),
        H(o.hidden),
        I(o.intermediate),
        active(o.bs - padding_tokens(o)),
        world(world_size(o)),
        scales(o.quant_mode == 2 && o.smooth_scales),
        scale_rows(o.op == 2 ? shared + o.moe_expert_num
                             : (o.shared_expert_rank_num > 0 ? o.moe_expert_num + 1 : o.moe_expert_num)),
        half(o.dtype == DType::bf16 ? numeric::Half::bf16 : numeric::Half::fp16) {}

  // The router's candidates: the MoE experts, and with op 2 the zero and copy experts.
  int route_experts() const { return E + Z + C; }

  // The row of `scales` dispatch uses for model expert m. V1 (contract §2.3): the shared expert row 0, MoE expert
  // e row e + 1 with a shared expert, else e. V2 (§2.2): shared expert j row j, MoE expert e row shared + e.
  int smooth_row(int m) const {
    if (op == 2) return m >= E ? m - E : shared + m;
    return m == E ? 0 : (S > 0 ? m + 1 : m);
  }
};

// Model expert m (Shape): a MoE expert for m < E, shared expert m - E otherwise.
struct ExpertWeights {
  std::vector<float> w1;  // (I, H): up projection
  std::vector<float> w2;  // (H, I): down projection
};

ExpertWeights make_expert_weights(std::uint64_t seed, int expert, std::int64_t H, std::int64_t I) {
  // Uniform with variance 1/fan_in keeps activations of order 1 through both projections.
  const Random r1(seed, Stream::w1, static_cast<std::uint64_t>(expert));
  const Random r2(seed, Stream::w2, static_cast<std::uint64_t>(expert));
  const double a1 = std::sqrt(3.0 / static_cast<double>(H));
  const double a2 = std::sqrt(3.0 / static_cast<double>(I));
  ExpertWeights w;
  w.w1.resize(static_cast<std::size_t>(I * H));
  w.w2.resize(static_cast<std::size_t>(H * I));
  for (std::size_t i = 0; i < w.w1.size(); ++i) w.w1[i] = static_cast<float>(a1 * r1.symmetric(i));
  for (std::size_t i = 0; i < w.w2.size(); ++i) w.w2[i] = static_cast<float>(a2 * r2.symmetric(i));
  return w;
}

// Router weights (route_experts, H), the same on every rank; variance 1/H gives logits of order 1.
std::vector<float> make_gate(std::uint64_t seed, const Shape& s) {
  const Random r(seed, Stream::gate, 0);
  const double a = std::sqrt(3.0 / static_cast<double>(s.H));
  std::vector<float> gate(static_cast<std::size_t>(s.route_experts() * s.H));
  for (std::size_t i = 0; i < gate.size(); ++i) gate[i] = static_cast<float>(a * r.symmetric(i));
  return gate;
}

// Smooth-quant scales (scale_rows, H), a model parameter and so the same on every rank; log-uniform in [0.5, 2).
std::vector<float> make_smooth_scales(std::uint64_t seed, const Shape& s) {
  const Random r(seed, Stream::smooth, 0);
  std::vector<float> scales(static_cast<std::size_t>(s.scale_rows * s.H));
  for (std::size_t i = 0; i < scales.size(); ++i) scales[i] = static_cast<float>(std::exp2(r.symmetric(i)));
  return scales;
}

// The rank's tokens (BS, H), standard normal rounded to bf16/fp16.
Tensor make_tokens(std::uint64_t seed, int global_rank, const Shape& s, DType dtype) {
  const Random r(seed, Stream::tokens, static_cast<std::uint64_t>(global_rank));
  Tensor x(dtype, s.BS, s.H);
  auto* bits = x.data<std::uint16_t>();
  for (std::int64_t i = 0; i < s.BS * s.H; ++i) {
    bits[i] = numeric::f32_to_half_rne(s.half, static_cast<float>(r.normal(static_cast<std::uint64_t>(i))));
  }
  return x;
}

// ---- router ----

struct Routing {
  Tensor expert_ids;     // (BS, K) int32, K distinct experts per token, most probable first
  Tensor expert_scales;  // (BS, K) fp32, the top-K softmax probabilities renormalized to sum 1
};

Routing route(const Tensor& x, const std::vector<float>& gate, const Shape& s) {
  std::vector<float> xf(static_cast<std::size_t>(s.BS * s.H));
  const auto* bits = x.data<std::uint16_t>();
  for (std::size_t i = 0; i < xf.size(); ++i) xf[i] = numeric::half_to_f32(s.half, bits[i]);
  const int n = s.route_experts();
  std::vector<float> logits(static_cast<std::size_t>(s.BS * n));
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(s.BS), n, static_cast<int>(s.H), 1.0f,
              xf.data(), static_cast<int>(s.H), gate.data(), static_cast<int>(s.H), 0.0f, logits.data(), n);

  Routing routing{Tensor(DType::int32, s.BS, s.K), Tensor(DType::fp32, s.BS, s.K)};
  std::vector<int> order(static_cast<std::size_t>(n));
  std::vector<double> prob(static_cast<std::size_t>(n));
  for (std::int64_t b = 0; b < s.BS; ++b) {
    const float* row = logits.data() + b * n;
    const double top = *std::max_element(row, row + n);
    // Softmax up to its normalization, which the renormalization over the top K cancels.
    for (int e = 0; e < n; ++e) prob[static_cast<std::size_t>(e)] = std::exp(static_cast<double>(row[e]) - top);
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + s.K, order.end(), [&](int a, int c) {
      const double pa = prob[static_cast<std::size_t>(a)], pc = prob[static_cast<std::size_t>(c)];
      return pa != pc ? pa > pc : a < c;
    });
    double top_sum = 0;
    for (int k = 0; k < s.K; ++k) top_sum += prob[static_cast<std::size_t>(order[static_cast<std::size_t>(k)])];
    for (int k = 0; k < s.K; ++k) {
      const int e = order[static_cast<std::size_t>(k)];
      routing.expert_ids.data<std::int32_t>()[b * s.K + k] = e;
      routing.expert_scales.data<float>()[b * s.K + k] = static_cast<float>(prob[static_cast<std::size_t>(e)] / top_sum);
    }
  }
  return routing;
}

// ---- experts ----

float silu(float v) { return v / (1.0f + std::exp(-v)); }

// Runs one expert's MLP y = W2[:, c0:c1) · silu(W1[c0:c1, :] · x) over `rows` rows of dispatch's output starting at
// `row0`, and writes y, rounded half to even to x's dtype, to the same rows of `out`. The expert first undoes what
// dispatch did to the tokens: it dequantizes (q * dynamic_scale) and divides by the smooth-scale row dispatch
// applied for it, so it sees the token itself up to int8 rounding. [c0, c1) is the intermediate slice this TP rank
// owns (the whole range without TP).
void run_expert(const DispatchResult& d, std::int64_t row0, std::int64_t rows, const float* smooth_row,
                const ExpertWeights& w, std::int64_t c0, std::int64_t c1, int quant_mode, const Shape& s,
                Tensor& out) {
  if (rows == 0) return;
  const std::int64_t H = s.H, slice = c1 - c0;
  std::vector<float> input(static_cast<std::size_t>(rows * H));
  const std::int64_t col_stride = d.expand_x.strides[1];
  for (std::int64_t i = 0; i < rows; ++i) {
    float* dst = input.data() + i * H;
    if (quant_mode == 2) {
      const std::int8_t* q = d.expand_x.ptr<std::int8_t>(row0 + i);
      const float scale = d.dynamic_scales.at<float>(row0 + i);
      for (std::int64_t h = 0; h < H; ++h) dst[h] = static_cast<float>(q[h * col_stride]) * scale;
      if (smooth_row != nullptr) {
        for (std::int64_t h = 0; h < H; ++h) dst[h] = dst[h] / smooth_row[h];
      }
    } else {
      const std::uint16_t* src = d.expand_x.ptr<std::uint16_t>(row0 + i);
      for (std::int64_t h = 0; h < H; ++h) dst[h] = numeric::half_to_f32(s.half, src[h * col_stride]);
    }
  }

  std::vector<float> hidden(static_cast<std::size_t>(rows * slice));
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(rows), static_cast<int>(slice),
              static_cast<int>(H), 1.0f, input.data(), static_cast<int>(H), w.w1.data() + c0 * H, static_cast<int>(H),
              0.0f, hidden.data(), static_cast<int>(slice));
  for (float& v : hidden) v = silu(v);
  std::vector<float> y(static_cast<std::size_t>(rows * H));
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(rows), static_cast<int>(H),
              static_cast<int>(slice), 1.0f, hidden.data(), static_cast<int>(slice), w.w2.data() + c0,
              static_cast<int>(s.I), 0.0f, y.data(), static_cast<int>(H));

  auto* dst = out.data<std::uint16_t>() + row0 * H;
  for (std::int64_t i = 0; i < rows * H; ++i) dst[i] = numeric::f32_to_half_rne(s.half, y[static_cast<std::size_t>(i)]);
}

// ---- one rank ----

GroupConfig config_for(const DemoOptions& o, int ep_rank, int tp_rank) {
  GroupConfig c;
  c.ep_world_size = o.ep_world_size;
  c.ep_rank_id = ep_rank;
  c.moe_expert_num = o.moe_expert_num;
  c.tp_world_size = o.tp_world_size;
  c.tp_rank_id = tp_rank;
  c.shared_expert_rank_num = o.shared_expert_rank_num;
  c.global_bs = o.global_bs;
  c.profile = o.profile;
  if (o.op == 2) c.shared_expert_num = o.shared_expert_num;
  return c;
}

// op 2: the (BS,) x_active_mask, tokens [0, active) true.
Tensor make_mask(const Shape& s) {
  Tensor mask(DType::boolean, s.BS);
  for (std::int64_t b = 0; b < s.BS; ++b) mask.data<std::uint8_t>()[b] = b < s.active ? 1 : 0;
  return mask;
}

// Dispatch with the options' operator: dispatch, or dispatch_v2 with the padding mask and the special experts.
DispatchResult call_dispatch(Group& group, const DemoOptions& o, const Shape& s, const Tensor& x,
                             const Routing& routing, const std::vector<float>& smooth, const Tensor& mask) {
  const TensorView scales = s.scales ? matrix_view(smooth.data(), DType::fp32, s.scale_rows, s.H) : TensorView{};
  if (o.op == 2) {
    DispatchV2Options options;
    options.scales = scales;
    options.x_active_mask = mask;
    options.quant_mode = o.quant_mode;
    options.expert_token_nums_type = o.expert_token_nums_type;
    options.zero_expert_num = s.Z;
    options.copy_expert_num = s.C;
    return group.dispatch_v2(x, routing.expert_ids, options);
  }
  DispatchOptions options;
  options.scales = scales;
  options.quant_mode = o.quant_mode;
  options.expert_token_nums_type = o.expert_token_nums_type;
  return group.dispatch(x, routing.expert_ids, options);
}

// Combine with the options' operator; combine_v2's copy experts return ori_x = the layer input x.
TensorView call_combine(Group& group, const DemoOptions& o, const Shape& s, const DispatchResult& d,
                        const Tensor& expert_out, const Tensor& x, const Tensor& expert_ids,
                        const TensorView& expert_scales, const Tensor& mask) {
  if (o.op == 2) {
    CombineV2Options options;
    options.tp_send_counts = d.tp_recv_counts;
    options.x_active_mask = mask;
    options.ori_x = x;
    options.zero_expert_num = s.Z;
    options.copy_expert_num = s.C;
    options.comm_quant_mode = o.comm_quant_mode;
    return group.combine_v2(expert_out, expert_ids, d.assist_info_for_combine, d.ep_recv_counts, expert_scales,
                            options);
  }
  CombineOptions options;
  options.tp_send_counts = d.tp_recv_counts;
  options.comm_quant_mode = o.comm_quant_mode;
  return group.combine(expert_out, expert_ids, d.expand_idx, d.ep_recv_counts, expert_scales, options);
}

}  // namespace

RankRecord run_rank(const DemoOptions& o, int global_rank, const JoinGroup& join) {
  const Shape s(o);
  RankRecord rec;
  const int ep_rank = global_rank / s.T;
  const int tp_rank = global_rank % s.T;
  const bool shared_rank = ep_rank < s.S;

  // Setup: the model (router, smooth scales, this rank's expert weights), the tokens and the group.
  auto start = Clock::now();
  rec.x = make_tokens(o.seed, global_rank, s, o.dtype);
  const std::vector<float> gate = make_gate(o.seed, s);
  const std::vector<float> smooth = s.scales ? make_smooth_scales(o.seed, s) : std::vector<float>{};
  std::vector<int> experts;  // this rank's local experts, as model experts m (Shape)
  if (shared_rank) {
    experts.push_back(s.E + ep_rank / s.R);  // V2 §3.5: shared expert j on ranks [j R, (j + 1) R)
  } else {
    for (int l = 0; l < s.L; ++l) experts.push_back((ep_rank - s.S) * s.L + l);
  }
  std::vector<ExpertWeights> weights;
  for (int e : experts) weights.push_back(make_expert_weights(o.seed, e, s.H, s.I));
  std::unique_ptr<Group> group = join(config_for(o, ep_rank, tp_rank));
  rec.setup_ms = ms_since(start);

  start = Clock::now();
  Routing routing = route(rec.x, gate, s);
  rec.route_ms = ms_since(start);

  start = Clock::now();
  const Tensor mask = o.op == 2 ? make_mask(s) : Tensor();
  const DispatchResult d = call_dispatch(*group, o, s, rec.x, routing, smooth, mask);
  rec.dispatch_ms = ms_since(start);

  // Experts: local expert l owns the next expert_token_nums rows of expand_x (a count or an inclusive prefix sum).
  start = Clock::now();
  Tensor expert_out(o.dtype, d.expand_x.rows(), s.H);
  const std::int64_t c0 = tp_rank * s.I / s.T, c1 = (tp_rank + 1) * s.I / s.T;  // this TP rank's MLP slice
  std::int64_t row0 = 0;
  for (std::size_t l = 0; l < experts.size(); ++l) {
    const std::int64_t value = d.expert_token_nums.at<std::int64_t>(static_cast<std::int64_t>(l));
    const std::int64_t rows = o.expert_token_nums_type == 1 ? value : value - row0;
    if (rows < 0 || row0 + rows > d.valid_rows) {
      throw Error(ErrorCode::internal, format("demo: rank %d: expert_token_nums[%zu] = %lld does not fit the %lld "
                                              "valid rows of expand_x",
                                              global_rank, l, static_cast<long long>(value),
                                              static_cast<long long>(d.valid_rows)));
    }
    const float* smooth_row = s.scales ? smooth.data() + s.smooth_row(experts[l]) * s.H : nullptr;
    run_expert(d, row0, rows, smooth_row, weights[l], c0, c1, o.quant_mode, s, expert_out);
    row0 += rows;
  }
  const bool first_moe_rank = ep_rank == s.S && tp_rank == 0;
  if (o.fault == Fault::drop_expert && first_moe_rank) {
    std::fill_n(expert_out.data<std::uint16_t>(), d.valid_rows * s.H, std::uint16_t{0});
  }
  if (o.fault == Fault::swap_rows && first_moe_rank && d.valid_rows >= 2) {
    std::swap_ranges(expert_out.data<std::uint16_t>(), expert_out.data<std::uint16_t>() + s.H,
                     expert_out.data<std::uint16_t>() + (d.valid_rows - 1) * s.H);
  }
  rec.experts_ms = ms_since(start);

  start = Clock::now();
  Tensor swapped_scales;
  TensorView combine_scales = routing.expert_scales;
  if (o.fault == Fault::swap_weights && global_rank == 0) {
    swapped_scales = Tensor(DType::fp32, s.BS, s.K);
    const float* src = routing.expert_scales.data<float>();
    float* dst = swapped_scales.data<float>();
    std::copy_n(src, s.BS * s.K, dst);
    for (std::int64_t b = 0; b < s.BS; ++b) std::swap(dst[b * s.K], dst[b * s.K + s.K - 1]);
    combine_scales = swapped_scales;
  }
  const TensorView y = call_combine(*group, o, s, d, expert_out, rec.x, routing.expert_ids, combine_scales, mask);
  rec.combine_ms = ms_since(start);

  rec.out = Tensor(o.dtype, s.BS, s.H);
  for (std::int64_t b = 0; b < s.BS; ++b) {
    for (std::int64_t h = 0; h < s.H; ++h) rec.out.data<std::uint16_t>()[b * s.H + h] = y.at<std::uint16_t>(b, h);
  }
  rec.valid_rows = d.valid_rows;
  rec.rows_sent = group->traffic().dispatch_rows_sent;
  rec.expert_ids = std::move(routing.expert_ids);
  rec.expert_scales = std::move(routing.expert_scales);
  return rec;
}

namespace {

// ---- dense reference ----

// The token row an expert sees after dispatch's int8 quantization, computed from the contract's formula (§2.2)
// rather than by moedist: v = x * smooth, ds = 127 / max|v|, q = rint(v * ds), then the expert's
// q * (1 / ds) / smooth, each step one fp32 operation.
void quantized_token(const std::uint16_t* x, const float* smooth, const Shape& s, std::vector<float>& v,
                     double* dst) {
  float amax = 0;
  for (std::int64_t h = 0; h < s.H; ++h) {
    v[static_cast<std::size_t>(h)] = numeric::half_to_f32(s.half, x[h]);
    if (smooth != nullptr) v[static_cast<std::size_t>(h)] = v[static_cast<std::size_t>(h)] * smooth[h];
    amax = std::max(amax, std::fabs(v[static_cast<std::size_t>(h)]));
  }
  if (amax == 0) {  // the contract's reading of an all-zero row: q = 0 with scale 0
    std::fill_n(dst, s.H, 0.0);
    return;
  }
  const float ds = 127.0f / amax;
  const float inverse = 1.0f / ds;
  for (std::int64_t h = 0; h < s.H; ++h) {
    const float q = std::nearbyint(v[static_cast<std::size_t>(h)] * ds);  // ties to even in the default mode
    float deq = q * inverse;
    if (smooth != nullptr) deq = deq / smooth[h];
    dst[h] = deq;
  }
}

// For every active token of every rank: sum_k w_k * f_{e_k}(token) + sum_j MLP_shared_j(token) (weight 1), in fp64
// with the full intermediate dimension, where f_e is expert e's MLP, nothing for a zero expert and the token itself
// (ori_x) for a copy expert; padding tokens' rows stay zero. With `quantized`, each MLP sees the token as dispatch's
// quant_mode 2 leaves it (quantized_token); otherwise the bf16/fp16 token itself. Returns (world * BS, H),
// rank-major.
std::vector<double> reference_layer(const DemoOptions& o, const Shape& s, const std::vector<RankRecord>& ranks,
                                    bool quantized) {
  std::vector<double> ref(static_cast<std::size_t>(s.world * s.BS * s.H), 0.0);
  const std::vector<float> smooth = s.scales ? make_smooth_scales(o.seed, s) : std::vector<float>{};
  std::vector<float> scratch(static_cast<std::size_t>(s.H));
  const auto token_row = [&](std::int64_t token) {
    return ranks[static_cast<std::size_t>(token / s.BS)].x.data<std::uint16_t>() + (token % s.BS) * s.H;
  };
  struct Entry {
    std::int64_t token;  // global token index: rank * BS + b
    double weight;
  };
  std::vector<Entry> entries;
  for (int m = 0; m < s.E + s.shared; ++m) {  // model experts: m >= E is shared expert m - E
    entries.clear();
    for (int g = 0; g < s.world; ++g) {
      for (std::int64_t b = 0; b < s.active; ++b) {
        const std::int64_t token = g * s.BS + b;
        if (m >= s.E) {
          entries.push_back({token, 1.0});
          continue;
        }
        const auto* ids = ranks[static_cast<std::size_t>(g)].expert_ids.data<std::int32_t>() + b * s.K;
        const auto* w = ranks[static_cast<std::size_t>(g)].expert_scales.data<float>() + b * s.K;
        for (int k = 0; k < s.K; ++k) {
          if (ids[k] == m) entries.push_back({token, static_cast<double>(w[k])});
        }
      }
    }
    if (entries.empty()) continue;
    const auto n = static_cast<std::int64_t>(entries.size());

    std::vector<double> input(static_cast<std::size_t>(n * s.H));
    const float* smooth_row = s.scales ? smooth.data() + s.smooth_row(m) * s.H : nullptr;
    for (std::int64_t i = 0; i < n; ++i) {
      const std::uint16_t* x = token_row(entries[static_cast<std::size_t>(i)].token);
      double* dst = input.data() + i * s.H;
      if (quantized) {
        quantized_token(x, smooth_row, s, scratch, dst);
      } else {
        for (std::int64_t h = 0; h < s.H; ++h) dst[h] = numeric::half_to_f32(s.half, x[h]);
      }
    }

    const ExpertWeights wf = make_expert_weights(o.seed, m, s.H, s.I);
    const std::vector<double> w1(wf.w1.begin(), wf.w1.end()), w2(wf.w2.begin(), wf.w2.end());
    std::vector<double> hidden(static_cast<std::size_t>(n * s.I));
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(n), static_cast<int>(s.I),
                static_cast<int>(s.H), 1.0, input.data(), static_cast<int>(s.H), w1.data(), static_cast<int>(s.H), 0.0,
                hidden.data(), static_cast<int>(s.I));
    for (double& v : hidden) v = v / (1.0 + std::exp(-v));
    std::vector<double> y(static_cast<std::size_t>(n * s.H));
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(n), static_cast<int>(s.H),
                static_cast<int>(s.I), 1.0, hidden.data(), static_cast<int>(s.I), w2.data(), static_cast<int>(s.I),
                0.0, y.data(), static_cast<int>(s.H));
    for (std::int64_t i = 0; i < n; ++i) {
      const Entry& entry = entries[static_cast<std::size_t>(i)];
      double* dst = ref.data() + entry.token * s.H;
      const double* src = y.data() + i * s.H;
      for (std::int64_t h = 0; h < s.H; ++h) dst[h] += entry.weight * src[h];
    }
  }
  // Copy experts (ids [E+Z, E+Z+C)) return the token itself, ori_x; zero experts (ids [E, E+Z)) add nothing.
  for (int g = 0; g < s.world; ++g) {
    for (std::int64_t b = 0; b < s.active; ++b) {
      const auto* ids = ranks[static_cast<std::size_t>(g)].expert_ids.data<std::int32_t>() + b * s.K;
      const auto* w = ranks[static_cast<std::size_t>(g)].expert_scales.data<float>() + b * s.K;
      const std::uint16_t* x = token_row(g * s.BS + b);
      double* dst = ref.data() + (g * s.BS + b) * s.H;
      for (int k = 0; k < s.K; ++k) {
        if (ids[k] < s.E + s.Z || ids[k] >= s.route_experts()) continue;
        for (std::int64_t h = 0; h < s.H; ++h) dst[h] += static_cast<double>(w[k]) * numeric::half_to_f32(s.half, x[h]);
      }
    }
  }
  return ref;
}

struct Comparison {
  double max_abs_error = 0;
  double max_abs_reference = 0;
  bool all_finite = true;
  bool padding_rows_zero = true;  // the rows of padding tokens hold +0.0 only (combine writes zeros for them)
  double rel() const { return max_abs_reference > 0 ? max_abs_error / max_abs_reference : max_abs_error; }
};

// Every row, padding tokens' included (their reference rows are zero).
Comparison compare(const Shape& s, const std::vector<RankRecord>& ranks, const std::vector<double>& ref) {
  Comparison c;
  for (int g = 0; g < s.world; ++g) {
    const auto* out = ranks[static_cast<std::size_t>(g)].out.data<std::uint16_t>();
    const double* r = ref.data() + g * s.BS * s.H;
    for (std::int64_t i = 0; i < s.BS * s.H; ++i) {
      const double v = numeric::half_to_f32(s.half, out[i]);
      if (!std::isfinite(v)) c.all_finite = false;
      if (i >= s.active * s.H && out[i] != 0) c.padding_rows_zero = false;
      c.max_abs_error = std::max(c.max_abs_error, std::fabs(v - r[i]));
      c.max_abs_reference = std::max(c.max_abs_reference, std::fabs(r[i]));
    }
  }
  return c;
}

// The routing entries of active tokens whose id falls in [first, first + count): what the zero or the copy experts
// received.
std::int64_t entries_routed_to(const Shape& s, const std::vector<RankRecord>& ranks, int first, int count) {
  std::int64_t n = 0;
  for (const RankRecord& r : ranks) {
    const auto* ids = r.expert_ids.data<std::int32_t>();
    for (std::int64_t i = 0; i < s.active * s.K; ++i) n += ids[i] >= first && ids[i] < first + count ? 1 : 0;
  }
  return n;
}

PhaseTime phase_time(const std::vector<RankRecord>& ranks, double RankRecord::*field) {
  std::vector<double> v;
  for (const RankRecord& r : ranks) v.push_back(r.*field);
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return {n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]), v.back()};
}

void print_report(const DemoOptions& o, const Shape& s, const DemoReport& r, std::ostream& out) {
  const TransportKind* kind = find_transport(o.transport);  // validate_options accepted the name
  const bool threads = kind != nullptr && kind->ranks == RankModel::threads;
  out << format("moedist demo: one MoE layer on %d %s (transport %s, profile %s)\n", r.world_size,
                threads ? "in-process ranks" : "rank processes", o.transport.c_str(), profile_name(o.profile));
  if (s.S > 0 && s.op == 2) {
    out << format(
        "  ranks     EP %d x TP %d; %d shared-expert ranks (%d shared expert%s x %d rank%s), %d MoE ranks x %d "
        "expert%s\n",
        s.W, s.T, s.S, s.shared, s.shared == 1 ? "" : "s", s.R, s.R == 1 ? "" : "s", s.W - s.S, s.L,
        s.L == 1 ? "" : "s");
  } else if (s.S > 0) {
    out << format("  ranks     EP %d x TP %d; %d shared-expert ranks, %d MoE ranks x %d expert%s\n", s.W, s.T, s.S,
                  s.W - s.S, s.L, s.L == 1 ? "" : "s");
  } else {
    out << format("  ranks     EP %d x TP %d; no shared expert, %d MoE ranks x %d expert%s\n", s.W, s.T, s.W, s.L,
                  s.L == 1 ? "" : "s");
  }
  const std::string experts = s.op == 2
                                  ? format("%d MoE + %d zero + %d copy experts, + %d shared", s.E, s.Z, s.C, s.shared)
                                  : format("%d experts%s", s.E, s.S > 0 ? " + 1 shared" : "");
  out << format("  layer     BS %lld, H %lld, K %d of %s, expert MLP H->%lld->H (SiLU)%s, %s\n",
                static_cast<long long>(s.BS), static_cast<long long>(s.H), s.K, experts.c_str(),
                static_cast<long long>(s.I), s.T == 2 ? " split over the TP pair" : "",
                std::string(dtype_name(o.dtype)).c_str());
  if (s.op == 2) {
    out << format(
        "  v2        dispatch_v2 / combine_v2; x_active_mask: %lld of %lld tokens per rank active; routing "
        "entries to zero experts %lld, to copy experts (ori_x = x) %lld\n",
        static_cast<long long>(s.active), static_cast<long long>(s.BS), static_cast<long long>(r.zero_expert_entries),
        static_cast<long long>(r.copy_expert_entries));
  }
  out << format("  quant     quant_mode %d%s, comm_quant_mode %d, expert_token_nums_type %d, global_bs %lld\n",
                o.quant_mode,
                o.quant_mode == 2 ? (s.scales ? " (dynamic int8, smooth scales)" : " (dynamic int8, no scales)")
                                  : " (none)",
                o.comm_quant_mode, o.expert_token_nums_type, static_cast<long long>(o.global_bs));
  if (o.fault != Fault::none) out << format("  fault     %s injected (checker self-test)\n", fault_name(o.fault));
  out << format("  tokens    %lld; rows dispatched %lld; rows through experts %lld\n",
                static_cast<long long>(r.tokens), static_cast<long long>(r.rows_dispatched),
                static_cast<long long>(r.expert_rows));
  out << "\n  phase              median ms     max ms   (per rank)\n";
  const std::pair<const char*, const PhaseTime*> phases[] = {
      {"setup", &r.setup}, {"route", &r.route}, {"dispatch", &r.dispatch}, {"experts", &r.experts},
      {"combine", &r.combine}};
  for (const auto& [name, t] : phases) out << format("  %-16s %11.3f %10.3f\n", name, t->median_ms, t->max_ms);
  out << format("  %-16s %11.3f            (wall, all ranks, setup included)\n", "ranks total", r.ranks_wall_ms);
  out << format("  %-16s %11.3f            (wall, single process, fp64)\n", "reference", r.reference_ms);
  out << "\n";
  out << format("  check     combine output vs a dense fp64 layer from the same inputs%s%s%s\n",
                o.quant_mode == 2 ? ", with dispatch's int8 quantization replayed" : "",
                o.comm_quant_mode == 2 ? " (not combine's)" : "",
                r.padding_tokens > 0 ? "; the padding tokens' rows must be zero" : "");
  out << format("  error     max |err| %.3e, max |ref| %.3e, max rel err %.3e, tolerance %.3e%s%s%s\n", r.max_abs_error,
                r.max_abs_reference, r.max_rel_error, r.tolerance, o.tolerance > 0 ? "" : " (auto)",
                r.all_finite ? "" : ", NON-FINITE OUTPUT", r.padding_rows_zero ? "" : ", NONZERO PADDING ROWS");
  if (r.unquantized_rel_diff >= 0) {
    out << format("  info      vs the layer without int8 dispatch quantization: max rel err %.3e\n",
                  r.unquantized_rel_diff);
  }
  out << "  result    " << (r.passed ? "PASS" : "MISMATCH") << "\n";
}

}  // namespace

const char* fault_name(Fault fault) noexcept {
  switch (fault) {
    case Fault::none: return "none";
    case Fault::drop_expert: return "drop-expert";
    case Fault::swap_rows: return "swap-rows";
    case Fault::swap_weights: return "swap-weights";
  }
  return "unknown";
}

bool fault_from_name(std::string_view name, Fault* out) noexcept {
  for (Fault fault : kAllFaults) {
    if (name == fault_name(fault)) {
      *out = fault;
      return true;
    }
  }
  return false;
}

double effective_tolerance(const DemoOptions& o) noexcept {
  if (o.tolerance > 0) return o.tolerance;
  const double unit_roundoff = o.dtype == DType::fp16 ? 0x1p-11 : 0x1p-8;
  return 4 * unit_roundoff + (o.comm_quant_mode == 2 ? 1.0 / 127 : 0.0);
}

namespace {

// The rules --op v2 adds. The library checks shared_expert_num against S (validate_config in validate_options).
void validate_v2_options(const DemoOptions& o) {
  const auto text = [](auto v) { return std::to_string(v); };
  if (o.zero_expert_num < 0) {
    reject(ErrorCode::invalid_argument, "zero_expert_num", text(o.zero_expert_num), "must be >= 0");
  }
  if (o.copy_expert_num < 0) {
    reject(ErrorCode::invalid_argument, "copy_expert_num", text(o.copy_expert_num), "must be >= 0");
  }
  if (static_cast<std::int64_t>(o.topk) > std::int64_t{o.moe_expert_num} + o.zero_expert_num + o.copy_expert_num) {
    reject(ErrorCode::invalid_argument, "topk", text(o.topk),
           "must be at most moe_expert_num + zero_expert_num + copy_expert_num (the router picks K distinct experts)");
  }
  if (o.padding_tokens < -1 || o.padding_tokens >= o.bs) {
    reject(ErrorCode::invalid_argument, "padding_tokens", text(o.padding_tokens),
           "must be -1 (BS / 4) or in [0, BS): every rank keeps at least one active token");
  }
  if (padding_tokens(o) > 0 && o.global_bs != 0 && o.global_bs != o.bs * o.ep_world_size) {
    reject(ErrorCode::invalid_argument, "global_bs", text(o.global_bs),
           "must be 0 or BS * W with padding tokens: V2 refuses x_active_mask on a rank with fewer than global_bs / W "
           "tokens (V2 §3.9)");
  }
}

}  // namespace

std::int64_t padding_tokens(const DemoOptions& o) noexcept {
  if (o.op != 2) return 0;
  return o.padding_tokens == -1 ? o.bs / 4 : o.padding_tokens;
}

void validate_options(const DemoOptions& o) {
  const auto text = [](auto v) { return std::to_string(v); };
  if (find_transport(o.transport) == nullptr) {
    reject(ErrorCode::unsupported, "transport", o.transport,
           "the demo runs on inproc (threads of one process), shm (processes over shared memory) or mpi (the "
           "processes of mpirun)");
  }
  if (o.ep_world_size < 1) reject(ErrorCode::invalid_argument, "ep_world_size", text(o.ep_world_size), "must be >= 1");
  if (o.tp_world_size < 0 || o.tp_world_size > 2) {
    reject(ErrorCode::invalid_argument, "tp_world_size", text(o.tp_world_size), "must be 0, 1 or 2");
  }
  if (static_cast<std::int64_t>(o.ep_world_size) * std::max(o.tp_world_size, 1) > kMaxWorldSize) {
    reject(ErrorCode::invalid_argument, "ep_world_size", text(o.ep_world_size),
           "ep_world_size * max(tp_world_size, 1) must be at most 1024 (the demo runs one thread or process per rank)");
  }
  if (o.bs < 1) reject(ErrorCode::invalid_argument, "bs", text(o.bs), "the demo needs at least one token per rank");
  if (o.hidden < 1) reject(ErrorCode::invalid_argument, "hidden", text(o.hidden), "must be >= 1");
  if (o.topk < 1) reject(ErrorCode::invalid_argument, "topk", text(o.topk), "must be >= 1");
  if (o.moe_expert_num < 1) reject(ErrorCode::invalid_argument, "moe_expert_num", text(o.moe_expert_num), "must be >= 1");
  if (o.op != 2 && o.topk > o.moe_expert_num) {
    reject(ErrorCode::invalid_argument, "topk", text(o.topk),
           "must be at most moe_expert_num (the router picks K distinct experts)");
  }
  if (o.intermediate < 1) reject(ErrorCode::invalid_argument, "intermediate", text(o.intermediate), "must be >= 1");
  if (o.tp_world_size == 2 && o.intermediate % 2 != 0) {
    reject(ErrorCode::invalid_argument, "intermediate", text(o.intermediate),
           "must be even with tp_world_size 2 (each TP rank computes half of the expert MLP)");
  }
  if (o.quant_mode != 0 && o.quant_mode != 2) {
    reject(ErrorCode::unsupported, "quant_mode", text(o.quant_mode), "the demo runs quant_mode 0 or 2");
  }
  if (o.dtype != DType::bf16 && o.dtype != DType::fp16) {
    reject(ErrorCode::invalid_dtype, "dtype", std::string(dtype_name(o.dtype)), "must be bfloat16 or float16");
  }
  if (!(o.tolerance >= 0) || !std::isfinite(o.tolerance)) {
    reject(ErrorCode::invalid_argument, "tolerance", format("%g", o.tolerance), "must be 0 (automatic) or a positive number");
  }
  if (o.fault == Fault::swap_weights && o.topk < 2) {
    reject(ErrorCode::invalid_argument, "topk", text(o.topk), "the swap-weights fault needs K >= 2 to swap anything");
  }
  if (o.timeout_ms < 1) reject(ErrorCode::invalid_argument, "timeout_ms", text(o.timeout_ms), "must be >= 1");
  if (o.op != 1 && o.op != 2) reject(ErrorCode::invalid_argument, "op", text(o.op), "must be 1 (v1) or 2 (v2)");
  if (o.op == 2) validate_v2_options(o);
  // The contract's rules (W, S, E, T, global_bs, the profile's limits), as the library states them.
  const GroupConfig config = config_for(o, 0, 0);
  validate_config(config);
  CapacityQuery query;
  query.bs = o.bs;
  query.k = o.topk;
  query.h = o.hidden;
  query.x_dtype = o.dtype;
  query.quant_mode = o.quant_mode;
  query.version = o.op;
  capacity(config, query);
}

int world_size(const DemoOptions& o) noexcept { return o.ep_world_size * std::max(o.tp_world_size, 1); }

std::vector<RankRecord> run_rank_threads(const DemoOptions& o, const JoinGroup& join) {
  const int world = world_size(o);
  std::vector<RankRecord> ranks(static_cast<std::size_t>(world));
  const SingleThreadedBlas blas;
  run_ranks(world, [&](int rank) { ranks[static_cast<std::size_t>(rank)] = run_rank(o, rank, join); });
  return ranks;
}

std::vector<RankRecord> run_inproc_ranks(const DemoOptions& o) {
  RuntimeOptions runtime;
  runtime.wait.timeout = std::chrono::milliseconds(o.timeout_ms);
  InProcessWorld world(world_size(o), runtime);
  return run_rank_threads(o, [&](const GroupConfig& config) { return world.join(config); });
}

RankRecord run_shm_rank(const DemoOptions& o) {
  const SingleThreadedBlas blas;
  ShmOptions shm;
  shm.wait.timeout = std::chrono::milliseconds(o.timeout_ms);
  return run_rank(o, launch_environment().rank,
                  [&](const GroupConfig& config) { return join_shm_from_env(config, shm); });
}

#ifdef MOEDIST_HAVE_MPI
RankRecord run_mpi_rank(const DemoOptions& o) {
  const SingleThreadedBlas blas;
  MpiOptions options;
  options.wait.timeout = std::chrono::milliseconds(o.timeout_ms);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return run_rank(o, rank, [&](const GroupConfig& config) { return join_mpi_world(config, MPI_COMM_WORLD, options); });
}
#endif

DemoReport run_demo(const DemoOptions& o, std::ostream& out, const RankRunner& runner) {
  validate_options(o);
  const Shape s(o);
  DemoReport report;
  report.world_size = s.world;
  report.tokens = s.world * s.BS;

  auto start = Clock::now();
  const std::vector<RankRecord> ranks = runner(o);
  report.ranks_wall_ms = ms_since(start);
  if (static_cast<int>(ranks.size()) != s.world) {
    throw Error(ErrorCode::internal, format("demo: the rank runner returned %zu records for %d ranks", ranks.size(),
                                            s.world));
  }

  report.setup = phase_time(ranks, &RankRecord::setup_ms);
  report.route = phase_time(ranks, &RankRecord::route_ms);
  report.dispatch = phase_time(ranks, &RankRecord::dispatch_ms);
  report.experts = phase_time(ranks, &RankRecord::experts_ms);
  report.combine = phase_time(ranks, &RankRecord::combine_ms);
  for (const RankRecord& r : ranks) {
    report.rows_dispatched += r.rows_sent;
    report.expert_rows += r.valid_rows;
  }

  start = Clock::now();
  const Comparison checked = compare(s, ranks, reference_layer(o, s, ranks, o.quant_mode == 2));
  if (o.quant_mode == 2) report.unquantized_rel_diff = compare(s, ranks, reference_layer(o, s, ranks, false)).rel();
  report.reference_ms = ms_since(start);

  report.max_abs_error = checked.max_abs_error;
  report.max_abs_reference = checked.max_abs_reference;
  report.max_rel_error = checked.rel();
  report.all_finite = checked.all_finite;
  report.tolerance = effective_tolerance(o);
  report.padding_tokens = s.world * (s.BS - s.active);
  report.padding_rows_zero = checked.padding_rows_zero;
  report.zero_expert_entries = entries_routed_to(s, ranks, s.E, s.Z);
  report.copy_expert_entries = entries_routed_to(s, ranks, s.E + s.Z, s.C);
  report.passed = checked.all_finite && checked.padding_rows_zero && report.max_rel_error <= report.tolerance;
  print_report(o, s, report, out);
  return report;
}

}  // namespace moedist::demo
