#!/usr/bin/env bash
# netns_mpi.sh: run an Open MPI job whose ranks live on N "hosts" made from
# network namespaces on this one machine, talking TCP over a private bridge.
#
# Usage:
#   netns_mpi.sh --hosts N --ranks-per-host R [--timeout S]
#                [--cut-host K (--cut-after-file PATH | --cut-after-seconds T)
#                 [--cut-grace G]]
#                [--env NAME]... [--mca NAME VALUE]... [--shared-dir DIR]
#                -- PROGRAM ARGS...
#
#   --hosts N              number of namespace-hosts (1..200)
#   --ranks-per-host R     ranks on each host; mpirun gets -np N*R
#   --timeout S            kill the job after S seconds, exit 124 (default 120)
#   --cut-host K           host index (0-based, ranks K*R..K*R+R-1) to cut off
#   --cut-after-file PATH  cut once PATH exists (polled every 50 ms); a relative
#                          PATH is taken relative to the shared dir
#                          (an existing PATH is removed before the start)
#   --cut-after-seconds T  cut T seconds (may be fractional) after mpirun starts
#   --cut-grace G          after the cut, once no rank process is left on any
#                          host for G seconds (default 2) while mpirun still
#                          runs, kill mpirun and exit 123 (see below)
#   --env NAME             forward the harness' variable NAME to all ranks (-x)
#   --mca NAME VALUE       extra MCA parameter for mpirun (and so the daemons)
#                          (with --cut-host, orte_abort_on_non_zero_status
#                          defaults to 0 so each rank can report the cut)
#   --shared-dir DIR       use DIR (caller-owned, kept) as MOEDIST_NETNS_DIR
#                          instead of a fresh temp dir removed at exit
#
# Ranks see (always, via -x):
#   MOEDIST_NETNS_HOSTS=N, MOEDIST_NETNS_RANKS_PER_HOST=R,
#   MOEDIST_NETNS_DIR=<dir on the shared file system, writable by ranks>,
#   MOEDIST_NETNS_CUT_FILE=<absolute cut file> (only with --cut-after-file).
# Ranks are placed by slot: world rank r runs on host r / R.
#
# Exit status: mpirun's; 124 on timeout (ranks still running); 123 when,
# after a cut, every rank has exited but mpirun hangs on the unreachable
# orted (its own status is unknowable then: check what the ranks wrote);
# 77 ("netns: skipped: ...") when this machine cannot host namespaces (not
# root, no ip/unshare/mpirun, no netns, veth or bridge support); 2 on bad
# usage; 130/143 on SIGINT/SIGTERM.
# MOEDIST_NETNS_KEEP=1 keeps the harness' temp dir (hostfile, agent, Open MPI
# session dirs, default shared dir) for inspection; namespaces, links and
# processes are removed on every exit path regardless.
#
# How it works, and what Open MPI 4.1.4 needed (learned by trying):
# * Topology: bridge mdb<pid> in the root namespace holds 10.A.B.1/24; host i
#   is namespace mdh<pid>-<i> holding 10.A.B.(11+i)/24 on "eth0", the peer of
#   veth mdv<pid>h<i> whose other end is a bridge port. ip_forward is not
#   touched and nothing routes off the bridge, so no traffic leaves it.
# * Subnet: chosen under a machine-wide flock. The starting candidate is
#   derived from the PID (spreads concurrent runs out), but the lock plus a
#   check that no interface address or route already uses 10.A.B.x is what
#   makes it correct: two PIDs mapping to one subnet, or leftovers of a run
#   that was SIGKILLed, simply make us take the next free /24. The bridge gets
#   its address before the lock is dropped, so the claim is visible to others.
# * mpirun runs in the root namespace; the rsh launcher starts one orted per
#   host through the agent written below (--mca plm_rsh_agent), which runs the
#   orted command in that host's namespace. plm_rsh_no_tree_spawn=1 makes
#   mpirun launch every orted itself (no orted launching orteds).
# * The agent gets "HOST  orted ... -mca orte_hnp_uri \"...\" ..." as separate
#   argv words that still carry shell quoting (made for ssh, which joins its
#   argv and hands it to a remote shell), so it must run sh -c "$*".
#   ip netns exec / unshare / sh keep the environment, so the orted inherits
#   mpirun's (PATH, LD_LIBRARY_PATH, OMPI_ALLOW_RUN_AS_ROOT*, OMPI_MCA_*).
# * Each host also gets its own UTS namespace (hostname mdh<pid>-<i>) and its
#   own tmpfs on /dev/shm. Without this all namespaces share hostname "vm":
#   vader names its segment /dev/shm/vader_segment.<hostname>.<jobid>.<local
#   rank>, so local rank 0 of host 0 and of host 1 mapped the SAME file and
#   segfaulted in mca_btl_vader_poll_handle_frag. Real hosts differ in both.
# * Which ranks are "one node" (MPI_COMM_TYPE_SHARED, vader) is decided by
#   ORTE's map: procs launched by the same orted share a node. The hostfile
#   names are addresses not local to the root namespace, so none of them is
#   mistaken for mpirun's own node, and mpirun's node gets no ranks.
# * oob_tcp_if_include / btl_tcp_if_include = our /24: daemons and ranks must
#   not advertise/try eth0 or lo (lo addresses are identical in every
#   namespace, and eth0 of the machine is unreachable from a namespace).
# * btl self,vader,tcp with pml ob1: vader within a host, TCP across hosts.
# * --bind-to none: every orted sees all cores of the machine; with R > cores
#   the default core binding would refuse to start.
# * orte_tmpdir_base points into our temp dir so ORTE session dirs of mpirun
#   and orteds do not pile up in /tmp when processes are SIGKILLed.
# * After a cut, mpirun cannot finish: the orted of the cut host can neither
#   report its ranks' exits nor receive the kill order, and the OOB TCP
#   connection to it has unacknowledged data, so TCP keepalive never fires and
#   retransmission gives up only after ~15 min (tcp_retries2 of the root
#   namespace, which we must not change). So after a cut the harness watches
#   the namespaces itself: rank processes are the children of the orteds;
#   when none has been left anywhere for --cut-grace seconds, mpirun can only
#   be waiting for the lost orted, and it is killed (exit 123). Otherwise the
#   --timeout path ends the job (exit 124). A SIGTERM to mpirun during that
#   hang made it segfault in PMIx_Finalize, so both paths use SIGKILL; the
#   ORTE session dirs live in our temp dir, so nothing is left behind.
set -euo pipefail

prog=$(basename "$0")
usage() {
    # The header comment up to "How it works" is the help text.
    awk 'NR > 1 && /^# How it works/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0" >&2
    exit 2
}
die_usage() { echo "$prog: $*" >&2; usage; }
skip() {
    # One plain line, then ctest's SKIP_RETURN_CODE.
    echo "netns: skipped: $*"
    exit 77
}
is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }
is_number() { [[ $1 =~ ^[0-9]+([.][0-9]+)?$ ]]; }
# Time in integer microseconds (EPOCHREALTIME without its decimal point,
# which is locale-dependent), so the 50 ms poll loop needs no subprocesses.
now_us() { echo "${EPOCHREALTIME//[!0-9]/}"; }
to_us() { awk -v s="$1" 'BEGIN { printf "%d", s * 1000000 }'; }
# elapsed START_US: seconds since START_US with 2 decimals.
elapsed() { local d=$(($(now_us) - $1)); printf '%d.%02d' $((d / 1000000)) $((d % 1000000 / 10000)); }
# stat_fields PID: the fields of /proc/PID/stat after "(comm)", into the
# global array `pstat` (pstat[0] = state, [1] = ppid, [19] = start time).
pstat=()
stat_fields() {
    local st after_comm='*) '
    # (read, not $(<file): under set -e a failed $(<file) ends the script.)
    { read -r st <"/proc/$1/stat"; } 2>/dev/null || return 1
    # shellcheck disable=SC2295  # the pattern is meant to be a pattern
    read -ra pstat <<<"${st##$after_comm}"
}
# running PID [START]: true while PID exists and is not a zombie waiting to be
# reaped; with START, only if it is still the process that started then (bash
# reaps exited children itself, so the PID could be reused meanwhile).
running() {
    stat_fields "$1" || return 1
    [[ ${pstat[0]} != Z && (-z ${2-} || ${pstat[19]} == "$2") ]]
}
# comm_of PID: the command name of PID.
comm_of() { local c; { read -r c <"/proc/$1/comm"; } 2>/dev/null && echo "$c"; }
# ranks_alive: true while some namespace-host still has a rank process, i.e.
# a live child of that host's orted.
ranks_alive() {
    local ns p
    for ns in "${created_ns[@]}"; do
        for p in $(ip netns pids "$ns" 2>/dev/null); do
            stat_fields "$p" || continue
            [[ ${pstat[0]} != Z && $(comm_of "$p") != orted && $(comm_of "${pstat[1]}") == orted ]] && return 0
        done
    done
    return 1
}

# ---------------------------------------------------------------- arguments
hosts="" rph="" timeout_s=120 cut_host="" cut_file="" cut_secs="" cut_grace=2 shared_dir=""
fwd_env=() extra_mca=()
while (($#)); do
    case $1 in
        --hosts) hosts=${2-}; shift 2 || usage ;;
        --ranks-per-host) rph=${2-}; shift 2 || usage ;;
        --timeout) timeout_s=${2-}; shift 2 || usage ;;
        --cut-host) cut_host=${2-}; shift 2 || usage ;;
        --cut-after-file) cut_file=${2-}; shift 2 || usage ;;
        --cut-after-seconds) cut_secs=${2-}; shift 2 || usage ;;
        --cut-grace) cut_grace=${2-}; shift 2 || usage ;;
        --env) fwd_env+=("${2-}"); shift 2 || usage ;;
        --mca) (($# >= 3)) || usage; extra_mca+=(--mca "$2" "$3"); shift 3 ;;
        --shared-dir) shared_dir=${2-}; shift 2 || usage ;;
        --) shift; break ;;
        -h|--help) usage ;;
        *) die_usage "unknown argument '$1'" ;;
    esac
done
(($#)) || die_usage "missing -- PROGRAM"
if ! is_uint "$hosts" || ((hosts < 1 || hosts > 200)); then die_usage "--hosts must be 1..200"; fi
if ! is_uint "$rph" || ((rph < 1)); then die_usage "--ranks-per-host must be >= 1"; fi
is_number "$timeout_s" || die_usage "--timeout must be a number of seconds"
if [[ -n $cut_host ]]; then
    if ! is_uint "$cut_host" || ((cut_host >= hosts)); then die_usage "--cut-host must be 0..$((hosts - 1))"; fi
    if [[ -n $cut_file && -n $cut_secs ]] || [[ -z $cut_file && -z $cut_secs ]]; then
        die_usage "--cut-host needs exactly one of --cut-after-file / --cut-after-seconds"
    fi
    [[ -z $cut_secs ]] || is_number "$cut_secs" || die_usage "--cut-after-seconds must be a number"
    is_number "$cut_grace" || die_usage "--cut-grace must be a number of seconds"
elif [[ -n $cut_file || -n $cut_secs ]]; then
    die_usage "--cut-after-* needs --cut-host"
fi
for name in "${fwd_env[@]}"; do
    [[ $name =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die_usage "bad --env name '$name'"
done
[[ -z $shared_dir || -d $shared_dir ]] || die_usage "--shared-dir '$shared_dir' is not a directory"

# ---------------------------------------------------------------- can we run here?
((EUID == 0)) || skip "needs root to create network namespaces"
for tool in ip unshare flock setsid awk; do
    command -v "$tool" >/dev/null 2>&1 || skip "'$tool' not found"
done
command -v mpirun >/dev/null 2>&1 || skip "mpirun not found"
[[ -n ${EPOCHREALTIME-} ]] || skip "bash >= 5 needed (EPOCHREALTIME)"

# ---------------------------------------------------------------- names
pid=$$
ns_prefix="mdh$pid-"          # namespace of host i: mdh<pid>-<i>
bridge="mdb$pid"              # <= 10 chars; IFNAMSIZ allows 15
veth_prefix="mdv${pid}h"      # host end of host i: mdv<pid>h<i>, <= 14 chars
lock_file=/run/lock/moedist-netns.lock
[[ -d /run/lock ]] || lock_file=/tmp/moedist-netns.lock

ns_name() { echo "$ns_prefix$1"; }
veth_name() { echo "$veth_prefix$1"; }

# ---------------------------------------------------------------- cleanup
# Everything below is tracked so cleanup can run at any point of setup.
tmp="" mpirun_pid="" mpirun_start="" created_ns=() created_veth=() created_bridge=""

# kill_ns_procs NS: SIGKILL everything whose network namespace is NS (orteds,
# ranks, agents). Repeat a few times: a dying orted may still fork.
kill_ns_procs() {
    local ns=$1 pids
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        [[ -n $pids ]] || return 0
        # shellcheck disable=SC2086
        kill -9 $pids 2>/dev/null || true
        sleep 0.1
    done
    echo "netns: warning: processes left in $ns: $(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')" >&2
}

# shellcheck disable=SC2317  # only reached through the EXIT trap
cleanup() {
    local rc=$? ns v
    set +e
    trap - EXIT INT TERM
    if [[ -n $mpirun_pid ]] && kill -0 "$mpirun_pid" 2>/dev/null; then
        kill -9 -- "-$mpirun_pid" 2>/dev/null
        wait "$mpirun_pid" 2>/dev/null
    fi
    for ns in "${created_ns[@]}"; do kill_ns_procs "$ns"; done
    # Delete the host ends explicitly: deleting a namespace tears down its
    # veth peer asynchronously, so `ip link` would still show it for a while.
    for v in "${created_veth[@]}"; do ip link del "$v" 2>/dev/null; done
    for ns in "${created_ns[@]}"; do ip netns del "$ns" 2>/dev/null; done
    [[ -z $created_bridge ]] || ip link del "$created_bridge" 2>/dev/null
    if [[ -n $tmp && -d $tmp ]]; then
        if [[ ${MOEDIST_NETNS_KEEP-} == 1 ]]; then
            echo "netns: kept $tmp" >&2
        else
            rm -rf "$tmp"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'echo "netns: interrupted (SIGINT), cleaning up" >&2; exit 130' INT
trap 'echo "netns: terminated (SIGTERM), cleaning up" >&2; exit 143' TERM

# gc_stale: remove namespaces/links of earlier runs whose harness is gone
# (SIGKILL cannot be trapped). Called with the lock held.
gc_stale() {
    local name spid ns
    for name in $(ip -o link show 2>/dev/null | awk -F': ' '{ sub(/@.*/, "", $2); print $2 }'); do
        [[ $name =~ ^md[bv]([0-9]+)([hn][0-9]+)?$ ]] || continue
        spid=${BASH_REMATCH[1]}
        if ((spid == pid)) || kill -0 "$spid" 2>/dev/null; then continue; fi
        ip link del "$name" 2>/dev/null || true
    done
    for ns in $(ip netns list 2>/dev/null | awk '{ print $1 }'); do
        [[ $ns =~ ^mdh([0-9]+)-[0-9]+$ ]] || continue
        spid=${BASH_REMATCH[1]}
        if ((spid == pid)) || kill -0 "$spid" 2>/dev/null; then continue; fi
        kill_ns_procs "$ns"
        ip netns del "$ns" 2>/dev/null || true
    done
}

# ---------------------------------------------------------------- setup
tmp=$(mktemp -d "${TMPDIR:-/tmp}/moedist-netns.$pid.XXXXXX")
chmod 755 "$tmp"
if [[ -z $shared_dir ]]; then
    shared_dir=$tmp/shared
    mkdir -m 1777 "$shared_dir"
fi
shared_dir=$(cd "$shared_dir" && pwd)
mkdir "$tmp/ompi"

exec {lock_fd}>"$lock_file"
flock -w 60 "$lock_fd" || skip "could not take $lock_file within 60 s"
gc_stale

# Pick 10.A.B.0/24, A in 200..249, B in 0..249, starting from the PID.
subnet_in_use() {
    { ip -4 -o addr show; ip -4 route show table all; } 2>/dev/null | grep -q "[^0-9.]${1//./\\.}\."
}
base="" n_subnets=$((50 * 250))
for ((k = 0; k < n_subnets; k++)); do
    idx=$(((pid + k) % n_subnets))
    cand="10.$((200 + idx % 50)).$((idx / 50))"
    if ! subnet_in_use "$cand"; then base=$cand; break; fi
done
[[ -n $base ]] || skip "no free 10.200-249.x.0/24 subnet"
subnet="$base.0/24"
host_addr() { echo "$base.$((11 + $1))"; }

err=$(ip link add name "$bridge" type bridge 2>&1) || skip "cannot create bridge: $err"
created_bridge=$bridge
# addrgenmode none: no IPv6 link-local addresses, so no IPv6 autoconf/MLD
# chatter; everything here is IPv4 on our /24.
ip link set "$bridge" addrgenmode none
ip addr add "$base.1/24" dev "$bridge"
ip link set "$bridge" up
exec {lock_fd}>&-    # the subnet is now visibly taken; let other runs proceed

for ((i = 0; i < hosts; i++)); do
    ns=$(ns_name "$i") v=$(veth_name "$i") p="mdv${pid}n$i"
    err=$(ip netns add "$ns" 2>&1) || skip "ip netns add failed: $err"
    created_ns+=("$ns")
    err=$(ip link add "$v" type veth peer name "$p" 2>&1) || skip "cannot create veth pair: $err"
    created_veth+=("$v")
    ip link set "$p" netns "$ns"
    ip -n "$ns" link set "$p" name eth0 addrgenmode none
    ip -n "$ns" addr add "$(host_addr "$i")/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    ip link set "$v" addrgenmode none
    ip link set "$v" master "$bridge" up
done

# The agent runs each orted in: the host's network namespace (ip netns exec,
# which also gives it a private mount namespace), a fresh UTS namespace with
# the host's own hostname, and a private /dev/shm (see the header for why).
agent=$tmp/rsh_agent.sh
# shellcheck disable=SC2016  # $vars here belong to the generated script
{
    echo '#!/bin/sh'
    echo '# rsh agent for Open MPI: $1 = host address, rest = command (shell words).'
    echo 'host=$1; shift'
    echo 'case $host in'
    for ((i = 0; i < hosts; i++)); do
        echo "    $(host_addr "$i")) ns=$(ns_name "$i") ;;"
    done
    echo '    *) echo "rsh_agent: unknown host $host" >&2; exit 255 ;;'
    echo 'esac'
    echo 'exec ip netns exec "$ns" unshare --uts --mount sh -c '\''hostname "$1" && mount -t tmpfs -o mode=1777,size=50% tmpfs /dev/shm && shift && exec sh -c "$*"'\'' rsh_agent "$ns" "$@"'
} >"$agent"
chmod 755 "$agent"

# Probe what the agent needs once, so an unsupported machine skips cleanly
# instead of failing inside mpirun.
# shellcheck disable=SC2016  # $(hostname) is evaluated inside the namespace
err=$("$agent" "$(host_addr 0)" 'test "$(hostname)" = '"$(ns_name 0)" 2>&1) ||
    skip "cannot enter a namespace with own hostname and /dev/shm: ${err:-probe failed}"

hostfile=$tmp/hostfile
for ((i = 0; i < hosts; i++)); do echo "$(host_addr "$i") slots=$rph"; done >"$hostfile"

if [[ -n $cut_file ]]; then
    [[ $cut_file == /* ]] || cut_file=$shared_dir/$cut_file
    rm -f "$cut_file"    # a leftover from an earlier run would cut at once
fi

# ---------------------------------------------------------------- run
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export MOEDIST_NETNS_HOSTS=$hosts MOEDIST_NETNS_RANKS_PER_HOST=$rph MOEDIST_NETNS_DIR=$shared_dir
xargs_env=(-x MOEDIST_NETNS_HOSTS -x MOEDIST_NETNS_RANKS_PER_HOST -x MOEDIST_NETNS_DIR)
if [[ -n $cut_file ]]; then
    export MOEDIST_NETNS_CUT_FILE=$cut_file
    xargs_env+=(-x MOEDIST_NETNS_CUT_FILE)
fi
# (mpirun itself warns about an unset NAME and forwards nothing for it.)
for name in "${fwd_env[@]}"; do xargs_env+=(-x "$name"); done

# With a cut, ranks are expected to fail one by one as they notice it; by
# default mpirun would kill every reachable rank as soon as the first one
# exits non-zero, before the others could report what they saw. So let each
# rank finish on its own (a --mca given by the caller wins).
if [[ -n $cut_host && " ${extra_mca[*]} " != *" orte_abort_on_non_zero_status "* ]]; then
    extra_mca+=(--mca orte_abort_on_non_zero_status 0)
fi

cmd=(mpirun -np $((hosts * rph)) --hostfile "$hostfile" --bind-to none
     --mca plm rsh
     --mca plm_rsh_agent "$agent"
     --mca plm_rsh_no_tree_spawn 1
     --mca oob_tcp_if_include "$subnet"
     --mca btl_tcp_if_include "$subnet"
     --mca btl "self,vader,tcp"
     --mca pml ob1
     --mca orte_tmpdir_base "$tmp/ompi"
     "${extra_mca[@]}" "${xargs_env[@]}" "$@")

echo "netns: $hosts hosts x $rph ranks on $subnet (namespaces ${ns_prefix}0..$((hosts - 1))), shared dir $shared_dir"
start=$(now_us)
timeout_us=$(to_us "$timeout_s")
grace_us=$(to_us "$cut_grace")
cut_us=""
[[ -z $cut_secs ]] || cut_us=$(to_us "$cut_secs")
# Own session/process group so the timeout can kill mpirun and everything it
# forked in the root namespace at once; stdin is not forwarded to rank 0.
setsid "${cmd[@]}" </dev/null &
mpirun_pid=$!
stat_fields "$mpirun_pid" || true
mpirun_start=${pstat[19]-}

# kill_mpirun: SIGKILL mpirun's process group and reap it (see the header
# for why not SIGTERM). The EXIT trap then removes the orteds, ranks,
# namespaces and links.
kill_mpirun() {
    kill -9 -- "-$mpirun_pid" 2>/dev/null || true
    wait "$mpirun_pid" 2>/dev/null || true
    mpirun_pid=""
}

cut_done="" ranks_seen="" idle_since="" next_scan=0
while running "$mpirun_pid" "$mpirun_start"; do
    t=$(($(now_us) - start))
    if [[ -n $cut_host && -z $cut_done ]]; then
        if [[ -n $cut_file && -e $cut_file ]] || { [[ -n $cut_us ]] && ((t >= cut_us)); }; then
            # Both ends: the bridge port and the host's own interface.
            ip link set "$(veth_name "$cut_host")" down
            ip -n "$(ns_name "$cut_host")" link set eth0 down
            cut_done=1
            echo "netns: cut host $cut_host ($(host_addr "$cut_host")) at $(date +%T.%3N) (t+$(elapsed "$start") s)"
        fi
    fi
    # Every 250 ms until ranks have been seen, and again after a cut: are
    # any ranks left? (Before they are seen, e.g. a cut before the launch,
    # only the timeout ends the job.)
    if [[ -n $cut_host ]] && [[ -z $ranks_seen || -n $cut_done ]] && ((t >= next_scan)); then
        next_scan=$((t + 250000))
        if ranks_alive; then
            ranks_seen=1 idle_since=""
        elif [[ -n $ranks_seen && -n $cut_done ]]; then
            : "${idle_since:=$t}"
            if ((t - idle_since >= grace_us)); then
                echo "netns: all ranks have exited after the cut, but mpirun still waits for the cut-off host's orted; killed it after $(elapsed "$start") s" >&2
                kill_mpirun
                exit 123
            fi
        fi
    fi
    if ((t >= timeout_us)); then
        echo "netns: timeout: mpirun still running after $timeout_s s, killing it and all namespace processes" >&2
        kill_mpirun
        exit 124
    fi
    sleep 0.05
done
rc=0
wait "$mpirun_pid" || rc=$?
mpirun_pid=""
echo "netns: mpirun exited with status $rc after $(elapsed "$start") s"
exit "$rc"
