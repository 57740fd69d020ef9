// Groups of processes over shared memory: the factories of the shm transport.
#include <string>

#include "common/format.h"
#include "moedist/launch.h"
#include "moedist/shm.h"
#include "transport/shm/shm_transport.h"

namespace moedist {

std::unique_ptr<Group> join_shm(const GroupConfig& config, const std::string& job, const ShmOptions& options) {
  validate_config(config);
  if (options.wait.timeout.count() <= 0)
    fail_value("ShmOptions::timeout (ms)", options.wait.timeout.count(), "must be > 0");
  validate_group_options(options.group);
  const int world = config.ep_world_size * tp_domain_size(config);
  auto transport = std::make_unique<shm::ShmTransport>(job, global_rank(config), world, options);
  return std::make_unique<Group>(config, std::move(transport), options.group);
}

std::unique_ptr<Group> join_shm_from_env(GroupConfig config, const ShmOptions& options) {
  const LaunchEnvironment env = launch_environment();
  if (config.tp_world_size == 0) config.tp_world_size = env.tp_world_size;
  const int t = tp_domain_size(config);
  config.ep_rank_id = env.rank / t;
  config.tp_rank_id = env.rank % t;
  if (config.ep_world_size * t != env.world_size) {
    fail(ErrorCode::config_mismatch, "ep_world_size * max(tp_world_size, 1)", concat(config.ep_world_size * t),
         concat("must equal MOEDIST_WORLD_SIZE = ", env.world_size));
  }
  return join_shm(config, env.job, options);
}

}  // namespace moedist
