// The layer behind `moedist demo`: a whole MoE layer (router top-k, dispatch, a per-expert MLP, combine) over
// N ranks (threads of one process, or processes), checked against a dense single-process fp64 computation of the
// same layer. With op 2 the layer calls the V2 operators, with padding tokens, zero and copy experts and several
// shared experts.
#pragma once

#include <cstdint>
#include <functional>
#include <iosfwd>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "moedist/config.h"
#include "moedist/dtype.h"
#include "moedist/group.h"
#include "moedist/tensor.h"
#include "transport/registry.h"

namespace moedist::demo {

// A bug the demo can plant on purpose. It is a self-test of the checker: with any fault other than none, a
// run must end in MISMATCH.
enum class Fault : std::uint8_t {
  none,
  drop_expert,   // the first MoE rank (TP rank 0) returns zeros instead of its expert outputs: a missing expert
  swap_rows,     // the first MoE rank (TP rank 0) swaps its first and last valid expert-output rows: a row-order bug
                 // (both faults change nothing if that rank received no rows, or for swap_rows a single row)
  swap_weights,  // global rank 0 gives combine expert_scales with columns 0 and K-1 swapped: weights on the wrong experts
};

const char* fault_name(Fault fault) noexcept;  // "none", "drop-expert", "swap-rows", "swap-weights"
bool fault_from_name(std::string_view name, Fault* out) noexcept;

// Parameter names follow torch_npu.npu_moe_distribute_dispatch / _combine. The defaults are the operator page's
// example program: 16 ranks, 2 shared-expert ranks, 14 MoE experts, BS 8, H 7168, K 8, quant_mode 2 with smooth
// scales, bf16.
struct DemoOptions {
  int ep_world_size = 16;
  int tp_world_size = 0;  // 0 or 1: no TP domain; 2: TP pairs with replicated experts, each computing half the MLP
  int shared_expert_rank_num = 2;
  int moe_expert_num = 14;
  std::int64_t bs = 8;
  std::int64_t hidden = 7168;
  int topk = 8;
  int quant_mode = 2;          // 0 or 2
  bool smooth_scales = true;   // pass smooth scales to dispatch (used with quant_mode 2 only, as on the NPU)
  DType dtype = DType::bf16;   // bf16 or fp16
  std::int64_t intermediate = 64;  // expert MLP intermediate size
  std::int64_t global_bs = 0;
  int expert_token_nums_type = 1;
  int comm_quant_mode = 0;
  std::uint64_t seed = 0;
  std::int64_t timeout_ms = 30000;
  // A run passes when max|combine output - reference| <= tolerance * max|reference|. 0 picks it from the rounding
  // the layer does (effective_tolerance).
  double tolerance = 0;
  Profile profile = Profile::portable;
  // inproc: ranks are threads (run_inproc_ranks); shm: ranks are processes (the runner `moedist demo` passes to
  // run_demo). Named in the summary.
  std::string transport{transport_name(TransportId::inproc)};
  Fault fault = Fault::none;
  // The operators: 1 = npu_moe_distribute_dispatch / combine; 2 = their V2 pair (dispatch_v2 / combine_v2), with
  // what the fields below add. They apply to op 2 only.
  int op = 1;
  int shared_expert_num = 2;  // Sn shared experts, each on S / Sn of the shared-expert ranks (S a multiple of Sn)
  // The router picks its top K among E MoE experts, Z zero experts (ids [E, E+Z): they add nothing) and C copy
  // experts (ids [E+Z, E+Z+C): they return ori_x, the layer input, LongCat style), never sent by dispatch.
  int zero_expert_num = 1;
  int copy_expert_num = 1;
  // The last P tokens of every rank are padding, masked off with a (BS,) x_active_mask; -1 = BS / 4.
  std::int64_t padding_tokens = -1;
};

// W * max(T, 1): the number of ranks.
int world_size(const DemoOptions& options) noexcept;

// The padding tokens per rank: options.padding_tokens, BS / 4 when it is -1; 0 with op 1.
std::int64_t padding_tokens(const DemoOptions& options) noexcept;

struct PhaseTime {
  double median_ms = 0;  // over ranks
  double max_ms = 0;
};

struct DemoReport {
  bool passed = false;
  int world_size = 0;                // W * max(T, 1) ranks
  std::int64_t tokens = 0;           // tokens over all ranks
  std::int64_t rows_dispatched = 0;  // rows all ranks wrote into receive windows (each rank's own included)
  std::int64_t expert_rows = 0;      // rows all experts processed (with T = 2, each row on both TP ranks)
  PhaseTime setup, route, dispatch, experts, combine;
  double ranks_wall_ms = 0;  // the whole multi-rank run, setup (and starting rank processes) included
  double reference_ms = 0;   // the dense reference (both variants)
  double max_abs_error = 0;  // max |combine output - reference|
  double max_abs_reference = 0;
  double max_rel_error = 0;  // max_abs_error / max_abs_reference: what the tolerance applies to
  double tolerance = 0;      // the tolerance applied (effective_tolerance)
  bool all_finite = true;    // every combine output element is finite
  // Informational (quant_mode 2 only, else negative): max |combine output - unquantized layer| / max |that layer|,
  // i.e. what int8 dispatch quantization costs end to end.
  double unquantized_rel_diff = -1;
  // op 2: the padding tokens (over all ranks), whether every row combine wrote for them is zero (a run passes only
  // then; the reference's rows for them are zero too), and the routing entries of active tokens that chose a zero or
  // a copy expert.
  std::int64_t padding_tokens = 0;
  bool padding_rows_zero = true;
  std::int64_t zero_expert_entries = 0;
  std::int64_t copy_expert_entries = 0;
};

// The tolerance a run applies: options.tolerance when it is set, else 4 unit roundoffs of the dtype (2^-8 for bf16,
// 2^-11 for fp16; the expert outputs, the combine output and, with TP, the partial sums are each rounded to it) plus
// 1/127 with comm_quant_mode 2 (int8 expert outputs, one scale per 8 elements). Measured errors stay below half of
// it; a missing expert, a misplaced row or a misapplied weight exceeds it many times over.
double effective_tolerance(const DemoOptions& options) noexcept;

// Throws ValidationError when the options break a rule of the demo or of the contract (checked with the library's
// own validate_config and capacity).
void validate_options(const DemoOptions& options);

// What one rank leaves for the check and the summary: the inputs it used, its combine output, its timings.
struct RankRecord {
  Tensor x;              // (BS, H) its tokens
  Tensor expert_ids;     // (BS, K) int32: the router's top-K experts
  Tensor expert_scales;  // (BS, K) fp32: their renormalized weights
  Tensor out;            // (BS, H) combine output
  double setup_ms = 0, route_ms = 0, dispatch_ms = 0, experts_ms = 0, combine_ms = 0;
  std::int64_t valid_rows = 0;  // rows its experts processed
  std::int64_t rows_sent = 0;   // rows its dispatch wrote into receive windows (its own included)
};

// Joins the group of a transport with one rank's configuration.
using JoinGroup = std::function<std::unique_ptr<Group>(const GroupConfig& config)>;

// Runs every rank (global ranks 0 .. world_size - 1) and returns their records in rank order.
using RankRunner = std::function<std::vector<RankRecord>(const DemoOptions& options)>;

// One rank's part of the layer: builds its tokens, the router and its experts' weights from the seed, joins
// through `join` (all of that timed as setup), routes, dispatches, runs its experts, combines. Plants
// options.fault where it belongs. Its BLAS calls run on the calling thread's BLAS settings.
RankRecord run_rank(const DemoOptions& options, int global_rank, const JoinGroup& join);

// Every rank on a thread of its own, joining through `join`, with BLAS on one thread per rank (W * T ranks share
// a few cores). Rethrows the lowest failing rank's error.
std::vector<RankRecord> run_rank_threads(const DemoOptions& options, const JoinGroup& join);

// The inproc runner: run_rank_threads on one InProcessWorld (RuntimeOptions.wait.timeout from options.timeout_ms).
std::vector<RankRecord> run_inproc_ranks(const DemoOptions& options);

// One rank of `moedist demo --transport shm`, in a process of its own started by moedist::launch: the global rank
// is MOEDIST_RANK, the group comes from join_shm_from_env (ShmOptions.wait.timeout from options.timeout_ms), and BLAS
// runs on one thread, since the job's processes share the cores.
RankRecord run_shm_rank(const DemoOptions& options);

#ifdef MOEDIST_HAVE_MPI
// One rank of `mpirun -np N moedist demo --transport mpi`: the global rank is the MPI_COMM_WORLD rank, the
// group comes from join_mpi_world (MpiOptions.wait.timeout from options.timeout_ms; MOEDIST_RANKS_PER_NODE makes
// virtual hosts), and BLAS runs on one thread.
RankRecord run_mpi_rank(const DemoOptions& options);
#endif

// Validates, runs the ranks with `runner` (its wall time is the report's ranks_wall_ms), computes the reference,
// prints the summary table to `out` and returns the numbers. The runner decides where ranks run; `moedist demo
// --transport shm` passes one that starts a process per rank. Library errors (a peer timeout, a rejected call)
// propagate as moedist::Error.
DemoReport run_demo(const DemoOptions& options, std::ostream& out, const RankRunner& runner = run_inproc_ranks);

}  // namespace moedist::demo
