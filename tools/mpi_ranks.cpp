#include "mpi_ranks.h"

#include <mpi.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <vector>

#include "moedist/error.h"

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

// A private directory, removed with everything in it.
struct TempDir {
  TempDir() {
    std::string pattern = (fs::temp_directory_path() / "moedist-mpi-XXXXXX").string();
    if (::mkdtemp(pattern.data()) == nullptr) throw Error(ErrorCode::internal, "cannot create a temporary directory in " + fs::temp_directory_path().string());
    path = pattern;
  }
  ~TempDir() {
    std::error_code ignored;
    fs::remove_all(path, ignored);
  }
  fs::path path;
};

std::string read_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// A payload: one status byte ('R' result, else an ErrorCode) then the file or the error message.
bool is_consequence(ErrorCode code) {
  return code == ErrorCode::peer_failed || code == ErrorCode::peer_lost || code == ErrorCode::timeout;
}

}  // namespace

void gather_rank_files(const std::function<void(const std::string& path)>& produce,
                       const std::function<void(int g, const std::string& path)>& consume) {
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  const TempDir dir;
  std::string payload;
  try {
    const fs::path mine = dir.path / "result";
    produce(mine.string());
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
  int first_error = -1;
  for (int g = 0; g < size; ++g) {
    const char status = all[static_cast<std::size_t>(offsets[static_cast<std::size_t>(g)])];
    if (status == 'R') continue;
    if (first_error < 0 || (is_consequence(static_cast<ErrorCode>(all[static_cast<std::size_t>(offsets[static_cast<std::size_t>(first_error)])])) &&
                            !is_consequence(static_cast<ErrorCode>(status)))) {
      first_error = g;
    }
  }
  if (first_error >= 0) {
    const std::size_t at = static_cast<std::size_t>(offsets[static_cast<std::size_t>(first_error)]);
    throw Error(static_cast<ErrorCode>(all[at]), all.substr(at + 1, static_cast<std::size_t>(sizes[static_cast<std::size_t>(first_error)]) - 1));
  }
  for (int g = 0; g < size; ++g) {
    const fs::path copy = dir.path / ("rank" + std::to_string(g));
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
