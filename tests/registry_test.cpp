// The transport registry (src/transport/registry.h): one entry per TransportId, in id order, names
// unique and found by name, and availability as this build has it (MPI only with MOEDIST_HAVE_MPI).
#include "transport/registry.h"

#include <gtest/gtest.h>

#include <set>
#include <string>

#include "moedist/error.h"

namespace moedist {
namespace {

TEST(Registry, EveryKindIsFoundByItsNameAndId) {
  std::set<std::string> names;
  int index = 0;
  for (const TransportKind& kind : transport_kinds()) {
    EXPECT_EQ(static_cast<int>(kind.id), index++) << kind.name;
    EXPECT_TRUE(names.insert(std::string(kind.name)).second) << "duplicate name " << kind.name;
    EXPECT_EQ(find_transport(kind.name), &kind);
    EXPECT_EQ(&transport_kind(kind.id), &kind);
    EXPECT_FALSE(kind.description.empty()) << kind.name;
    EXPECT_EQ(kind.available, kind.why_unavailable.empty()) << kind.name;
    EXPECT_EQ(kind.ranks == RankModel::launcher, !kind.launcher.empty()) << kind.name;
  }
  EXPECT_EQ(transport_names().size(), names.size());
  EXPECT_EQ(find_transport("no-such-transport"), nullptr);
}

TEST(Registry, AvailabilityIsThisBuilds) {
  EXPECT_TRUE(transport_kind(TransportId::inproc).available);
  EXPECT_TRUE(transport_kind(TransportId::shm).available);
  const TransportKind& mpi = transport_kind(TransportId::mpi);
#ifdef MOEDIST_HAVE_MPI
  EXPECT_TRUE(mpi.available);
  EXPECT_NO_THROW(require_available(mpi, "--transport mpi"));
#else
  EXPECT_FALSE(mpi.available);
  try {
    require_available(mpi, "--transport mpi");
    ADD_FAILURE() << "a build without MPI accepted the mpi transport";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::unsupported);
    EXPECT_NE(std::string(e.what()).find("--transport mpi: this moedist was built without MPI support"),
              std::string::npos)
        << e.what();
  }
#endif
}

}  // namespace
}  // namespace moedist
