#include "mpi_ranks.h"

#include <mpi.h>

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <vector>

#include "moedist/error.h"
#include "process/rank_processes.h"

namespace moedist::cli {

namespace fs = std::filesystem;

MpiSession::MpiSession() {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (initialized == 0) {
    int provided = 0;
    MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided);
    owns_ = true;
  }
  MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
  MPI_Comm_size(MPI_COMM_WORLD, &size_);
}

MpiSession::~MpiSession() {
  if (owns_) MPI_Finalize();
}

namespace {

std::string read_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

}  // namespace

void gather_rank_files(const std::function<void(const std::string& path)>& produce,
                       const std::function<void(int g, const std::string& path)>& consume) {
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  const process::TempDir dir("moedist-mpi");
  std::string payload;
  try {
    // A payload: one status byte ('R' result, else an ErrorCode) then the file or the error message.
    const std::string mine = process::result_file(dir.path(), rank);
    produce(mine);
    payload = "R" + read_file(mine);
  } catch (const Error& e) {
    payload = std::string(1, static_cast<char>(e.code())) + e.what();
  } catch (const std::exception& e) {
    payload = std::string(1, static_cast<char>(ErrorCode::internal)) + e.what();
  }
  const int bytes = static_cast<int>(payload.size());
  std::vector<int> sizes(static_cast<std::size_t>(size)), offsets(static_cast<std::size_t>(size));
  MPI_Gather(&bytes, 1, MPI_INT, sizes.data(), 1, MPI_INT, 0, MPI_COMM_WORLD);
  std::string all;
  if (rank == 0) {
    long long total = 0;
    for (int g = 0; g < size; ++g) {
      offsets[static_cast<std::size_t>(g)] = static_cast<int>(total);
      total += sizes[static_cast<std::size_t>(g)];
    }
    if (total > 0x7fffffff) throw Error(ErrorCode::capacity, "the ranks' results exceed 2 GiB, more than one MPI gather can carry");
    all.resize(static_cast<std::size_t>(total));
  }
  MPI_Gatherv(payload.data(), bytes, MPI_CHAR, all.data(), sizes.data(), offsets.data(), MPI_CHAR, 0, MPI_COMM_WORLD);
  if (rank != 0) return;
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(size));
  for (int g = 0; g < size; ++g) {
    const std::size_t at = static_cast<std::size_t>(offsets[static_cast<std::size_t>(g)]);
    if (all[at] == 'R') continue;
    errors[static_cast<std::size_t>(g)] = std::make_exception_ptr(
        Error(static_cast<ErrorCode>(all[at]),
              all.substr(at + 1, static_cast<std::size_t>(sizes[static_cast<std::size_t>(g)]) - 1)));
  }
  const int first_error = process::root_cause(errors);
  if (first_error >= 0) std::rethrow_exception(errors[static_cast<std::size_t>(first_error)]);
  for (int g = 0; g < size; ++g) {
    const fs::path copy = process::rank_file(dir.path(), g, "");
    std::ofstream(copy, std::ios::binary)
        .write(all.data() + offsets[static_cast<std::size_t>(g)] + 1, sizes[static_cast<std::size_t>(g)] - 1);
    consume(g, copy.string());
  }
}

int report_or_error(const std::function<int()>& report) {
  try {
    return report();
  } catch (const Error& e) {
    std::fprintf(stderr, "moedist: error (%s): %s\n", error_code_name(e.code()), e.what());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moedist: error: %s\n", e.what());
  }
  return 2;
}

int share_exit_status(int status_on_rank0) {
  int status = status_on_rank0;
  MPI_Bcast(&status, 1, MPI_INT, 0, MPI_COMM_WORLD);
  return status;
}

}  // namespace moedist::cli
