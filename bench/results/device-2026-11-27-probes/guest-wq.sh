#!/bin/sh
. /vm/lib.sh
SIZE=256M RT=6
mkdir -p /bench && mount -t tmpfs -o size=2000m tmpfs /bench && cd /bench || fail tmpfs
for f in m_src m_tgt u_src a_src; do truncate -s $SIZE $f; done
run_timeout 60 ublk-mirror add -n 0 --sync none -s /bench/m_src -t /bench/m_tgt -b /bench/m_bm >/dev/null || fail add
run_timeout 60 rublk add loop -n 1 -f /bench/u_src > /dev/null || fail rublk
run_timeout 60 rublk add loop -n 2 -a -f /bench/a_src > /dev/null || fail rublk
wait_for 10 devs sh -c "test -b /dev/ublkb0 && test -b /dev/ublkb1 && test -b /dev/ublkb2"
for d in 0 1 2; do run_timeout 120 fio --name=fill --filename=/dev/ublkb$d --rw=write --bs=1M --iodepth=8 --ioengine=io_uring --direct=1 --size=$SIZE --output=/tmp/fill.out || fail fill; done
wait_for 120 synced sh -c "ublk-mirror status -n 0 --json | grep -q '\"state\": \"synced\"'"
cpu() { # pid: "main-ish-threads wq-threads" ticks
  m=0; w=0; for t in /proc/$1/task/*; do c=$(awk '{print $14+$15}' $t/stat); case $(cat $t/comm) in iou-wrk*) w=$((w+c));; *) m=$((m+c));; esac; done; echo "$m $w"; }
P0=$(pidof ublk-mirror | tr ' ' '\n' | sort -n | tail -1)
for r in 1 2; do for n in 1 2 0; do
  case $n in 0) P=$(pgrep -f "ublk-mirror add" | head -1); P=$(ublk-mirror list --json | sed -n 's/.*"pid": \([0-9]*\).*/\1/p' | head -1);; *) P=$(cat /sys/block/ublkb$n/../../ 2>/dev/null; ps -o pid,args | awk -v n=$n '/rublk/ && !/awk/ {print $1}' | sed -n "${n}p");; esac
  a=$(cpu $P)
  out=$(run_timeout 120 fio --name=b --filename=/dev/ublkb$n --rw=randread --bs=4k --iodepth=32 --ioengine=io_uring --direct=1 --size=$SIZE --time_based --runtime=$RT --ramp_time=1 --output-format=terse --terse-version=3) || fail fio
  b=$(cpu $P)
  echo "$out" | awk -F';' -v n="$n" -v a="$a" -v b="$b" -v p=$P '{ printf "RESULT dev%s pid %s randread %d cpu(before threads wq) %s after %s\n", n, p, $8 + $49, a, b }'
done; done
ps -o pid,args | grep -v grep | grep "rublk\|ublk-mirror"
