// Subcommands of the `moedist` tool. Each add_* function registers its subcommand (with its flags and
// --help text) on the app; when the subcommand runs, it stores its exit status in *exit_code.
#pragma once

#include <CLI/CLI.hpp>
#include <string>
#include <vector>

namespace moedist::cli {

// The values of --transport. "mpi" is always accepted, so that a build without MPI can say so.
inline std::vector<std::string> transport_names() { return {"inproc", "shm", "mpi"}; }
// Throws ErrorCode::unsupported for --transport mpi in a build without MPI.
void require_transport_built(const std::string& transport);

void add_demo(CLI::App& app, int* exit_code);
void add_replay(CLI::App& app, int* exit_code);
void add_size(CLI::App& app, int* exit_code);
void add_launch(CLI::App& app, int* exit_code);

}  // namespace moedist::cli

namespace moedist::cli {
void add_bench(CLI::App& app, int* exit_code);
}  // namespace moedist::cli
