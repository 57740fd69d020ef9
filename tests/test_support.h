// Shared helpers of the test programs: random valid cases, a runner that drives the in-process runtime
// with strided inputs and caller or group-owned outputs, and the bit-exact comparison with the oracle.
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "casefile/case_file.h"
#include "oracle/oracle.h"

namespace moedist::testing {

struct CaseLimits {
  int max_ep_world_size = 16;
  int max_k = 16;
  std::int64_t max_h = 80;
  std::int64_t max_bs = 6;
  bool allow_tp = true;
};

// A random configuration that satisfies every semantic rule, with random inputs for every rank.
casefile::Case random_case(std::mt19937_64& rng, const CaseLimits& limits = {});

// One-line description for failure messages.
std::string describe(const casefile::Case& c);

// The same case in the oracle's plain representation.
oracle::Case to_oracle_case(const casefile::Case& c);

struct RunOptions {
  bool strided_inputs = false;  // pass x, expert_ids, expert_scales and combine inputs as non-contiguous views
  bool caller_outputs = false;  // give dispatch and combine caller-provided output buffers
};

// Runs dispatch then combine for every rank on the in-process runtime (independently of
// casefile::run_case, so that the two runners check each other).
std::vector<casefile::RankOutputs> run_runtime(const casefile::Case& c, const RunOptions& options);

// Compares runtime outputs with the oracle's bit for bit; returns "" when equal, else the first difference.
std::string compare_with_oracle(const casefile::Case& c, const std::vector<casefile::RankOutputs>& got,
                                const std::vector<oracle::RankOutput>& want);

// 16-bit float helpers for building inputs.
std::uint16_t to_half_bits(DType dtype, float value);

}  // namespace moedist::testing
