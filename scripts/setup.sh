#!/usr/bin/env bash
# Installs the Debian packages moedist needs to build and test, when any is missing.
# Safe to run again: it does nothing when everything is there.
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config   # toolchain
  libgtest-dev libgmock-dev                      # tests
  libopenblas-dev                                # expert matmuls of `moedist demo`
  nlohmann-json3-dev                             # case files (safetensors headers)
  libcli11-dev                                   # the command-line tool
  libopenmpi-dev openmpi-bin                     # the MPI transport, its tests and `moedist bench`'s MPI baseline
  iproute2                                       # `ip netns`: the real-host tests (tests/netns/, need root)
  python3-dev pybind11-dev python3-pybind11      # the Python package (python/)
  python3-numpy python3-torch python3-mpi4py     # its tensors and communicators
  python3-pytest python3-pip python3-setuptools python3-wheel python3-venv  # its tests and pip install
  clang libclang-rt-14-dev                       # the libFuzzer harnesses (fuzz/, scripts/fuzz.sh)
  clang-format clang-tidy                        # scripts/check_style.sh: the style of the lines a change touches
  libbenchmark-dev                               # kernel micro-benchmarks (optional: moedist_micro_bench)
  gnuplot-nox                                    # `moedist bench --plot` (optional)
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if ((${#missing[@]} == 0)); then
  echo "setup: all build and test dependencies are installed"
  exit 0
fi

echo "setup: installing ${missing[*]}"
as_root=()
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null || { echo "setup: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
  as_root=(sudo)
fi
"${as_root[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
