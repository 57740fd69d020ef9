#include "contract/token_mask.h"

#include "common/format.h"
#include "contract/checks.h"
#include "contract/layout.h"

namespace moedist::contract {

std::int64_t check_token_mask(const GroupConfig& c, const TensorView& mask, std::int64_t bs, Values values) {
  if (!mask.present()) return bs;
  const std::string shape = shape_text(mask);
  if (c.profile == Profile::ascend_a3)
    fail(ErrorCode::invalid_argument, "x_active_mask", shape, "profile ascend_a3 does not support it (must be None)");
  if (mask.dtype != DType::boolean)
    fail(ErrorCode::invalid_dtype, "x_active_mask.dtype", std::string(dtype_name(mask.dtype)), "must be bool");
  if (mask.ndim != 1 || mask.shape[0] != bs)
    fail(ErrorCode::invalid_shape, "x_active_mask.shape", shape,
         concat("must be (BS,) = (", bs, ",) (a (BS, K) mask is a V2 operator's)"));
  if (bs > 0 && mask.data == nullptr)
    fail(ErrorCode::invalid_argument, "x_active_mask.data", "nullptr", "a mask needs data");
  if (c.global_bs != 0 && c.global_bs > sat_mul(bs, static_cast<std::int64_t>(c.ep_world_size)))
    fail(ErrorCode::invalid_argument, "x_active_mask", shape,
         concat("must be None on a rank with fewer tokens than global_bs / ep_world_size = ",
                c.global_bs / c.ep_world_size, " (BS = ", bs,
                "): with different BS per rank every token must be active"));
  if (values == Values::on_device) return bs;
  std::int64_t active = 0;
  while (active < bs && mask.at<std::uint8_t>(active) != 0) ++active;
  for (std::int64_t b = active + 1; b < bs; ++b) {
    if (mask.at<std::uint8_t>(b) != 0)
      fail(ErrorCode::invalid_argument, concat("x_active_mask[", b, "]"), "true",
           concat("every true must come before every false (x_active_mask[", active,
                  "] is false): active tokens are a prefix of x"));
  }
  return active;
}

}  // namespace moedist::contract
