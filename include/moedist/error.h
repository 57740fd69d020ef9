// Typed errors. Every error moedist raises is a moedist::Error with a code; the message names the
// parameter (or peer and phase), the offending value and the rule.
#pragma once

#include <stdexcept>
#include <string>

namespace moedist {

enum class ErrorCode : int {
  invalid_argument = 1,  // a value breaks a rule of the contract (ids out of range, bad attribute, ...)
  invalid_dtype = 2,     // a tensor has the wrong dtype
  invalid_shape = 3,     // a tensor has the wrong rank or extent
  config_mismatch = 4,   // ranks disagree about the group configuration or about a call
  capacity = 5,          // a buffer is too small for what must be written
  timeout = 6,           // a peer did not arrive in time
  peer_failed = 7,       // a peer raised an error in the same collective call
  protocol = 8,          // a peer sent data that fails its bounds checks
  case_file = 9,         // a malformed or inconsistent case file
  unsupported = 10,      // a feature or mode moedist does not implement (for example quant_mode 1)
  internal = 11,
  peer_lost = 12,        // a peer process exited or was killed
};

const char* error_code_name(ErrorCode code) noexcept;

class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& message);
  ErrorCode code() const noexcept { return code_; }

 private:
  ErrorCode code_;
};

// A caller-supplied value breaks a rule. parameter() is the torch_npu parameter name ("expert_ids",
// "quant_mode", ...), value() the offending value as text, rule() the rule in words.
class ValidationError : public Error {
 public:
  ValidationError(ErrorCode code, std::string parameter, std::string value, std::string rule);
  const std::string& parameter() const noexcept { return parameter_; }
  const std::string& value() const noexcept { return value_; }
  const std::string& rule() const noexcept { return rule_; }

 private:
  std::string parameter_, value_, rule_;
};

// A collective step could not complete: a peer timed out, failed, or sent malformed data.
// peer() is the global rank of the peer at fault (-1 if unknown), phase() the step ("dispatch.counts", ...).
class PeerError : public Error {
 public:
  PeerError(ErrorCode code, int peer, std::string phase, const std::string& message);
  int peer() const noexcept { return peer_; }
  const std::string& phase() const noexcept { return phase_; }

 private:
  int peer_;
  std::string phase_;
};

}  // namespace moedist
