// The body of one moedist rank in `moedist bench`: its inputs, dispatch and combine on a group with identity
// experts, and the check that the bytes the group reports moving are the bytes the bench counts. Shared by the
// transports that time moedist (inproc and shm in runners.cpp, moedist-mpi in mpi_baseline_main.cpp), so that
// every one of them runs the same calls on the same tokens.
#pragma once

#include "moedist/group.h"
#include "moedist/tensor.h"
#include "workload.h"

namespace moedist::bench {

// The group configuration of global rank `rank` (ep_rank * max(T, 1) + tp_rank) at a point: W EP ranks, E experts,
// S shared-expert ranks, T.
GroupConfig group_config(const Point& p, int rank);

// One rank's dispatch and combine on a group, with identity experts.
class MoedistRank {
 public:
  MoedistRank(const Point& p, int rank, Group& group);

  // The untimed first round trip: sizes the group's buffers, makes the identity experts' rows for quant_mode 2
  // (dispatch gives the same rows every iteration, since the inputs are the same), and checks that the bytes the
  // group reports moving are the bytes the bench counts. Throws std::runtime_error when they differ.
  void prime(const PointBytes& bytes);

  // Dispatch and combine, for run_rank_loop.
  RankOps ops();

 private:
  void dispatch();
  void combine();

  Point p_;
  int rank_;
  Group& group_;
  RankInputs in_;
  Tensor smooth_, identity_;
  DispatchOptions options_;
  DispatchResult result_;
  TensorView expert_out_;  // the identity experts' rows: dispatch's expand_x (quant 0) or dequantized (quant 2)
};

}  // namespace moedist::bench
