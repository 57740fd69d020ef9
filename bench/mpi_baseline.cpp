#include "mpi_baseline.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

#include "kernels/row_kernels.h"

namespace moedist::bench {

namespace {

void check(int rc, const char* what) {
  if (rc != MPI_SUCCESS) throw std::runtime_error(std::string(what) + " failed (MPI error " + std::to_string(rc) + ")");
}

MPI_Datatype contiguous_bytes(std::int64_t bytes) {
  MPI_Datatype t = MPI_DATATYPE_NULL;
  check(MPI_Type_contiguous(static_cast<int>(bytes), MPI_BYTE, &t), "MPI_Type_contiguous");
  check(MPI_Type_commit(&t), "MPI_Type_commit");
  return t;
}

// Exclusive prefix sums of counts into displs; returns the total.
std::int64_t prefix(const std::vector<int>& counts, std::vector<int>& displs) {
  std::int64_t total = 0;
  displs.resize(counts.size());
  for (std::size_t i = 0; i < counts.size(); ++i) {
    displs[i] = static_cast<int>(total);
    total += counts[i];
  }
  return total;
}

template <class T>
T* data_or_null(std::vector<T>& v) { return v.empty() ? nullptr : v.data(); }

}  // namespace

MpiAlltoallvMoe::MpiAlltoallvMoe(MPI_Comm comm, const MpiMoeShape& shape) : comm_(comm), shape_(shape) {
  check(MPI_Comm_size(comm, &world_), "MPI_Comm_size");
  check(MPI_Comm_rank(comm, &rank_), "MPI_Comm_rank");
  if (shape.E < 1 || shape.E % world_ != 0) throw std::invalid_argument("E must be a positive multiple of the ranks");
  if (shape.quant_mode != 0 && shape.quant_mode != 2) throw std::invalid_argument("quant_mode must be 0 or 2");
  local_ = shape.E / world_;
  row_bytes_ = shape.quant_mode == 2 ? shape.h : 2 * shape.h;
  dispatch_row_ = contiguous_bytes(row_bytes_);
  combine_row_ = contiguous_bytes(2 * shape.h);
  send_counts_.resize(static_cast<std::size_t>(shape.E));
  recv_counts_.resize(static_cast<std::size_t>(shape.E));
  send_rows_.resize(static_cast<std::size_t>(world_));
  recv_rows_.resize(static_cast<std::size_t>(world_));
  scratch_.resize(static_cast<std::size_t>(shape.h));
  acc_.resize(static_cast<std::size_t>(shape.h));
}

MpiAlltoallvMoe::~MpiAlltoallvMoe() {
  MPI_Type_free(&dispatch_row_);
  MPI_Type_free(&combine_row_);
}

void MpiAlltoallvMoe::dispatch(const std::uint16_t* x, std::int64_t bs, const std::int32_t* expert_ids,
                               const float* smooth) {
  const std::int64_t h = shape_.h;
  const int k = shape_.k;
  bs_ = bs;

  // Counts per (destination, local expert). With S = 0 that index, d * L + l, is the expert id itself.
  std::fill(send_counts_.begin(), send_counts_.end(), 0);
  for (std::int64_t i = 0; i < bs * k; ++i) ++send_counts_[static_cast<std::size_t>(expert_ids[i])];
  check(MPI_Alltoall(send_counts_.data(), local_, MPI_INT, recv_counts_.data(), local_, MPI_INT, comm_), "MPI_Alltoall");

  // Send layout: destination-major, local-expert minor (expert order), tokens in order within a chunk.
  std::vector<std::int64_t> cursor(send_counts_.size());
  std::int64_t sent = 0;
  for (std::size_t e = 0; e < send_counts_.size(); ++e) {
    cursor[e] = sent;
    sent += send_counts_[e];
  }
  for (int d = 0; d < world_; ++d) {
    int rows = 0;
    for (int l = 0; l < local_; ++l) rows += send_counts_[static_cast<std::size_t>(d * local_ + l)];
    send_rows_[static_cast<std::size_t>(d)] = rows;
  }
  prefix(send_rows_, send_displs_);
  send_.resize(static_cast<std::size_t>(sent * row_bytes_));
  if (shape_.quant_mode == 2) send_scales_.resize(static_cast<std::size_t>(sent));
  slot_.resize(static_cast<std::size_t>(bs * k));
  expand_idx_.resize(static_cast<std::size_t>(bs * k));

  // Pack: one copy (or quantization) of every (token, expert) row into its place in the send buffer.
  const numeric::Half half = shape_.dtype == DType::fp16 ? numeric::Half::fp16 : numeric::Half::bf16;
  std::vector<std::int64_t> chunk_start(cursor);
  for (std::int64_t b = 0; b < bs; ++b) {
    const std::uint16_t* row = x + b * h;
    std::int64_t first = -1;  // without smooth scales: the token's row quantized once, at its first entry
    for (int j = 0; j < k; ++j) {
      const auto e = static_cast<std::size_t>(expert_ids[b * k + j]);
      const std::int64_t pos = cursor[e]++;
      slot_[static_cast<std::size_t>(b * k + j)] = pos;
      expand_idx_[static_cast<std::size_t>(b * k + j)] = static_cast<std::int32_t>(pos - chunk_start[e]);
      if (shape_.quant_mode == 2 && smooth == nullptr && first >= 0) {
        std::memcpy(send_.data() + pos * row_bytes_, send_.data() + first * row_bytes_,
                    static_cast<std::size_t>(row_bytes_));
        send_scales_[static_cast<std::size_t>(pos)] = send_scales_[static_cast<std::size_t>(first)];
      } else if (shape_.quant_mode == 2) {
        kernels::quantize_row(row, 1, half, smooth ? smooth + static_cast<std::int64_t>(e) * h : nullptr, h,
                              reinterpret_cast<std::int8_t*>(send_.data() + pos * row_bytes_),
                              &send_scales_[static_cast<std::size_t>(pos)], scratch_.data());
        first = pos;
      } else {
        std::memcpy(send_.data() + pos * row_bytes_, row, static_cast<std::size_t>(row_bytes_));
      }
    }
  }

  for (int r = 0; r < world_; ++r) {
    int rows = 0;
    for (int l = 0; l < local_; ++l) rows += recv_counts_[static_cast<std::size_t>(r * local_ + l)];
    recv_rows_[static_cast<std::size_t>(r)] = rows;
  }
  received_rows_ = prefix(recv_rows_, recv_displs_);
  recv_.resize(static_cast<std::size_t>(received_rows_ * row_bytes_));
  check(MPI_Alltoallv(data_or_null(send_), send_rows_.data(), send_displs_.data(), dispatch_row_, data_or_null(recv_),
                      recv_rows_.data(), recv_displs_.data(), dispatch_row_, comm_),
        "MPI_Alltoallv (rows)");
  if (shape_.quant_mode == 2) {
    recv_scales_.resize(static_cast<std::size_t>(received_rows_));
    check(MPI_Alltoallv(data_or_null(send_scales_), send_rows_.data(), send_displs_.data(), MPI_FLOAT,
                        data_or_null(recv_scales_), recv_rows_.data(), recv_displs_.data(), MPI_FLOAT, comm_),
          "MPI_Alltoallv (scales)");
  }
  sort_received();
}

// The received buffer holds chunks (source rank r, local expert l) in r-major order; expand_x wants l-major. A
// stable counting sort by local expert moves whole chunks. With one expert per rank the two orders coincide and
// nothing is copied.
void MpiAlltoallvMoe::sort_received() {
  sorted_offset_.assign(static_cast<std::size_t>(local_ * world_), 0);
  std::int64_t next = 0;
  for (int l = 0; l < local_; ++l) {
    for (int r = 0; r < world_; ++r) {
      sorted_offset_[static_cast<std::size_t>(l * world_ + r)] = next;
      next += recv_counts_[static_cast<std::size_t>(r * local_ + l)];
    }
  }
  if (local_ == 1) return;
  sorted_.resize(recv_.size());
  if (shape_.quant_mode == 2) sorted_scales_.resize(recv_scales_.size());
  for (int r = 0; r < world_; ++r) {
    std::int64_t from = recv_displs_[static_cast<std::size_t>(r)];
    for (int l = 0; l < local_; ++l) {
      const std::int64_t n = recv_counts_[static_cast<std::size_t>(r * local_ + l)];
      const std::int64_t to = sorted_offset_[static_cast<std::size_t>(l * world_ + r)];
      if (n > 0) {
        std::memcpy(sorted_.data() + to * row_bytes_, recv_.data() + from * row_bytes_, static_cast<std::size_t>(n * row_bytes_));
        if (shape_.quant_mode == 2)
          std::memcpy(sorted_scales_.data() + to, recv_scales_.data() + from, static_cast<std::size_t>(n) * sizeof(float));
      }
      from += n;
    }
  }
}

const void* MpiAlltoallvMoe::expand_x() const noexcept { return local_ == 1 ? recv_.data() : sorted_.data(); }

const float* MpiAlltoallvMoe::dynamic_scales() const noexcept {
  return local_ == 1 ? recv_scales_.data() : sorted_scales_.data();
}

std::vector<std::int32_t> MpiAlltoallvMoe::ep_recv_counts() const {
  std::vector<std::int32_t> counts(static_cast<std::size_t>(local_ * world_));
  std::int32_t running = 0;
  for (int l = 0; l < local_; ++l) {
    for (int r = 0; r < world_; ++r) {
      running += recv_counts_[static_cast<std::size_t>(r * local_ + l)];
      counts[static_cast<std::size_t>(l * world_ + r)] = running;
    }
  }
  return counts;
}

std::vector<std::int64_t> MpiAlltoallvMoe::expert_token_nums() const {
  std::vector<std::int64_t> nums(static_cast<std::size_t>(local_), 0);
  for (int r = 0; r < world_; ++r) {
    for (int l = 0; l < local_; ++l) nums[static_cast<std::size_t>(l)] += recv_counts_[static_cast<std::size_t>(r * local_ + l)];
  }
  return nums;
}

void MpiAlltoallvMoe::combine(const std::uint16_t* expert_out, const float* weights, std::uint16_t* out) {
  const std::int64_t h = shape_.h;
  const int k = shape_.k;
  // Expert outputs back into received (source rank, local expert) order: the inverse of sort_received.
  const std::uint16_t* back = expert_out;
  if (local_ > 1) {
    back_send_.resize(static_cast<std::size_t>(received_rows_ * h));
    for (int r = 0; r < world_; ++r) {
      std::int64_t to = recv_displs_[static_cast<std::size_t>(r)];
      for (int l = 0; l < local_; ++l) {
        const std::int64_t n = recv_counts_[static_cast<std::size_t>(r * local_ + l)];
        const std::int64_t from = sorted_offset_[static_cast<std::size_t>(l * world_ + r)];
        if (n > 0) std::memcpy(back_send_.data() + to * h, expert_out + from * h, static_cast<std::size_t>(n * h) * 2);
        to += n;
      }
    }
    back = back_send_.data();
  }
  back_recv_.resize(slot_.size() * static_cast<std::size_t>(h));
  check(MPI_Alltoallv(received_rows_ > 0 ? back : nullptr, recv_rows_.data(), recv_displs_.data(), combine_row_,
                      data_or_null(back_recv_), send_rows_.data(), send_displs_.data(), combine_row_, comm_),
        "MPI_Alltoallv (expert outputs)");

  // Weighted sum in increasing k, fp32, rounded half to even (contract §4.2 with S = 0).
  const numeric::Half half = shape_.dtype == DType::fp16 ? numeric::Half::fp16 : numeric::Half::bf16;
  for (std::int64_t b = 0; b < bs_; ++b) {
    std::fill(acc_.begin(), acc_.end(), 0.0f);
    for (int j = 0; j < k; ++j) {
      const std::int64_t pos = slot_[static_cast<std::size_t>(b * k + j)];
      kernels::accumulate_scaled(acc_.data(), back_recv_.data() + pos * h, half, weights[b * k + j], h);
    }
    kernels::store_row(acc_.data(), half, h, out + b * h, 1);
  }
}

}  // namespace moedist::bench
