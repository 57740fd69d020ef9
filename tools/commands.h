// Subcommands of the `moedist` tool. Each add_* function registers its subcommand (with its flags and
// --help text) on the app; when the subcommand runs, it stores its exit status in *exit_code.
#pragma once

#include <CLI/CLI.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "transport/registry.h"

namespace moedist::cli {

// The values of --transport: every transport of the registry, also those this build lacks, so that
// asking for one says why it is missing (require_transport_built).
inline std::vector<std::string> transport_names() { return moedist::transport_names(); }
// The --transport help, from the registry: each transport and what it runs ranks as. A transport whose
// ranks an outside launcher starts is shown as `<launcher> moedist <command> --transport <name><args>`,
// followed by `note`.
std::string transport_help(std::string_view command, std::string_view args, std::string_view note);
// The registry's entry of a --transport value; throws ErrorCode::unsupported when this build lacks it.
const TransportKind& require_transport_built(const std::string& transport);

void add_demo(CLI::App& app, int* exit_code);
void add_replay(CLI::App& app, int* exit_code);
void add_size(CLI::App& app, int* exit_code);
void add_launch(CLI::App& app, int* exit_code);

}  // namespace moedist::cli

namespace moedist::cli {
void add_bench(CLI::App& app, int* exit_code);
}  // namespace moedist::cli
