#!/bin/sh
# What the systemd unit runs: `up --name` adds, is a no-op while live, and recovers after the
# daemon died; `down --name` removes; `udev-name` (the udev rule's helper) names the device.
# vm-args: -b /usr/bin/udevadm -d srcdisk=16M -d other=16M
# vm-files: udev/60-ublk-mirror.rules
# shellcheck source=/dev/null
. /vm/lib.sh
S=/tmp/src.img T=/tmp/tgt.img B=/tmp/bm
truncate -s 64M $S $T
UP="ublk-mirror up --name data -s $S -t $T -b $B -q 2"
run_timeout 60 $UP > /tmp/up1 || fail "up"
grep -q '"name": "data"' /tmp/up1 || fail "up did not name the device: $(cat /tmp/up1)"
[ "$(ublk-mirror udev-name ublkb0)" = data ] || fail "udev-name ublkb0 is not 'data'"
# The project's udev rules, run by the real udevadm against the real device.
command -v udevadm > /dev/null || fail "udevadm is not in the guest (run with -b /usr/bin/udevadm)"
mkdir -p /etc/udev/rules.d /run/udev
cp /payload/60-ublk-mirror.rules /etc/udev/rules.d/ || fail "the rules file is not in /payload"
# The rules name /usr/bin/ublk-mirror, where the Debian package puts it; run.sh's -b puts the
# binary in /usr/local/bin.
[ -e /usr/bin/ublk-mirror ] || ln -s /usr/local/bin/ublk-mirror /usr/bin/ublk-mirror
run_timeout 60 udevadm test --action=add /sys/class/block/ublkb0 > /tmp/udev.out 2>&1
grep -q "disk/by-ublk-mirror/data" /tmp/udev.out || fail "udev rules give no by-ublk-mirror link: $(tail -30 /tmp/udev.out)"
log "udev: $(grep -m1 'by-ublk-mirror' /tmp/udev.out)"
# Rule 2: a configured mirror's source disk appearing wants its systemd instance; others do not.
SRCDISK=$(disk_dev srcdisk)
[ -b "$SRCDISK" ] || fail "no srcdisk"
mkdir -p /etc/ublk-mirror
echo "SOURCE=$SRCDISK" > /etc/ublk-mirror/vmdisk.conf
run_timeout 60 udevadm test --action=add "/sys/class/block/${SRCDISK#/dev/}" > /tmp/udev2.out 2>&1
grep -q "SYSTEMD_WANTS=ublk-mirror@vmdisk.service" /tmp/udev2.out || fail "the source disk does not want ublk-mirror@vmdisk: $(tail -30 /tmp/udev2.out)"
OTHER=$(disk_dev other)
[ -b "$OTHER" ] || fail "no second disk"
run_timeout 60 udevadm test --action=add "/sys/class/block/${OTHER#/dev/}" > /tmp/udev3.out 2>&1
grep -q "60-ublk-mirror.rules" /tmp/udev3.out || fail "udevadm did not read the rules for $OTHER: $(tail -20 /tmp/udev3.out)"
if grep -q "ublk-mirror@" /tmp/udev3.out; then fail "an unconfigured disk wants a mirror"; fi
log "udev: $(grep -m1 'SYSTEMD_WANTS' /tmp/udev2.out)"
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
