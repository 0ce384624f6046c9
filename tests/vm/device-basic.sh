#!/bin/sh
# vm-args: -m 2G
# The ublk device: data written through /dev/ublkbN reads back and lands on the source; the
# mirror converges and the target verifies; del + re-add with the same bitmap copies only what
# was written in between (scenarios 1 and 5 of the device issue).
# shellcheck source=/dev/null
. /vm/lib.sh
S=/tmp/src.img T=/tmp/tgt.img B=/tmp/bm
truncate -s 256M $S $T

step "add"
run_timeout 60 ublk-mirror add -s $S -t $T -b $B > /tmp/add.json 2> /tmp/add.err || fail "add: $(cat /tmp/add.err)"
cat /tmp/add.json
grep -q '"bdev": "/dev/ublkb0"' /tmp/add.json || fail "add did not print /dev/ublkb0"
# --affinity single (the default): the queue thread runs on one CPU, the others float.
PID=$(ublk-mirror list --json | jnum pid)
ALL=$(sed -n 's/^Cpus_allowed_list:[[:space:]]*//p' /proc/"$PID"/status)
QC=$(queue_cpus "$PID")
[ "$(echo "$QC" | wc -l)" = 1 ] && [ -n "$QC" ] || fail "expected one queue thread, found CPU lists '$QC'"
case "$QC" in *-*|*,*) fail "the queue thread is not pinned to one CPU: $QC (process: $ALL)";; esac
log "queue thread on CPU $QC (process: $ALL)"
grep -q '"state": "LIVE"' /tmp/add.json || fail "device not LIVE when add returned"
DEV=/dev/ublkb0
wait_for 10 "$DEV to appear" test -b $DEV
[ "$(blockdev --getsize64 $DEV)" = 268435456 ] || fail "device size $(blockdev --getsize64 $DEV) != 256 MiB"

step "dd write, read back, compare (direct I/O)"
dd if=/dev/urandom of=/tmp/pattern bs=1M count=32 2>/dev/null
run_timeout 120 dd if=/tmp/pattern of=$DEV bs=1M seek=8 oflag=direct conv=fsync 2>/dev/null || fail "dd to $DEV"
run_timeout 120 dd if=$DEV of=/tmp/readback bs=1M skip=8 count=32 iflag=direct 2>/dev/null || fail "dd from $DEV"
cmp /tmp/pattern /tmp/readback || fail "read-back differs"
dd if=$S of=/tmp/onsrc bs=1M skip=8 count=32 2>/dev/null
cmp /tmp/pattern /tmp/onsrc || fail "the source does not hold the written data"

step "the mirror converges"
run_timeout 60 ublk-mirror status -n 0 --wait-synced --timeout 60 > /dev/null || fail "a consistent point"
ublk-mirror status -n 0
ublk-mirror list

step "del --wait-synced, then verify offline"
run_timeout 90 ublk-mirror del -n 0 --wait-synced --timeout 60 || fail "del"
[ ! -e $DEV ] || fail "$DEV still exists after del"
ublk-mirror list --json | grep -q bdev && fail "device still listed"
run_timeout 60 ublk-mirror verify -s $S -t $T -b $B || fail "verify after del"

step "re-add with the same bitmap: only what is written is copied"
run_timeout 60 ublk-mirror add -s $S -t $T -b $B > /tmp/add2.json 2> /tmp/add.err || fail "re-add: $(cat /tmp/add.err)"
wait_for 10 "$DEV to appear" test -b $DEV
run_timeout 60 dd if=/dev/urandom of=$DEV bs=64k count=4 seek=1000 oflag=direct conv=fsync 2>/dev/null || fail "dd"
# The dd's fsync returned, so its regions are dirty by now: synced means they were copied.
run_timeout 90 ublk-mirror status -n 0 --wait-synced --timeout 60 > /dev/null || fail "not synced within 60 s of the dd"
copied=$(ublk-mirror status -n 0 --json | sed -n 's/.*"bytes_copied": \([0-9]*\).*/\1/p')
log "bytes copied after re-add: $copied"
[ "$copied" = 262144 ] || fail "re-add copied $copied bytes, expected the 262144 written"
run_timeout 90 ublk-mirror del -n 0 --wait-synced --timeout 60 || fail "del"
run_timeout 60 ublk-mirror verify -s $S -t $T -b $B || fail "verify"
log ok
