#!/bin/sh
# vm-args: -d src=64M -d tgt=64M -d small=32M
# The offline engine on real block devices (virtio disks) in the guest kernel: sizes come from
# BLKGETSIZE64, O_DIRECT on a block device, a short target is refused.
# shellcheck source=/dev/null
. /vm/lib.sh
SRC=$(disk_dev src) TGT=$(disk_dev tgt) SMALL=$(disk_dev small)
[ -b "$SRC" ] && [ -b "$TGT" ] && [ -b "$SMALL" ] || fail "virtio disks missing: src=$SRC tgt=$TGT small=$SMALL"
ublk-mirror --version || fail "the ublk-mirror binary does not run in the guest"

step "fill 8 MiB of the source"
dd if=/dev/urandom of="$SRC" bs=1M count=8 seek=20 conv=fsync 2>/dev/null || fail "dd to $SRC"

step "full sync block device to block device"
run_timeout 120 ublk-mirror sync -s "$SRC" -t "$TGT" -b /tmp/bm --json > /tmp/sync.json || fail "sync: $(cat /tmp/sync.json)"
cat /tmp/sync.json
grep -q '"device_size": 67108864' /tmp/sync.json || fail "device size is not the disk's 64 MiB"
grep -q '"mode": "full"' /tmp/sync.json || fail "a new bitmap must mean a full sync"
cmp "$SRC" "$TGT" || fail "source and target differ after sync"
run_timeout 60 ublk-mirror verify -s "$SRC" -t "$TGT" -b /tmp/bm || fail "verify after sync"

step "resync copies nothing"
run_timeout 60 ublk-mirror sync -s "$SRC" -t "$TGT" -b /tmp/bm --json > /tmp/sync2.json || fail "resync"
grep -q '"bytes_copied": 0' /tmp/sync2.json || fail "resync copied data: $(cat /tmp/sync2.json)"

step "a target smaller than the source is refused"
if ublk-mirror sync -s "$SRC" -t "$SMALL" -b /tmp/bm2 2> /tmp/err; then fail "sync to a 32 MiB target succeeded"; fi
show_expected /tmp/err
grep -q "smaller than the source" /tmp/err || fail "unclear error"
[ ! -e /tmp/bm2 ] || fail "a bitmap was left behind"
log "ok"
