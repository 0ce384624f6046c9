#!/bin/sh
# vm-args: -m 1G -d data=2G
# Real disk sizes (issue 14): `add` of a 2 TiB sparse source with 1 GiB of guest memory; writes
# at the start, the middle and the end of /dev/ublkb0; synced; status; the daemon's peak RSS
# (VmHWM) within 3 x the bitmap + 32 MiB; del; the written ranges compared on the target.
# The pair lives on ext4 on a virtio disk (a sparse host file), not on the guest's tmpfs: a real
# filesystem's extent lookups (SEEK_DATA/SEEK_HOLE) and hole punching over 2 TiB are what is
# tested, and tmpfs would hold the written data in the guest's 1 GiB.
# shellcheck source=/dev/null
. /vm/lib.sh
MIB=1048576
SIZE_MIB=2097152            # 2 TiB
DEV=/dev/ublkb0
step "ext4 on the data disk"
D=$(disk_dev data)
run_timeout 120 mkfs.ext4 -q -F "$D" || fail "mkfs.ext4 $D"
mkdir -p /data && mount "$D" /data || fail "mount $D"
S=/data/src.img T=/data/tgt.img B=/data/bm
truncate -s $((SIZE_MIB * MIB)) $S $T || fail "truncate 2 TiB"
log "memory: $(grep MemTotal /proc/meminfo)"

step "add (timed until the device exists), initial sync of the sparse pair"
t0=$(now_ms)
run_timeout 120 ublk-mirror add -s $S -t $T -b $B > /tmp/add.json 2> /tmp/add.err || fail "add: $(cat /tmp/add.err)"
t1=$(now_ms)
wait_for 30 "$DEV to appear" test -b $DEV
t2=$(now_ms)
[ "$(blockdev --getsize64 $DEV)" = $((SIZE_MIB * MIB)) ] || fail "device size $(blockdev --getsize64 $DEV)"
PID=$(ublk-mirror list --json | jnum pid)
[ -n "$PID" ] || fail "no daemon pid"
run_timeout 150 ublk-mirror status -n 0 --wait-synced --timeout 140 > /dev/null || fail "initial sync of 2 TiB sparse"
t3=$(now_ms)
log "add returned after $((t1 - t0)) ms, $DEV after $((t2 - t0)) ms, synced after $((t3 - t0)) ms"

step "1 MiB written at the start, the middle and the end (O_DIRECT)"
dd if=/dev/urandom of=/tmp/pattern bs=1M count=3 2>/dev/null
i=0
for off in 0 $((SIZE_MIB / 2)) $((SIZE_MIB - 1)); do
    dd if=/tmp/pattern of=/tmp/p$i bs=1M skip=$i count=1 2>/dev/null
    run_timeout 60 dd if=/tmp/p$i of=$DEV bs=1M seek=$off count=1 oflag=direct conv=fsync 2>/dev/null || fail "dd to $DEV at MiB $off"
    i=$((i + 1))
done
run_timeout 150 ublk-mirror status -n 0 --wait-synced --timeout 140 > /dev/null || fail "not synced after the writes"
t4=$(now_ms)
log "synced $((t4 - t3)) ms after the initial sync (writes included)"
ublk-mirror status -n 0
mirror_status 0
cat /tmp/st.json

step "the daemon's peak RSS against 3 x bitmap + 32 MiB"
run_timeout 30 ublk-mirror bitmap show $B --json > /tmp/show.json || fail "bitmap show"
NREG=$(jnum nregions < /tmp/show.json) G=$(jnum granularity < /tmp/show.json)
BMB=$(( (NREG + 7) / 8 ))
BOUND_KB=$(( (3 * BMB + 32 * MIB) / 1024 ))
HWM=$(sed -n 's/^VmHWM:[[:space:]]*\([0-9]*\) kB/\1/p' /proc/"$PID"/status)
RSS=$(sed -n 's/^VmRSS:[[:space:]]*\([0-9]*\) kB/\1/p' /proc/"$PID"/status)
log "granularity $G, $NREG regions, bitmap $((BMB / 1024)) KiB, bound $BOUND_KB kB; daemon VmHWM $HWM kB, VmRSS $RSS kB"
[ -n "$HWM" ] && [ "$HWM" -le "$BOUND_KB" ] || fail "daemon peak RSS $HWM kB > bound $BOUND_KB kB"

step "del, then the written ranges on the target"
t5=$(now_ms)
run_timeout 120 ublk-mirror del -n 0 --wait-synced --timeout 100 || fail "del"
log "del took $(( $(now_ms) - t5 )) ms"
[ ! -e $DEV ] || fail "$DEV still exists after del"
i=0
for off in 0 $((SIZE_MIB / 2)) $((SIZE_MIB - 1)); do
    dd if=$T of=/tmp/t$i bs=1M skip=$off count=1 2>/dev/null
    dd if=$S of=/tmp/s$i bs=1M skip=$off count=1 2>/dev/null
    cmp /tmp/p$i /tmp/s$i || fail "the source does not hold the data written at MiB $off"
    cmp /tmp/p$i /tmp/t$i || fail "the target differs at MiB $off"
    i=$((i + 1))
done
TA=$(du -k $T | cut -f1)
log "target allocated: $TA KiB (3 MiB written)"
[ "$TA" -le 8192 ] || fail "the target is not sparse: $TA KiB allocated"
run_timeout 120 ublk-mirror verify -s $S -t $T -b $B || fail "verify of the 2 TiB pair"
echo "SCALE-2TIB add_ms=$((t1 - t0)) dev_ms=$((t2 - t0)) initial_sync_ms=$((t3 - t0)) vmhwm_kb=$HWM bound_kb=$BOUND_KB granularity=$G regions=$NREG"
umount /data
log ok
