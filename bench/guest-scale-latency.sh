#!/bin/sh
# Guest side of bench/scale-vm.sh: 4k random write latency (fio, io_uring, O_DIRECT, QD1) on a
# 2 TiB ublk-mirror device over a sparse pair on ext4, in four modes, their order rotated from
# round to round so that drift of the emulated machine hits all alike:
#   idle   nothing else runs;
#   watch  one `ublk-mirror status -n 0 --watch --json --interval 0.1` process: status asked
#          10 times a second over the control socket (what a monitor or `--watch` does);
#   poll   `ublk-mirror status -n 0 --json` started 10 times a second (a process each);
#   spawn  `ublk-mirror --version` started 10 times a second: the cost of the processes alone,
#          without asking the daemon anything.
# Before every run the mirror is synced (the previous run's regions copied).
# Prints: LAT <mode> <round> <p50 us> <p99 us> <iops> <status answers or processes>
#
# A source with latency of its own, as a disk has (env, at most one; default: the sparse file):
#   SOURCE_DELAY_MS=N  device-mapper `delay` over a loop device (direct I/O) over the sparse file:
#                      every read, write and flush of the source waits N ms more. dm-delay takes
#                      whole ms and counts in jiffies (HZ=250 in the guest: 4 ms steps), and
#                      below 50 ms a kthread polls the queued bios (cond_resched loop) meanwhile;
#   SOURCE_NULLB_US=N  null_blk, 2 TiB memory backed (pages allocated on write), each request
#                      completed by an hrtimer N us after submission (irqmode=2): exact, no
#                      polling; the written data takes guest memory (~4 KiB a write).
# The pair is then added with --sync none (source and target both read as zeros), and before the
# rounds the source alone is measured: SRC <p50 us> <p99 us> <iops> (4k random reads QD1).
# shellcheck source=/dev/null
. /vm/lib.sh
RT=${BENCH_RUNTIME:-8} ROUNDS=${BENCH_ROUNDS:-4}
MIB=1048576 SIZE_MIB=2097152 DEV=/dev/ublkb0
D=$(disk_dev data)
run_timeout 120 mkfs.ext4 -q -F "$D" || fail "mkfs.ext4"
mkdir -p /data && mount "$D" /data || fail "mount"
S=/data/src.img T=/data/tgt.img B=/data/bm
truncate -s $((SIZE_MIB * MIB)) $S $T
SRC=$S SYNC=full LOOP=''
[ -z "${SOURCE_DELAY_MS:-}" ] || [ -z "${SOURCE_NULLB_US:-}" ] || fail "SOURCE_DELAY_MS and SOURCE_NULLB_US exclude each other"
if [ -n "${SOURCE_DELAY_MS:-}" ]; then
    modprobe loop || fail "modprobe loop"
    modprobe dm-delay || fail "modprobe dm-delay"
    wait_for 5 /dev/mapper/control test -c /dev/mapper/control
    LOOP=$(run_timeout 30 /usr/sbin/losetup --direct-io=on --show -f $S) || fail "losetup $S"
    run_timeout 30 dmsetup create umsrc --table "0 $(blockdev --getsz "$LOOP") delay $LOOP 0 $SOURCE_DELAY_MS" || fail "dmsetup create delay"
    SRC=/dev/mapper/umsrc SYNC=none
    log "source: dm-delay $SOURCE_DELAY_MS ms ($(dmsetup table umsrc)) over $LOOP (direct I/O: $(cat /sys/block/"${LOOP#/dev/}"/loop/dio)) over $S"
elif [ -n "${SOURCE_NULLB_US:-}" ]; then
    run_timeout 30 modprobe null_blk nr_devices=1 gb=$((SIZE_MIB / 1024)) memory_backed=1 irqmode=2 \
        completion_nsec=$((SOURCE_NULLB_US * 1000)) || fail "modprobe null_blk"
    wait_for 5 /dev/nullb0 test -b /dev/nullb0
    [ "$(blockdev --getsize64 /dev/nullb0)" = $((SIZE_MIB * MIB)) ] || fail "/dev/nullb0 is $(blockdev --getsize64 /dev/nullb0) bytes"
    SRC=/dev/nullb0 SYNC=none
    log "source: null_blk, memory backed, completed ${SOURCE_NULLB_US} us after submission (irqmode $(cat /sys/module/null_blk/parameters/irqmode), completion_nsec $(cat /sys/module/null_blk/parameters/completion_nsec))"
fi
if [ "$SRC" != "$S" ]; then
    # The source alone, before the mirror: reads, so that source and target stay identical.
    run_timeout 60 fio --name=src --filename=$SRC --ioengine=io_uring --direct=1 --rw=randread --bs=4k \
        --iodepth=1 --time_based --runtime=4 --ramp_time=1 --percentile_list=50:99 \
        --output-format=terse --terse-version=3 > /tmp/src.out || fail "fio on the source alone"
    # terse v3, read part: 8 iops, 18 and 19 the clat percentiles (50 and 99, in us)
    awk -F';' '{ split($18, a, "="); split($19, b, "="); printf "SRC %s %s %d\n", a[2], b[2], $8 }' /tmp/src.out
fi
run_timeout 120 ublk-mirror add -s $SRC -t $T -b $B --sync $SYNC > /tmp/add.json 2> /tmp/add.err || fail "add: $(cat /tmp/add.err)"
wait_for 30 $DEV test -b $DEV
run_timeout 150 ublk-mirror status -n 0 --wait-synced --timeout 140 > /dev/null || fail "initial sync"
PID=$(ublk-mirror list --json | jnum pid)
log "device up and synced; $(grep MemTotal /proc/meminfo)"

poller() {  # poller CMD...: CMD 10 times a second until /tmp/stop exists; the count in /tmp/polls
    n=0
    while [ ! -e /tmp/stop ]; do
        "$@" > /dev/null || echo "$* failed" >&2
        n=$((n + 1))
        usleep 100000
    done
    echo $n > /tmp/polls
}
one() {  # one MODE ROUND
    run_timeout 300 ublk-mirror status -n 0 --wait-synced --timeout 280 > /dev/null || fail "synced before $1 $2"
    rm -f /tmp/stop /tmp/polls
    case $1 in
        poll) poller ublk-mirror status -n 0 --json & PP=$! ;;
        spawn) poller ublk-mirror --version & PP=$! ;;
        watch) ublk-mirror status -n 0 --watch --json --interval 0.1 > /tmp/watch.out & PP=$! ;;
    esac
    out=$(run_timeout $((RT + 60)) fio --name=lat --filename=$DEV --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k \
        --iodepth=1 --time_based --runtime="$RT" --ramp_time=1 --percentile_list=50:99 \
        --output-format=terse --terse-version=3) || fail "fio ($1 round $2)"
    polls=0
    case $1 in
        poll | spawn) touch /tmp/stop; wait $PP; polls=$(cat /tmp/polls) ;;
        watch) kill $PP; wait $PP 2>/dev/null; polls=$(wc -l < /tmp/watch.out) ;;
    esac
    # terse v3, write part: 49 iops, 59 and 60 the clat percentiles asked for (50 and 99, in us)
    echo "$out" | awk -F';' -v m="$1" -v r="$2" -v p="$polls" \
        '{ split($59, a, "="); split($60, b, "="); printf "LAT %s %d %s %s %d %d\n", m, r, a[2], b[2], $49, p }'
}
r=1
while [ $r -le "$ROUNDS" ]; do
    case $((r % 4)) in
        1) order="idle watch poll spawn" ;;
        2) order="spawn poll watch idle" ;;
        3) order="watch idle spawn poll" ;;
        0) order="poll spawn idle watch" ;;
    esac
    for m in $order; do one $m $r; done
    r=$((r + 1))
done
ublk-mirror status -n 0
log "daemon VmHWM: $(sed -n 's/^VmHWM:[[:space:]]*//p' /proc/"$PID"/status)"
for k in /proc/[0-9]*; do  # dm-delay's polling kthread: CPU time it took (clock ticks of 10 ms)
    case $(cat "$k/comm" 2>/dev/null) in dm-delay-flush*) ;; *) continue ;; esac
    log "dm-delay-flush-worker CPU: $(awk '{ printf "%.1f s", ($14 + $15) / 100 }' "$k/stat") over $(vm_uptime) s of uptime"
done
run_timeout 300 ublk-mirror del -n 0 --wait-synced --timeout 280 || fail "del"
if [ -n "$LOOP" ]; then
    run_timeout 30 dmsetup remove umsrc || fail "dmsetup remove"
    run_timeout 30 /usr/sbin/losetup -d "$LOOP" || fail "losetup -d"
    # The bitmap names /dev/mapper/umsrc; the files themselves are compared (holes skipped).
    run_timeout 300 ublk-mirror verify -s $S -t $T || fail "verify after the benchmark"
elif [ "$SRC" = /dev/nullb0 ]; then
    log "no verify: it would read 2 TiB from null_blk; $(grep MemAvailable /proc/meminfo)"
else
    run_timeout 300 ublk-mirror verify -s $S -t $T -b $B || fail "verify after the benchmark"
fi
umount /data
