#!/bin/sh
# vm-args: -m 2G -d src=128M -d tgt=128M
# Switchover under fio verify (issue 5): the device moves onto its target with no error and no
# stale data; afterwards the old source's device is removed (dmsetup refuses while anything
# holds it open) while fio still runs. Then the daemon is killed and `recover` serves the target
# alone (the bitmap says switched over), with the add-time --affinity all (its queue thread not
# pinned). The old pair is refused afterwards.
# shellcheck source=/dev/null
. /vm/lib.sh
B=/tmp/bm DEV=/dev/ublkb0 EV=/tmp/events.jsonl
modprobe dm-mod || fail "modprobe dm-mod"
wait_for 5 "/dev/mapper/control" test -c /dev/mapper/control
SRC=$(disk_dev src) T=$(disk_dev tgt)
SECT=$(blockdev --getsz "$SRC")
dmsetup create src --table "0 $SECT linear $SRC 0" || fail "dmsetup create"
S=/dev/mapper/src
dd if=/dev/urandom of=$S bs=1M count=128 oflag=direct status=none || fail "fill the source"

add_synced $S $T $B --event-log $EV --affinity all
# floating WHEN: with --affinity all (one queue: its set is every CPU) the queue thread may run
# wherever the daemon may.
floating() {
    _p=$(ublk-mirror list --json | jnum pid)
    _all=$(sed -n 's/^Cpus_allowed_list:[[:space:]]*//p' /proc/"$_p"/status)
    _qc=$(queue_cpus "$_p")
    [ -n "$_qc" ] && [ "$_qc" = "$_all" ] || fail "--affinity all: the queue thread is on '$_qc', the daemon on '$_all' ($1)"
    log "queue thread on CPUs $_qc ($1)"
}
floating "after add"

step "fio verify; switchover in the middle"
fio_verify_bg so 128M
sleep 4
run_timeout 90 ublk-mirror switchover -n 0 --timeout 60 2> /tmp/so.err || fail "switchover: $(cat /tmp/so.err)"
log "switched over"
mirror_status 0
[ "$(jstr state < /tmp/st.json)" = switched-over ] || fail "state after switchover: $(cat /tmp/st.json)"
# Nothing holds the old source any more: its device can be removed while fio runs (the mirror's
# ring goes with the mirror thread, so allow it a moment).
wait_for 10 "the old source to be released" dmsetup remove src
log "old source removed"
step "SIGKILL of the daemon after the switchover; recover serves the target alone"
PID=$(jnum pid < /tmp/st.json)
[ -n "$PID" ] || fail "no daemon pid in $(cat /tmp/st.json)"
kill -9 "$PID" || fail "kill $PID"
wait_for 20 "the device to wait for a new daemon" sh -c "ublk-mirror list --json | grep -q QUIESCED"
run_timeout 90 ublk-mirror recover -n 0 > /tmp/rec.json 2>/tmp/rec.err || fail "recover after the switchover: $(cat /tmp/rec.err)"
grep -q '"state": "LIVE"' /tmp/rec.json || fail "not LIVE after recover: $(cat /tmp/rec.json)"
mirror_status 0
[ "$(jstr state < /tmp/st.json)" = switched-over ] || fail "state after recover: $(cat /tmp/st.json)"
floating "after recover"
wait_fio $FIO /tmp/fio.out
dd if=$DEV of=/tmp/dev.img bs=1M iflag=direct status=none || fail "reading the device after the switch"
cmp -n 134217728 /tmp/dev.img $T || fail "the device does not read what the target holds"
grep -q '"event":"switched-over"' $EV || fail "no switched-over event: $(cat $EV)"
run_timeout 60 ublk-mirror del -n 0 || fail "del"

step "the old pair is refused"
dmsetup create src --table "0 $SECT linear $SRC 0" || fail "recreate the source"
if run_timeout 60 ublk-mirror add -s $S -t $T -b $B > /tmp/add2.out 2> /tmp/add2.err; then
    fail "add of the old pair was accepted after a switchover"
fi
cat /tmp/add2.err
grep -q "switched over" /tmp/add2.err || fail "unclear refusal: $(cat /tmp/add2.err)"
[ ! -e $DEV ] || fail "a device was left behind"
log ok
