// The typed error for a status the GPU recorded (device_state.h Status).
#pragma once

#include <cstdint>

#include "cuda/device_state.h"

namespace moedist::cuda {

// Returns when st.code == 0; otherwise throws the ValidationError (a bad argument of this rank) or
// PeerError (a peer failed, timed out, disagreed or sent a malformed record) that st describes.
// `me` is this rank's global rank, `call_k` the K of the call (to name expert_ids[b, j]).
void throw_status_error(const Status& st, int me, std::int64_t call_k);

}  // namespace moedist::cuda
