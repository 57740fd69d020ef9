// `--transport mpi` of the CLI: the command runs under mpirun, one process per rank. Each rank writes its
// result to a local file; the files travel to rank 0 over MPI (so no shared file system is needed), and
// rank 0 reports for all. Built only with MPI.
#pragma once

#include <functional>
#include <string>

namespace moedist::cli {

// MPI for the length of one command: initialized (unless the process already did) on construction,
// finalized on destruction.
class MpiSession {
 public:
  MpiSession();
  ~MpiSession();
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;
  int rank() const noexcept { return rank_; }
  int size() const noexcept { return size_; }

 private:
  int rank_ = 0, size_ = 1;
  bool owns_ = false;
};

// Collective. Every rank calls produce(path) to write its result to a local file; rank 0 then calls
// consume(g, path) for every rank g in order with a copy of that rank's file. A rank whose produce throws
// sends its error instead; rank 0 then raises the first rank's own error (preferring it over the
// peer_failed, peer_lost and timeout errors it caused elsewhere) with its code and message (produce
// names its rank in it), after every rank's result arrived. Returns on the other ranks as soon as their
// part is sent.
void gather_rank_files(const std::function<void(const std::string& path)>& produce,
                       const std::function<void(int g, const std::string& path)>& consume);

// Collective: rank 0's exit status, on every rank (so that mpirun's status is the report's).
int share_exit_status(int status_on_rank0);

// Runs a command's rank-0 report: returns its status, or prints an error the way main() does and returns 2.
int report_or_error(const std::function<int()>& report);

}  // namespace moedist::cli
