#!/bin/sh
# Guest side of bench/scale-vm.sh: 4k random write latency (fio, io_uring, O_DIRECT, QD1) on a
# 2 TiB ublk-mirror device over a sparse pair on ext4, with `ublk-mirror status -n 0 --json`
# polled 10 times a second in the background ("poll") against no polling ("idle"), alternated
# A/B then B/A in successive rounds so that drift of the emulated machine hits both alike.
# Before every run the mirror is synced (the previous run's regions copied).
# Prints: LAT <idle|poll> <round> <p50 us> <p99 us> <iops> <polls done>
# shellcheck source=/dev/null
. /vm/lib.sh
RT=${BENCH_RUNTIME:-8} ROUNDS=${BENCH_ROUNDS:-4}
MIB=1048576 SIZE_MIB=2097152 DEV=/dev/ublkb0
D=$(disk_dev data)
run_timeout 120 mkfs.ext4 -q -F "$D" || fail "mkfs.ext4"
mkdir -p /data && mount "$D" /data || fail "mount"
S=/data/src.img T=/data/tgt.img B=/data/bm
truncate -s $((SIZE_MIB * MIB)) $S $T
run_timeout 120 ublk-mirror add -s $S -t $T -b $B > /tmp/add.json 2> /tmp/add.err || fail "add: $(cat /tmp/add.err)"
wait_for 30 $DEV test -b $DEV
run_timeout 150 ublk-mirror status -n 0 --wait-synced --timeout 140 > /dev/null || fail "initial sync"
PID=$(ublk-mirror list --json | jnum pid)
log "device up and synced; $(grep MemTotal /proc/meminfo)"

poller() {  # status 10 times a second until /tmp/stop exists; the count in /tmp/polls
    n=0
    while [ ! -e /tmp/stop ]; do
        ublk-mirror status -n 0 --json > /dev/null || echo "status failed" >&2
        n=$((n + 1))
        usleep 100000
    done
    echo $n > /tmp/polls
}
one() {  # one MODE ROUND
    run_timeout 300 ublk-mirror status -n 0 --wait-synced --timeout 280 > /dev/null || fail "synced before $1 $2"
    rm -f /tmp/stop /tmp/polls
    if [ "$1" = poll ]; then poller & PP=$!; fi
    out=$(run_timeout $((RT + 60)) fio --name=lat --filename=$DEV --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k \
        --iodepth=1 --time_based --runtime="$RT" --ramp_time=1 --percentile_list=50:99 \
        --output-format=terse --terse-version=3) || fail "fio ($1 round $2)"
    polls=0
    if [ "$1" = poll ]; then touch /tmp/stop; wait $PP; polls=$(cat /tmp/polls); fi
    # terse v3, write part: 49 iops, 59 and 60 the clat percentiles asked for (50 and 99, in us)
    echo "$out" | awk -F';' -v m="$1" -v r="$2" -v p="$polls" \
        '{ split($59, a, "="); split($60, b, "="); printf "LAT %s %d %s %s %d %d\n", m, r, a[2], b[2], $49, p }'
}
r=1
while [ $r -le "$ROUNDS" ]; do
    if [ $((r % 2)) = 1 ]; then one idle $r; one poll $r; else one poll $r; one idle $r; fi
    r=$((r + 1))
done
ublk-mirror status -n 0
log "daemon VmHWM: $(sed -n 's/^VmHWM:[[:space:]]*//p' /proc/"$PID"/status)"
run_timeout 300 ublk-mirror del -n 0 --wait-synced --timeout 280 || fail "del"
run_timeout 300 ublk-mirror verify -s $S -t $T -b $B || fail "verify after the benchmark"
umount /data
