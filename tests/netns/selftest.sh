#!/usr/bin/env bash
# selftest.sh: checks netns_mpi.sh end to end. Exit 0 = all passed, 1 = a
# check failed, 77 = this machine cannot run it (one "netns: skipped:" line).
#
# Cases (each also checks that no namespace, link or temp dir is left):
#   info-2x2     2 hosts x 2 ranks: MPI_COMM_TYPE_SHARED groups exactly the 2
#                ranks of a host, hosts are distinct network namespaces (and
#                not ours), Allreduce/Alltoall across hosts over TCP work,
#                ranks of one host map a vader (shared memory) segment
#   info-4x1     4 hosts x 1 rank, same checks
#   concurrent   two 2x1 runs at once get different subnets, both pass
#   cut          2 hosts x 1 rank; rank 0 asks for the cut after 20 good
#                exchanges; both ranks must report "no reply within 3 s after
#                cut" in $MOEDIST_NETNS_DIR/rank-R.txt, and the harness must
#                end the hung mpirun itself (exit 123) well before --timeout
#   timeout      a program that never ends: exit 124 right after --timeout
#   sigterm      SIGTERM to the harness mid-run: exit 143, everything removed
#   skip         not root / no `ip`: exit 77 with one "netns: skipped:" line
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
harness=$here/netns_mpi.sh
skip() {
    echo "netns: skipped: $*"
    exit 77
}
((EUID == 0)) || skip "needs root to create network namespaces"
command -v mpicc >/dev/null 2>&1 || skip "mpicc not found"

work=$(mktemp -d "${TMPDIR:-/tmp}/moedist-netns-selftest.XXXXXX")
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"
mpicc -O1 -Wall -o "$work/selftest" "$here/selftest.c"
SELFTEST_ROOT_NS=$(readlink /proc/self/ns/net)
export SELFTEST_ROOT_NS

failures=0
fail() {
    echo "selftest.sh: FAIL [$case_name]: $*"
    failures=$((failures + 1))
}
ms_since() { echo $(((${EPOCHREALTIME//[!0-9]/} - $1) / 1000)); }

# harness_pid LOG: the harness PID, from its "namespaces mdh<pid>-0..." line.
harness_pid() { sed -n 's/.*(namespaces mdh\([0-9]*\)-0\..*/\1/p' "$1" | head -n1; }

# check_clean LOG: nothing of that harness run may be left.
check_clean() {
    local hp
    hp=$(harness_pid "$1")
    [[ -n $hp ]] || return 0
    if ip netns list | grep -q "^mdh$hp-"; then fail "namespaces left: $(ip netns list | grep "^mdh$hp-" | tr '\n' ' ')"; fi
    if ip -o link show | grep -Eq ": md[bv]${hp}[hn@:]"; then fail "links left: $(ip -o link show | grep -E ": md[bv]$hp" | cut -d: -f2 | tr '\n' ' ')"; fi
    if compgen -G "${TMPDIR:-/tmp}/moedist-netns.$hp.*" >/dev/null; then fail "temp dir left: $(echo "${TMPDIR:-/tmp}/moedist-netns.$hp".*)"; fi
}

# run CASE ARGS...: runs the harness with ARGS, output to $work/CASE.log and
# stdout; sets $rc and $ms (wall time); stops the self-test with 77 when the
# harness skipped.
run() {
    case_name=$1
    shift
    local t0=${EPOCHREALTIME//[!0-9]/}
    rc=0
    "$harness" "$@" >"$work/$case_name.log" 2>&1 || rc=$?
    ms=$(ms_since "$t0")
    if ((rc == 77)); then    # pass the harness' one skip line on, nothing else
        grep -m1 '^netns: skipped:' "$work/$case_name.log" || echo "netns: skipped: harness skipped"
        exit 77
    fi
    echo "=== $case_name: netns_mpi.sh $*"
    sed 's/^/    /' "$work/$case_name.log"
    echo "=== $case_name: exit $rc after $ms ms"
    check_clean "$work/$case_name.log"
}

# check_info LOG HOSTS R: the rank table printed by `selftest info`.
check_info() {
    local log=$1 hosts=$2 r=$3 bad
    grep -q '^selftest: info OK$' "$log" || fail "no 'selftest: info OK'"
    # Re-check here what matters most: local size R everywhere, one
    # namespace per host, different namespaces on different hosts.
    bad=$(awk -v H="$hosts" -v R="$r" '
        $1 == "selftest:" && $2 == "rank" {
            for (i = 2; i < NF; i += 2) kv[$i] = $(i + 1)
            n++; host = kv["host"]; ns = kv["netns"]
            if (kv["local_size"] != R) print "rank " kv["rank"] " local_size " kv["local_size"] " != " R
            if (host in ns_of && ns_of[host] != ns) print "host " host " has two namespaces"
            ns_of[host] = ns
        }
        END {
            if (n != H * R) print "saw " n " rank lines, want " H * R
            for (a in ns_of) for (b in ns_of)
                if (a < b && ns_of[a] == ns_of[b]) print "hosts " a " and " b " share namespace " ns_of[a]
        }' "$log")
    [[ -z $bad ]] || fail "$bad"
}

summary=()
note() { summary+=("$(printf '%-12s exit %3d  %6d ms' "$case_name" "$rc" "$ms")"); }

# ---- (a) placement, namespaces, collectives
run info-2x2 --hosts 2 --ranks-per-host 2 --timeout 60 --env SELFTEST_ROOT_NS -- "$work/selftest" info
((rc == 0)) || fail "exit $rc, want 0"
check_info "$work/info-2x2.log" 2 2
note

run info-4x1 --hosts 4 --ranks-per-host 1 --timeout 60 --env SELFTEST_ROOT_NS -- "$work/selftest" info
((rc == 0)) || fail "exit $rc, want 0"
check_info "$work/info-4x1.log" 4 1
note

# ---- concurrent runs must not collide (names carry the PID, subnets locked)
case_name=concurrent
t0=${EPOCHREALTIME//[!0-9]/}
echo "=== concurrent: two 2x1 runs at once"
"$harness" --hosts 2 --ranks-per-host 1 --timeout 60 --env SELFTEST_ROOT_NS -- "$work/selftest" info >"$work/c1.log" 2>&1 &
p1=$!
"$harness" --hosts 2 --ranks-per-host 1 --timeout 60 --env SELFTEST_ROOT_NS -- "$work/selftest" info >"$work/c2.log" 2>&1 &
p2=$!
rc1=0 rc2=0
wait "$p1" || rc1=$?
wait "$p2" || rc2=$?
ms=$(ms_since "$t0") rc=$((rc1 | rc2))
sed 's/^/    [1] /' "$work/c1.log"
sed 's/^/    [2] /' "$work/c2.log"
((rc1 == 0 && rc2 == 0)) || fail "exits $rc1 and $rc2, want 0 and 0"
s1=$(sed -n 's/.* on \([0-9./]*\) (namespaces.*/\1/p' "$work/c1.log")
s2=$(sed -n 's/.* on \([0-9./]*\) (namespaces.*/\1/p' "$work/c2.log")
[[ -n $s1 && $s1 != "$s2" ]] || fail "subnets '$s1' and '$s2' must differ"
check_info "$work/c1.log" 2 1
check_info "$work/c2.log" 2 1
check_clean "$work/c1.log"
check_clean "$work/c2.log"
note

# ---- (b) link cut: ranks must notice, the harness must not hang
mkdir -m 1777 "$work/cut"
run cut --hosts 2 --ranks-per-host 1 --timeout 30 --cut-host 1 --cut-after-file cut \
    --shared-dir "$work/cut" -- "$work/selftest" cut
((rc == 123)) || fail "exit $rc, want 123 (all ranks gone, hung mpirun killed)"
((ms < 20000)) || fail "took $ms ms, want < 20000"
grep -q '^netns: cut host 1 (' "$work/cut.log" || fail "no 'netns: cut host 1' line"
for r in 0 1; do
    f=$work/cut/rank-$r.txt
    if [[ ! -f $f ]]; then
        fail "$f missing"
    elif ! grep -q "^rank $r: no reply within 3 s after cut" "$f"; then
        fail "$f says: $(cat "$f")"
    fi
done
note

# ---- timeout path: a program that never ends
run timeout --hosts 1 --ranks-per-host 1 --timeout 2 -- sleep 60
((rc == 124)) || fail "exit $rc, want 124"
((ms < 8000)) || fail "took $ms ms, want < 8000"
note

# ---- SIGTERM to the harness mid-run
case_name=sigterm
t0=${EPOCHREALTIME//[!0-9]/}
nap="59.$$"    # a unique sleep, to look for leftovers by its command line
echo "=== sigterm: netns_mpi.sh --hosts 2 --ranks-per-host 1 -- sleep $nap, SIGTERM after 1.5 s"
"$harness" --hosts 2 --ranks-per-host 1 --timeout 60 -- sleep "$nap" >"$work/sigterm.log" 2>&1 &
hp=$!
sleep 1.5
kill -TERM "$hp"
rc=0
wait "$hp" || rc=$?
ms=$(ms_since "$t0")
sed 's/^/    /' "$work/sigterm.log"
((rc == 143)) || fail "exit $rc, want 143"
check_clean "$work/sigterm.log"
if pgrep -fx "sleep $nap" >/dev/null; then fail "sleep $nap still running"; fi
note

# ---- skip paths: exactly one "netns: skipped:" line and exit 77
case_name=skip
for how in nonroot noip; do
    rc=0
    if [[ $how == nonroot ]]; then
        command -v setpriv >/dev/null 2>&1 || continue
        out=$(setpriv --reuid=65534 --regid=65534 --clear-groups "$harness" --hosts 1 --ranks-per-host 1 -- true 2>&1) || rc=$?
    else
        # A PATH with just what the harness needs before its tool check
        # (ip lives in /usr/bin on Debian 12, so trimming PATH is not enough).
        mkdir -p "$work/noip-bin"
        ln -sf "$(command -v bash)" "$(command -v basename)" "$work/noip-bin/"
        out=$(PATH=$work/noip-bin "$harness" --hosts 1 --ranks-per-host 1 -- true 2>&1) || rc=$?
    fi
    echo "=== skip ($how): exit $rc: $out"
    ((rc == 77)) || fail "$how: exit $rc, want 77"
    [[ $out == "netns: skipped: "* && $out != *$'\n'* ]] || fail "$how: want one 'netns: skipped:' line, got: $out"
done
ms=0
note

echo "=== summary"
printf '    %s\n' "${summary[@]}"
if ((failures)); then
    echo "selftest.sh: $failures check(s) FAILED"
    exit 1
fi
echo "selftest.sh: all checks passed"
