// Case files: a recorded dispatch/combine run of every rank, in safetensors format (docs/case-files.md).
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "moedist/dtype.h"
#include "moedist/group.h"
#include "moedist/inproc.h"
#include "moedist/shm.h"
#include "moedist/tensor.h"

namespace moedist::casefile {

// Inputs of one rank (global rank g = ep_rank * max(tp_world_size, 1) + tp_rank).
struct RankInputs {
  Tensor x;              // (BS, H) bf16/fp16
  Tensor expert_ids;     // (BS, K) int32
  Tensor scales;         // optional (E[+1], H) fp32 smooth scales
  Tensor expert_scales;  // optional (BS, K) fp32 combine weights; absent = 1.0
  Tensor x_active_mask;  // optional (BS,) bool: tokens [0, n) active, n = its trues (trues first); V2 also (BS, K)
  Tensor combine_x;      // optional (valid rows, H) expert outputs in x's dtype; absent = identity experts
  // V2 combine inputs (op 2), all optional as in the operator, in x's dtype.
  Tensor ori_x;                 // (BS, H): the copy and const experts' input
  Tensor shared_expert_x;       // (BS, H): added with weight 1
  Tensor const_expert_alpha_1;  // (Q, H)
  Tensor const_expert_alpha_2;  // (Q, H)
  Tensor const_expert_v;        // (Q, H)
};

struct Case {
  int ep_world_size = 0;
  int tp_world_size = 0;
  int moe_expert_num = 0;
  int shared_expert_rank_num = 0;
  int shared_expert_num = 1;
  std::int64_t global_bs = 0;
  int quant_mode = 0;
  int expert_token_nums_type = 1;
  int comm_quant_mode = 0;
  DType dtype = DType::bf16;
  // The operators: 1 = npu_moe_distribute_dispatch / combine, 2 = their V2 pair (then the special experts
  // and comm_alg apply, and shared_expert_num may be 0 to 4).
  int op = 1;
  int zero_expert_num = 0, copy_expert_num = 0, const_expert_num = 0;
  std::string comm_alg;
  std::vector<RankInputs> ranks;  // W * max(T, 1) entries
};

// Outputs of one rank, as `moedist replay` writes them. Dispatch outputs are cut to the valid rows.
struct RankOutputs {
  Tensor expand_x;           // (valid, H) int8 or x's dtype
  Tensor dynamic_scales;     // (valid,) fp32, quant_mode 2 only
  Tensor expand_scales;      // (valid,) fp32, only when expert_scales were given
  Tensor expand_idx;         // (BS*K,) int32 (0 for inactive tokens' entries); V1 only
  Tensor assist_info_for_combine;  // (3 * own EP rows,) int32: the written triples; V2 only
  Tensor expert_token_nums;  // (L,) int64
  Tensor ep_recv_counts;     // int32
  Tensor tp_recv_counts;     // (2,) int32, TP only
  Tensor combine_out;        // (BS, H) x's dtype (zero rows for inactive tokens)
};

// Read / write a case file. Malformed files raise moedist::Error with ErrorCode::case_file.
Case read_case(const std::string& path);
void write_case(const std::string& path, const Case& c);

// The configuration global rank g of the case joins its group with (profile portable).
GroupConfig group_config(const Case& c, int g);

// One rank's dispatch then combine (dispatch_v2 then combine_v2 for an op 2 case, without performance_info),
// on a group of any transport joined with group_config(c, g). A
// combine_x whose row count differs from the rank's valid rows is a case_file error, raised before
// combine. Errors carry no rank prefix; the runners below add it.
RankOutputs run_case_rank(Group& group, const Case& c, int g);

// Run dispatch then combine for every rank on the in-process runtime. A failure raises the first
// rank's own error (not the peer_failed / timeout errors it causes elsewhere) as a moedist::Error with
// its code and a "rank g (ep_rank e, tp_rank t): " prefix; a combine_x whose row count differs from
// the rank's valid rows is a case_file error.
std::vector<RankOutputs> run_case(const Case& c, const RuntimeOptions& options = {});

// Write / read replay outputs (tensors named rank{g}.expand_x, ...; see docs/case-files.md).
void write_outputs(const std::string& path, const std::vector<RankOutputs>& outputs);
std::vector<RankOutputs> read_outputs(const std::string& path, int world_size);

// One rank's outputs alone: a replay output file (same format and version) that holds only rank g's
// tensors, still named rank{g}.*. A worker process writes one; the parent merges them with write_outputs.
void write_rank_outputs(const std::string& path, int g, const RankOutputs& outputs);
RankOutputs read_rank_outputs(const std::string& path, int g);

// ---- ranks as processes ----------------------------------------------------------------------------
// `moedist replay --transport shm` and `moedist demo --transport shm` run every rank as a worker process
// of their own binary. The parent hands the workers a private directory; worker g writes its result
// there, or its error if it fails, and the parent reads them back once every worker has exited.

// Given the private directory, the worker program and its arguments.
using WorkerCommand = std::function<std::vector<std::string>(const std::string& dir)>;

// This process's own command line (/proc/self/exe, then the arguments from /proc/self/cmdline) with
// `extra` appended (before a "--" separator, if any): how a command starts copies of itself as its
// workers, with the same flags.
std::vector<std::string> own_command_line(const std::vector<std::string>& extra);

// Parent side. Creates a private directory (mkdtemp, mode 0700), starts `ranks` processes of
// worker_command(dir) with moedist::launch (tp_world_size is exported when > 0), waits for all, then
// calls read_result(g, path of rank g's result) for g = 0..ranks-1, and removes the directory, also when
// something throws. Failures are raised as a moedist::Error that names the rank: first every rank that
// died without reporting ("rank 3 (pid 1234) was killed by signal 9 (Killed) ..."), since the others'
// peer_lost errors follow from it; else the first rank's own error rather than the peer_failed /
// peer_lost / timeout errors it caused elsewhere, prefixed "rank g (ep_rank e, tp_rank t): ".
void run_rank_processes(int ranks, int tp_world_size, const WorkerCommand& worker_command,
                        const std::function<void(int g, const std::string& path)>& read_result);

// Worker side, in a process run_rank_processes started: calls produce(g, path) for the rank the
// launcher's environment names (MOEDIST_RANK) to write its result to `path`. An exception from produce
// is written where the parent looks for it. Returns the exit status for the process: 0, or 2 on error.
int run_rank_worker(const std::string& dir, const std::function<void(int g, const std::string& path)>& produce);

// Replay with every rank a process (run_rank_processes) over the shared-memory transport:
// worker_command(dir) must start a program that calls run_case_worker with `dir` on the file `c` was
// read from. Returns what run_case returns for the same case, byte for byte, and reports failures alike.
std::vector<RankOutputs> run_case_processes(const Case& c, const WorkerCommand& worker_command);

// One worker of run_case_processes: reads the case, joins its group with join_shm_from_env, runs its
// rank (run_case_rank) and writes its outputs with write_rank_outputs. Returns the exit status.
int run_case_worker(const std::string& case_path, const std::string& dir, const ShmOptions& options);

}  // namespace moedist::casefile
