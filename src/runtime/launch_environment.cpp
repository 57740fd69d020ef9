// What a launcher (`moedist launch`, or any that sets the same variables) tells a rank process. Not part
// of any one transport: join_shm_from_env reads it, and so can a program that joins some other way.
#include <cerrno>
#include <cstdlib>
#include <string>

#include "common/format.h"
#include "moedist/launch.h"

namespace moedist {

namespace {
int env_int(const char* name, bool required, int fallback) {
  const char* text = std::getenv(name);
  if (text == nullptr || *text == '\0') {
    if (!required) return fallback;
    fail(
        ErrorCode::invalid_argument, name, "unset",
        "must be set (start the ranks with `moedist launch`, or set MOEDIST_RANK, MOEDIST_WORLD_SIZE and MOEDIST_JOB)");
  }
  char* end = nullptr;
  errno = 0;
  const long value = std::strtol(text, &end, 10);
  if (errno != 0 || end == text || *end != '\0' || value < 0 || value > (1 << 20)) {
    fail(ErrorCode::invalid_argument, name, text, "must be a non-negative integer");
  }
  return static_cast<int>(value);
}
}  // namespace

LaunchEnvironment launch_environment() {
  LaunchEnvironment env;
  env.rank = env_int("MOEDIST_RANK", true, 0);
  env.world_size = env_int("MOEDIST_WORLD_SIZE", true, 0);
  env.tp_world_size = env_int("MOEDIST_TP_WORLD_SIZE", false, 0);
  const char* job = std::getenv("MOEDIST_JOB");
  if (job == nullptr || *job == '\0') fail(ErrorCode::invalid_argument, "MOEDIST_JOB", "unset", "must name the job");
  env.job = job;
  if (env.world_size < 1) fail_value("MOEDIST_WORLD_SIZE", env.world_size, "must be >= 1");
  if (env.rank >= env.world_size)
    fail_value("MOEDIST_RANK", env.rank, concat("must be < MOEDIST_WORLD_SIZE = ", env.world_size));
  if (env.tp_world_size > 2) fail_value("MOEDIST_TP_WORLD_SIZE", env.tp_world_size, "must be 0, 1 or 2");
  return env;
}

}  // namespace moedist
