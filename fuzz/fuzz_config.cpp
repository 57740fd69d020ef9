// Fuzzes the configuration rules and the capacity arithmetic (moedist::validate_config, capacity()):
// any values, negative and huge included, must give a result or a moedist::Error, never a crash, an
// overflow or an out-of-bounds access.
#include <cstddef>
#include <cstdint>

#include "fuzz_input.h"
#include "moedist/config.h"
#include "moedist/error.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace moedist;
  fuzz::Input in(data, size);
  GroupConfig c;
  c.ep_world_size = fuzz::as_int(in.number(0, 300));
  c.ep_rank_id = fuzz::as_int(in.number(-1, 300));
  c.moe_expert_num = fuzz::as_int(in.number(0, 600));
  c.tp_world_size = fuzz::as_int(in.number(-1, 3));
  c.tp_rank_id = fuzz::as_int(in.number(-1, 2));
  c.shared_expert_rank_num = fuzz::as_int(in.number(-1, 300));
  c.shared_expert_num = fuzz::as_int(in.number(-1, 3));
  c.expert_shard_type = fuzz::as_int(in.number(-1, 2));
  c.global_bs = in.number(-1, 100000);
  c.profile = static_cast<Profile>(in.byte() % 3);
  CapacityQuery q;
  q.bs = in.number(-1, 5000);
  q.k = in.number(-1, 20);
  q.h = in.number(-1, 10000);
  q.x_dtype = in.byte() % 2 == 0 ? DType::bf16 : DType::fp16;
  q.quant_mode = fuzz::as_int(in.number(-1, 3));
  try {
    validate_config(c);
    const CapacityReport r = capacity(c, q);
    if (r.total_bytes < 0 || r.window_bytes < 0 || r.A < 0) __builtin_trap();  // a valid answer is never negative
  } catch (const Error&) {
  }
  return 0;
}
