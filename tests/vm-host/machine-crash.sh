#!/usr/bin/env bash
# Machine crash: kill the whole VM in the middle of a write workload on a mirrored device whose
# source and target are virtio disks (block devices) and whose bitmap lives on an ext4 disk; boot
# again over the same disk images and `add` with the same bitmap: only the regions the bitmap
# marks dirty are copied, and the pair ends identical (the crash-consistency issue, layer 3).
# Run by scripts/test.sh; args: the ublk-mirror binary.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${1:-target/release/ublk-mirror}
dir=$(mktemp -d /var/tmp/ublk-mirror-crash.XXXXXX)
qpid=
cleanup() { [ -n "$qpid" ] && kill "$qpid" 2>/dev/null; rm -rf "$dir"; }
trap cleanup EXIT
truncate -s 128M "$dir/src.img" "$dir/tgt.img"
truncate -s 64M "$dir/meta.img"
mkfs.ext4 -q -F "$dir/meta.img"
disks=(-d src="$dir/src.img" -d tgt="$dir/tgt.img" -d meta="$dir/meta.img")

cat > "$dir/boot1.sh" <<'G'
. /vm/lib.sh
mkdir -p /meta && mount "$(disk_dev meta)" /meta || fail "mount meta"
run_timeout 60 ublk-mirror add -s "$(disk_dev src)" -t "$(disk_dev tgt)" -b /meta/bm > /dev/null || fail add
wait_for 10 dev test -b /dev/ublkb0
run_timeout 60 ublk-mirror status -n 0 --wait-synced --timeout 60 > /dev/null || fail "initial sync"
# A live mirror clears bits lazily (2.5-5 s after the copy) and then flushes the bitmap: wait for
# that, so that the crash below tests the workload's dirty regions, not the initial sync's.
wait_for 30 "the initial sync's bits to be cleared" sh -c "ublk-mirror bitmap show /meta/bm --json | grep -q '\"dirty_regions\": 0,'"
sleep 1
sync
echo WORKLOAD-RUNNING
# Writes until the machine dies: random 4k writes, and FLUSHes now and then (fsync=64).
fio --name=crash --filename=/dev/ublkb0 --ioengine=io_uring --direct=1 --bs=4k --iodepth=16 \
    --rw=randwrite --offset=48M --size=32M --time_based --runtime=600 --fsync=64 --output=/dev/null
fail "the workload ended before the machine was killed"
G
cat > "$dir/boot2.sh" <<'G'
. /vm/lib.sh
mkdir -p /meta && mount "$(disk_dev meta)" /meta || fail "mount meta"
ublk-mirror bitmap show /meta/bm
dirty=$(ublk-mirror bitmap show /meta/bm --json | sed -n 's/^  "dirty_bytes": \([0-9]*\).*/\1/p')
log "dirty after the crash: $dirty bytes"
[ -n "$dirty" ] && [ "$dirty" -gt 0 ] || fail "nothing dirty after a crash under writes: the test did not test anything"
# The workload wrote only 32 MiB at 48 MiB: nothing else may be dirty.
[ "$dirty" -le 33554432 ] || fail "$dirty bytes dirty, more than the 32 MiB written: the bitmap did not limit the resync"
ublk-mirror bitmap show /meta/bm --json | sed -n 's/.*"start": \([0-9]*\).*/\1/p' > /tmp/starts
[ -s /tmp/starts ] || fail "no dirty runs listed"
while read -r r; do
    [ "$r" -ge 768 ] && [ "$r" -lt 1280 ] || fail "region $r is dirty, outside the written 48..80 MiB"
done < /tmp/starts
run_timeout 60 ublk-mirror add -s "$(disk_dev src)" -t "$(disk_dev tgt)" -b /meta/bm > /dev/null || fail "add after crash"
wait_for 10 dev test -b /dev/ublkb0
run_timeout 120 ublk-mirror status -n 0 --wait-synced --timeout 120 > /dev/null || fail "resync"
copied=$(ublk-mirror status -n 0 --json | sed -n 's/.*"bytes_copied": \([0-9]*\).*/\1/p')
log "resync copied $copied bytes"
[ "$copied" -le "$dirty" ] || fail "resync copied $copied bytes, more than the $dirty dirty"
run_timeout 90 ublk-mirror del -n 0 --wait-synced --timeout 60 || fail del
cmp "$(disk_dev src)" "$(disk_dev tgt)" || fail "source and target differ after the resync"
log ok
G

echo "== boot 1: workload, then the machine is killed"
log1="$dir/boot1.log"
vm/run.sh -t 300 -r 3 -b "$BIN" "${disks[@]}" "$dir/boot1.sh" > "$log1" 2>&1 &
runner=$!
for _ in $(seq 1 600); do
    grep -aq WORKLOAD-RUNNING "$log1" && break
    kill -0 "$runner" 2>/dev/null || { cat "$log1"; echo "FAIL: boot 1 ended before the workload started"; exit 1; }
    sleep 0.5
done
grep -aq WORKLOAD-RUNNING "$log1" || { tail -30 "$log1"; echo "FAIL: the workload never started"; exit 1; }
sleep $((2 + RANDOM % 4))
# Anchored: the `timeout` wrapper around qemu has the same words in its command line.
qpid=$(pgrep -f "^qemu-system-x86_64 .*$dir/src.img" | head -1 || true)
[ -n "$qpid" ] || { echo "FAIL: no qemu to kill"; exit 1; }
kill -9 "$qpid"
echo "killed qemu $qpid in the middle of the workload"
qpid=
wait "$runner" || true   # the run fails: the machine died

echo "== boot 2: recover from the disks"
vm/run.sh -t 300 -r 3 -b "$BIN" "${disks[@]}" "$dir/boot2.sh"
