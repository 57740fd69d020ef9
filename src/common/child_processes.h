// Runs a function in forked child processes, all at once, and collects what each returned. For tests
// and benchmarks whose ranks must be processes (a process that initialized CUDA cannot fork ranks that
// use it, so even a single probe of the device runs in a child).
#pragma once

#include <functional>
#include <string>
#include <vector>

namespace moedist {

struct ChildResult {
  bool finished = false;  // body returned (or threw) and the child exited; false: the child died first
  std::string text;       // what body returned, or "exception: <what>" when it threw
  int wait_status = 0;    // waitpid's status
};

// body(i) runs in child i of n; the parent waits for all of them.
std::vector<ChildResult> run_in_children(int n, const std::function<std::string(int)>& body);

}  // namespace moedist
