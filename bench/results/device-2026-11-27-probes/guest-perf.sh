#!/bin/sh
. /vm/lib.sh
SIZE=256M RT=8
echo 0 > /proc/sys/kernel/kptr_restrict; echo -1 > /proc/sys/kernel/perf_event_paranoid
mkdir -p /bench && mount -t tmpfs -o size=2000m tmpfs /bench && cd /bench || fail tmpfs
for f in m_src m_tgt u_src; do truncate -s $SIZE $f; done
run_timeout 60 ublk-mirror add -n 0 --sync none -s /bench/m_src -t /bench/m_tgt -b /bench/m_bm >/dev/null || fail add
run_timeout 60 rublk add loop -n 1 -a -f /bench/u_src > /dev/null || fail rublk
wait_for 10 devs sh -c "test -b /dev/ublkb0 && test -b /dev/ublkb1"
for d in 0 1; do run_timeout 120 fio --name=fill --filename=/dev/ublkb$d --rw=write --bs=1M --iodepth=8 --ioengine=io_uring --direct=1 --size=$SIZE --output=/tmp/fill.out || fail fill; done
wait_for 120 synced sh -c "ublk-mirror status -n 0 --json | grep -q '\"state\": \"synced\"'"
ublk-mirror pause -n 0
MP=$(ublk-mirror list --json | sed -n 's/.*"pid": \([0-9]*\).*/\1/p' | head -1)
RP=$(ps -o pid,args | awk '/rublk add/ && !/awk/ {print $1}' | head -1)
for n in 0 1; do
  P=$MP; [ $n = 1 ] && P=$RP
  fio --name=b --filename=/dev/ublkb$n --rw=randread --bs=4k --iodepth=32 --ioengine=io_uring --direct=1 --size=$SIZE --time_based --runtime=$RT --output-format=terse --terse-version=3 > /tmp/fio$n.out &
  F=$!
  sleep 2
  perf record -q -e cpu-clock -F 999 -g -a -o /tmp/perf$n.data -- sleep 4 2>/tmp/perf.err || cat /tmp/perf.err
  wait $F
  awk -F';' -v n="$n" '{ printf "RESULT dev%s randread %d\n", n, $8 + $49 }' /tmp/fio$n.out
  echo "=== PROFILE dev$n (pid $P) by comm"
  perf report -i /tmp/perf$n.data --stdio --no-children --sort comm 2>/dev/null | grep -v "^#" | grep -v "^$" | head -15
  echo "=== TIDS dev$n"
  perf report -i /tmp/perf$n.data --stdio --no-children --pid $P --sort tid -g none 2>/dev/null | grep -v "^#" | grep -v "^$" | head -12
  echo "=== CALLERS dev$n"
  perf report -i /tmp/perf$n.data --stdio --no-children --pid $P --sort sym -S _raw_spin_unlock_irqrestore,finish_task_switch.isra.0 -G 2>/dev/null | grep -v "^#" | grep -v "^$" | head -80
  echo "=== PROFILE dev$n pid $P top symbols"
  perf report -i /tmp/perf$n.data --stdio --no-children --pid $P --sort sym -g none 2>/dev/null | grep -v "^#" | grep -v "^$" | head -40
done
