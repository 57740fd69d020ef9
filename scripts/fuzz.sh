#!/usr/bin/env bash
# Builds the libFuzzer harnesses (the `fuzz` CMake preset: clang, ASan + UBSan) and runs each for a
# bounded time, starting from its corpus in fuzz/corpus/<name>. New inputs go to a scratch copy, not
# the repository; a crash stops with the harness's report and the input that caused it.
#   scripts/fuzz.sh [SECONDS_PER_HARNESS]   (default 60)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
cmake --preset fuzz >/dev/null
cmake --build --preset fuzz
scratch=$(mktemp -d /tmp/moedist-fuzz-XXXXXX)
trap 'rm -rf "$scratch"' EXIT
status=0
for name in config casefile peers; do
  mkdir -p "$scratch/$name" "$scratch/artifacts-$name"
  cp -r "fuzz/corpus/$name/." "$scratch/$name/"
  log="$scratch/$name.log"
  if build/fuzz/fuzz/fuzz_"$name" -max_total_time="$seconds" -print_final_stats=1 -artifact_prefix="$scratch/artifacts-$name/" \
      "$scratch/$name" >"$log" 2>&1; then
    runs=$(grep -Eo 'Done [0-9]+ runs in [0-9]+ second' "$log" | tail -1 | awk '{print $2 " executions in " $5 " s"}')
    echo "fuzz $name: ${runs:-?}, no crash (corpus: $(ls "fuzz/corpus/$name" | wc -l) inputs)"
  else
    status=1
    echo "fuzz $name: CRASH"
    grep -E 'ERROR|SUMMARY|runtime error|Test unit written' "$log" | head -20
    crash=$(ls "$scratch/artifacts-$name"/* 2>/dev/null | head -1)
    if [[ -n $crash ]]; then
      mkdir -p build/fuzz/crashes && cp "$crash" build/fuzz/crashes/
      echo "the input is kept in build/fuzz/crashes/$(basename "$crash"); fix the bug and add it to fuzz/corpus/$name"
    fi
  fi
done
exit $status
