#!/usr/bin/env bash
# The one prepared run for a lent GPU machine (the `device` tool, 15 minutes per session): builds the
# CUDA backend for Hopper (sm_90), runs the GPU suite and the benchmarks, and leaves in $OUT a summary,
# the benchmark JSON files, the report table and one archive of every log (the tool returns at most 8
# files), with the summary table printed last.
#
# Here, once (a Debian machine with apt):  scripts/gpu_session.sh --prepare
#   fetches the two build dependencies the device image lacks (GoogleTest, nlohmann-json) as .deb files
#   into .devdeps/, which .git/info/exclude keeps out of git.
# Then through the device tool:  command "bash scripts/gpu_session.sh", carry [".devdeps"], timeout_s 600.
# A second call, when the device budget still has about 8 minutes (its steps are limited to 430 s in all):
#   command "bash scripts/gpu_session.sh --python", carry [".devdeps"], timeout_s 450:
#   builds the Python extension with the CUDA backend for the image's python3 (which holds torch with CUDA)
#   and runs the package's CUDA path with torch CUDA tensors: python/tests/cuda_path_check.py torch (random
#   cases against the oracle, the typed errors) and the operator page's eager example on the GPU.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
  mkdir -p .devdeps
  grep -qx '/.devdeps/' .git/info/exclude 2>/dev/null || echo '/.devdeps/' >> .git/info/exclude
  (cd .devdeps && apt-get download libgtest-dev nlohmann-json3-dev) || exit 1
  ls -la .devdeps
  exit 0
fi

OUT=${OUT:-/tmp/moedist-gpu-out}
LOGS=/tmp/moedist-gpu-logs
mkdir -p "$OUT" "$LOGS"
log() { echo "== $(date +%T) $*" | tee -a "$OUT/summary.txt"; }
status=0
step() {  # step NAME SECONDS COMMAND...: runs with a time limit, logs to $LOGS/NAME.log, records the outcome
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  log "$name: exit $rc after $((SECONDS - start)) s ($(tail -n 1 "$LOGS/$name.log"))"
  [ $rc -eq 0 ] || status=1
  return $rc
}
finish() {
  tar czf "$OUT/logs.tgz" -C "$LOGS" . 2>/dev/null
  echo
  grep -h "MISMATCH\|FAIL" "$LOGS"/gpu_*.log 2>/dev/null | head -n 20
  cat "$OUT/summary.txt"
  [ -f "$OUT/report.md" ] && cat "$OUT/report.md"
  exit $status
}

log "start on $(hostname)"
# compute_mode must be Default: several ranks (processes) share the GPU.
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_mode,clocks.sm,clocks.mem --format=csv | tee -a "$OUT/summary.txt"
nvcc_bin=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
{ "$nvcc_bin" --version | tail -n 2; c++ --version | head -n 1; cmake --version | head -n 1; } | tee -a "$OUT/summary.txt"

prefix=$PWD/.devdeps/root
if ls .devdeps/*.deb > /dev/null 2>&1; then
  for f in .devdeps/*.deb; do dpkg -x "$f" "$prefix"; done
fi
if [ "${1:-}" = "--python" ]; then
  py=$(command -v python3)
  step py_configure 60 cmake -S . -B build/gpu-python -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DCMAKE_CUDA_COMPILER="$nvcc_bin" -DMOEDIST_WITH_MPI=OFF -DMOEDIST_BUILD_TESTS=OFF -DMOEDIST_BUILD_TOOLS=OFF \
    -DMOEDIST_WERROR=OFF -DPython3_EXECUTABLE="$py" -DCMAKE_PREFIX_PATH="$prefix/usr" \
    -Dnlohmann_json_DIR="$prefix/usr/share/cmake/nlohmann_json" || { cat "$LOGS/py_configure.log"; finish; }
  grep -q "Python package ON" "$LOGS/py_configure.log" || { log "no Python package in this build (see py_configure.log)"; status=1; finish; }
  step py_build 120 cmake --build build/gpu-python --parallel 16 --target moedist_python || { tail -n 40 "$LOGS/py_build.log"; finish; }
  step py_cuda_path 150 env PYTHONPATH=build/gpu-python/python PYTHONUNBUFFERED=1 "$py" python/tests/cuda_path_check.py torch
  step py_example 100 env PYTHONPATH=build/gpu-python/python PYTHONUNBUFFERED=1 MOEDIST_EXAMPLE_DEVICE=cuda \
    "$py" examples/torch_npu_example.py
  finish
fi

# MOEDIST_WERROR=OFF: this image's compiler is not the one CI checks warnings with.
step configure 60 cmake -S . -B build/gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 \
  -DCMAKE_CUDA_COMPILER="$nvcc_bin" -DMOEDIST_WITH_MPI=OFF -DMOEDIST_BUILD_PYTHON=OFF -DMOEDIST_BUILD_TOOLS=OFF \
  -DMOEDIST_WERROR=OFF -DCMAKE_PREFIX_PATH="$prefix/usr" -DGTest_DIR="$prefix/usr/lib/x86_64-linux-gnu/cmake/GTest" \
  -Dnlohmann_json_DIR="$prefix/usr/share/cmake/nlohmann_json" || { cat "$LOGS/configure.log"; finish; }
step build 130 cmake --build build/gpu --parallel 16 --target cuda_oracle_check cuda_host_test cuda_protocol_test \
  cuda_row_math_test moedist_cuda_bench || { tail -n 40 "$LOGS/build.log"; finish; }
"$nvcc_bin" --resource-usage -arch=sm_90 -std=c++17 --fmad=false -Iinclude -Isrc -c src/cuda/kernels.cu -o /tmp/k.o \
  > "$LOGS/resource_usage.txt" 2>&1 || true
grep -A2 "Function properties for .*moedist" "$LOGS/resource_usage.txt" | grep -E "spill|Used" | sort | uniq -c | tee -a "$OUT/summary.txt"

# The limits add up to under 600 s (the device tool's per-call limit); a step that hangs is cut off at its
# limit and the next one runs. Every program prints line by line, so a cut-off step keeps what it found.
step cpu_protocol 20 build/gpu/tests/cuda_protocol_test
step cpu_row_math 20 build/gpu/tests/cuda_row_math_test
step host 20 build/gpu/tests/cuda_host_test
step gpu_errors 60 build/gpu/tests/cuda_oracle_check --errors
if grep -q "through CUDA IPC\|cudaErrorInsufficientDriver\|no usable CUDA device" "$LOGS/gpu_errors.log"; then
  log "no usable device, or ranks cannot share it (see gpu_errors.log in logs.tgz): the multi-rank steps are skipped"
  finish
fi
step gpu_oracle 110 build/gpu/tests/cuda_oracle_check --cases 24
step bench 100 build/gpu/bench/moedist_cuda_bench --json "$OUT/cuda_bench.json"
nvidia-smi --query-gpu=clocks.sm,clocks.mem --format=csv | tee -a "$OUT/summary.txt"
step torch_eager 50 env PYTHONUNBUFFERED=1 python3 bench/torch_eager_baseline.py --json "$OUT/torch_eager.json"
if [ -f "$OUT/cuda_bench.json" ]; then
  if [ -f "$OUT/torch_eager.json" ]; then
    python3 bench/cuda_report.py "$OUT/cuda_bench.json" "$OUT/torch_eager.json" > "$OUT/report.md"
  else
    python3 bench/cuda_report.py "$OUT/cuda_bench.json" > "$OUT/report.md"
  fi
fi
finish
