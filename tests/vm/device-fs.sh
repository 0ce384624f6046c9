#!/bin/sh
# ext4 on the device: mkfs, mount, write files, sync, umount, fsck clean; once synced the target
# fscks clean and holds the same files (scenario 2 of the device issue).
# shellcheck source=/dev/null
. /vm/lib.sh
S=/tmp/src.img T=/tmp/tgt.img B=/tmp/bm DEV=/dev/ublkb0
truncate -s 256M $S $T
run_timeout 60 ublk-mirror add -s $S -t $T -b $B > /tmp/add.json || fail "add"
wait_for 10 "$DEV" test -b $DEV

step "mkfs.ext4, mount, write, umount, fsck"
run_timeout 120 mkfs.ext4 -q -F $DEV || fail "mkfs.ext4"
# mkfs zeroes with WRITE_ZEROES, which the device advertises; the source is on tmpfs, which
# refuses FALLOC_FL_ZERO_RANGE: the device must fall back, not fail it.
if dmesg | grep "operation not supported error, dev ublkb0" > /tmp/opnotsupp; then
    fail "the device failed an operation it advertises: $(head -3 /tmp/opnotsupp)"
fi
modprobe loop || fail "modprobe loop"
mkdir -p /mnt/dev /mnt/tgt
mount $DEV /mnt/dev || fail "mount"
i=0
while [ $i -lt 20 ]; do
    dd if=/dev/urandom of=/mnt/dev/file$i bs=64k count=$((i + 1)) 2>/dev/null || fail "write file$i"
    i=$((i + 1))
done
mkdir /mnt/dev/dir && echo hello > /mnt/dev/dir/hello
(cd /mnt/dev && md5sum file* dir/hello > /tmp/sums)
sync
umount /mnt/dev || fail "umount"
run_timeout 120 e2fsck -fn $DEV > /tmp/fsck.out 2>&1 || fail "e2fsck on the device: $(cat /tmp/fsck.out)"

step "the synced target is a clean file system with the same files"
run_timeout 60 ublk-mirror status -n 0 --wait-synced --timeout 60 > /dev/null || fail "a consistent point"
run_timeout 120 e2fsck -fn $T > /tmp/fsck2.out 2>&1 || fail "e2fsck on the target: $(cat /tmp/fsck2.out)"
mount -o ro,loop $T /mnt/tgt || fail "mount target"
(cd /mnt/tgt && md5sum -c /tmp/sums > /dev/null) || fail "target files differ"
umount /mnt/tgt
run_timeout 90 ublk-mirror del -n 0 --wait-synced --timeout 60 || fail "del"
log ok
