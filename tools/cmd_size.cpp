// `moedist size`: the capacity A and the bytes a group allocates for a configuration.
#include <cstdio>
#include <vector>

#include "commands.h"
#include "moedist/config.h"
#include "moedist/error.h"

namespace moedist::cli {

void add_size(CLI::App& app, int* exit_code) {
  struct Args {
    GroupConfig config;
    std::int64_t bs = 8, k = 8, h = 7168;
    std::string dtype = "bfloat16", profile = "portable", op = "v1";
    int quant_mode = 2;
  };
  auto args = std::make_shared<Args>();
  args->config.ep_world_size = 16;
  args->config.moe_expert_num = 14;
  args->config.shared_expert_rank_num = 2;
  CLI::App* cmd = app.add_subcommand("size", "Print the capacity A (rows a rank may receive) and the bytes a group "
                                             "allocates per rank for a configuration, for every rank role");
  cmd->add_option("--ep-world-size", args->config.ep_world_size, "EP ranks (W)")->capture_default_str();
  cmd->add_option("--tp-world-size", args->config.tp_world_size, "TP ranks per EP rank: 0/1 none, 2")->capture_default_str();
  cmd->add_option("--moe-expert-num", args->config.moe_expert_num, "MoE experts (E)")->capture_default_str();
  cmd->add_option("--shared-expert-rank-num", args->config.shared_expert_rank_num, "shared-expert ranks (S)")->capture_default_str();
  cmd->add_option("--shared-expert-num", args->config.shared_expert_num,
                  "shared experts (V2: 0-4, each on S / this many ranks; V1: 1)")
      ->capture_default_str();
  cmd->add_option("--op", args->op, "v1 (npu_moe_distribute_dispatch) or v2 (..._dispatch_v2: another shared-rank A)")
      ->capture_default_str();
  cmd->add_option("--global-bs", args->config.global_bs, "max BS * W, or 0 when every rank has the same BS")->capture_default_str();
  cmd->add_option("--bs", args->bs, "tokens per rank (with --global-bs, the max is global_bs / W)")->capture_default_str();
  cmd->add_option("--topk", args->k, "experts per token (K)")->capture_default_str();
  cmd->add_option("--hidden", args->h, "hidden size (H)")->capture_default_str();
  cmd->add_option("--dtype", args->dtype, "bfloat16 or float16")->capture_default_str();
  cmd->add_option("--quant-mode", args->quant_mode, "0 or 2")->capture_default_str();
  cmd->add_option("--profile", args->profile, "portable, ascend_a3 or ascend_a2")->capture_default_str();
  cmd->callback([args, exit_code] {
    GroupConfig c = args->config;
    if (!profile_from_name(args->profile.c_str(), &c.profile))
      throw CLI::ValidationError("--profile", "must be portable, ascend_a3 or ascend_a2, not '" + args->profile + "'");
    CapacityQuery q;
    q.bs = args->bs;
    q.k = args->k;
    q.h = args->h;
    q.quant_mode = args->quant_mode;
    if (args->op != "v1" && args->op != "v2")
      throw CLI::ValidationError("--op", "must be v1 or v2, not '" + args->op + "'");
    q.version = args->op == "v2" ? 2 : 1;
    if (!dtype_from_name(args->dtype, &q.x_dtype))
      throw CLI::ValidationError("--dtype", "must be bfloat16 or float16, not '" + args->dtype + "'");
    // Compute every role first, so that an invalid configuration prints only its error.
    const int roles = c.shared_expert_rank_num > 0 ? 2 : 1;
    std::vector<CapacityReport> reports;
    for (int role = 0; role < roles; ++role) {
      c.ep_rank_id = role == 0 ? 0 : c.shared_expert_rank_num;  // role 0 is the shared rank when S > 0
      reports.push_back(capacity(c, q));
    }
    std::printf("%-18s %10s %14s %16s %16s %16s\n", "rank role", "A", "expand_x rows", "window bytes", "output bytes",
                "total bytes");
    for (int role = 0; role < roles; ++role) {
      const CapacityReport& r = reports[static_cast<std::size_t>(role)];
      std::printf("%-18s %10lld %14lld %16lld %16lld %16lld\n", roles == 2 && role == 0 ? "shared-expert rank" : "MoE rank",
                  static_cast<long long>(r.A), static_cast<long long>(r.expand_x_rows), static_cast<long long>(r.window_bytes),
                  static_cast<long long>(r.output_bytes), static_cast<long long>(r.total_bytes));
    }
    std::printf("effective global_bs = %lld; the same configuration on Ascend A3 needs HCCL_BUFFSIZE >= %lld MB\n",
                static_cast<long long>(reports.back().global_bs), static_cast<long long>(reports.back().ascend_hccl_buffsize_mb));
    *exit_code = 0;
  });
}

}  // namespace moedist::cli
