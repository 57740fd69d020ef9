#include "moedist/error.h"

#include <utility>

namespace moedist {

const char* error_code_name(ErrorCode code) noexcept {
  switch (code) {
    case ErrorCode::invalid_argument:
      return "invalid_argument";
    case ErrorCode::invalid_dtype:
      return "invalid_dtype";
    case ErrorCode::invalid_shape:
      return "invalid_shape";
    case ErrorCode::config_mismatch:
      return "config_mismatch";
    case ErrorCode::capacity:
      return "capacity";
    case ErrorCode::timeout:
      return "timeout";
    case ErrorCode::peer_failed:
      return "peer_failed";
    case ErrorCode::protocol:
      return "protocol";
    case ErrorCode::case_file:
      return "case_file";
    case ErrorCode::unsupported:
      return "unsupported";
    case ErrorCode::internal:
      return "internal";
    case ErrorCode::peer_lost:
      return "peer_lost";
  }
  return "unknown";
}

Error::Error(ErrorCode code, const std::string& message) : std::runtime_error(message), code_(code) {}

ValidationError::ValidationError(ErrorCode code, std::string parameter, std::string value, std::string rule)
    : Error(code, parameter + " = " + value + ": " + rule),
      parameter_(std::move(parameter)),
      value_(std::move(value)),
      rule_(std::move(rule)) {}

PeerError::PeerError(ErrorCode code, int peer, std::string phase, const std::string& message)
    : Error(code, message), peer_(peer), phase_(std::move(phase)) {}

}  // namespace moedist
