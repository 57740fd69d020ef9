#!/usr/bin/env bash
# netns_mpi.sh on a machine that can create network namespaces but not enter them (`ip netns exec`
# fails on `mount --make-rslave /` where / is not a mount point, as in a chroot) must report a skip
# with the reason, not a failed run. A stand-in `ip` first on PATH plays that machine: it passes
# every command to the real ip except `ip netns exec`, which fails as there.
#   skip_when_unenterable.sh
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
real_ip=$(command -v ip) || { echo "netns: skipped: 'ip' not found"; exit 77; }
((EUID == 0)) || { echo "netns: skipped: needs root to create network namespaces"; exit 77; }
fake=$(mktemp -d /tmp/moedist-fake-ip-XXXXXX)
trap 'rm -rf "$fake"' EXIT
cat > "$fake/ip" <<FAKE
#!/bin/sh
if [ "\$1" = netns ] && [ "\$2" = exec ]; then
    echo 'mount --make-rslave /: Invalid argument' >&2
    exit 1
fi
exec "$real_ip" "\$@"
FAKE
chmod +x "$fake/ip"
out=$(PATH="$fake:$PATH" "$here/netns_mpi.sh" --hosts 2 --ranks-per-host 1 --timeout 60 -- true 2>&1)
status=$?
echo "$out" | tail -n 5
# The probe only runs where namespaces can be made at all; elsewhere the harness skips earlier, for
# its own reason, and this check has nothing to see.
if [[ $status -eq 77 && $out == *"netns: skipped: cannot enter a namespace"*"make-rslave"* ]]; then
    echo "skip_when_unenterable: PASS: exit 77 with the reason"
elif [[ $status -eq 77 ]]; then
    echo "netns: skipped: this machine cannot create network namespaces at all: $(grep -m1 'netns: skipped:' <<<"$out")"
    exit 77
else
    echo "skip_when_unenterable: FAIL: the harness exited $status where it should have reported a skip"
    exit 1
fi
