#!/bin/sh
. /vm/lib.sh
SIZE=256M RT=6
mkdir -p /bench && mount -t tmpfs -o size=2000m tmpfs /bench && cd /bench || fail tmpfs
for f in m_src m_tgt u_src l_src l_tgt; do truncate -s $SIZE $f; done
run_timeout 60 ublk-mirror-ae add -n 0 --sync none -s /bench/m_src -t /bench/m_tgt -b /bench/m_bm >/dev/null || fail add
run_timeout 60 rublk add loop -n 1 -f /bench/u_src > /dev/null || fail rublk
run_timeout 60 ublk-mirror-cur add -n 2 --sync none -s /bench/l_src -t /bench/l_tgt -b /bench/l_bm >/dev/null || fail add-lto
wait_for 10 devs sh -c "test -b /dev/ublkb0 && test -b /dev/ublkb1 && test -b /dev/ublkb2"
for d in 0 1 2; do run_timeout 120 fio --name=fill --filename=/dev/ublkb$d --rw=write --bs=1M --iodepth=8 --ioengine=io_uring --direct=1 --size=$SIZE --output=/tmp/fill.out || fail fill; done
for n in 0 2; do wait_for 120 synced sh -c "ublk-mirror status -n $n --json | grep -q '\"state\": \"synced\"'"; done
ublk-mirror pause -n 0; ublk-mirror pause -n 2
for r in 1 2 3 4; do for rw in randread; do for n in 1 0 2; do
  out=$(run_timeout 120 fio --name=b --filename=/dev/ublkb$n --rw=$rw --bs=4k --iodepth=32 --ioengine=io_uring --direct=1 --size=$SIZE --time_based --runtime=$RT --ramp_time=1 --output-format=terse --terse-version=3) || fail fio
  echo "$out" | awk -F';' -v n="$n" -v rw=$rw '{ printf "RESULT dev%s %s %d\n", n, rw, $8 + $49 }'
done; done; done
