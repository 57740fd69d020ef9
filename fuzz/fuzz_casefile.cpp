// Fuzzes the case-file reader (safetensors header, metadata, tensor table and the case rules): any bytes
// must give a Case or a moedist::Error, never a crash or an out-of-bounds read.
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "casefile/case_file.h"
#include "moedist/error.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static const int fd = ::memfd_create("moedist-fuzz-case", 0);  // one in-memory file, rewritten per input
  if (fd < 0 || ::ftruncate(fd, 0) != 0 || ::pwrite(fd, data, size, 0) != static_cast<ssize_t>(size)) __builtin_trap();
  const std::string path = "/proc/self/fd/" + std::to_string(fd);
  try {
    const moedist::casefile::Case c = moedist::casefile::read_case(path);
    (void)c;
  } catch (const moedist::Error&) {
  }
  return 0;
}
