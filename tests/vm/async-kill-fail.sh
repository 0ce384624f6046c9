#!/bin/sh
# vm-args: -m 2G -d tgt=128M
# Async mode (ordered shipping) under fio with verify and fsyncs, on a target that is a block
# device (so the device's queue ships early where it may): (1) the daemon is killed while writes are queued and recovered: fio sees no error, the
# recovered daemon ships again and the pair converges; (2) the target fails while shipping
# (dm-error): fio sees no error, the mirror falls behind (async (behind), target-failed), and once
# the target is back it catches up and ships again; source == target at the end.
# shellcheck source=/dev/null
. /vm/lib.sh
S=/tmp/src.img B=/tmp/bm DEV=/dev/ublkb0
dm_target tgt
dd if=/dev/urandom of=$S bs=1M count=128 status=none
EV=/tmp/events.jsonl
shipping() { ublk-mirror status -n 0 --json | grep -q '"mode": "async"'; }
# fio randwrite with verify and an fsync every 32 writes (each fsync closes an epoch).
fio_async_bg() {
    fio --filename=$DEV --ioengine=io_uring --direct=1 --bs=4k --iodepth=16 --rw=randwrite --size="$2" \
        --offset="$3" --fsync=32 --name="$1" --verify=crc32c --do_verify=1 --output=/tmp/fio.out &
    FIO=$!
}

step "add in async mode over a dm target, synced, shipping"
add_synced $S $T $B --mode async --async-buffer 16M --event-log $EV
wait_for 10 "shipping" shipping

step "SIGKILL of the daemon while writes are shipped, then recover"
fio_async_bg k 48M 0
shipped() { [ "$(ublk-mirror status -n 0 --json | jnum shipped_bytes)" -ge "$1" ]; }
wait_for 60 "writes shipped under fio" shipped 4194304
mirror_status 0
# A block device target: the queue writes the target itself, with the source write, where the
# order lets a write go at once (early shipping); the loop the rest.
[ "$(jnum issued_by_queues < /tmp/st.json)" -gt 0 ] || fail "no shipped write issued by the queue: $(cat /tmp/st.json)"
PID=$(ublk-mirror list --json | jnum pid)
[ -n "$PID" ] || fail "no daemon pid"
kill -9 "$PID" || fail "kill daemon $PID"
log "killed daemon $PID with $(jnum queued_writes < /tmp/st.json) writes queued a moment before"
wait_for 20 "the device to wait for a new daemon" sh -c "ublk-mirror list --json | grep -q QUIESCED"
run_timeout 90 ublk-mirror recover -n 0 > /tmp/rec.json 2>/tmp/rec.err || fail "recover: $(cat /tmp/rec.err)"
grep -q '"state": "LIVE"' /tmp/rec.json || fail "not LIVE after recover: $(cat /tmp/rec.json)"
wait_fio $FIO /tmp/fio.out
run_timeout 120 ublk-mirror status -n 0 --wait-synced --timeout 120 > /dev/null || fail "convergence after recovery"
wait_for 10 "shipping after the recovery" shipping
cmp -n 134217728 $S $T || fail "source and target differ after the recovery"

step "the target fails while shipping, then comes back"
mirror_status 0
BASE=$(jnum shipped_bytes < /tmp/st.json)
fio_async_bg f 48M 64M
wait_for 60 "more writes shipped under fio" shipped $((BASE + 4194304))
dm_target_error
wait_for 30 "async (behind)" sh -c 'ublk-mirror status -n 0 --json | grep -q "\"mode\": \"async (behind)\""'
sleep 3
dm_target_back
wait_fio $FIO /tmp/fio.out
run_timeout 180 ublk-mirror status -n 0 --wait-synced --timeout 180 > /dev/null || fail "no convergence after the target came back"
wait_for 10 "shipping again" shipping
grep '"event":"async-' $EV
grep -q '"event":"async-behind".*target-failed' $EV || fail "no async-behind target-failed event"
grep -q '"event":"async-resumed"' $EV || fail "no async-resumed event"
run_timeout 90 ublk-mirror del -n 0 --wait-synced --timeout 60 || fail "del"
cmp -n 134217728 $S $T || fail "source and target differ at the end"
log ok
