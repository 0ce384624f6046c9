#!/bin/sh
# fio randwrite with verify while mirroring, then SIGKILL of the daemon in the middle of a fio
# verify run and `recover`: no I/O error reaches fio, its verify passes, the mirror converges and
# source == target (scenarios 3 and 4 of the device issue). Before that, SIGSTOP/SIGCONT of the
# daemon under fio: the device keeps serving. Two queues, so that writers on two
# rings share the bitmap and the recovery restarts both. Last, a panic in the daemon (a test
# fault) under fio: the daemon aborts as a whole, and recover resumes as after a kill.
# shellcheck source=/dev/null
. /vm/lib.sh
S=/tmp/src.img T=/tmp/tgt.img B=/tmp/bm DEV=/dev/ublkb0
truncate -s 128M $S $T
run_timeout 60 ublk-mirror add -q 2 -s $S -t $T -b $B > /tmp/add.json || fail "add"
grep -q '"queues": 2' /tmp/add.json || fail "not 2 queues: $(cat /tmp/add.json)"
wait_for 10 "$DEV" test -b $DEV
FIO="fio --filename=$DEV --ioengine=io_uring --direct=1 --bs=4k --iodepth=32 --size=64M"

step "fio randwrite QD32 with crc32c verify, while mirroring; the daemon stopped and continued"
$FIO --name=w --rw=randwrite --verify=crc32c --do_verify=1 --output=/tmp/fio1.out &
FIO_PID=$!
# A stopped and continued daemon carries on serving (fio would hang, then fail below, if a
# queue thread ended).
sleep 2
PID=$(ublk-mirror list --json | jnum pid)
for i in 1 2 3; do
    kill -STOP "$PID" || fail "SIGSTOP $PID"
    sleep 0.3
    kill -CONT "$PID" || fail "SIGCONT $PID"
    sleep 0.3
done
log "daemon $PID stopped and continued 3 times"
wait_fio $FIO_PID /tmp/fio1.out 120
run_timeout 120 ublk-mirror status -n 0 --wait-synced --timeout 120 > /dev/null || fail "a consistent point"
run_timeout 60 ublk-mirror verify -s $S -t $T -b $B || fail "verify after fio"

step "SIGKILL of the daemon during a fio verify run, then recover"
$FIO --name=k --rw=randwrite --verify=crc32c --do_verify=1 --offset=64M --output=/tmp/fio2.out &
FIO_PID=$!
sleep 3
PID=$(ublk-mirror list --json | sed -n 's/.*"pid": \([0-9]*\).*/\1/p')
[ -n "$PID" ] || fail "no daemon pid"
kill -9 "$PID" || fail "kill daemon $PID"
log "killed daemon $PID"
wait_for 20 "the device to wait for a new daemon" sh -c "ublk-mirror list --json | grep -q QUIESCED"
if ublk-mirror status -n 0 > /tmp/st 2>&1; then fail "status claims a live daemon: $(cat /tmp/st)"; fi
grep -q "recover -n 0" /tmp/st || fail "status does not say to recover: $(cat /tmp/st)"
run_timeout 90 ublk-mirror recover -n 0 > /tmp/rec.json 2>/tmp/rec.err || fail "recover: $(cat /tmp/rec.err)"
grep -q '"state": "LIVE"' /tmp/rec.json || fail "not LIVE after recover: $(cat /tmp/rec.json)"
wait_fio $FIO_PID /tmp/fio2.out
run_timeout 120 ublk-mirror status -n 0 --wait-synced --timeout 120 > /dev/null || fail "convergence after recovery"
run_timeout 90 ublk-mirror del -n 0 --wait-synced --timeout 60 || fail "del"
cmp $S $T || fail "source and target differ"
run_timeout 60 ublk-mirror verify -s $S -t $T -b $B || fail "verify"

step "a panic in the daemon (test fault) ends it as a kill does: the device waits, recover resumes"
rm -f $B /tmp/panic
# The daemon inherits the variable from add: once /tmp/panic exists, its mirror loop panics at
# its next wake-up, and the daemon's panic hook aborts the whole process.
UBLK_MIRROR_TEST_PANIC_WHILE=/tmp/panic run_timeout 60 ublk-mirror add -q 2 -s $S -t $T -b $B --sync none > /dev/null || fail "add"
wait_for 10 "$DEV" test -b $DEV
PID=$(ublk-mirror list --json | jnum pid)
$FIO --name=p --rw=randwrite --verify=crc32c --do_verify=1 --output=/tmp/fio3.out &
FIO_PID=$!
sleep 2
expected "the daemon's log shows the injected panic and its backtrace"
touch /tmp/panic
wait_for 30 "the daemon to end" sh -c "! kill -0 $PID 2> /dev/null"
wait_for 20 "the device to wait for a new daemon" sh -c "ublk-mirror list --json | grep -q QUIESCED"
grep -q "panic in the daemon" /run/ublk-mirror/daemon-$PID.log || fail "the daemon's log does not report the panic: $(tail -5 /run/ublk-mirror/daemon-$PID.log)"
log "daemon $PID: $(grep -m1 'panic in the daemon' /run/ublk-mirror/daemon-$PID.log)"
rm /tmp/panic
run_timeout 90 ublk-mirror recover -n 0 > /tmp/rec.json 2>/tmp/rec.err || fail "recover after the panic: $(cat /tmp/rec.err)"
wait_fio $FIO_PID /tmp/fio3.out
run_timeout 120 ublk-mirror status -n 0 --wait-synced --timeout 120 > /dev/null || fail "convergence after the panic"
run_timeout 90 ublk-mirror del -n 0 --wait-synced --timeout 60 || fail "del"
cmp $S $T || fail "source and target differ after the panic and recover"
log ok
