#!/bin/sh
# vm-args: -m 2G -d tgt=128M -d fsdisk=192M
# Target failures never reach the applications (issue 5): with fio verify running on the device,
# the target's device starts failing every I/O (dm-error), then comes back; fio sees no error, the
# mirror reports degraded (status and event log) and converges by itself. Then a full target
# (ENOSPC on a file system that fills up): degraded, space freed, converged. Last, --max-retries:
# the mirror gives up (stopped), writes still succeed, and waiting for synced is refused at once.
# Between the two, the mirror loop itself fails (a test fault): state failed, an event, waiting
# refused, and a restart by itself once the fault is gone.
# shellcheck source=/dev/null
. /vm/lib.sh
S=/tmp/src.img B=/tmp/bm DEV=/dev/ublkb0
dm_target tgt
dd if=/dev/urandom of=$S bs=1M count=128 status=none
EV=/tmp/events.jsonl

step "add over a dm target and sync"
add_synced $S $T $B --event-log $EV

step "fio verify on the device while the target fails"
fio_verify_bg tf 96M
sleep 2
dm_target_error
wait_for 30 "degraded" sh -c 'ublk-mirror status -n 0 --json | grep -q "\"state\": \"degraded\""'
mirror_status 0
log "status: $(jstr state < /tmp/st.json), failures $(jnum target_failures < /tmp/st.json), last error: $(jstr last_error < /tmp/st.json)"
[ "$(jnum dirty_bytes < /tmp/st.json)" -gt 0 ] || fail "nothing dirty while the target fails"
sleep 5
dm_target_back
wait_fio $FIO /tmp/fio.out
run_timeout 180 ublk-mirror status -n 0 --wait-synced --timeout 180 > /dev/null || fail "no convergence after the target came back"
cat $EV
grep -q '"event":"degraded"' $EV || fail "no degraded event"
grep -q '"event":"recovered"' $EV || fail "no recovered event"
run_timeout 90 ublk-mirror del -n 0 --wait-synced --timeout 60 || fail "del"
cmp -n 134217728 $S $T || fail "source and target differ after recovery"

step "a full target: ENOSPC on its file system, then space freed"
FSD=$(disk_dev fsdisk)
mkfs.ext4 -q -F "$FSD" || fail "mkfs"
mkdir -p /mnt/t && mount "$FSD" /mnt/t || fail "mount"
# 128 MiB sparse target on a 192 MiB file system with 100 MiB taken: the copy runs out of space.
truncate -s 128M /mnt/t/target.img
expected "the kernel may log a full file system (ENOSPC) for the target's writes"
dd if=/dev/zero of=/mnt/t/filler bs=1M count=100 conv=fsync status=none
rm -f $B
run_timeout 60 ublk-mirror add -s $S -t /mnt/t/target.img -b $B --event-log $EV > /dev/null 2> /tmp/add.err || fail "add: $(cat /tmp/add.err)"
wait_for 10 "$DEV" test -b $DEV
wait_for 60 "degraded on ENOSPC" sh -c 'ublk-mirror status -n 0 --json | grep -q "\"state\": \"degraded\""'
mirror_status 0
jstr last_error < /tmp/st.json | grep -qi "space" || fail "the error does not say the target is full: $(jstr last_error < /tmp/st.json)"
dd if=/dev/urandom of=$DEV bs=64k count=16 seek=100 oflag=direct status=none || fail "a write to the device failed while the target is full"
rm /mnt/t/filler
log "freed 100 MiB"
run_timeout 180 ublk-mirror status -n 0 --wait-synced --timeout 180 > /dev/null || fail "no convergence after space was freed"
run_timeout 90 ublk-mirror del -n 0 --wait-synced --timeout 60 || fail "del"
cmp $S /mnt/t/target.img || fail "source and target differ"
umount /mnt/t

step "the mirror loop itself fails (test fault): failed, evented, restarted once the fault goes"
rm -f $B $EV
# The daemon inherits the variable from add: while /tmp/mirror-fault exists, its mirror loop
# fails (at setup, and at its next wake-up when running).
export UBLK_MIRROR_TEST_FAIL_MIRROR_WHILE=/tmp/mirror-fault
add_synced $S $T $B --event-log $EV
unset UBLK_MIRROR_TEST_FAIL_MIRROR_WHILE
expected "the daemon's log reports the injected fault of its mirror loop"
touch /tmp/mirror-fault
dd if=/dev/urandom of=$DEV bs=64k count=8 seek=30 oflag=direct status=none || fail "a write failed as the loop broke"
wait_for 30 "state failed" sh -c 'ublk-mirror status -n 0 --json | grep -q "\"state\": \"failed\""'
mirror_status 0
jstr last_error < /tmp/st.json | grep -q "injected fault" || fail "the error is not the loop's: $(jstr last_error < /tmp/st.json)"
grep -q '"event":"mirror-failed"' $EV || fail "no mirror-failed event"
dd if=/dev/urandom of=$DEV bs=64k count=8 seek=40 oflag=direct status=none || fail "a write failed while the loop is down"
mirror_status 0
[ "$(jstr state < /tmp/st.json)" = failed ] || fail "state is not failed while nothing mirrors: $(cat /tmp/st.json)"
t0=$(now_ms)
run_timeout 60 ublk-mirror status -n 0 --wait-synced --timeout 50 > /tmp/w.out 2>&1 && fail "--wait-synced succeeded while the loop is down"
el=$(( $(now_ms) - t0 ))
grep -q "mirror loop failed" /tmp/w.out || fail "--wait-synced: $(tail -2 /tmp/w.out)"
[ $el -lt 20000 ] || fail "--wait-synced took $el ms: it waited out its timeout"
log "--wait-synced refused after $el ms: $(tail -1 /tmp/w.out)"
rm /tmp/mirror-fault
# The supervisor restarts the loop at its next retry (up to 5 s away); until then status says
# failed, and waiting for synced is refused.
wait_for 30 "the loop restarted" sh -c '! ublk-mirror status -n 0 --json | grep -q "\"state\": \"failed\""'
run_timeout 120 ublk-mirror status -n 0 --wait-synced --timeout 110 > /dev/null || fail "no convergence after the fault went"
grep -q '"event":"mirror-restarted"' $EV || fail "no mirror-restarted event"
grep -q '"event":"recovered"' $EV || fail "no recovered event"
mirror_status 0
log "after the restart: $(jstr state < /tmp/st.json), failures $(jnum target_failures < /tmp/st.json)"
run_timeout 90 ublk-mirror del -n 0 --wait-synced --timeout 60 || fail "del"
cmp -n 134217728 $S $T || fail "source and target differ after the loop's restart"

step "--max-retries: the mirror gives up, and waiting for synced says so at once"
rm -f $B
add_synced $S $T $B --sync none --max-retries 2 --event-log $EV
expected "the kernel logs I/O errors of the target's device (dm-error) until the mirror gives up"
dmsetup suspend tgt && dmsetup load tgt --table "0 $SECT error" && dmsetup resume tgt || fail "switch to dm-error"
dd if=/dev/urandom of=$DEV bs=64k count=4 seek=10 oflag=direct status=none || fail "a write failed while the target fails"
wait_for 60 "stopped" sh -c 'ublk-mirror status -n 0 --json | grep -q "\"state\": \"stopped\""'
grep -q '"event":"stopped"' $EV || fail "no stopped event"
dd if=/dev/urandom of=$DEV bs=64k count=4 seek=20 oflag=direct status=none || fail "a write failed after the mirror stopped"
for w in "" --watch; do
    t0=$(now_ms)
    run_timeout 60 ublk-mirror status -n 0 $w --wait-synced --timeout 50 > /tmp/w.out 2>&1 && fail "status $w --wait-synced succeeded on a stopped mirror"
    el=$(( $(now_ms) - t0 ))
    grep -q "mirroring has stopped" /tmp/w.out || fail "status $w --wait-synced: $(tail -2 /tmp/w.out)"
    [ $el -lt 20000 ] || fail "status $w --wait-synced took $el ms: it waited out its timeout"
    log "status $w --wait-synced: refused after $el ms: $(tail -1 /tmp/w.out)"
done
run_timeout 60 ublk-mirror del -n 0 || fail "del"
dmsetup suspend tgt && dmsetup load tgt --table "0 $SECT linear $TGT 0" && dmsetup resume tgt || fail "switch back"
log ok
