// Generic message helpers: concat() formats values into a string; fail() and fail_value() throw the
// library's validation errors, whose text is "<parameter> = <value>: <rule>". Not tied to the contract:
// transports, runtimes and tools report their own parameters with them too.
#pragma once

#include <sstream>
#include <string>

#include "moedist/error.h"

namespace moedist {

template <class... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  return os.str();
}

[[noreturn]] inline void fail(ErrorCode code, const std::string& parameter, const std::string& value,
                              const std::string& rule) {
  throw ValidationError(code, parameter, value, rule);
}

template <class V>
[[noreturn]] void fail_value(const std::string& parameter, const V& value, const std::string& rule) {
  fail(ErrorCode::invalid_argument, parameter, concat(value), rule);
}

}  // namespace moedist
