// The in-process runtime: a world of threads sharing one inproc::InProcHub.
#include <exception>
#include <thread>
#include <vector>

#include "common/format.h"
#include "moedist/inproc.h"
#include "transport/inproc/inproc_transport.h"

namespace moedist {

struct InProcessWorld::Hub {
  std::shared_ptr<inproc::InProcHub> hub;
};

InProcessWorld::InProcessWorld(int world_size, RuntimeOptions options) : hub_(std::make_shared<Hub>()) {
  if (world_size < 1) fail_value("world_size", world_size, "must be >= 1");
  if (options.wait.timeout.count() <= 0) fail_value("timeout (ms)", options.wait.timeout.count(), "must be > 0");
  if (options.ranks_per_host < 0) fail_value("RuntimeOptions::ranks_per_host", options.ranks_per_host, "must be >= 0");
  hub_->hub =
      std::make_shared<inproc::InProcHub>(world_size, options.wait.timeout, options.spin, options.ranks_per_host);
}

InProcessWorld::~InProcessWorld() = default;

int InProcessWorld::world_size() const noexcept { return hub_->hub->size(); }

std::unique_ptr<Group> InProcessWorld::join(const GroupConfig& config, const GroupOptions& options) {
  validate_config(config);
  validate_group_options(options);
  const int want = config.ep_world_size * tp_domain_size(config);
  if (want != world_size()) {
    fail(ErrorCode::config_mismatch, "ep_world_size * max(tp_world_size, 1)", concat(want),
         concat("must equal the world size of this runtime, ", world_size()));
  }
  const int rank = global_rank(config);
  hub_->hub->claim(rank);
  return std::make_unique<Group>(config, std::make_unique<inproc::InProcTransport>(hub_->hub, rank), options);
}

void run_ranks(int n, const std::function<void(int rank)>& fn) {
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(n));
  std::vector<std::thread> threads;
  threads.reserve(static_cast<std::size_t>(n));
  for (int r = 0; r < n; ++r) {
    threads.emplace_back([&, r] {
      try {
        fn(r);
      } catch (...) {
        errors[static_cast<std::size_t>(r)] = std::current_exception();
      }
    });
  }
  for (std::thread& t : threads) t.join();
  for (const std::exception_ptr& e : errors) {
    if (e) std::rethrow_exception(e);
  }
}

}  // namespace moedist
