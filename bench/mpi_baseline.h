// Baseline (a) of `moedist bench`: dispatch and combine as a user would write them with MPI, the way
// collective-based MoE layers do (Megatron's alltoall dispatcher, FastMoE):
//
//   dispatch: count the rows for every (destination rank, local expert) from expert_ids; MPI_Alltoall the
//             counts; pack the rows (quant_mode 2: quantized per (token, expert) with moedist's quantize_row and
//             the expert's smooth scales, or once per token and copied when there are no smooth scales)
//             destination-major, local-expert minor, token order; MPI_Alltoallv the rows (and the fp32 scales);
//             then a local stable sort of the received (source rank, local expert) chunks into (local expert,
//             source rank, token) order: dispatch's expand_x order.
//   combine:  the reverse: put the expert outputs back in received order, MPI_Alltoallv them home, and add each
//             token's K rows in increasing k with fp32 accumulation, rounded half to even (moedist's
//             accumulate_scaled / store_row, so the result is the contract's bit for bit).
//
// It supports what the bench measures: no shared-expert ranks (S = 0) and no TP domain (T <= 1). The results
// match moedist's dispatch / combine bit for bit (checked against the oracle by `moedist_mpi_baseline --check`).
#pragma once

#include <mpi.h>

#include <cstdint>
#include <vector>

#include "moedist/dtype.h"

namespace moedist::bench {

struct MpiMoeShape {
  int E = 0;  // experts, a multiple of the communicator's size; expert e lives on rank e / (E / W)
  std::int64_t h = 0;
  int k = 0;
  int quant_mode = 0;  // 0 or 2
  DType dtype = DType::bf16;
};

class MpiAlltoallvMoe {
 public:
  MpiAlltoallvMoe(MPI_Comm comm, const MpiMoeShape& shape);
  ~MpiAlltoallvMoe();
  MpiAlltoallvMoe(const MpiAlltoallvMoe&) = delete;
  MpiAlltoallvMoe& operator=(const MpiAlltoallvMoe&) = delete;

  // Collective. x: (bs, h) packed 16-bit rows; expert_ids: (bs, k), K distinct experts per token;
  // smooth: (E, h) fp32 smooth scales for quant_mode 2 (row e for expert e), or nullptr.
  void dispatch(const std::uint16_t* x, std::int64_t bs, const std::int32_t* expert_ids, const float* smooth);

  // Dispatch's results, in moedist's layout.
  std::int64_t rows() const noexcept { return received_rows_; }
  const void* expand_x() const noexcept;          // rows() rows: int8 (quant_mode 2) or 16-bit
  const float* dynamic_scales() const noexcept;   // rows() scales (quant_mode 2)
  const std::vector<std::int32_t>& expand_idx() const noexcept { return expand_idx_; }  // (bs * k)
  std::vector<std::int32_t> ep_recv_counts() const;      // (L * W): inclusive prefix sums, index l * W + r
  std::vector<std::int64_t> expert_token_nums() const;   // (L): rows per local expert

  // Collective. expert_out: rows() 16-bit rows in expand_x order; weights: (bs, k) fp32 of the last dispatch's
  // tokens; out: (bs, h).
  void combine(const std::uint16_t* expert_out, const float* weights, std::uint16_t* out);

 private:
  void sort_received();

  MPI_Comm comm_;
  MpiMoeShape shape_;
  int world_ = 0, rank_ = 0, local_ = 0;  // local_: experts per rank (L)
  std::int64_t row_bytes_ = 0;            // bytes of one dispatched row
  MPI_Datatype dispatch_row_ = MPI_DATATYPE_NULL, combine_row_ = MPI_DATATYPE_NULL;

  std::int64_t bs_ = 0, received_rows_ = 0;
  std::vector<int> send_counts_;    // (E): rows to expert e = (destination e / L, local expert e % L)
  std::vector<int> recv_counts_;    // (W * L): rows from (source rank r, local expert l), index r * L + l
  std::vector<int> send_rows_, send_displs_, recv_rows_, recv_displs_;  // per rank, in rows
  std::vector<std::int64_t> sorted_offset_;  // (L * W): first expand_x row of block (l, r), index l * W + r
  std::vector<std::int64_t> slot_;           // (bs * k): the send-buffer row of each (token, k) entry
  std::vector<std::int32_t> expand_idx_;

  std::vector<std::uint8_t> send_, recv_, sorted_;
  std::vector<float> send_scales_, recv_scales_, sorted_scales_;
  std::vector<float> scratch_;
  std::vector<std::uint16_t> back_send_, back_recv_;
  std::vector<float> acc_;
};

}  // namespace moedist::bench
