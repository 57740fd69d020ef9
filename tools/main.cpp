// The `moedist` command-line tool.
#include <cstdio>
#include <exception>

#include "commands.h"
#include "moedist/error.h"
#include "moedist/version.h"

namespace moedist::cli {
void require_transport_built(const std::string& transport) {
#ifndef MOEDIST_HAVE_MPI
  if (transport == "mpi") {
    throw Error(ErrorCode::unsupported, "--transport mpi: this moedist was built without MPI support (`moedist --version` says so); "
                                        "install Open MPI (Debian: libopenmpi-dev openmpi-bin) and rebuild");
  }
#else
  (void)transport;
#endif
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
