#!/bin/sh
. /vm/lib.sh
SIZE=256M RT=6
mkdir -p /bench && mount -t tmpfs -o size=2000m tmpfs /bench && cd /bench || fail tmpfs
for f in m_src m_tgt o_src o_tgt u_src a_src; do truncate -s $SIZE $f; done
run_timeout 60 ublk-mirror add -n 0 --sync none -s /bench/m_src -t /bench/m_tgt -b /bench/m_bm >/dev/null || fail add
run_timeout 60 ublk-mirror-old add -n 3 --sync none -s /bench/o_src -t /bench/o_tgt -b /bench/o_bm >/dev/null || fail add-old
run_timeout 60 rublk add loop -n 1 -f /bench/u_src > /dev/null || fail rublk
run_timeout 60 rublk add loop -n 2 -a -f /bench/a_src > /dev/null || fail rublk
wait_for 10 devs sh -c "test -b /dev/ublkb0 && test -b /dev/ublkb1 && test -b /dev/ublkb2 && test -b /dev/ublkb3"
for d in 0 1 2 3; do run_timeout 120 fio --name=fill --filename=/dev/ublkb$d --rw=write --bs=1M --iodepth=8 --ioengine=io_uring --direct=1 --size=$SIZE --output=/tmp/fill.out || fail fill; done
wait_for 120 synced sh -c "ublk-mirror status -n 0 --json | grep -q '\"state\": \"synced\"' && ublk-mirror status -n 3 --json | grep -q '\"state\": \"synced\"'"
snap() { for t in /proc/$1/task/*; do echo "$(basename $t) $(cat $t/comm | tr ' ' _) $(awk '{print $14, $15}' $t/stat) $(awk '/^voluntary_ctxt/ {v=$2} /^nonvoluntary_ctxt/ {n=$2} END {print v, n}' $t/status)"; done; }
P0=$(ps -o pid,args | awk '/ublk-mirror add -n 0/ && !/awk/ {print $1}' | head -1)
P3=$(ps -o pid,args | awk '/ublk-mirror-old add -n 3/ && !/awk/ {print $1}' | head -1)
P1=$(ps -o pid,args | awk '/rublk add loop -n 1/ && !/awk/ {print $1}')
P2=$(ps -o pid,args | awk '/rublk add loop -n 2/ && !/awk/ {print $1}')
echo "pids $P0 $P1 $P2 $P3"; ps -o pid,args; for p in $P0 $P1 $P2 $P3; do grep Cpus_allowed_list /proc/$p/task/*/status; done
for job in randread randwrite; do for r in 1 2 3; do for n in 1 3 2 0; do
  eval P=\$P$n
  snap $P > /tmp/a
  out=$(run_timeout 120 fio --name=b --filename=/dev/ublkb$n --rw=$job --bs=4k --iodepth=32 --ioengine=io_uring --direct=1 --size=$SIZE --time_based --runtime=$RT --ramp_time=1 --output-format=terse --terse-version=3) || fail fio
  snap $P > /tmp/b
  echo "$out" | awk -F';' -v n="$n" -v j=$job '{ printf "RESULT dev%s %s %d\n", n, j, $8 + $49 }'
  awk -v n=$n 'NR==FNR {u[$1]=$3; s[$1]=$4; v[$1]=$5; c[$1]=$6; next} { du=$3-u[$1]; ds=$4-s[$1]; dv=$5-v[$1]; dn=$6-c[$1]; if (du+ds+dv+dn > 0) printf "  THR dev%s %s %s utime %d stime %d vcsw %d ivcsw %d\n", n, $1, $2, du, ds, dv, dn }' /tmp/a /tmp/b
done; done; done
