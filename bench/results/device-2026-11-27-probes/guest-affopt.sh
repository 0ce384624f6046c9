#!/bin/sh
# dev0/dev3: --affinity single (background / write-blocking), dev2/dev4: --affinity all; dev1: rublk loop.
. /vm/lib.sh
SIZE=256M RT=6
mkdir -p /bench && mount -t tmpfs -o size=3000m tmpfs /bench && cd /bench || fail tmpfs
for f in 0 2 3 4; do truncate -s $SIZE s$f t$f; done; truncate -s $SIZE u_src
run_timeout 60 ublk-mirror add -n 0 --sync none --affinity=single -s /bench/s0 -t /bench/t0 -b /bench/b0 >/dev/null || fail add0
run_timeout 60 rublk add loop -n 1 -f /bench/u_src > /dev/null || fail rublk
run_timeout 60 ublk-mirror add -n 2 --sync none --affinity=all -s /bench/s2 -t /bench/t2 -b /bench/b2 >/dev/null || fail add2
run_timeout 60 ublk-mirror add -n 3 --sync none --affinity=single --mode write-blocking -s /bench/s3 -t /bench/t3 -b /bench/b3 >/dev/null || fail add3
run_timeout 60 ublk-mirror add -n 4 --sync none --affinity=all --mode write-blocking -s /bench/s4 -t /bench/t4 -b /bench/b4 >/dev/null || fail add4
wait_for 10 devs sh -c "test -b /dev/ublkb0 && test -b /dev/ublkb1 && test -b /dev/ublkb2 && test -b /dev/ublkb3 && test -b /dev/ublkb4"
for d in 0 1 2 3 4; do run_timeout 120 fio --name=fill --filename=/dev/ublkb$d --rw=write --bs=1M --iodepth=8 --ioengine=io_uring --direct=1 --size=$SIZE --output=/tmp/fill.out || fail fill; done
synced() { for m in 0 2 3 4; do wait_for 300 "synced $m" sh -c "ublk-mirror status -n $m --json | grep -q '\"state\": \"synced\"'"; done; }
synced
for p in $(ps -o pid,args | awk '/ublk-mirror/ && !/awk/ {print $1}'); do grep -H Cpus_allowed_list /proc/$p/task/*/status; done
for r in 1 2 3; do for job in randread randwrite seqwrite; do
  case $job in
    randread) a="--rw=randread --bs=4k --iodepth=32";;
    randwrite) a="--rw=randwrite --bs=4k --iodepth=32";;
    seqwrite) a="--rw=write --bs=1M --iodepth=8";;
  esac
  for n in 1 0 2 3 4; do
    synced
    out=$(run_timeout 120 fio --name=b --filename=/dev/ublkb$n $a --ioengine=io_uring --direct=1 --size=$SIZE --time_based --runtime=$RT --ramp_time=1 --output-format=terse --terse-version=3) || fail fio
    echo "$out" | awk -F';' -v n="$n" -v j=$job -v r=$r '{ printf "RESULT dev%s %s %d %d %d\n", n, j, r, $8 + $49, $7 + $48 }'
  done
done; done
for p in $(ps -o pid,args | awk '/ublk-mirror/ && !/awk/ {print $1}'); do grep -H Cpus_allowed_list /proc/$p/task/*/status; done
