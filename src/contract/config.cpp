// Configuration rules (contract §6.1 semantic rules, plus the opt-in Ascend hardware profiles), derived
// facts and the capacity rule A (§3.3, §3.4.1, §3.5).
#include "moedist/config.h"

#include <algorithm>
#include <cstring>

#include "common/format.h"
#include "contract/checks.h"
#include "contract/layout.h"

namespace moedist {

const char* profile_name(Profile profile) noexcept {
  switch (profile) {
    case Profile::portable: return "portable";
    case Profile::ascend_a3: return "ascend_a3";
    case Profile::ascend_a2: return "ascend_a2";
  }
  return "unknown";
}

bool profile_from_name(const char* name, Profile* out) noexcept {
  for (Profile p : {Profile::portable, Profile::ascend_a3, Profile::ascend_a2}) {
    if (std::strcmp(name, profile_name(p)) == 0) {
      *out = p;
      return true;
    }
  }
  return false;
}

int tp_domain_size(const GroupConfig& c) noexcept { return std::max(c.tp_world_size, 1); }
int global_rank(const GroupConfig& c) noexcept { return c.ep_rank_id * tp_domain_size(c) + c.tp_rank_id; }
bool is_shared_expert_rank(const GroupConfig& c) noexcept { return c.ep_rank_id < c.shared_expert_rank_num; }
int moe_local_expert_num(const GroupConfig& c) noexcept {
  const int moe_ranks = c.ep_world_size - c.shared_expert_rank_num;
  return moe_ranks > 0 ? c.moe_expert_num / moe_ranks : 0;
}
int local_expert_num(const GroupConfig& c) noexcept {
  return is_shared_expert_rank(c) ? 1 : moe_local_expert_num(c);
}

void validate_config(const GroupConfig& c) {
  const int W = c.ep_world_size;
  const int S = c.shared_expert_rank_num;
  if (W < 1) fail_value("ep_world_size", W, "must be >= 1");
  // Bounds that keep every count and record size far from overflow (a call record holds W * L counts).
  if (W > 65536) fail_value("ep_world_size", W, "must be <= 65536");
  if (c.ep_rank_id < 0 || c.ep_rank_id >= W)
    fail_value("ep_rank_id", c.ep_rank_id, concat("must be in [0, ep_world_size = ", W, ")"));
  if (c.tp_world_size < 0 || c.tp_world_size > 2)
    fail_value("tp_world_size", c.tp_world_size, "must be 0, 1 (no TP domain) or 2");
  if (c.tp_world_size <= 1 && c.tp_rank_id != 0)
    fail_value("tp_rank_id", c.tp_rank_id, concat("must be 0 without a TP domain (tp_world_size = ", c.tp_world_size, ")"));
  if (c.tp_world_size == 2 && (c.tp_rank_id < 0 || c.tp_rank_id > 1))
    fail_value("tp_rank_id", c.tp_rank_id, "must be 0 or 1 with tp_world_size = 2");
  if (c.expert_shard_type != 0)
    fail_value("expert_shard_type", c.expert_shard_type, "must be 0 (shared-expert ranks placed before MoE ranks)");
  if (S < 0 || S >= W)
    fail_value("shared_expert_rank_num", S, concat("must be in [0, ep_world_size = ", W, ")"));
  // shared_expert_num: 1 for the V1 operators (checked at their calls); V2 §3.5 / §7.1 allow 0 to 4
  // shared experts, each on S / Sn ranks (S == 0 with the default 1 means none).
  const int sn = contract::v2_shared_expert_num(c);
  if (c.shared_expert_num < 0 || c.shared_expert_num > 4)
    fail_value("shared_expert_num", c.shared_expert_num, "must be in [0, 4] (1 in the V1 operators)");
  if ((sn == 0) != (S == 0))
    fail_value("shared_expert_num", c.shared_expert_num,
               concat("must be 0 exactly when shared_expert_rank_num is 0 (it is ", S, ")"));
  if (sn > 0 && S % sn != 0)
    fail_value(
        "shared_expert_num", c.shared_expert_num,
        concat("must divide shared_expert_rank_num = ", S, " (each shared expert on S / shared_expert_num ranks)"));
  if (c.moe_expert_num < 1) fail_value("moe_expert_num", c.moe_expert_num, "must be >= 1");
  if (c.moe_expert_num > (1 << 20)) fail_value("moe_expert_num", c.moe_expert_num, "must be <= 1048576");
  if (c.moe_expert_num % (W - S) != 0)
    fail_value("moe_expert_num", c.moe_expert_num,
               concat("must be a multiple of ep_world_size - shared_expert_rank_num = ", W - S));
  if (c.tp_world_size == 2 && moe_local_expert_num(c) != 1)
    fail_value("moe_expert_num", c.moe_expert_num,
               concat("a TP domain needs one expert per MoE rank, but moe_expert_num / (ep_world_size - "
                      "shared_expert_rank_num) = ", moe_local_expert_num(c)));
  if (c.global_bs < 0) fail_value("global_bs", c.global_bs, "must be >= 0");
  if (c.global_bs % W != 0)
    fail_value("global_bs", c.global_bs, concat("must be 0 or a multiple of ep_world_size = ", W));

  if (c.profile == Profile::ascend_a3) {
    // The V2 kernels' limits (V2 §7.1); the V1 ones are narrower (check_v1_config).
    if (W < 2 || W > 768) fail_value("ep_world_size", W, "profile ascend_a3 allows 2 to 768 (V2 operators)");
    if (c.moe_expert_num > 1024)
      fail_value("moe_expert_num", c.moe_expert_num, "profile ascend_a3 allows at most 1024");
  } else if (c.profile == Profile::ascend_a2) {
    if (W > 256 || W % 8 != 0)
      fail_value("ep_world_size", W, "profile ascend_a2 needs a multiple of 8 that is at most 256");
    if (S != 0) fail_value("shared_expert_rank_num", S, "profile ascend_a2 has no shared-expert ranks (must be 0)");
    if (c.tp_world_size > 1) fail_value("tp_world_size", c.tp_world_size, "profile ascend_a2 has no TP domain");
    if (c.moe_expert_num > 512) fail_value("moe_expert_num", c.moe_expert_num, "profile ascend_a2 allows at most 512");
    if (c.moe_expert_num / W > 24)
      fail_value("moe_expert_num", c.moe_expert_num, "profile ascend_a2 allows at most 24 experts per rank");
  }
}

namespace contract {

void check_v1_config(const GroupConfig& c) {
  if (c.shared_expert_num != 1)
    fail_value("shared_expert_num", c.shared_expert_num, "must be 1 in the V1 operators (0 to 4 in the V2 ones)");
  if (c.shared_expert_rank_num > 0 && c.ep_world_size % c.shared_expert_rank_num != 0)
    fail_value("shared_expert_rank_num", c.shared_expert_rank_num,
               concat("ep_world_size = ", c.ep_world_size, " must be a multiple of it in the V1 operators"));
  if (c.profile == Profile::ascend_a3) {
    static constexpr int kA3Sizes[] = {8, 16, 32, 64, 128, 144, 256, 288};
    if (std::find(std::begin(kA3Sizes), std::end(kA3Sizes), c.ep_world_size) == std::end(kA3Sizes))
      fail_value("ep_world_size", c.ep_world_size,
                 "profile ascend_a3 allows 8, 16, 32, 64, 128, 144, 256 or 288 in the V1 operators");
    if (c.moe_expert_num > 512)
      fail_value("moe_expert_num", c.moe_expert_num, "profile ascend_a3 allows at most 512 in the V1 operators");
  }
}

}  // namespace contract

CapacityReport capacity(const GroupConfig& config, const CapacityQuery& q) {
  validate_config(config);
  if (q.bs < 0) fail_value("bs", q.bs, "must be >= 0");
  // V2's K may exceed E with special experts (K <= E + zero + copy + const experts, a call's choice).
  if (q.k < 1 || (q.version != 2 && q.k > config.moe_expert_num))
    fail_value("k", q.k, concat("must be in [1, moe_expert_num = ", config.moe_expert_num, "]"));
  if (q.h < 1) fail_value("h", q.h, "must be >= 1");
  if (q.x_dtype != DType::bf16 && q.x_dtype != DType::fp16)
    fail_value("x_dtype", dtype_name(q.x_dtype), "must be bfloat16 or float16");
  if (q.quant_mode == 1)
    fail(ErrorCode::unsupported, "quant_mode", "1",
         "static quantization is not supported (0 = none, 2 = dynamic int8)");
  if (q.quant_mode != 0 && q.quant_mode != 2) fail_value("quant_mode", q.quant_mode, "must be 0 (none) or 2 (dynamic int8)");
  if (config.global_bs != 0 && contract::sat_mul(q.bs, config.ep_world_size) > config.global_bs)
    fail_value("bs", q.bs, concat("bs * ep_world_size must be <= global_bs = ", config.global_bs));

  contract::check_profile_call_limits(config, q.bs, q.k, q.h, q.version);
  const contract::Topology topo(config);
  if (q.version != 1 && q.version != 2) fail_value("version", q.version, "must be 1 (V1 operators) or 2 (V2)");
  if (q.version == 1) contract::check_v1_config(config);
  const contract::CallShape shape{q.bs, q.k, q.h, q.bs, q.version};
  const contract::WindowLayout layout(topo, shape, config.ep_rank_id);

  CapacityReport r;
  r.global_bs = topo.effective_global_bs(q.bs);
  r.A = layout.capacity_a;
  r.expand_x_rows = contract::sat_mul(layout.capacity_a, static_cast<std::int64_t>(topo.T));
  r.max_receive_rows = layout.dispatch_rows;
  r.window_bytes = static_cast<std::int64_t>(layout.total_bytes);
  r.output_bytes = static_cast<std::int64_t>(contract::group_output_bytes(topo, shape, config.ep_rank_id));
  if (r.window_bytes >= contract::kSizeLimit || r.output_bytes >= contract::kSizeLimit) {
    fail(ErrorCode::capacity, "bs", concat(q.bs),
         concat("with k = ", q.k, ", h = ", q.h, " and global_bs = ", config.global_bs,
                " a rank would need more than 2^62 bytes"));
  }
  r.total_bytes = r.window_bytes + r.output_bytes;
  // A3 rule [OP-DOC-D1]: 1024*1024*(HCCL_BUFFSIZE-2)/2 >= BS*2*(H+128)*(W*L+K+1), and HCCL_BUFFSIZE >= 2.
  using contract::sat_add;
  using contract::sat_mul;
  const std::int64_t need = sat_mul(sat_mul(sat_mul(q.bs, 2), sat_add(q.h, 128)),
                                    sat_add(sat_mul(static_cast<std::int64_t>(config.ep_world_size), local_expert_num(config)), q.k + 1));
  const std::int64_t mib = 1024 * 1024;
  r.ascend_hccl_buffsize_mb = std::max<std::int64_t>(2, 2 + (sat_mul(need, 2) + mib - 1) / mib);
  return r;
}

}  // namespace moedist
