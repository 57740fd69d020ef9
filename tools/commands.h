// Subcommands of the `moedist` tool. Each add_* function registers its subcommand (with its flags and
// --help text) on the app; when the subcommand runs, it stores its exit status in *exit_code.
#pragma once

#include <CLI/CLI.hpp>

namespace moedist::cli {

void add_demo(CLI::App& app, int* exit_code);
void add_replay(CLI::App& app, int* exit_code);
void add_size(CLI::App& app, int* exit_code);
void add_launch(CLI::App& app, int* exit_code);

}  // namespace moedist::cli

namespace moedist::cli {
void add_bench(CLI::App& app, int* exit_code);
}  // namespace moedist::cli
