// The static configuration of one EP domain (and optional TP domain), the capacity rule A and the bytes
// a group allocates. Parameter names follow torch_npu.npu_moe_distribute_dispatch.
#pragma once

#include <cstdint>

#include "moedist/dtype.h"

namespace moedist {

// Which limits are enforced on top of the contract's semantic rules.
//   portable  : semantic rules only (any H >= 1, any W >= 1, any K <= E, any BS >= 0).
//   ascend_a3 : also the Atlas A3 V1 limits (H == 7168, W in {8,16,32,64,128,144,256,288}, K <= 8,
//               1 <= BS <= 512, E <= 512, no expert_scales).
//   ascend_a2 : also the Atlas A2 V1 limits (W <= 256 and W % 8 == 0, E <= 512, E/W <= 24, no shared
//               experts, no TP, 1 <= BS <= 256, K <= 16, H % 32 == 0 and H <= 7168).
enum class Profile : std::uint8_t { portable, ascend_a3, ascend_a2 };

const char* profile_name(Profile profile) noexcept;
bool profile_from_name(const char* name, Profile* out) noexcept;

struct GroupConfig {
  int ep_world_size = 0;           // W
  int ep_rank_id = 0;              // this rank in the EP domain, [0, W)
  int moe_expert_num = 0;          // E, a multiple of W - shared_expert_rank_num
  int tp_world_size = 0;           // 0 or 1: no TP domain; 2: TP domain of two ranks
  int tp_rank_id = 0;              // this rank in the TP domain
  int shared_expert_rank_num = 0;  // S: ranks [0, S) host the shared expert
  int shared_expert_num = 1;       // V1: must be 1. V2: 0-4 shared experts, S / shared_expert_num ranks each
  int expert_shard_type = 0;       // must be 0: shared-expert ranks come first
  std::int64_t global_bs = 0;      // 0 (every rank has the same BS) or max BS * W
  Profile profile = Profile::portable;
};

// Throws ValidationError if the configuration breaks a rule (checked once, at group creation).
void validate_config(const GroupConfig& config);

// Derived facts about the rank a config describes.
int tp_domain_size(const GroupConfig& config) noexcept;       // max(tp_world_size, 1)
int global_rank(const GroupConfig& config) noexcept;          // ep_rank_id * tp_domain_size + tp_rank_id
bool is_shared_expert_rank(const GroupConfig& config) noexcept;
int moe_local_expert_num(const GroupConfig& config) noexcept;  // E / (W - S): experts per MoE rank
int local_expert_num(const GroupConfig& config) noexcept;      // 1 on a shared-expert rank, else E / (W - S)

// Per-call shape a capacity question is asked for.
struct CapacityQuery {
  std::int64_t bs = 0;   // tokens on this rank (with global_bs != 0, the max BS is global_bs / W)
  std::int64_t k = 0;    // top-k
  std::int64_t h = 0;    // hidden size
  DType x_dtype = DType::bf16;
  int quant_mode = 0;
  int version = 1;  // 1: the V1 operators; 2: the V2 ones (a shared-expert rank's A is maxBS * ceil(W / R))
};

struct CapacityReport {
  std::int64_t A = 0;                 // most rows this rank can receive in the EP domain (the contract's A)
  std::int64_t expand_x_rows = 0;     // A * max(tp_world_size, 1): rows of expand_x, as torch_npu allocates it
  // Rows the group's window holds: A * max(T, 1), except on a shared-expert rank where ranks with
  // different BS can send more than A rows (the V1 split rotates each rank's remainder); there it is
  // (max BS + (W - S) * ceil(max BS / S)) * max(T, 1) when that is larger.
  std::int64_t max_receive_rows = 0;
  std::int64_t global_bs = 0;         // effective global_bs (BS * W when the config says 0)
  std::int64_t window_bytes = 0;      // bytes of the rank's communication window
  std::int64_t output_bytes = 0;      // bytes of group-owned dispatch + combine outputs
  std::int64_t total_bytes = 0;       // window_bytes + output_bytes: what a group allocates on this rank
  // The Ascend A3 HCCL_BUFFSIZE the same configuration would need, in MB (the rule of [OP-DOC-D1]).
  std::int64_t ascend_hccl_buffsize_mb = 0;
};

// The capacity A and the bytes a group allocates for a configuration and call shape.
// Throws ValidationError for an invalid configuration or query.
CapacityReport capacity(const GroupConfig& config, const CapacityQuery& query);

}  // namespace moedist
