#!/usr/bin/env bash
# Runs tests/mpi/mpi_fault JOBS times (8 ranks each, 5 kills per job) under `mpirun --enable-recovery`
# and checks that every job reports every survivor naming every victim and a correct group afterwards.
#   fault_injection.sh PROGRAM JOBS
set -uo pipefail
program=$1 jobs=$2
command -v mpirun >/dev/null || { echo "skipped: mpirun is not in PATH"; exit 77; }
kills=0 failed=0
for ((j = 1; j <= jobs; j++)); do
  out=$(timeout 120 mpirun --oversubscribe --enable-recovery -np 8 "$program" --seed "$j" --timeout-ms 3000 2>&1)
  summary=$(grep -m1 '^mpi faults:' <<<"$out")
  if [[ $summary == *"every survivor named the victim"*"matched the oracle"* ]]; then
    kills=$((kills + $(sed -E 's/^mpi faults: ([0-9]+) kills.*/\1/' <<<"$summary")))
    echo "job $j: $summary"
  else
    failed=$((failed + 1))
    echo "job $j FAILED:"; grep -E 'WRONG|failed|^mpi faults' <<<"$out" | head -20
  fi
done
echo "fault injection over MPI: $kills kills in $jobs jobs, $failed jobs failed"
[[ $failed -eq 0 && $kills -ge 100 ]]
