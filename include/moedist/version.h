#pragma once

namespace moedist {
// "MAJOR.MINOR.PATCH (features)", e.g. "0.1.0 (transports: inproc)".
const char* version_string() noexcept;
}  // namespace moedist
