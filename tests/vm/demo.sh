#!/bin/sh
# A guided tour, not a test of its own (scripts/try-in-vm.sh runs it): create a mirrored device,
# put a file system on it, watch the mirror converge, look at status, delete it, verify.
# shellcheck source=/dev/null
. /vm/lib.sh
S=/tmp/disk.img T=/tmp/mirror.img B=/tmp/disk.bitmap DEV=/dev/ublkb0
truncate -s 512M $S $T
step "ublk-mirror add --source $S --target $T --bitmap $B"
run_timeout 60 ublk-mirror add --source $S --target $T --bitmap $B || fail "add"
step "mkfs.ext4 and some files on $DEV"
run_timeout 120 mkfs.ext4 -q $DEV || fail mkfs
mkdir -p /mnt/d && mount $DEV /mnt/d || fail mount
dd if=/dev/urandom of=/mnt/d/data bs=1M count=64 2>/dev/null; sync
step "ublk-mirror status -n 0"
ublk-mirror status -n 0
run_timeout 60 ublk-mirror status -n 0 --wait-synced --timeout 60 > /dev/null || fail "a consistent point"
ublk-mirror status -n 0
umount /mnt/d
step "ublk-mirror del -n 0 --wait-synced; ublk-mirror verify"
run_timeout 90 ublk-mirror del -n 0 --wait-synced || fail del
run_timeout 60 ublk-mirror verify --source $S --target $T --bitmap $B || fail verify
ublk-mirror bitmap show $B
step "what happened"
echo "    $S (512 MiB, sparse) was served as $DEV; every write first marked its 64 KiB region in"
echo "    $B, and the mirror copied the marked regions to $T. Once synced, del stopped"
echo "    the device with the target holding every write; verify compared both files (reading"
echo "    only where either holds data), and the bitmap is clean: a later add with it copies"
echo "    nothing until something is written. More: man ublk-mirror, docs/operations.md."
