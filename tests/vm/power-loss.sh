#!/bin/sh
# vm-args: -b target/release/examples/log_writes_replay -b target/release/examples/invariant_check -d src=64M -d tgt=64M -d meta=16M -d srclog=512M -d tgtlog=2G -d metalog=128M -d rsrc=64M -d rtgt=64M -d rmeta=16M
# Power loss of the media (docs/crash-safety.md): source, target and the bitmap's ext4 each sit on
# a dm-log-writes device that logs every write once a FLUSH (or FUA) has made it durable. Under
# a mirror doing its initial sync and then fio random writes with fsyncs, all three devices are
# suspended together and marked, several times. Afterwards each log is replayed up to each mark
# onto a zeroed disk: the media as a power loss at that moment leaves them when every write not
# yet flushed is lost. On each such state: the invariant (bit set OR source == target, for every
# region), checked independently and by `ublk-mirror verify`; then the ext4 is recovered, `add`
# resumes from the bitmap and copies exactly the dirty bytes, and source == target.
# shellcheck source=/dev/null
. /vm/lib.sh
MARKS=8
for t in log_writes_replay invariant_check; do
    command -v $t > /dev/null || fail "$t is not in the guest: build it (cargo build --release --examples) and pass it with -b"
done
# Three RAM disks (allocated as written) hold the changes a recovery makes to the replayed media.
modprobe dm-log-writes && modprobe dm-snapshot && modprobe brd rd_nr=3 rd_size=81920 || fail "modprobe"
[ -b /dev/ram2 ] && [ "$(blockdev --getsize64 /dev/ram2)" = 83886080 ] || fail "brd did not make 3 RAM disks of 80 MiB (was it loaded already?)"
for d in src tgt meta srclog tgtlog metalog rsrc rtgt rmeta; do
    v=$(disk_dev $d) && [ -b "$v" ] || fail "no disk $d: run with this file's vm-args"
    eval "$(echo "$d" | tr a-z A-Z)=$v"
done
SIZE=$(blockdev --getsize64 "$SRC")
DEV=/dev/ublkb0 PS=/dev/mapper/pl-src PT=/dev/mapper/pl-tgt PM=/dev/mapper/pl-meta
# The paths the bitmap records: the recovered media get the same names (see check_mark).
ADD="ublk-mirror add -s $PS -t $PT -b /meta/bm"
LW="pl-src pl-tgt pl-meta"

cleanup() {
    kill_leftover_daemons "ublk-mirror|^fio"
    umount /meta 2> /dev/null
    for d in $LW; do dmsetup remove "$d" 2> /dev/null; done
}
trap cleanup EXIT

step "dm-log-writes under source, target and the bitmap's file system"
lw() { # NAME DATA LOG
    dmsetup create "$1" --table "0 $(blockdev --getsz "$2") log-writes $2 $3" || fail "dmsetup create $1"
}
lw pl-src "$SRC" "$SRCLOG"
lw pl-tgt "$TGT" "$TGTLOG"
lw pl-meta "$META" "$METALOG"
# No discards (a discarded range may read back as anything) and no lazy init behind our back.
run_timeout 60 mkfs.ext4 -q -F -b 4096 -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 $PM || fail "mkfs.ext4"
mkdir -p /meta && mount $PM /meta || fail "mount $PM"

# All three devices stop taking I/O (suspend waits for what is in flight), get the same mark,
# and go on. So a mark is one instant for the three media: what each had made durable before it.
# --nolockfs: freezing the ext4 would sync it, a flush the workload did not ask for.
mark_all() {
    for d in $LW; do run_timeout 30 dmsetup suspend --nolockfs "$d" || fail "suspend $d for mark $1"; done
    for d in $LW; do run_timeout 30 dmsetup message "$d" 0 mark "$1" || fail "mark $1 on $d"; done
    for d in $LW; do run_timeout 30 dmsetup resume "$d" || fail "resume $d after mark $1"; done
    log "mark $1 ($(ublk-mirror status -n 0 --json 2> /dev/null | sed -n 's/.*"state": "\([a-z]*\)".*/\1/p' | head -1))"
}

step "add (initial full sync) and fio random writes with fsyncs, $MARKS marks"
run_timeout 60 $ADD > /tmp/add.json 2>&1 || fail "add: $(cat /tmp/add.json)"
wait_for 10 "$DEV" test -b $DEV
# The first power loss in the middle of the initial sync (every bit set, copies and clears going on).
mark_all m0
# 4 KiB random writes in 16..48 MiB, a FLUSH every 16 writes, until killed after the marks;
# rate-limited so that the logs (each 4 KiB write is copied as a 64 KiB region) stay well within
# their disks on a faster host too.
fio --name=pl --filename=$DEV --ioengine=io_uring --direct=1 --bs=4k --iodepth=8 \
    --rw=randwrite --offset=16M --size=32M --fsync=16 --rate_iops=400 --time_based --runtime=600 \
    --randseed="$(now_ms)" --output=/tmp/fio.out &
FIO=$!
k=1
while [ $k -le "$MARKS" ]; do
    # Marks 1.2 s apart: the first ones fall in the initial sync, the later ones after it, with
    # lazy clearing (2.5-5 s) behind the writes.
    usleep 1200000
    kill -0 $FIO 2> /dev/null || fail "fio ended early: $(cat /tmp/fio.out)"
    mark_all m$k
    k=$((k + 1))
done
kill -INT $FIO
wait $FIO
grep -q "err= 0" /tmp/fio.out || fail "fio saw errors: $(cat /tmp/fio.out)"
run_timeout 120 ublk-mirror status -n 0 --wait-synced --timeout 120 > /dev/null || fail "no convergence"
run_timeout 90 ublk-mirror del -n 0 --wait-synced --timeout 60 || fail "del"
# After an orderly stop: every bit clear and durable, the target a durable copy.
mark_all final
umount /meta || fail "umount /meta"
for d in $LW; do
    st=$(dmsetup status "$d")
    case "$st" in *logging_disabled*) fail "$d stopped logging (log full or failed): $st" ;; esac
    log "$d: $st (entries, last log sector)"
    # Removal logs what was never flushed and a last mark, and completes the log.
    run_timeout 60 dmsetup remove "$d" || fail "dmsetup remove $d"
done
for l in "$SRCLOG" "$TGTLOG" "$METALOG"; do
    log_writes_replay list "$l" > /tmp/list 2> /tmp/list.err || fail "listing $l: $(cat /tmp/list.err)"
    tail -n 1 /tmp/list | grep -q "mark dm-log-writes-end" || fail "$l does not end with the removal's mark: $(tail -n 3 /tmp/list)"
    log "$(cat /tmp/list.err): $(grep -c ' flush ' /tmp/list) flushes, $(grep -c ' write ' /tmp/list) writes, $(grep -c ' discard ' /tmp/list) discards, marks: $(grep ' mark ' /tmp/list | cut -d' ' -f3 | tr '\n' ' ')"
done

RS='' RT='' RM=''
replay() { # LOG DEV MARK RESUME -> prints the new resume token
    _r=$(log_writes_replay replay "$1" "$2" --to-mark "$3" ${4:+--resume "$4"} 2> /tmp/replay.err) \
        || fail "replay of $1 to mark $3: $(cat /tmp/replay.err)"
    echo "$_r" >&2
    echo "$_r" | sed -n 's/^resume=\([0-9:]*\) .*/\1/p'
}
# recovered NAME REPLAYED RAMDISK: a throw-away writable view (a non-persistent dm snapshot whose
# changes go to the RAM disk) of a replayed medium, under the path the bitmap recorded, so that
# the replayed disk stays as the log left it for the next mark.
recovered() {
    dmsetup create "$1" --table "0 $(blockdev --getsz "$2") snapshot $2 $3 N 8" || fail "snapshot $1 of $2"
}
drop_recovered() {
    for _d in $LW; do run_timeout 30 dmsetup remove "$_d" || fail "remove $_d"; done
}

NEG_DONE=0 PARTIAL=0 BEHIND=0
check_mark() { # MARK
    step "power loss at mark $1: each medium as its last flush before the mark left it"
    RS=$(replay "$SRCLOG" "$RSRC" "$1" "$RS") && RT=$(replay "$TGTLOG" "$RTGT" "$1" "$RT") \
        && RM=$(replay "$METALOG" "$RMETA" "$1" "$RM") || exit 1
    recovered pl-src "$RSRC" /dev/ram0
    recovered pl-tgt "$RTGT" /dev/ram1
    recovered pl-meta "$RMETA" /dev/ram2
    # What a boot does: fsck replays the ext4 journal, then mount.
    run_timeout 60 e2fsck -p $PM > /tmp/fsck.out 2>&1
    rc=$?
    [ $rc -le 1 ] || fail "mark $1: e2fsck of the bitmap's file system: rc=$rc $(cat /tmp/fsck.out)"
    mount $PM /meta || fail "mark $1: mount the bitmap's file system"
    [ -f /meta/bm ] || fail "mark $1: no bitmap file after the power loss (it was made durable before add returned)"
    ublk-mirror bitmap show /meta/bm --json > /tmp/bm.json || fail "mark $1: bitmap show"
    dirty=$(sed -n 's/^  "dirty_bytes": \([0-9]*\).*/\1/p' /tmp/bm.json)
    [ -n "$dirty" ] || fail "mark $1: no dirty_bytes in $(cat /tmp/bm.json)"

    # The invariant, twice: an independent reading of the bitmap's bits, then ublk-mirror's own.
    invariant_check $PS $PT /meta/bm > /tmp/inv.out 2>&1
    rc=$?
    cat /tmp/inv.out
    [ $rc = 0 ] || fail "mark $1: THE INVARIANT FAILS after a power loss: the regions above have a clear bit and differ (rerun: vm/run.sh with this file's vm-args)"
    differing=$(sed -n 's/.*differing=\([0-9]*\).*/\1/p' /tmp/inv.out)
    run_timeout 60 ublk-mirror verify -s $PS -t $PT -b /meta/bm > /tmp/verify.out 2>&1
    rc=$?
    case "$rc:$differing" in
        0:0) ;;
        3:0 | 0:*) fail "mark $1: verify (rc $rc) and invariant_check ($differing differing) disagree: $(cat /tmp/verify.out)" ;;
        3:*) BEHIND=$((BEHIND + 1)) ;;
        *) fail "mark $1: verify rc=$rc: $(cat /tmp/verify.out)" ;;
    esac

    # Negative control, once: a bitmap whose clears ran ahead of the target's copies (what
    # clearing bits before the target flush would leave; the final, all-clear bitmap over these
    # media) must be caught by both checkers, on exactly the differing regions.
    if [ "$differing" -gt 0 ] && [ $NEG_DONE = 0 ]; then
        cp /meta/bm /tmp/bm-ahead
        dd if=/dev/zero of=/tmp/bm-ahead bs=4096 seek=1 count=1 conv=notrunc 2> /dev/null
        invariant_check $PS $PT /tmp/bm-ahead > /tmp/neg.out 2>&1
        rc=$?
        [ $rc = 1 ] && grep -q "violations=$differing\$" /tmp/neg.out \
            || fail "negative control: invariant_check rc=$rc on a bitmap ahead of the target: $(tail -n 2 /tmp/neg.out)"
        run_timeout 60 ublk-mirror verify -s $PS -t $PT -b /tmp/bm-ahead > /tmp/neg.out 2>&1
        rc=$?
        [ $rc = 4 ] || fail "negative control: ublk-mirror verify rc=$rc (want 4) on a bitmap ahead of the target: $(cat /tmp/neg.out)"
        log "negative control: a bitmap ahead of the target is reported by both checkers ($differing regions)"
        NEG_DONE=1
    fi

    # Recovery: add with the same bitmap resumes, copying what it marks dirty and nothing else.
    run_timeout 60 $ADD > /tmp/add.json 2>&1 || fail "mark $1: add after the power loss: $(cat /tmp/add.json)"
    wait_for 10 "$DEV after mark $1" test -b $DEV
    run_timeout 120 ublk-mirror status -n 0 --wait-synced --timeout 120 > /dev/null || fail "mark $1: resync"
    ublk-mirror status -n 0 --json > /tmp/st.json
    copied=$(sed -n 's/.*"bytes_copied": \([0-9]*\).*/\1/p' /tmp/st.json)
    zeroed=$(sed -n 's/.*"bytes_zeroed": \([0-9]*\).*/\1/p' /tmp/st.json)
    run_timeout 90 ublk-mirror del -n 0 --wait-synced --timeout 60 || fail "mark $1: del"
    log "mark $1: $dirty bytes dirty, $differing regions differed, resync copied $copied (+$zeroed zeroed)"
    [ $((copied + zeroed)) = "$dirty" ] || fail "mark $1: the resync copied $copied (+$zeroed) bytes, the bitmap marked $dirty dirty"
    [ "$dirty" -gt 0 ] && [ "$dirty" -lt "$SIZE" ] && PARTIAL=$((PARTIAL + 1))
    run_timeout 120 cmp $PS $PT || fail "mark $1: source and target differ after the resync"
    umount /meta || fail "umount"
    drop_recovered
}

k=0
while [ $k -le "$MARKS" ]; do
    check_mark m$k
    k=$((k + 1))
done
check_mark final
[ "$dirty" = 0 ] && [ "$differing" = 0 ] || fail "after an orderly del the durable state is not clean: $dirty bytes dirty, $differing regions differ"
# Evidence that the marks hit what the test is about.
[ $BEHIND -gt 0 ] || fail "at no mark did the target lag the source: the power losses tested nothing"
[ $PARTIAL -gt 0 ] || fail "no mark had a partial dirty set: the bitmap-limited resync was not exercised"
log "ok: $((MARKS + 1)) power losses under load and one after del; the target lagged at $BEHIND, partial resyncs at $PARTIAL"
