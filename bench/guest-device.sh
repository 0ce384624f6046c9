#!/bin/sh
# Guest side of bench/device.sh: fio on eight block devices over the same kind of backing files
# (tmpfs), interleaved in rounds so that drift of the emulated machine hits all alike:
#   mirror     ublk-mirror while mirroring, background mode (source + target + bitmap, --sync none),
#              default settings: the copy yields to I/O (--busy-speed 16M)
#   mirror-compete  the same with --busy-speed 0: the copy competes with fio at full speed
#   mirror-wb  the same in write-blocking mode (--mode write-blocking: writes go to both at once)
#   mirror-async  the same in async mode (--mode async: writes shipped in order from a buffer)
#   ublk       rublk's plain ublk loop target over one file (its default: libublk's callback loop)
#   ublk-async rublk's loop with --async_await (libublk's async tasks, the style ublk-mirror uses)
#   loop    the kernel loop driver (direct I/O)
#   raid1   dm-raid1 (dm-mirror, core log) over two kernel loop devices: the in-kernel mirror
# Prints: RESULT <device> <job> <round> <iops> <KiB/s>
# shellcheck source=/dev/null
. /vm/lib.sh
SIZE=${BENCH_SIZE:-256M} RT=${BENCH_RUNTIME:-6} ROUNDS=${BENCH_ROUNDS:-3}
modprobe loop; modprobe dm-mirror
# Thirteen backing files of 256 MiB, all filled: more than the 1 GiB /tmp holds (the guest has 5 GiB).
mkdir -p /bench && mount -t tmpfs -o size=3800m tmpfs /bench && cd /bench || fail "tmpfs for the files"
for f in m_src m_tgt c_src c_tgt w_src w_tgt s_src s_tgt u_src a_src l_src r_a r_b; do truncate -s $SIZE $f; done
# shellcheck disable=SC2086
run_timeout 60 ublk-mirror add -n 0 --sync none ${BENCH_MIRROR_ARGS:-} -s /bench/m_src -t /bench/m_tgt -b /bench/m_bm > /dev/null || fail "ublk-mirror add"
# shellcheck disable=SC2086
run_timeout 60 ublk-mirror add -n 4 --sync none --busy-speed 0 ${BENCH_MIRROR_ARGS:-} -s /bench/c_src -t /bench/c_tgt -b /bench/c_bm > /dev/null || fail "ublk-mirror add (compete)"
run_timeout 60 rublk add loop -n 1 -f /bench/u_src > /dev/null || fail "rublk add"
run_timeout 60 ublk-mirror add -n 2 --sync none --mode write-blocking -s /bench/w_src -t /bench/w_tgt -b /bench/w_bm > /dev/null || fail "ublk-mirror add (write-blocking)"
run_timeout 60 rublk add loop -n 3 -a -f /bench/a_src > /dev/null || fail "rublk add --async_await"
run_timeout 60 ublk-mirror add -n 5 --sync none --mode async -s /bench/s_src -t /bench/s_tgt -b /bench/s_bm > /dev/null || fail "ublk-mirror add (async)"
wait_for 10 "ublk devices" sh -c "test -b /dev/ublkb0 && test -b /dev/ublkb1 && test -b /dev/ublkb2 && test -b /dev/ublkb3 && test -b /dev/ublkb4 && test -b /dev/ublkb5"
L=$(losetup -f) && losetup "$L" /bench/l_src || fail "losetup"
RA=$(losetup -f) && losetup "$RA" /bench/r_a && RB=$(losetup -f) && losetup "$RB" /bench/r_b || fail "losetup raid legs"
SECT=$(( $(blockdev --getsize64 "$RA") / 512 ))
dmsetup create bench-raid1 --table "0 $SECT mirror core 2 1024 nosync 2 $RA 0 $RB 0" || fail "dm-mirror"
wait_for 10 "dm device" test -b /dev/mapper/bench-raid1
DEVS="mirror:/dev/ublkb0 mirror-compete:/dev/ublkb4 mirror-wb:/dev/ublkb2 mirror-async:/dev/ublkb5 ublk:/dev/ublkb1 ublk-async:/dev/ublkb3 loop:$L raid1:/dev/mapper/bench-raid1"
log "devices: $DEVS"
for job in randread randwrite seqwrite; do
    for d in $DEVS; do
        # Lay data down first so reads hit written blocks (and the mirror has copied it).
        run_timeout 120 fio --name=fill --filename=${d#*:} --rw=write --bs=1M --iodepth=8 --ioengine=io_uring --direct=1 --size=$SIZE --output=/tmp/fill.out \
            || fail "fill of $d: $(cat /tmp/fill.out)"
    done
    [ "$job" = randread ] || break
done
for n in 0 2 4 5; do
    wait_for 120 "mirror $n to converge after the fill" sh -c "ublk-mirror status -n $n --json | grep -q '\"state\": \"synced\"'"
done
r=1
while [ $r -le "$ROUNDS" ]; do
    for job in randread randwrite seqwrite; do
        a=$(bench_fio_args "$job")
        for d in $DEVS; do
            # The background mirror copies what the previous jobs dirtied: let it finish first, or
            # its copying would load the (emulated, CPU-bound) machine during the next device's run.
            for n in 0 2 4 5; do
                wait_for 300 "mirror $n synced" sh -c "ublk-mirror status -n $n --json | grep -q '\"state\": \"synced\"'"
            done
            # shellcheck disable=SC2086
            out=$(run_timeout 120 fio --name=b --filename=${d#*:} $a --ioengine=io_uring --direct=1 --size=$SIZE \
                --time_based --runtime=$RT --ramp_time=1 --output-format=terse --terse-version=3) || fail "fio $job on $d"
            echo "$out" | awk -F';' -v n="${d%%:*}" -v j=$job -v r=$r '{ printf "RESULT %s %s %d %d %d\n", n, j, r, $8 + $49, $7 + $48 }'
        done
    done
    r=$((r + 1))
done
ublk-mirror status -n 0
ublk-mirror status -n 2
ublk-mirror status -n 4
ublk-mirror status -n 5
run_timeout 120 ublk-mirror del -n 0 --wait-synced --timeout 100 || fail "del"
run_timeout 120 ublk-mirror del -n 2 --wait-synced --timeout 100 || fail "del"
run_timeout 120 ublk-mirror del -n 4 --wait-synced --timeout 100 || fail "del"
run_timeout 120 ublk-mirror del -n 5 --wait-synced --timeout 100 || fail "del"
run_timeout 60 ublk-mirror verify -s /bench/m_src -t /bench/m_tgt -b /bench/m_bm || fail "the mirror is not identical after the benchmark"
run_timeout 60 ublk-mirror verify -s /bench/w_src -t /bench/w_tgt -b /bench/w_bm || fail "the write-blocking mirror is not identical after the benchmark"
run_timeout 60 ublk-mirror verify -s /bench/s_src -t /bench/s_tgt -b /bench/s_bm || fail "the async mirror is not identical after the benchmark"
