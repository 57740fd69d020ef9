#!/usr/bin/env bash
# The Python package under torch 2.13: the pytest suite (python/tests, but for test_packaging.py) and mypy over the package, in
# a virtual environment of Debian's /usr/bin/python3 (the interpreter the build's extension is made for)
# with the pinned packages of python/requirements-torch2.txt. ctest's python.pytest runs the same suite
# with Debian's torch 1.13; this is the second torch version CI tests.
#
# Usage: scripts/python_torch2.sh [BUILD_DIR]   (default build/release, built by its workflow first)
# The environment is made in build/venv-torch2 and reused while the requirements are unchanged. torch is
# taken only from this machine's disk (pip's find-links, e.g. /opt/wheels): never PyPI's multi-GB CUDA
# build. The other packages come from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
build=$(realpath "${1:-build/release}")
python=/usr/bin/python3
venv=build/venv-torch2
requirements=python/requirements-torch2.txt
torch_version=2.13.0

if [[ ! -f $build/python/moedist/__init__.py ]] || ! compgen -G "$build/python/moedist/_moedist*.so" >/dev/null; then
  echo "python_torch2: no built package in $build/python (run: cmake --workflow --preset release)" >&2
  exit 1
fi

start=$SECONDS
if [[ ! -x $venv/bin/python ]] || ! cmp -s "$requirements" "$venv/requirements.txt"; then
  echo "python_torch2: making $venv (torch $torch_version, $requirements)"
  rm -rf "$venv"
  "$python" -m venv "$venv"
  if ! "$venv/bin/pip" install --quiet --no-index --no-deps "torch==$torch_version"; then
    echo "python_torch2: torch $torch_version is not on this machine's disk (pip's find-links: $("$venv/bin/pip" config get global.find-links 2>/dev/null || echo none)); this step needs a machine whose image carries its CPU wheel" >&2
    exit 1
  fi
  "$venv/bin/pip" install --quiet --only-binary=:all: -r "$requirements"
  cp "$requirements" "$venv/requirements.txt"  # the environment is complete: reuse it next time
fi
"$venv/bin/python" -c "import torch; v = torch.__version__; assert v.split('+')[0] == '$torch_version', v; print('python_torch2: torch', v, 'from', torch.__file__)"

# test_packaging.py is left out: it makes its own fresh torch 2.13 environments whatever interpreter runs
# it, so a second run here would test nothing new (about four minutes); ctest's python.pytest runs it.
echo "python_torch2: pytest python/tests with torch $torch_version (test_packaging.py: see ctest's python.pytest)"
env PYTHONPATH="$build/python" MOEDIST_SOURCE_DIR="$PWD" MOEDIST_BUILD_DIR="$build" \
  OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
  "$venv/bin/python" -m pytest -q -p no:cacheprovider python/tests --ignore=python/tests/test_packaging.py -rs \
  | tee "$venv/pytest.log"
# As ctest's python.pytest: only the mpi4py tests may skip, in a build without MPI.
has_mpi=$(PYTHONPATH="$build/python" "$venv/bin/python" -c "import moedist; print(int(moedist.has_mpi))")
if [[ $has_mpi == 1 ]] && grep -qE "[0-9]+ skipped" "$venv/pytest.log"; then
  echo "python_torch2: tests were skipped under torch $torch_version (see above)" >&2
  exit 1
fi

echo "python_torch2: mypy (pyproject.toml's [tool.mypy]) over python/moedist"
"$venv/bin/mypy" --python-executable "$venv/bin/python"
echo "python_torch2: done in $((SECONDS - start)) s"
