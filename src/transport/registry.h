// The transports of moedist, in one list: their names (the CLI's --transport values, the benchmark's
// columns, the Python package's world kinds), whether this build has each, and how its ranks join.
// Every other place that picks a transport looks it up here and switches on TransportId, so adding a
// transport is one entry in registry.cpp (docs/architecture.md, "Adding a transport").
#pragma once

#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace moedist {

enum class TransportId {
  inproc,  // threads of one process (InProcessWorld)
  shm,     // processes on one host over shared memory (join_shm)
  mpi,     // the processes of an MPI communicator, on one or more hosts (join_mpi)
};

// How the ranks of a transport come to be, which decides how a tool starts them.
enum class RankModel {
  threads,          // the caller runs every rank as a thread of its own process
  local_processes,  // the caller starts a process per rank on this host (as `moedist launch` does)
  launcher,         // an outside launcher (mpirun) started the processes; each is one rank
};

struct TransportKind {
  TransportId id;
  std::string_view name;         // the --transport value and the Python world kind
  std::string_view description;  // one phrase, for help texts ("a thread per rank in this process")
  RankModel ranks;
  std::string_view launcher;         // RankModel::launcher: the command that starts the ranks ("mpirun -np N")
  bool available;                    // built into this moedist
  std::string_view why_unavailable;  // "" when available; else what to install or rebuild with
};

// Every transport moedist knows, the ones this build lacks included (so that asking for one can say
// why it is missing rather than that it does not exist).
std::span<const TransportKind> transport_kinds() noexcept;
// The entry of `name`, or nullptr when no transport has that name.
const TransportKind* find_transport(std::string_view name) noexcept;
const TransportKind& transport_kind(TransportId id) noexcept;
inline std::string_view transport_name(TransportId id) noexcept { return transport_kind(id).name; }
// The names, in list order (for CLI11's IsMember and help texts).
std::vector<std::string> transport_names();

// Throws moedist::Error (ErrorCode::unsupported) "<what>: <why_unavailable>" when this build lacks it.
void require_available(const TransportKind& kind, std::string_view what);

}  // namespace moedist
