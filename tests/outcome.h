// What a call raised, captured as a value, and assertions on it: shared by the tests that check error
// types, codes, parameters, peers, phases and messages.
#pragma once

#include <gtest/gtest.h>

#include <string>

#include "moedist/error.h"

namespace moedist::testing {

struct Outcome {
  enum class Kind { none, validation, peer, other_error, other_exception };
  Kind kind = Kind::none;
  ErrorCode code = ErrorCode::internal;
  std::string what, parameter, value, rule, phase;
  int peer = -1;
};

template <class Fn>
Outcome capture(Fn&& fn) {
  Outcome o;
  try {
    fn();
  } catch (const ValidationError& e) {
    o.kind = Outcome::Kind::validation;
    o.code = e.code();
    o.what = e.what();
    o.parameter = e.parameter();
    o.value = e.value();
    o.rule = e.rule();
  } catch (const PeerError& e) {
    o.kind = Outcome::Kind::peer;
    o.code = e.code();
    o.what = e.what();
    o.peer = e.peer();
    o.phase = e.phase();
  } catch (const Error& e) {
    o.kind = Outcome::Kind::other_error;
    o.code = e.code();
    o.what = e.what();
  } catch (const std::exception& e) {
    o.kind = Outcome::Kind::other_exception;
    o.what = e.what();
  }
  return o;
}

inline std::string describe(const Outcome& o) {
  switch (o.kind) {
    case Outcome::Kind::none: return "no exception";
    case Outcome::Kind::validation:
      return std::string("ValidationError(") + error_code_name(o.code) + ", parameter '" + o.parameter + "', value '" +
             o.value + "', rule '" + o.rule + "')";
    case Outcome::Kind::peer:
      return std::string("PeerError(") + error_code_name(o.code) + ", peer " + std::to_string(o.peer) + ", phase '" +
             o.phase + "'): " + o.what;
    case Outcome::Kind::other_error: return std::string("Error(") + error_code_name(o.code) + "): " + o.what;
    case Outcome::Kind::other_exception: return "std::exception: " + o.what;
  }
  return "?";
}

inline bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

inline ::testing::AssertionResult peer_error(const Outcome& got, ErrorCode code, int peer, const std::string& phase,
                                             const std::string& fragment) {
  if (got.kind != Outcome::Kind::peer || got.code != code || got.peer != peer || got.phase != phase || !contains(got.what, fragment)) {
    return ::testing::AssertionFailure() << "expected PeerError(" << error_code_name(code) << ", peer " << peer << ", phase '"
                                         << phase << "') containing '" << fragment << "', got " << describe(got);
  }
  return ::testing::AssertionSuccess();
}

inline ::testing::AssertionResult validation_error(const Outcome& got, ErrorCode code, const std::string& parameter,
                                                   const std::string& value, const std::string& fragment) {
  if (got.kind != Outcome::Kind::validation || got.code != code || got.parameter != parameter || got.value != value ||
      !contains(got.what, fragment)) {
    return ::testing::AssertionFailure() << "expected ValidationError(" << error_code_name(code) << ", parameter '" << parameter
                                         << "', value '" << value << "') containing '" << fragment << "', got "
                                         << describe(got);
  }
  return ::testing::AssertionSuccess();
}

}  // namespace moedist::testing
