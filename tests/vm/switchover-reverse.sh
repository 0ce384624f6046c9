#!/bin/sh
# vm-args: -m 2G -d src=128M -d tgt=128M
# switchover --reverse under fio verify (issue 5), in async mode (issue 17: the writes are shipped
# to the target when the switchover holds them; the old source is made durable before it becomes
# the target): the device moves onto its target and the old source becomes the mirror's target;
# fio sees no error; new writes reach the old source through the mirror, shipped. The bitmap
# records the reversed pair: a daemon killed afterwards is recovered on the reversed pair (in
# async mode still), `del` + `add` in the old order is refused and in the new order copies
# nothing. (tests/vm/switchover.sh covers the forward switchover in the default mode.)
# shellcheck source=/dev/null
. /vm/lib.sh
B=/tmp/bm DEV=/dev/ublkb0 EV=/tmp/events.jsonl
S=$(disk_dev src) T=$(disk_dev tgt)
dd if=/dev/urandom of=$S bs=1M count=128 oflag=direct status=none || fail "fill the source"
add_synced $S $T $B --event-log $EV --mode async --async-buffer 32M

step "fio verify, shipped in async mode; switchover --reverse in the middle"
fio_verify_bg rev 128M
wait_for 30 "writes shipped in async mode" sh -c "ublk-mirror status -n 0 --json | grep -q '\"shipped_bytes\": [1-9]'"
sleep 2
run_timeout 90 ublk-mirror switchover -n 0 --reverse --timeout 60 2> /tmp/so.err || fail "switchover --reverse: $(cat /tmp/so.err)"
log "reversed"
mirror_status 0
[ "$(jstr source < /tmp/st.json)" = "$T" ] || fail "the source is not the old target: $(cat /tmp/st.json)"
[ "$(jstr target < /tmp/st.json)" = "$S" ] || fail "the target is not the old source: $(cat /tmp/st.json)"
[ "$(jstr state < /tmp/st.json)" != switched-over ] || fail "a reverse switchover must keep mirroring: $(cat /tmp/st.json)"
grep -q '"reverse":true' $EV || fail "no reverse switched-over event: $(cat $EV)"
grep -q '"mode": "async' /tmp/st.json || fail "not in async mode after the reverse: $(cat /tmp/st.json)"

step "SIGKILL of the daemon during fio; recover continues on the reversed pair"
sleep 2
PID=$(jnum pid < /tmp/st.json)
kill -9 "$PID" || fail "kill $PID"
wait_for 20 "the device to wait for a new daemon" sh -c "ublk-mirror list --json | grep -q QUIESCED"
run_timeout 90 ublk-mirror recover -n 0 > /tmp/rec.json 2>/tmp/rec.err || fail "recover: $(cat /tmp/rec.err)"
mirror_status 0
[ "$(jstr source < /tmp/st.json)" = "$T" ] || fail "recover did not keep the reversed pair: $(cat /tmp/st.json)"
wait_fio $FIO /tmp/fio.out
grep -q '"mode": "async' /tmp/st.json || fail "the recovered daemon is not in async mode: $(cat /tmp/st.json)"
run_timeout 120 ublk-mirror status -n 0 --wait-synced --timeout 120 > /dev/null || fail "convergence after the reverse"
dd if=$DEV of=/tmp/dev.img bs=1M iflag=direct status=none || fail "reading the device"
cmp /tmp/dev.img $T || fail "the device does not read what the new source (old target) holds"
run_timeout 60 ublk-mirror del -n 0 --wait-synced --timeout 60 || fail "del"
cmp $S $T || fail "the old source (new target) is not a copy of the new source"

step "the bitmap holds the reversed pair"
if run_timeout 60 ublk-mirror add -s $S -t $T -b $B > /tmp/add2.out 2> /tmp/add2.err; then
    fail "add in the old order was accepted after --reverse"
fi
grep -q "another pair" /tmp/add2.err || fail "unclear refusal: $(cat /tmp/add2.err)"
[ ! -e $DEV ] || fail "a device was left behind"
run_timeout 60 ublk-mirror add -s $T -t $S -b $B > /dev/null 2> /tmp/add3.err || fail "add of the reversed pair: $(cat /tmp/add3.err)"
wait_for 10 "$DEV" test -b $DEV
run_timeout 60 ublk-mirror status -n 0 --wait-synced --timeout 60 > /dev/null || fail "synced"
mirror_status 0
[ "$(jnum bytes_copied < /tmp/st.json)" = 0 ] || fail "re-adding the reversed pair copied data: $(cat /tmp/st.json)"
run_timeout 60 ublk-mirror del -n 0 || fail "del"
log ok
