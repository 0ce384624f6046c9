#!/bin/sh
# What the systemd unit runs: `up --name` adds, is a no-op while live, and recovers after the
# daemon died; `down --name` removes; `udev-name` (the udev rule's helper) names the device.
# shellcheck source=/dev/null
. /vm/lib.sh
S=/tmp/src.img T=/tmp/tgt.img B=/tmp/bm
truncate -s 64M $S $T
UP="ublk-mirror up --name data -s $S -t $T -b $B -q 2"
run_timeout 60 $UP > /tmp/up1 || fail "up"
grep -q '"name": "data"' /tmp/up1 || fail "up did not name the device: $(cat /tmp/up1)"
[ "$(ublk-mirror udev-name ublkb0)" = data ] || fail "udev-name ublkb0 is not 'data'"
run_timeout 60 $UP > /tmp/up2 || fail "second up"
grep -q '"pid": '"$(sed -n 's/.*"pid": \([0-9]*\).*/\1/p' /tmp/up1)" /tmp/up2 || fail "second up started another daemon"
[ "$(ls /sys/class/ublk-char | wc -l)" = 1 ] || fail "second up made a second device"
dd if=/dev/urandom of=/dev/ublkb0 bs=64k count=16 oflag=direct 2>/dev/null || fail "write"
kill -9 "$(sed -n 's/.*"pid": \([0-9]*\).*/\1/p' /tmp/up1)"
wait_for 20 "QUIESCED" sh -c "ublk-mirror list --json | grep -q QUIESCED"
run_timeout 90 $UP > /tmp/up3 || fail "up after the daemon died (recover)"
grep -q '"state": "LIVE"' /tmp/up3 || fail "not live after up: $(cat /tmp/up3)"
[ "$(ublk-mirror udev-name ublkb0)" = data ] || fail "the name did not survive recovery"
run_timeout 90 ublk-mirror down --name data --wait-synced --timeout 60 || fail "down"
[ -z "$(ls /sys/class/ublk-char)" ] || fail "down left a device"
run_timeout 30 ublk-mirror down --name data || fail "down of an absent device must succeed"
run_timeout 60 ublk-mirror verify -s $S -t $T -b $B || fail "verify"
if ublk-mirror add --name "bad/name" -s $S -t $T -b $B 2>/tmp/err; then fail "a bad name was accepted"; fi
grep -q "not valid" /tmp/err || fail "unclear error: $(cat /tmp/err)"
[ -z "$(ls /sys/class/ublk-char)" ] || fail "a refused add left a device"
log ok
