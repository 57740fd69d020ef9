#include "contract/token_mask.h"

#include "common/format.h"
#include "contract/checks.h"
#include "contract/layout.h"
#include "contract/v2_routing.h"

namespace moedist::contract {

namespace {

void check_mask_dtype(const TensorView& mask) {
  if (mask.dtype != DType::boolean)
    fail(ErrorCode::invalid_dtype, "x_active_mask.dtype", std::string(dtype_name(mask.dtype)), "must be bool");
}

// The rules both operators' masks share after dtype and shape: data, and none on a rank below
// global_bs / W tokens.
void check_mask_basics(const GroupConfig& c, const TensorView& mask, std::int64_t bs) {
  const std::string shape = shape_text(mask);
  if (mask.numel() > 0 && mask.data == nullptr)
    fail(ErrorCode::invalid_argument, "x_active_mask.data", "nullptr", "a mask needs data");
  if (c.global_bs != 0 && c.global_bs > sat_mul(bs, static_cast<std::int64_t>(c.ep_world_size)))
    fail(ErrorCode::invalid_argument, "x_active_mask", shape,
         concat("must be None on a rank with fewer tokens than global_bs / ep_world_size = ",
                c.global_bs / c.ep_world_size, " (BS = ", bs,
                "): with different BS per rank every token must be active"));
}

// The number of leading trues of a 1-D mask, which must be all of its trues.
std::int64_t prefix_length(const TensorView& mask, std::int64_t bs) {
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

}  // namespace

std::int64_t check_token_mask(const GroupConfig& c, const TensorView& mask, std::int64_t bs, Values values) {
  if (!mask.present()) return bs;
  const std::string shape = shape_text(mask);
  if (c.profile == Profile::ascend_a3)
    fail(ErrorCode::invalid_argument, "x_active_mask", shape, "profile ascend_a3 does not support it (must be None)");
  check_mask_dtype(mask);
  if (mask.ndim != 1 || mask.shape[0] != bs)
    fail(ErrorCode::invalid_shape, "x_active_mask.shape", shape,
         concat("must be (BS,) = (", bs, ",) (a (BS, K) mask is a V2 operator's)"));
  check_mask_basics(c, mask, bs);
  if (values == Values::on_device) return bs;
  return prefix_length(mask, bs);
}

EntryMask check_entry_mask(const GroupConfig& c, const TensorView& mask, std::int64_t bs, std::int64_t k,
                           Values values) {
  EntryMask m;
  if (!mask.present()) return m;
  check_mask_dtype(mask);
  const bool tokens = mask.ndim == 1 && mask.shape[0] == bs;
  const bool entries = mask.ndim == 2 && mask.shape[0] == bs && mask.shape[1] == k;
  if (!tokens && !entries)
    fail(ErrorCode::invalid_shape, "x_active_mask.shape", shape_text(mask),
         concat("must be (BS,) = (", bs, ",) or (BS, K) = (", bs, ", ", k, ")"));
  if (entries && c.profile == Profile::ascend_a2)
    fail(ErrorCode::invalid_argument, "x_active_mask", shape_text(mask), "profile ascend_a2 takes only a (BS,) mask");
  check_mask_basics(c, mask, bs);
  if (tokens) {
    m.kind = EntryMask::Kind::tokens;
    m.prefix = values == Values::on_device ? bs : prefix_length(mask, bs);
  } else {
    m.kind = EntryMask::Kind::entries;
    m.mask = mask;
  }
  return m;
}

}  // namespace moedist::contract
