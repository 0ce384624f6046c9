#!/bin/sh
# vm-args: -m 2G -d src=128M -d tgt=128M
# Switchover under fio verify (issue 5): the device moves onto its target with no error and no
# stale data; afterwards the old source's device fails every I/O (dm-error) while fio still runs,
# so any read or write still reaching it would fail fio. The old pair is refused afterwards.
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

run_timeout 60 ublk-mirror add -s $S -t $T -b $B --event-log $EV > /dev/null 2> /tmp/add.err || fail "add: $(cat /tmp/add.err)"
wait_for 10 "$DEV" test -b $DEV
run_timeout 120 ublk-mirror status -n 0 --wait-synced --timeout 120 > /dev/null || fail "initial sync"

step "fio verify; switchover in the middle"
fio --filename=$DEV --ioengine=io_uring --direct=1 --bs=4k --iodepth=32 --rw=randwrite --size=128M \
    --name=so --verify=crc32c --do_verify=1 --output=/tmp/fio.out &
FIO=$!
sleep 4
run_timeout 90 ublk-mirror switchover -n 0 --timeout 60 2> /tmp/so.err || fail "switchover: $(cat /tmp/so.err)"
log "switched over"
mirror_status 0
[ "$(jstr state < /tmp/st.json)" = switched-over ] || fail "state after switchover: $(cat /tmp/st.json)"
# The old source gets no I/O any more: its device now fails every I/O (dm-error), so a read or
# write still reaching it would fail fio. (The daemon drops its descriptors of it at once; the
# kernel lets go of the device once every ublk tag has been reused, or at del.)
dmsetup suspend src && dmsetup load src --table "0 $SECT error" && dmsetup resume src || fail "replace the source"
log "old source now fails every I/O"
wait_fio $FIO /tmp/fio.out
dd if=$DEV of=/tmp/dev.img bs=1M iflag=direct status=none || fail "reading the device after the switch"
cmp -n 134217728 /tmp/dev.img $T || fail "the device does not read what the target holds"
grep -q '"event":"switched-over"' $EV || fail "no switched-over event: $(cat $EV)"
run_timeout 60 ublk-mirror del -n 0 || fail "del"

step "the old pair is refused"
dmsetup suspend src && dmsetup load src --table "0 $SECT linear $SRC 0" && dmsetup resume src || fail "restore the source"
if run_timeout 60 ublk-mirror add -s $S -t $T -b $B > /tmp/add2.out 2> /tmp/add2.err; then
    fail "add of the old pair was accepted after a switchover"
fi
cat /tmp/add2.err
grep -q "switched over" /tmp/add2.err || fail "unclear refusal: $(cat /tmp/add2.err)"
[ ! -e $DEV ] || fail "a device was left behind"
log ok
