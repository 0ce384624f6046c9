#!/bin/sh
# vm-args: -m 2G
# Live operations on a real device (issue 5): the speed limit holds within 10% over 20 s; pause
# stops copying and resume continues; write-blocking mode keeps the dirty count at zero under
# fio; settings and events go through the control socket; status reports progress and ETA.
# shellcheck source=/dev/null
. /vm/lib.sh
S=/tmp/src.img T=/tmp/tgt.img B=/tmp/bm DEV=/dev/ublkb0
status_json() { mirror_status 0; }
copied() { status_json; jnum bytes_copied < /tmp/st.json; }

# Data everywhere, so that the copy is of data and not of holes.
dd if=/dev/urandom of=$S bs=1M count=192 status=none
truncate -s 192M $T

step "add with --speed 4M: the initial sync runs at 4 MiB/s"
run_timeout 60 ublk-mirror add -s $S -t $T -b $B --speed 4M > /tmp/add.json 2> /tmp/add.err || fail "add: $(cat /tmp/add.err)"
wait_for 10 "$DEV" test -b $DEV
sleep 2
a=$(copied); ta=$(now_ms)
sleep 20
b=$(copied); tb=$(now_ms)
rate=$(( (b - a) * 1000 / (tb - ta) ))
want=$((4 * 1048576))
log "copied $((b - a)) bytes in $((tb - ta)) ms: $rate B/s (limit $want)"
[ $rate -le $((want * 110 / 100)) ] || fail "rate $rate B/s is more than 10% above the limit $want"
[ $rate -ge $((want * 90 / 100)) ] || fail "rate $rate B/s is more than 10% below the limit $want"
status_json
grep -q '"state": "syncing"' /tmp/st.json || fail "not syncing: $(cat /tmp/st.json)"
eta=$(jnum eta_secs < /tmp/st.json)
[ -n "$eta" ] || fail "no ETA while syncing: $(cat /tmp/st.json)"
log "ETA ${eta}s, progress $(jnum progress < /tmp/st.json)"
run_timeout 10 ublk-mirror status -n 0 | tee /tmp/st.txt
grep -q "ETA" /tmp/st.txt || fail "human status has no ETA"

step "pause stops the copy; resume continues"
run_timeout 10 ublk-mirror pause -n 0 || fail "pause"
# Copies already in flight when the pause came may still land: wait for none in flight.
t=0
while status_json; [ "$(jnum copying_bytes < /tmp/st.json)" != 0 ]; do
    sleep 0.2; t=$((t + 1)); [ $t -lt 150 ] || fail "copies still in flight 30 s after pause: $(cat /tmp/st.json)"
done
a=$(copied)
sleep 3
b=$(copied)
[ "$a" = "$b" ] || fail "copied $((b - a)) bytes while paused"
status_json
[ "$(jstr state < /tmp/st.json)" = paused ] || fail "state not paused: $(cat /tmp/st.json)"
run_timeout 10 ublk-mirror resume -n 0 || fail "resume"
# --watch without a terminal: a line a second until synced (still at 4 MiB/s for a while).
ublk-mirror status -n 0 --watch --wait-synced --timeout 290 > /tmp/watch.out 2>&1 &
W=$!
sleep 3
c=$(copied)
[ "$c" -gt "$b" ] || fail "no progress after resume ($b -> $c)"
run_timeout 10 ublk-mirror set -n 0 --speed 0 > /dev/null || fail "set --speed 0"
t=0
while kill -0 $W 2>/dev/null; do
    sleep 1; t=$((t + 1)); [ $t -lt 300 ] || { kill $W; fail "status --watch --wait-synced still running"; }
done
wait $W || fail "status --watch: $(tail -3 /tmp/watch.out)"
tail -n 3 /tmp/watch.out
grep -q "% syncing" /tmp/watch.out || fail "--watch printed no progress line: $(cat /tmp/watch.out)"
tail -n 1 /tmp/watch.out | grep -q "100.0% synced" || fail "--watch did not end synced"

step "write-blocking: fio randwrite keeps the dirty count at zero"
run_timeout 10 ublk-mirror set -n 0 --mode write-blocking > /tmp/set.json || fail "set --mode"
grep -q '"mode": "write-blocking"' /tmp/set.json || fail "mode not set: $(cat /tmp/set.json)"
c0=$(copied)
fio --filename=$DEV --ioengine=io_uring --direct=1 --bs=4k --iodepth=32 --rw=randwrite --size=64M \
    --name=wb --verify=crc32c --do_verify=1 --output=/tmp/fio.out &
FIO=$!
max=0 n=0
while kill -0 $FIO 2>/dev/null; do
    status_json
    d=$(jnum dirty_bytes < /tmp/st.json)
    [ "$d" -gt "$max" ] && max=$d
    n=$((n + 1))
    [ $n -lt 1500 ] || { kill $FIO; fail "fio still running after 300 s"; }
    sleep 0.2
done
wait $FIO || fail "fio: $(cat /tmp/fio.out)"
grep -q "err= 0" /tmp/fio.out || fail "fio errors: $(cat /tmp/fio.out)"
log "$n samples during fio, largest dirty count $max bytes"
[ $n -ge 3 ] || fail "too few samples ($n) to tell"
[ "$max" = 0 ] || fail "dirty bytes reached $max in write-blocking mode"
status_json
[ "$(jnum bytes_copied < /tmp/st.json)" = "$c0" ] || fail "the mirror copied data although every write was mirrored"
run_timeout 60 ublk-mirror status -n 0 --wait-synced --timeout 60 > /dev/null || fail "synced"

step "events: the log has the state changes"
EV=$(sed -n 's/.*"event_log": "\([^"]*\)".*/\1/p' /tmp/st.json)
[ -f "$EV" ] || fail "no event log at '$EV'"
cat "$EV"
for e in started settings paused resumed synced; do
    grep -q "\"event\":\"$e\"" "$EV" || fail "no $e event in $EV"
done
[ "$(stat -c %a /run/ublk-mirror/0.sock)" = 600 ] || fail "control socket mode $(stat -c %a /run/ublk-mirror/0.sock)"

step "online verify: clean, then a region of the target corrupted behind the mirror's back"
run_timeout 120 ublk-mirror verify -n 0 > /tmp/ov.out || fail "online verify of a synced pair: $(cat /tmp/ov.out)"
cat /tmp/ov.out
grep -q " 0 mismatches" /tmp/ov.out || fail "mismatches reported on a synced pair"
# Region 1000 (64 KiB regions): bytes 65536000.., overwritten on the target file only.
dd if=/dev/urandom of=$T bs=4096 count=1 seek=16001 conv=notrunc status=none
sync
rc=0
run_timeout 120 ublk-mirror verify -n 0 > /tmp/ov.out || rc=$?
cat /tmp/ov.out
[ $rc = 4 ] || fail "online verify exit $rc, want 4 (a clean region differs)"
grep -q "region 1000:" /tmp/ov.out || fail "the corrupted region 1000 is not reported"
# Repair it: a write through the device makes the region dirty, and the copy fixes the target.
dd if=$DEV of=/tmp/r1000 bs=64k count=1 skip=1000 iflag=direct status=none
dd if=/tmp/r1000 of=$DEV bs=64k count=1 seek=1000 oflag=direct status=none
run_timeout 60 ublk-mirror status -n 0 --wait-synced --timeout 60 > /dev/null || fail "synced after the repair"

step "del, then source == target"
run_timeout 90 ublk-mirror del -n 0 --wait-synced --timeout 60 || fail "del"
cmp $S $T || fail "source and target differ"
[ ! -e /run/ublk-mirror/0.sock ] || fail "control socket left behind"
log ok
