#!/bin/sh
# Smoke test of the VM itself (not of ublk-mirror): the kernel pieces and tools that the device
# tests rely on are there and work. Run: vm/run.sh vm/guest/smoke.sh  [-d data=64M to check disks]
# shellcheck source=/dev/null # vm/guest/lib.sh, placed there by vm/run.sh
. /vm/lib.sh

step "kernel $(uname -r), $(nproc) vCPUs, $(free -m | awk '/^Mem:/ { print $2 }') MiB"

step "ublk_drv"
grep -q '^ublk_drv ' /proc/modules || fail "ublk_drv is not loaded"
[ -c /dev/ublk-control ] || fail "/dev/ublk-control is missing or not a character device"
ls -l /dev/ublk-control

step "module loading on demand (busybox modprobe, decompressed modules)"
for m in null_blk dm-mod dm-flakey loop; do
    modprobe "$m" || fail "modprobe $m"
done
[ -b /dev/nullb0 ] || fail "null_blk loaded but /dev/nullb0 is missing"
wait_for 5 "/dev/mapper/control" test -c /dev/mapper/control
dmsetup version || fail "dmsetup does not run"
dmsetup targets | grep -q flakey || fail "dm-flakey target not registered"

step "ext4 tools"
truncate -s 64M /tmp/ext4.img
mkfs.ext4 -q -F /tmp/ext4.img || fail "mkfs.ext4"
e2fsck -fn /tmp/ext4.img > /dev/null || fail "e2fsck on a fresh file system"
dumpe2fs -h /tmp/ext4.img 2>/dev/null | grep -q '^Filesystem state: *clean' || fail "dumpe2fs"
mkdir -p /mnt/ext4
mount -o loop /tmp/ext4.img /mnt/ext4 || fail "mount of the ext4 image over loop"
echo hello > /mnt/ext4/f
umount /mnt/ext4 || fail "umount"
debugfs -R 'cat /f' /tmp/ext4.img 2>/dev/null | grep -q hello || fail "debugfs cannot read back the file"
rm -f /tmp/ext4.img

step "fio (from the tools disk)"
fio --version || fail "fio does not start"
# io_uring is what a ublk server is built on; exercise it once here.
run_timeout 60 fio --name=smoke --filename=/tmp/fio.dat --size=8M --bs=4k --rw=randrw \
    --ioengine=io_uring --iodepth=8 --runtime=2 --time_based --output-format=terse > /tmp/fio.out \
    || fail "fio io_uring job failed: $(cat /tmp/fio.out)"
rm -f /tmp/fio.dat

step "extra disks"
if [ -s /run/ublk-vm/disks ]; then
    while read -r name dev; do
        [ -b "$dev" ] || fail "disk $name: $dev is not a block device"
        [ "$(disk_dev "$name")" = "$dev" ] || fail "disk $name: by-serial link does not point to $dev"
        size=$(blockdev --getsize64 "$dev") || fail "blockdev $dev"
        dd if="$dev" of=/dev/null bs=4k count=1 iflag=direct 2>/dev/null || fail "disk $name: read of $dev failed"
        log "disk $name: $dev, $size bytes, readable"
    done < /run/ublk-vm/disks
else
    log "no extra disks attached"
fi

step "smoke test passed"
