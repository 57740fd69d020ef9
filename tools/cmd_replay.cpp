// `moedist replay CASE OUT`: run a recorded case on the in-process runtime and write every rank's outputs.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "casefile/case_file.h"
#include "commands.h"

namespace moedist::cli {

void add_replay(CLI::App& app, int* exit_code) {
  struct Args {
    std::string case_path;
    std::string out_path;
    std::int64_t timeout_ms = 30000;
  };
  auto args = std::make_shared<Args>();

  CLI::App* sub = app.add_subcommand(
      "replay", "Run a recorded case file (every rank's dispatch and combine) and write every rank's outputs");
  sub->footer(
      "CASE is a safetensors file holding the group configuration (as __metadata__ strings) and each rank's\n"
      "inputs rank{g}.x, rank{g}.expert_ids and optionally .scales, .expert_scales, .combine_x. replay runs\n"
      "dispatch then combine on every rank of an in-process world (one thread per rank) and writes OUT, a\n"
      "safetensors file with rank{g}.expand_x, .dynamic_scales, .expand_scales, .expand_idx,\n"
      ".expert_token_nums, .ep_recv_counts, .tp_recv_counts and .combine_out. Without combine_x the experts\n"
      "are identities. It prints one line per rank and exits 0; a malformed case or a rule the inputs break\n"
      "exits 2 with a message naming the tensor and the rule. The format is in docs/case-files.md.");
  sub->add_option("CASE", args->case_path, "Case file to run (safetensors; see docs/case-files.md)")->required();
  sub->add_option("OUT", args->out_path, "Where to write every rank's outputs (safetensors)")->required();
  sub->add_option("--timeout-ms", args->timeout_ms, "Longest wait for a peer in any phase, in milliseconds")
      ->capture_default_str()
      ->check(CLI::Range(std::int64_t{1}, std::int64_t{24} * 3600 * 1000));

  sub->callback([args, exit_code] {
    const casefile::Case c = casefile::read_case(args->case_path);
    RuntimeOptions options;
    options.timeout = std::chrono::milliseconds(args->timeout_ms);
    const std::vector<casefile::RankOutputs> outputs = casefile::run_case(c, options);
    casefile::write_outputs(args->out_path, outputs);

    const int tp = std::max(c.tp_world_size, 1);
    for (std::size_t g = 0; g < outputs.size(); ++g) {
      const int rank = static_cast<int>(g);
      std::printf("rank %d (ep_rank %d, tp_rank %d): BS %lld, valid rows %lld\n", rank, rank / tp, rank % tp,
                  static_cast<long long>(c.ranks[g].x.rows()), static_cast<long long>(outputs[g].expand_x.rows()));
    }
    std::printf("wrote the outputs of %zu ranks to %s\n", outputs.size(), args->out_path.c_str());
    *exit_code = 0;
  });
}

}  // namespace moedist::cli
