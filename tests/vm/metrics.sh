#!/bin/sh
# vm-args: -m 2G -b /usr/bin/promtool
# `ublk-mirror metrics` on a live device (issue 15): with no device, synced, paused with dirty
# bytes, with its daemon killed (up 0, quiesced, still exit 0), recovered, deleted. Every output
# passes `promtool check metrics` (Prometheus's parser and naming lint; the host's promtool,
# from scripts/deps.sh, copied in by the vm-args line) and shows the device's state one-hot.
# shellcheck source=/dev/null
. /vm/lib.sh
S=/tmp/src.img T=/tmp/tgt.img B=/tmp/bm DEV=/dev/ublkb0
# The labels of every series of device 0 (its name defaults to the source's file name).
L='device="ublkb0",name="src.img",source="/tmp/src.img",target="/tmp/tgt.img"'

# metrics FILE: `ublk-mirror metrics` into FILE (its stderr in FILE.err); fails the script
# unless it exits 0 and promtool finds nothing to say about the output.
metrics() {
    run_timeout 30 ublk-mirror metrics > "$1" 2> "$1.err" || fail "metrics: $(cat "$1.err")"
    run_timeout 60 promtool check metrics < "$1" > "$1.lint" 2>&1 || fail "promtool check metrics: $(cat "$1.lint")"
    [ ! -s "$1.lint" ] || fail "promtool check metrics: $(cat "$1.lint")"
}
# has FILE LINE: FILE has the whole line LINE.
has() { grep -qxF "$2" "$1" || { cat "$1" >&2; fail "no line '$2' in the metrics above"; }; }
# value FILE SERIES: the value of the sample SERIES (name and labels, written as in the output).
value() { awk -v k="$2 " 'index($0, k) == 1 { print substr($0, length(k) + 1) }' "$1"; }
# one_state FILE FAMILY STATE: of device 0's FAMILY series, STATE alone is 1.
one_state() {
    has "$1" "$2{$L,state=\"$3\"} 1"
    n=$(grep -c "^$2{device=\"ublkb0\",.*} 1\$" "$1")
    [ "$n" = 1 ] || { cat "$1" >&2; fail "$n series of $2 are 1 for ublkb0"; }
}

step "no device: the families, and ublk_mirror_devices 0"
metrics /tmp/m0
has /tmp/m0 "ublk_mirror_devices 0"
[ "$(grep -vc '^#' /tmp/m0)" = 1 ] || fail "samples other than ublk_mirror_devices without a device: $(cat /tmp/m0)"

step "synced"
truncate -s 64M $S $T
add_synced $S $T $B
metrics /tmp/m1
has /tmp/m1 "ublk_mirror_devices 1"
has /tmp/m1 "ublk_mirror_up{$L} 1"
one_state /tmp/m1 ublk_mirror_ublk_state live
one_state /tmp/m1 ublk_mirror_state synced
has /tmp/m1 "ublk_mirror_copy_mode{$L,mode=\"background\"} 1"
[ "$(grep -c '^ublk_mirror_copy_mode{device="ublkb0",.*} 1$' /tmp/m1)" = 1 ] || fail "copy mode not one-hot: $(cat /tmp/m1)"
has /tmp/m1 "ublk_mirror_dirty_bytes{$L} 0"
has /tmp/m1 "ublk_mirror_device_size_bytes{$L} 67108864"
points=$(value /tmp/m1 "ublk_mirror_consistent_points_total{$L}")
[ "${points:-0}" -ge 1 ] || fail "consistent points '$points' after the initial sync"
at=$(value /tmp/m1 "ublk_mirror_last_consistent_timestamp_seconds{$L}")
[ -n "$at" ] || fail "no timestamp of the last consistent point: $(cat /tmp/m1)"
age=$(awk -v at="$at" -v now="$(date +%s)" 'BEGIN { printf "%d\n", now - at }')
[ "$age" -ge -2 ] && [ "$age" -le 600 ] || fail "last consistent point $age s ago (timestamp $at, now $(date +%s))"
copied=$(value /tmp/m1 "ublk_mirror_copied_bytes_total{$L}")
zeroed=$(value /tmp/m1 "ublk_mirror_zeroed_bytes_total{$L}")
log "synced: $points consistent points, last ${age}s ago; $copied bytes copied, $zeroed zeroed"

step "paused with 1 MiB written: paused, 1 MiB dirty, lagging"
run_timeout 10 ublk-mirror pause -n 0 || fail "pause"
run_timeout 60 dd if=/dev/urandom of=$DEV bs=1M count=1 seek=8 oflag=direct conv=fsync 2>/dev/null || fail "dd"
metrics /tmp/m2
one_state /tmp/m2 ublk_mirror_state paused
has /tmp/m2 "ublk_mirror_dirty_bytes{$L} 1048576"
has /tmp/m2 "ublk_mirror_copying_bytes{$L} 0"
lag=$(value /tmp/m2 "ublk_mirror_lag_seconds{$L}")
awk -v l="$lag" 'BEGIN { exit !(l > 0) }' || fail "lag '$lag' while 1 MiB is dirty"

step "resumed: synced again, the 1 MiB copied"
run_timeout 10 ublk-mirror resume -n 0 || fail "resume"
run_timeout 60 ublk-mirror status -n 0 --wait-synced --timeout 60 > /dev/null || fail "synced after resume"
metrics /tmp/m3
one_state /tmp/m3 ublk_mirror_state synced
has /tmp/m3 "ublk_mirror_dirty_bytes{$L} 0"
now=$(value /tmp/m3 "ublk_mirror_copied_bytes_total{$L}")
[ $((now - copied)) -ge 1048576 ] || fail "copied $((now - copied)) bytes after resume, expected at least 1048576"

step "daemon killed: up 0, quiesced, the other families without it, exit 0"
PID=$(ublk-mirror list --json | jnum pid)
kill -9 "$PID" || fail "kill the daemon $PID"
wait_for 20 QUIESCED sh -c "ublk-mirror list --json | grep -q QUIESCED"
metrics /tmp/m4
has /tmp/m4 "ublk_mirror_devices 1"
has /tmp/m4 "ublk_mirror_up{$L} 0"
one_state /tmp/m4 ublk_mirror_ublk_state quiesced
if grep -q '^ublk_mirror_state{' /tmp/m4; then cat /tmp/m4 >&2; fail "a mirror state for a device whose daemon is dead"; fi
grep -q "device 0" /tmp/m4.err || fail "stderr does not name device 0: $(cat /tmp/m4.err)"
log "stderr: $(cat /tmp/m4.err)"

step "recovered, then deleted"
run_timeout 90 ublk-mirror recover -n 0 > /tmp/rec.out 2>&1 || fail "recover: $(cat /tmp/rec.out)"
run_timeout 60 ublk-mirror status -n 0 --wait-synced --timeout 60 > /dev/null || fail "synced after recover"
metrics /tmp/m5
has /tmp/m5 "ublk_mirror_up{$L} 1"
one_state /tmp/m5 ublk_mirror_ublk_state live
one_state /tmp/m5 ublk_mirror_state synced
run_timeout 90 ublk-mirror del -n 0 --wait-synced --timeout 60 || fail "del"
metrics /tmp/m6
has /tmp/m6 "ublk_mirror_devices 0"
cat /tmp/m5
log ok
