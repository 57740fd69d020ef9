#include "moedist/version.h"

namespace moedist {
const char* version_string() noexcept { return MOEDIST_VERSION " (transports: inproc, shm)"; }
}  // namespace moedist
