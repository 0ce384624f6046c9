#!/bin/sh
# vm-args: -m 2G -d tgt=128M
# Convergence under a write load the background copy cannot keep up with (issue 5): the target
# is slowed down with dm-delay and fio randwrites at full speed. In background mode the dirty set
# never drains and there is no consistent point while fio runs; with --max-lag the mirror switches
# to write-blocking when the lag passes the bound, reaches a consistent point while fio still
# runs, and switches back.
# shellcheck source=/dev/null
. /vm/lib.sh
S=/tmp/src.img B=/tmp/bm DEV=/dev/ublkb0 EV=/tmp/events.jsonl
modprobe dm-mod || fail "modprobe dm-mod"
modprobe dm-delay || fail "modprobe dm-delay"
wait_for 5 "/dev/mapper/control" test -c /dev/mapper/control
TGT=$(disk_dev tgt)
SECT=$(blockdev --getsz "$TGT")
truncate -s 128M $S
run_timeout 60 ublk-mirror sync -s $S -t "$TGT" -b $B > /dev/null || fail "initial offline sync"
# Every target I/O takes 100 ms more.
dmsetup create slow --table "0 $SECT delay $TGT 0 100" || fail "dmsetup create delay"
T=/dev/mapper/slow
run_timeout 60 ublk-mirror add -s $S -t $T -b $B --sync none --event-log $EV > /dev/null 2> /tmp/add.err || fail "add: $(cat /tmp/add.err)"
wait_for 10 "$DEV" test -b $DEV
run_timeout 60 ublk-mirror status -n 0 --wait-synced --timeout 60 > /dev/null || fail "synced before the load"
FIO="fio --filename=$DEV --ioengine=io_uring --direct=1 --bs=4k --iodepth=32 --rw=randwrite --time_based --runtime=25 --name=lag"

# watch_fio PID: samples the status every second while fio runs; leaves the largest lag in
# MAXLAG, the consistent points at the start and the end in CP0 and CP1.
watch_fio() {
    mirror_status 0
    CP0=$(jnum consistent_points < /tmp/st.json)
    MAXLAG=0
    n=0
    while kill -0 "$1" 2>/dev/null; do
        mirror_status 0
        lag=$(jnum lag_secs < /tmp/st.json | cut -d. -f1)
        [ "${lag:-0}" -gt "$MAXLAG" ] && MAXLAG=$lag
        CP1=$(jnum consistent_points < /tmp/st.json)
        n=$((n + 1)); [ $n -lt 120 ] || { kill "$1"; fail "fio still running after 120 s"; }
        sleep 1
    done
    wait "$1" || fail "fio failed"
}

step "background mode: fio at full speed, the target falls behind for good"
$FIO --output=/tmp/fio1.out &
watch_fio $!
echo; log "background: consistent points $CP0 -> $CP1 during fio, largest lag ${MAXLAG}s, $(jnum dirty_bytes < /tmp/st.json) bytes dirty at the end"
[ "$CP1" = "$CP0" ] || fail "background mode reached a consistent point under this load: the test proves nothing"
[ "$MAXLAG" -ge 15 ] || fail "the lag did not grow in background mode (${MAXLAG}s)"
run_timeout 300 ublk-mirror status -n 0 --wait-synced --timeout 300 > /dev/null || fail "synced after the load"

step "--max-lag 5s: write-blocking when behind, a consistent point while fio runs"
run_timeout 10 ublk-mirror set -n 0 --max-lag 5s > /dev/null || fail "set --max-lag"
$FIO --output=/tmp/fio2.out &
watch_fio $!
echo; log "max-lag: consistent points $CP0 -> $CP1 during fio, largest lag ${MAXLAG}s"
grep -q "err= 0" /tmp/fio2.out || fail "fio errors: $(cat /tmp/fio2.out)"
[ "$CP1" -gt "$CP0" ] || fail "no consistent point while fio ran with --max-lag"
[ "$MAXLAG" -lt 15 ] || fail "the lag reached ${MAXLAG}s with --max-lag 5s"
grep -q '"event":"write-blocking-on"' $EV || fail "no write-blocking-on event: $(cat $EV)"
grep -q '"event":"write-blocking-off"' $EV || fail "no write-blocking-off event: $(cat $EV)"
grep '"event":"write-blocking' $EV
run_timeout 300 ublk-mirror status -n 0 --wait-synced --timeout 300 > /dev/null || fail "synced after the load"
run_timeout 90 ublk-mirror del -n 0 --wait-synced --timeout 120 || fail "del"
cmp -n 134217728 $S $T || fail "source and target differ"
log ok
