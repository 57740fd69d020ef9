// How long a rank waits for its peers: one options type, with one default, for every transport and
// backend (RuntimeOptions::wait, ShmOptions::wait, MpiOptions::wait, cuda::CudaGroupOptions::wait).
#pragma once

#include <chrono>

namespace moedist {

struct WaitOptions {
  // The longest wait for a peer in any collective step, joining included. A wait past it raises a
  // PeerError (ErrorCode::timeout) naming the peer waited for and the phase; the group is unusable
  // afterwards. 30 s by default everywhere: long enough for ranks that time-share cores or a GPU, short
  // enough that a rank that never comes is reported rather than waited for. A peer that dies is
  // reported sooner where the transport can see it (ErrorCode::peer_lost).
  std::chrono::milliseconds timeout{30000};
};

}  // namespace moedist
