// The `moedist` command-line tool.
#include <cstdio>
#include <exception>

#include "commands.h"
#include "moedist/error.h"
#include "moedist/version.h"

namespace moedist::cli {
std::string transport_help(std::string_view command, std::string_view args, std::string_view note) {
  std::string text = "where ranks run:";
  const char* separator = " ";
  for (const TransportKind& kind : transport_kinds()) {
    text += separator;
    text += std::string(kind.name) + ", ";
    if (kind.ranks == RankModel::launcher) {
      text += "this process is one rank of `" + std::string(kind.launcher) + " moedist " + std::string(command) +
              " --transport " + std::string(kind.name) + std::string(args) + "` (" + std::string(note) + ")";
    } else {
      text += kind.description;
    }
    separator = "; ";
  }
  return text;
}

const TransportKind& require_transport_built(const std::string& transport) {
  const TransportKind* kind = find_transport(transport);
  if (kind == nullptr) throw Error(ErrorCode::invalid_argument, "--transport " + transport + ": no such transport");
  require_available(*kind, "--transport " + transport);
  return *kind;
}
}  // namespace moedist::cli

int main(int argc, char** argv) {
  CLI::App app{"moedist: MoE expert-parallel dispatch/combine with the semantics of Ascend's "
               "npu_moe_distribute_dispatch / npu_moe_distribute_combine, on CPUs."};
  app.require_subcommand(1);
  app.set_version_flag("--version", std::string("moedist ") + moedist::version_string());
  int exit_code = 0;
  moedist::cli::add_demo(app, &exit_code);
  moedist::cli::add_replay(app, &exit_code);
  moedist::cli::add_size(app, &exit_code);
  moedist::cli::add_launch(app, &exit_code);
  moedist::cli::add_bench(app, &exit_code);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const moedist::Error& e) {
    std::fprintf(stderr, "moedist: error (%s): %s\n", moedist::error_code_name(e.code()), e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moedist: error: %s\n", e.what());
    return 2;
  }
  return exit_code;
}
