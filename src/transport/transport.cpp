#include "transport/transport.h"

#include <string>

#include "moedist/error.h"

namespace moedist {

std::string Transport::host_name(int host) const { return "host " + std::to_string(host); }

void Transport::exchange(std::span<const Outgoing> out, std::span<const int> from, std::span<std::vector<std::byte>>,
                         std::string_view phase) {
  if (!out.empty() || !from.empty()) {
    throw Error(ErrorCode::internal, "phase '" + std::string(phase) + "': this transport has one host and no point-to-point messages");
  }
}

}  // namespace moedist
