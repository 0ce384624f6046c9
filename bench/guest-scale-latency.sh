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
run_timeout 300 ublk-mirror del -n 0 --wait-synced --timeout 280 || fail "del"
run_timeout 300 ublk-mirror verify -s $S -t $T -b $B || fail "verify after the benchmark"
umount /data
