// Groups of processes over shared memory, and the launcher's environment.
#include <cerrno>
#include <cstdlib>
#include <string>

#include "common/format.h"
#include "moedist/shm.h"
#include "transport/shm/shm_transport.h"

namespace moedist {

std::unique_ptr<Group> join_shm(const GroupConfig& config, const std::string& job, const ShmOptions& options) {
  validate_config(config);
  if (options.timeout.count() <= 0) fail_value("ShmOptions::timeout (ms)", options.timeout.count(), "must be > 0");
  const int world = config.ep_world_size * tp_domain_size(config);
  auto transport = std::make_unique<shm::ShmTransport>(job, global_rank(config), world, options);
  return std::make_unique<Group>(config, std::move(transport));
}

namespace {
int env_int(const char* name, bool required, int fallback) {
  const char* text = std::getenv(name);
  if (text == nullptr || *text == '\0') {
    if (!required) return fallback;
    fail(ErrorCode::invalid_argument, name, "unset",
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

std::unique_ptr<Group> join_shm_from_env(GroupConfig config, const ShmOptions& options) {
  const LaunchEnvironment env = launch_environment();
  if (config.tp_world_size == 0) config.tp_world_size = env.tp_world_size;
  const int t = tp_domain_size(config);
  config.ep_rank_id = env.rank / t;
  config.tp_rank_id = env.rank % t;
  if (config.ep_world_size * t != env.world_size) {
    fail(ErrorCode::config_mismatch, "ep_world_size * max(tp_world_size, 1)",
                   concat(config.ep_world_size * t),
                   concat("must equal MOEDIST_WORLD_SIZE = ", env.world_size));
  }
  return join_shm(config, env.job, options);
}

}  // namespace moedist
