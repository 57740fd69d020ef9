// What the extension's bindings share: the GIL released around collective calls, and a configuration
// from the package's dict of torch_npu's int parameters.
#pragma once

#include <cxxabi.h>
#include <pybind11/pybind11.h>
#include <unistd.h>

#include "moedist/config.h"

namespace moedist::python {

// Releases the GIL for a collective call, as py::gil_scoped_release does, and takes it back at the end of
// the scope -- except on a daemon thread whose interpreter is finalizing: CPython then ends the thread
// inside PyEval_RestoreThread with pthread_exit, whose forced unwinding may not leave a destructor (that
// is std::terminate: the whole process aborts at exit). Such a thread is parked instead, holding nothing
// of Python's, until the main thread's exit ends the process.
class WithoutGil {
 public:
  WithoutGil() : state_(PyEval_SaveThread()) {}
  WithoutGil(const WithoutGil&) = delete;
  WithoutGil& operator=(const WithoutGil&) = delete;
  ~WithoutGil() {
    try {
      PyEval_RestoreThread(state_);
    } catch (abi::__forced_unwind&) {  // never leaves the handler: the process is exiting
      for (;;) pause();
    }
  }

 private:
  PyThreadState* state_;
};

// The GroupConfig of the package's configuration dict (keys as torch_npu names the parameters; a
// missing key keeps GroupConfig's default). A value out of its field's range is a ValidationError.
GroupConfig config_from(const pybind11::dict& d);

}  // namespace moedist::python
