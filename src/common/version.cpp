#include "moedist/version.h"

#include <string>

#ifdef MOEDIST_HAVE_MPI
#include <mpi.h>
#endif

namespace moedist {
const char* version_string() noexcept {
#ifdef MOEDIST_HAVE_MPI
  // The MPI library's own name and version (callable before MPI_Init), e.g. "Open MPI v4.1.4, ...".
  static const std::string text = [] {
    char library[MPI_MAX_LIBRARY_VERSION_STRING] = {};
    int len = 0;
    std::string name = MPI_Get_library_version(library, &len) == MPI_SUCCESS
                           ? std::string(library, static_cast<std::size_t>(len))
                           : "";
    name = name.substr(0, name.find(','));
    while (!name.empty() && (name.back() == '\n' || name.back() == ' ')) name.pop_back();
    return std::string(MOEDIST_VERSION " (transports: inproc, shm, mpi; MPI support on: ") + name +
           ", " MOEDIST_MPI_SUMMARY ")";
  }();
  return text.c_str();
#else
  return MOEDIST_VERSION " (transports: inproc, shm; MPI support off: built without MPI)";
#endif
}
}  // namespace moedist
