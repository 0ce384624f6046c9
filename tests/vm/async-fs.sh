#!/bin/sh
# Async mode (ordered shipping) under a file system: mkfs, mount, write files with fsyncs, and
# the target gets the writes from the replication buffer (shipped bytes, epochs), stays a clean
# file system with the same files once synced, and switching the mode live falls back and
# resumes.
# shellcheck source=/dev/null
. /vm/lib.sh
S=/tmp/src.img T=/tmp/tgt.img B=/tmp/bm DEV=/dev/ublkb0
truncate -s 256M $S $T
run_timeout 60 ublk-mirror add -s $S -t $T -b $B --mode async --async-buffer 16M > /tmp/add.json || fail "add"
wait_for 10 "$DEV" test -b $DEV
wait_for 10 "async mode shipping" sh -c "ublk-mirror status -n 0 --json | grep -q '\"mode\": \"async\"'"

step "mkfs.ext4, mount, write files with fsync, umount"
run_timeout 120 mkfs.ext4 -q -F $DEV || fail "mkfs.ext4"
modprobe loop || fail "modprobe loop"
mkdir -p /mnt/dev /mnt/tgt
mount $DEV /mnt/dev || fail "mount"
i=0
while [ $i -lt 20 ]; do
    dd if=/dev/urandom of=/mnt/dev/file$i bs=64k count=$((i + 1)) conv=fsync 2>/dev/null || fail "write file$i"
    i=$((i + 1))
done
(cd /mnt/dev && md5sum file* > /tmp/sums)
sync
umount /mnt/dev || fail "umount"

step "the writes were shipped in epochs; the synced target is the same clean file system"
run_timeout 60 ublk-mirror status -n 0 --wait-synced --timeout 60 > /dev/null || fail "a consistent point"
ublk-mirror status -n 0 --json > /tmp/st.json
shipped=$(sed -n 's/.*"shipped_bytes": \([0-9]*\).*/\1/p' /tmp/st.json)
epochs=$(sed -n 's/.*"epochs": \([0-9]*\).*/\1/p' /tmp/st.json)
[ "${shipped:-0}" -ge $((20 * 21 / 2 * 65536)) ] || fail "only ${shipped:-no} bytes shipped: $(cat /tmp/st.json)"
[ "${epochs:-0}" -ge 20 ] || fail "only ${epochs:-no} epochs for 20 fsynced files: $(cat /tmp/st.json)"
ublk-mirror status -n 0 > /tmp/st.txt || fail "status"
grep -q "^shipping .* shipped in [0-9]* epochs" /tmp/st.txt || fail "status does not show the shipping: $(cat /tmp/st.txt)"
run_timeout 120 e2fsck -fn $T > /tmp/fsck2.out 2>&1 || fail "e2fsck on the target: $(cat /tmp/fsck2.out)"
mount -o ro,loop $T /mnt/tgt || fail "mount target"
(cd /mnt/tgt && md5sum -c /tmp/sums > /dev/null) || fail "target files differ"
umount /mnt/tgt

step "set --mode background falls behind; async again resumes"
ublk-mirror set -n 0 --mode background > /dev/null || fail "set background"
ublk-mirror status -n 0 --json | grep -q '"mode": "background"' || fail "mode not background"
ublk-mirror set -n 0 --mode async > /dev/null || fail "set async"
wait_for 10 "async again" sh -c "ublk-mirror status -n 0 --json | grep -q '\"mode\": \"async\"'"
grep -q '"async-behind"' /run/ublk-mirror/0.events || fail "no async-behind event: $(tail -5 /run/ublk-mirror/0.events)"
run_timeout 90 ublk-mirror del -n 0 --wait-synced --timeout 60 || fail "del"
cmp $S $T || fail "source and target differ after del"
log ok
