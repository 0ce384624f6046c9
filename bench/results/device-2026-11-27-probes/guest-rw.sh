#!/bin/sh
. /vm/lib.sh
SIZE=256M RT=6
mkdir -p /bench && mount -t tmpfs -o size=2000m tmpfs /bench && cd /bench || fail tmpfs
for f in m_src m_tgt u_src; do truncate -s $SIZE $f; done
run_timeout 60 ublk-mirror add -n 0 --sync none -s /bench/m_src -t /bench/m_tgt -b /bench/m_bm > /dev/null || fail add
run_timeout 60 rublk add loop -n 1 -f /bench/u_src > /dev/null || fail rublk
wait_for 10 devs sh -c "test -b /dev/ublkb0 && test -b /dev/ublkb1"
for d in /dev/ublkb0 /dev/ublkb1; do run_timeout 120 fio --name=fill --filename=$d --rw=write --bs=1M --iodepth=8 --ioengine=io_uring --direct=1 --size=$SIZE --output=/tmp/fill.out || fail fill; done
wait_for 120 synced sh -c "ublk-mirror status -n 0 --json | grep -q '\"state\": \"synced\"'"
one() { # name dev
  out=$(run_timeout 120 fio --name=b --filename=$2 --rw=randwrite --bs=4k --iodepth=32 --ioengine=io_uring --direct=1 --size=$SIZE --time_based --runtime=$RT --ramp_time=1 --output-format=terse --terse-version=3) || fail fio
  echo "$out" | awk -F';' -v n="$1" '{ printf "RESULT %s randwrite %d\n", n, $8 + $49 }'
}
for r in 1 2; do
  wait_for 300 synced sh -c "ublk-mirror status -n 0 --json | grep -q '\"state\": \"synced\"'"
  one ublk /dev/ublkb1
  one mirror /dev/ublkb0
  ublk-mirror status -n 0 --json | grep -E '"(persistent_dirty_regions|bytes_copied|dirty_bytes)"'
  wait_for 300 synced sh -c "ublk-mirror status -n 0 --json | grep -q '\"state\": \"synced\"'"
  ublk-mirror pause -n 0
  one mirror-paused /dev/ublkb0
  ublk-mirror status -n 0 --json | grep -E '"(persistent_dirty_regions|dirty_bytes)"'
  one mirror-paused-again /dev/ublkb0
  ublk-mirror resume -n 0
done
