#!/bin/sh
# vm-args: -m 1G -d ext4disk=96M -d xfsdisk=320M -d bdev=48M
# WRITE_ZEROES, which the device advertises, never fails whatever the source is: a file on tmpfs
# (no FALLOC_FL_ZERO_RANGE: the daemon punches a hole), on ext4 and on xfs (both take it), and a
# block device (fallocate on it is BLKZEROOUT in the kernel). For each: the three ways a user
# zeroes a range of /dev/ublkb0 (blkdiscard -z: WRITE_ZEROES with NOUNMAP; fallocate
# --zero-range: the same through fallocate; fallocate --punch-hole: WRITE_ZEROES that may
# unmap), no error in the kernel log, the device keeps advertising the operation (the kernel
# turns it off after a refusal), the ranges read back as zeroes and nothing around them changed,
# and once synced the target equals the source.
# (xfs needs 300 MiB at least, hence its disk's size.)
# shellcheck source=/dev/null
. /vm/lib.sh
DEV=/dev/ublkb0 MIB=1048576 SIZE_MIB=48
modprobe xfs || fail "modprobe xfs"
mkdir -p /mnt/ext4 /mnt/xfs
run_timeout 60 mkfs.ext4 -q -F "$(disk_dev ext4disk)" || fail "mkfs.ext4"
mount "$(disk_dev ext4disk)" /mnt/ext4 || fail "mount ext4"
run_timeout 120 mkfs.xfs -q -f "$(disk_dev xfsdisk)" || fail "mkfs.xfs"
mount "$(disk_dev xfsdisk)" /mnt/xfs || fail "mount xfs"
BDEV=$(disk_dev bdev)
dd if=/dev/zero of=/tmp/zeroes bs=1M count=4 status=none

# zero_range HOW OFF_MIB: zeroes 4 MiB of the device at OFF_MIB with HOW. The util-linux tools
# by path: busybox runs its own applets of those names first, which lack these options.
zero_range() {
    case $1 in
        blkdiscard-z) run_timeout 60 /usr/sbin/blkdiscard -z -o $(($2 * MIB)) -l $((4 * MIB)) $DEV ;;
        zero-range) run_timeout 60 /usr/sbin/fallocate --zero-range -o $(($2 * MIB)) -l $((4 * MIB)) $DEV ;;
        punch-hole) run_timeout 60 /usr/sbin/fallocate --punch-hole --keep-size -o $(($2 * MIB)) -l $((4 * MIB)) $DEV ;;
    esac || fail "$1 at MiB $2 on the device (source on $kind)"
}

for kind in tmpfs ext4 xfs blockdev; do
    case $kind in
        tmpfs) S=/tmp/src.img ;;
        ext4) S=/mnt/ext4/src.img ;;
        xfs) S=/mnt/xfs/src.img ;;
        blockdev) S=$BDEV ;;
    esac
    step "source: $kind ($S)"
    T=/tmp/tgt.img B=/tmp/bm
    rm -f $T $B
    [ -b "$S" ] || { rm -f "$S"; truncate -s ${SIZE_MIB}M "$S"; }
    truncate -s ${SIZE_MIB}M $T
    dd if=/dev/urandom of=/tmp/orig bs=1M count=$SIZE_MIB status=none
    dd if=/tmp/orig of="$S" bs=1M conv=fsync status=none || fail "fill $S"
    add_synced "$S" $T $B
    wz=$(cat /sys/block/ublkb0/queue/write_zeroes_max_bytes)
    [ "$wz" -gt 0 ] || fail "the device does not advertise WRITE_ZEROES (write_zeroes_max_bytes $wz)"
    dmesg -c > /dev/null
    zero_range blkdiscard-z 4
    zero_range zero-range 20
    zero_range punch-hole 40
    if dmesg | grep "error, dev ublkb0" > /tmp/kerr; then
        fail "the device failed a zeroing on $kind: $(head -3 /tmp/kerr)"
    fi
    wz2=$(cat /sys/block/ublkb0/queue/write_zeroes_max_bytes)
    [ "$wz2" = "$wz" ] || fail "on $kind the kernel turned WRITE_ZEROES off ($wz -> $wz2): a zeroing was refused"
    # What the device now holds: the original with the three ranges zeroed.
    cp /tmp/orig /tmp/want
    for off in 4 20 40; do
        dd if=/tmp/zeroes of=/tmp/want bs=1M seek=$off conv=notrunc status=none
    done
    run_timeout 60 dd if=$DEV of=/tmp/got bs=1M count=$SIZE_MIB iflag=direct status=none || fail "read the device back"
    cmp /tmp/want /tmp/got || fail "on $kind the device does not read back the original with the three ranges zeroed"
    run_timeout 90 ublk-mirror del -n 0 --wait-synced --timeout 60 > /dev/null || fail "del"
    cmp -n $((SIZE_MIB * MIB)) /tmp/want "$S" || fail "the source on $kind is not the original with the ranges zeroed"
    cmp -n $((SIZE_MIB * MIB)) /tmp/want $T || fail "the target differs from the source ($kind)"
    log "$kind: 3 zeroings, no kernel error, read back and mirrored"
done
umount /mnt/ext4 /mnt/xfs
log "ok"
