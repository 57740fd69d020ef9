// Case files: a recorded dispatch/combine run of every rank, in safetensors format (docs/case-files.md).
#pragma once

#include <string>
#include <vector>

#include "moedist/dtype.h"
#include "moedist/inproc.h"
#include "moedist/tensor.h"

namespace moedist::casefile {

// Inputs of one rank (global rank g = ep_rank * max(tp_world_size, 1) + tp_rank).
struct RankInputs {
  Tensor x;              // (BS, H) bf16/fp16
  Tensor expert_ids;     // (BS, K) int32
  Tensor scales;         // optional (E[+1], H) fp32 smooth scales
  Tensor expert_scales;  // optional (BS, K) fp32 combine weights; absent = 1.0
  Tensor combine_x;      // optional (valid rows, H) expert outputs in x's dtype; absent = identity experts
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
  std::vector<RankInputs> ranks;  // W * max(T, 1) entries
};

// Outputs of one rank, as `moedist replay` writes them. Dispatch outputs are cut to the valid rows.
struct RankOutputs {
  Tensor expand_x;           // (valid, H) int8 or x's dtype
  Tensor dynamic_scales;     // (valid,) fp32, quant_mode 2 only
  Tensor expand_scales;      // (valid,) fp32, only when expert_scales were given
  Tensor expand_idx;         // (BS*K,) int32
  Tensor expert_token_nums;  // (L,) int64
  Tensor ep_recv_counts;     // int32
  Tensor tp_recv_counts;     // (2,) int32, TP only
  Tensor combine_out;        // (BS, H) x's dtype
};

// Read / write a case file. Malformed files raise moedist::Error with ErrorCode::case_file.
Case read_case(const std::string& path);
void write_case(const std::string& path, const Case& c);

// Run dispatch then combine for every rank on the in-process runtime. A failure raises the first
// rank's own error (not the peer_failed / timeout errors it causes elsewhere) as a moedist::Error with
// its code and a "rank g (ep_rank e, tp_rank t): " prefix; a combine_x whose row count differs from
// the rank's valid rows is a case_file error.
std::vector<RankOutputs> run_case(const Case& c, const RuntimeOptions& options = {});

// Write / read replay outputs (tensors named rank{g}.expand_x, ...; see docs/case-files.md).
void write_outputs(const std::string& path, const std::vector<RankOutputs>& outputs);
std::vector<RankOutputs> read_outputs(const std::string& path, int world_size);

}  // namespace moedist::casefile
