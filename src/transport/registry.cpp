#include "transport/registry.h"

#include <string>

#include "moedist/error.h"

namespace moedist {

namespace {

#ifdef MOEDIST_HAVE_MPI
constexpr bool kHaveMpi = true;
constexpr std::string_view kNoMpi;
#else
constexpr bool kHaveMpi = false;
constexpr std::string_view kNoMpi =
    "this moedist was built without MPI support (`moedist --version` says so); install Open MPI (Debian: "
    "libopenmpi-dev openmpi-bin) and rebuild";
#endif

// In the order the CLI lists them. The ids index this array (transport_kind relies on it).
constexpr TransportKind kKinds[] = {
    {TransportId::inproc, "inproc", "a thread per rank in this process", RankModel::threads, "", true, ""},
    {TransportId::shm, "shm",
     "a process per rank (started like `moedist launch` does), connected through shared memory",
     RankModel::local_processes, "", true, ""},
    {TransportId::mpi, "mpi", "the processes of mpirun, on one or more hosts", RankModel::launcher, "mpirun -np N",
     kHaveMpi, kNoMpi},
};

static_assert(static_cast<int>(TransportId::inproc) == 0 && static_cast<int>(TransportId::shm) == 1 &&
              static_cast<int>(TransportId::mpi) == 2);

}  // namespace

std::span<const TransportKind> transport_kinds() noexcept { return kKinds; }

const TransportKind* find_transport(std::string_view name) noexcept {
  for (const TransportKind& kind : kKinds) {
    if (kind.name == name) return &kind;
  }
  return nullptr;
}

const TransportKind& transport_kind(TransportId id) noexcept { return kKinds[static_cast<int>(id)]; }

std::vector<std::string> transport_names() {
  std::vector<std::string> names;
  for (const TransportKind& kind : kKinds) names.emplace_back(kind.name);
  return names;
}

void require_available(const TransportKind& kind, std::string_view what) {
  if (!kind.available)
    throw Error(ErrorCode::unsupported, std::string(what) + ": " + std::string(kind.why_unavailable));
}

}  // namespace moedist
