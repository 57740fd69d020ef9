// The steps V1's and V2's combine share (src/ops/combine.cpp, src/ops/combine_v2.cpp): the call's
// arguments, staging this rank's expert-output rows in its window, the output, where the other ranks
// published their rows, and serving the rows other hosts ask for.
#pragma once

#include <cstddef>
#include <exception>
#include <vector>

#include "contract/checks.h"
#include "numeric/convert.h"
#include "ops/group_state.h"

namespace moedist::combine_steps {

using numeric::Half;

// One combine call as the phases after the record exchange share it: the caller's arguments, the
// shape they were checked to, and what follows from them.
struct CombineCall {
  CombineCall(Group::State& state, const TensorView& expand_x_, const TensorView& expert_ids_,
              const TensorView& expert_scales_, const MutableTensorView& out_, int comm_quant_mode,
              const contract::CallShape& shape_, const contract::CombineCounts& rows_)
      : s(state),
        topo(state.topo),
        expand_x(expand_x_),
        expert_ids(expert_ids_),
        expert_scales(expert_scales_),
        out(out_),
        shape(shape_),
        rows(rows_),
        h(shape_.h),
        k(shape_.k),
        bs(shape_.bs),
        active(shape_.active),
        type(expand_x_.dtype == DType::bf16 ? Half::bf16 : Half::fp16),
        quantized(comm_quant_mode == 2),
        v2(shape_.version == 2),
        my_layout(topo, shape_, topo.ep_rank),
        min_row_bytes(quantized ? my_layout.comm_quant_groups * 2 + static_cast<std::size_t>(h)
                                : static_cast<std::size_t>(h) * 2),
        answer_stride(contract::align_up(min_row_bytes, 4)),
        my_host(state.my_host()) {}

  Group::State& s;
  const contract::Topology& topo;
  const TensorView& expand_x;
  const TensorView& expert_ids;
  const TensorView& expert_scales;  // V2: may be absent (weights 1)
  const MutableTensorView out;      // the caller's output buffer, or absent
  const contract::CallShape shape;
  const contract::CombineCounts rows;
  const std::int64_t h, k, bs;
  const std::int64_t active;  // V1: tokens produced, [0, active) (x_active_mask); V2: the active tokens' number
  const Half type;
  const bool quantized;                    // comm_quant_mode 2: rows travel as int8 groups
  const bool v2;                           // the V2 operators (the TP add rounds half to even, V1 §4.4)
  const contract::WindowLayout my_layout;  // this rank's window for this call
  const std::size_t min_row_bytes;         // bytes of one expert-output row as a source reads it
  const std::size_t answer_stride;         // bytes of one row in a proxy's answer
  const int my_host;
  std::int64_t rows_from_other_hosts = 0;

  int host_of_ep(int d) const { return s.routes.host_of(topo.global_rank(d, topo.tp_rank)); }
};

// Where this rank's expert-output rows are for the source ranks to read: offset in its window, row stride.
struct PublishedRows {
  std::size_t offset;
  std::size_t row_bytes;
};

// Rows in this rank's window passed back to a second combine after one: refused (combine_steps.cpp).
void check_window_rows_unused(const Group::State& s, const TensorView& expand_x);

// Makes this rank's rows readable by the source ranks: TP reduce first (§4.4), else optional int8
// quantization (§4.5). Returns where they are. With `route_error` nothing is staged.
PublishedRows stage_rows(const CombineCall& c, const std::exception_ptr& route_error);

// The output: the caller's buffer, else the group's, reallocated only when its shape changes.
MutableTensorView combine_output(const CombineCall& c);

// Where every expert rank of this rank's TP lane published its rows (s.rows_of, s.row_bytes_of);
// checked against its window before any address is formed.
void locate_published_rows(const CombineCall& c);

// Appends to `answer` the rows carried-for rank r asked this host for (a RowRequest each).
using AnswerRequests = void (*)(const CombineCall& c, int r, const std::vector<std::byte>& requests,
                                std::vector<std::byte>& answer);

// Answers the ranks this rank carries for from its host's windows (s.carried_out): a status of 0 and
// the rows, or the failure's code and message. Returns the first failure, to raise once all are answered.
std::exception_ptr serve_carried_requests(const CombineCall& c, AnswerRequests answer_requests);

// Each proxy's answer must carry status 0 and exactly the rows asked for; a proxy's failure is raised here.
void check_answers(const CombineCall& c);

// Adds elements [h0, h0 + len) of one row to acc, times `weight` when weighted: a row as published with
// comm quant (int8_groups: the group scales, then the int8 values), else a 16-bit row.
void accumulate_row(const CombineCall& c, float* acc, const std::byte* row, bool int8_groups, bool weighted,
                    float weight, std::int64_t h0, std::int64_t len);

}  // namespace moedist::combine_steps
