// Shared helpers of the test programs: random valid cases, a runner that drives the in-process runtime
// with strided inputs and caller or group-owned outputs, and the bit-exact comparison with the oracle.
#pragma once

#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "casefile/case_file.h"
#include "moedist/group.h"
#include "moedist/shm.h"
#include "oracle/oracle.h"
#include "oracle/oracle_v2.h"

namespace moedist::testing {

struct CaseLimits {
  int max_ep_world_size = 16;
  int max_k = 16;
  std::int64_t max_h = 80;
  std::int64_t max_bs = 6;
  bool allow_tp = true;
  int world_size = 0;  // > 0: exactly this many ranks (ep_world_size * max(tp_world_size, 1)); else random
  // Give some cases an x_active_mask (a random prefix of active tokens per rank, garbage expert ids in
  // the inactive rows), where the rules allow one. Off by default: the CUDA backend refuses masks.
  bool token_masks = false;
  // The share of cases that call the V2 operators (op 2): shared_expert_num 0-4, (BS,) and (BS, K)
  // masks, zero / copy / const experts, ori_x, shared_expert_x, comm_alg.
  double v2 = 0.0;
};

// Whether the V1 operators accept the configuration of `c` too (shared_expert_num 1, W a multiple of S):
// then a group can take V1 and V2 calls in turn.
bool v1_compatible(const casefile::Case& c);

// A random configuration that satisfies every semantic rule, with random inputs for every rank.
casefile::Case random_case(std::mt19937_64& rng, const CaseLimits& limits = {});

// New random inputs (dtype, modes, K, H, BS, tensors) for the configuration already in `c`; BS is
// random per rank when global_bs != 0, else `bs_for_global_bs_zero` on every rank.
void random_inputs(casefile::Case& c, std::mt19937_64& rng, const CaseLimits& limits, std::int64_t bs_for_global_bs_zero);

// A random configuration without a TP domain, `world_size` ranks, every rank with `bs` tokens
// (global_bs = 0) of rows up to `max_h` wide: for the error tests, which want a plain group.
casefile::Case uniform_case(std::mt19937_64& rng, int world_size, std::int64_t max_h, std::int64_t bs);

// The next call on the same group: the configuration and shapes of `c` with new random x, expert ids
// and router weights (smooth scales kept), and identity experts (no combine_x). The ids are distinct per
// token, drawn from [0, id_count) (default: moe_expert_num).
casefile::Case next_call(const casefile::Case& c, std::mt19937_64& rng, int id_count = 0);

// One-line description for failure messages.
std::string describe(const casefile::Case& c);

// The same case in the oracle's plain representation (V1 cases; V2 ones for the V2 oracle).
oracle::Case to_oracle_case(const casefile::Case& c);
oracle::v2::Case to_oracle_v2_case(const casefile::Case& c);

// The oracle's outputs of a case of either operator pair, and one rank's comparison with them
// ("" when equal bit for bit, else the first difference).
struct Expected {
  int op = 1;
  std::vector<oracle::RankOutput> v1;
  std::vector<oracle::v2::RankOutput> v2;
};
Expected expected_outputs(const casefile::Case& c);
std::string compare_rank(const casefile::Case& c, int g, const casefile::RankOutputs& got, const Expected& want);
// Every rank of a case, with either oracle.
std::string oracle_diff(const casefile::Case& c, const std::vector<casefile::RankOutputs>& got);

struct RunOptions {
  // Pass x, expert_ids, expert_scales, x_active_mask and combine inputs as non-contiguous views, and
  // expand_idx to combine as (BS, K).
  bool strided_inputs = false;
  bool caller_outputs = false;  // give dispatch and combine caller-provided output buffers
  bool outputs_in_window = false;  // write the expert outputs into Group::combine_buffer() (T <= 1)
  int ranks_per_host = 0;          // run_runtime: virtual hosts of this many ranks (0: one host)
  // run_runtime: each rank's GroupOptions (its worker threads), by global rank; empty: the defaults.
  std::function<GroupOptions(int g)> group_options = {};
};

// Copies the first `rows` rows (or entries) of a view into a new contiguous tensor.
Tensor copy_rows(const TensorView& v, std::int64_t rows);

// The GroupConfig of global rank g of a case.
GroupConfig rank_config(const casefile::Case& c, int g);

// The group's traffic counters right after dispatch and right after combine.
struct RankTraffic {
  TrafficCounters after_dispatch, after_combine;
};

// Runs one rank's dispatch then combine on an existing group (any transport), with the oracle's
// identity experts unless the case gives combine_x; `traffic`, when given, receives the counters.
casefile::RankOutputs run_rank(Group& group, const casefile::Case& c, int g, const RunOptions& options,
                               RankTraffic* traffic = nullptr);

// Runs dispatch then combine for every rank on the in-process runtime (independently of
// casefile::run_case, so that the two runners check each other).
std::vector<casefile::RankOutputs> run_runtime(const casefile::Case& c, const RunOptions& options);

// Compares one rank's outputs with the oracle's bit for bit; returns "" when equal, else the first difference.
std::string compare_rank_with_oracle(const casefile::Case& c, int g, const casefile::RankOutputs& got, const oracle::RankOutput& want);

// Compares runtime outputs with the oracle's bit for bit; returns "" when equal, else the first difference.
std::string compare_with_oracle(const casefile::Case& c, const std::vector<casefile::RankOutputs>& got,
                                const std::vector<oracle::RankOutput>& want);

// (bs, k) int32 expert ids: k distinct experts in [0, experts) per row, uniformly at random.
Tensor random_ids(std::mt19937_64& rng, std::int64_t bs, std::int64_t k, int experts);  // k <= experts, or throws
// int32 tensors holding the given values, row-major.
Tensor int32_tensor(std::int64_t rows, std::int64_t cols, const std::vector<std::int32_t>& values);
Tensor int32_vector(const std::vector<std::int32_t>& values);

// 16-bit float helpers for building inputs.
std::uint16_t to_half_bits(DType dtype, float value);

}  // namespace moedist::testing

namespace moedist::testing {

struct ProcessRun {
  std::vector<casefile::RankOutputs> outputs;  // per global rank (empty tensors where the rank failed)
  std::vector<std::string> errors;             // per global rank: "" or the error the rank raised
  std::vector<int> wait_status;                // per global rank: waitpid status
  std::vector<double> seconds;                 // per global rank: time from start to the rank's return
};

// Runs every rank of the case as its own process (fork) over the shared-memory transport, on a fresh
// job. `customize(g, options)` may change one rank's ShmOptions (fault-injection tests set on_phase).
ProcessRun run_processes(const casefile::Case& c, const RunOptions& options, const ShmOptions& shm,
                         const std::function<void(int, ShmOptions&)>& customize = {});

// Entries of /dev/shm whose name mentions moedist (there should never be any).
std::vector<std::string> moedist_shm_entries();

// Entries of a /proc directory (/proc/self/fd, /proc/self/task), -1 if it cannot be read: the leak
// checks of the fault tests count descriptors and threads with it.
int proc_entries(const char* dir);

}  // namespace moedist::testing
