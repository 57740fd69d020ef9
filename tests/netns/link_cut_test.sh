#!/usr/bin/env bash
# A host's link goes down mid-run: every rank, on both sides of the cut, must fail with a clear error
# (a timeout naming a rank it waited for) within the timeout, none may hang or crash.
#   link_cut_test.sh HOSTS RANKS_PER_HOST CUT_HOST TIMEOUT_MS PROGRAM
set -euo pipefail
hosts=$1 per_host=$2 cut_host=$3 timeout_ms=$4 program=$5
here=$(cd "$(dirname "$0")" && pwd)
shared=$(mktemp -d /tmp/moedist-linkcut-XXXXXX)
trap 'rm -rf "$shared"' EXIT

set +e
"$here/netns_mpi.sh" --hosts "$hosts" --ranks-per-host "$per_host" --timeout 90 --shared-dir "$shared" \
  --cut-host "$cut_host" --cut-after-file cut-now -- "$program" --timeout-ms "$timeout_ms" --calls-before-cut 20 --max-seconds 40
status=$?
set -e
[[ $status -eq 77 ]] && exit 77
echo "link_cut_test: harness exit status $status (123: ranks gone, mpirun stuck on the cut host, as expected)"

ranks=$((hosts * per_host))
limit_ms=$((timeout_ms + 3000))  # the timeout, plus the part of the last call that completed before it (and a loaded machine)
failed=0
for ((r = 0; r < ranks; r++)); do
  file="$shared/rank-$r.txt"
  if [[ ! -s $file ]]; then
    echo "link_cut_test: rank $r wrote no report"; failed=1; continue
  fi
  line=$(cat "$file")
  echo "$line"
  if [[ $line != *"FAILED after"* ]]; then echo "link_cut_test: rank $r did not fail"; failed=1; continue; fi
  if [[ $line != *"timed out after $timeout_ms ms"*"waiting for rank"* && $line != *": peer_failed: "* ]]; then
    echo "link_cut_test: rank $r failed without naming the rank it lost"; failed=1
  fi
  waited=$(sed -E 's/.* calls, ([0-9]+) ms after.*/\1/' <<<"$line")
  if (( waited > limit_ms )); then echo "link_cut_test: rank $r took $waited ms, more than $limit_ms"; failed=1; fi
done
[[ $failed -eq 0 ]] && echo "link_cut_test: PASS: all $ranks ranks failed with a clear error within ${limit_ms} ms"
exit $failed
