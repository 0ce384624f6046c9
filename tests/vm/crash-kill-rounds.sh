#!/bin/sh
# Daemon SIGKILL at random moments under fio verify workloads, 20 rounds, each followed by
# `recover`: no I/O error reaches fio, every verify passes, the mirror converges and
# source == target at the end (the crash-consistency issue, layer 3).
# shellcheck source=/dev/null
. /vm/lib.sh
S=/tmp/src.img T=/tmp/tgt.img B=/tmp/bm DEV=/dev/ublkb0 ROUNDS=${KILL_ROUNDS:-20}
truncate -s 128M $S $T
run_timeout 60 ublk-mirror add -q 2 -s $S -t $T -b $B > /dev/null || fail "add"
wait_for 10 "$DEV" test -b $DEV
round=1
while [ $round -le "$ROUNDS" ]; do
    off=$(( (round % 4) * 32 ))
    fio --name=r$round --filename=$DEV --ioengine=io_uring --direct=1 --bs=4k --iodepth=32 \
        --rw=randwrite --size=24M --offset=${off}M --verify=crc32c --do_verify=1 \
        --randseed=$round --output=/tmp/fio.out &
    FIO=$!
    # A random moment in the write phase (0.1 .. 1.5 s).
    sleep "$((RANDOM % 2)).$((RANDOM % 9 + 1))"
    PID=$(ublk-mirror list --json | sed -n 's/.*"pid": \([0-9]*\).*/\1/p')
    kill -9 "$PID" 2>/dev/null || fail "round $round: no daemon to kill"
    wait_for 20 "round $round: QUIESCED" sh -c "ublk-mirror list --json | grep -q QUIESCED"
    run_timeout 90 ublk-mirror recover -n 0 > /tmp/rec.out 2>&1 || fail "round $round: recover: $(cat /tmp/rec.out)"
    t=0
    while kill -0 $FIO 2>/dev/null; do
        sleep 1; t=$((t + 1)); [ $t -lt 120 ] || fail "round $round: fio hangs after recovery"
    done
    wait $FIO || fail "round $round: fio failed: $(cat /tmp/fio.out)"
    grep -q "err= 0" /tmp/fio.out || fail "round $round: fio saw errors: $(cat /tmp/fio.out)"
    log "round $round: killed daemon $PID, recovered, fio verify passed"
    round=$((round + 1))
done
run_timeout 120 ublk-mirror status -n 0 --wait-synced --timeout 120 > /dev/null || fail "no convergence"
run_timeout 90 ublk-mirror del -n 0 --wait-synced --timeout 60 || fail "del"
cmp $S $T || fail "source and target differ"
run_timeout 60 ublk-mirror verify -s $S -t $T -b $B || fail "verify"
log ok
