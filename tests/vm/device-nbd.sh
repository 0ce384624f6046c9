#!/bin/sh
# vm-args: -m 2G -b /usr/bin/qemu-nbd
# The device mirroring to an NBD server (issue 7): qemu-nbd serves the target file over a Unix
# socket inside the VM. fio verify on the device while mirroring; the server is killed in the
# middle (the mirror reports degraded, fio sees no error), restarted, and the mirror converges by
# itself; source == target at the end.
# shellcheck source=/dev/null
. /vm/lib.sh
S=/tmp/src.img T=/tmp/tgt.img B=/tmp/bm DEV=/dev/ublkb0 SOCK=/tmp/nbd.sock EV=/tmp/events.jsonl
truncate -s 128M $S $T
start_server() {
    rm -f $SOCK /tmp/nbd.pid
    qemu-nbd -f raw -x tgt --socket=$SOCK --persistent --shared=4 --pid-file=/tmp/nbd.pid --fork $T \
        || fail "qemu-nbd did not start"
    wait_for 10 "the NBD socket" test -S $SOCK
}
start_server
URI="nbd+unix:///tgt?socket=$SOCK"

step "add with an NBD target, fio verify while mirroring"
run_timeout 60 ublk-mirror add -s $S -t "$URI" -b $B --event-log $EV > /tmp/add.json 2> /tmp/add.err || fail "add: $(cat /tmp/add.err)"
wait_for 10 "$DEV" test -b $DEV
fio --filename=$DEV --ioengine=io_uring --direct=1 --bs=4k --iodepth=32 --rw=randwrite --size=96M \
    --name=nbd --verify=crc32c --do_verify=1 --output=/tmp/fio.out &
FIO=$!
sleep 3

step "kill the server in the middle, restart it"
kill "$(cat /tmp/nbd.pid)" || fail "kill qemu-nbd"
wait_for 30 "degraded" sh -c 'ublk-mirror status -n 0 --json | grep -q "\"state\": \"degraded\""'
mirror_status 0
log "while the server is down: $(jstr last_error < /tmp/st.json)"
sleep 3
start_server
log "server back"
wait_fio $FIO /tmp/fio.out
run_timeout 240 ublk-mirror status -n 0 --wait-synced --timeout 240 > /dev/null || fail "no convergence after the server came back"
grep -q '"event":"degraded"' $EV && grep -q '"event":"recovered"' $EV || fail "events: $(cat $EV)"
run_timeout 90 ublk-mirror del -n 0 --wait-synced --timeout 60 || fail "del"
run_timeout 60 ublk-mirror verify -s $S -t "$URI" -b $B || fail "verify through NBD"
kill "$(cat /tmp/nbd.pid)"
cmp $S $T || fail "source and target differ"
log ok
