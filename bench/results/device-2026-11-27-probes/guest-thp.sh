#!/bin/sh
. /vm/lib.sh
SIZE=256M
mkdir -p /bench && mount -t tmpfs -o size=1000m tmpfs /bench && cd /bench || fail tmpfs
for f in m_src m_tgt u_src; do truncate -s $SIZE $f; done
run_timeout 60 ublk-mirror add -n 0 --sync none -s /bench/m_src -t /bench/m_tgt -b /bench/m_bm >/dev/null || fail add
run_timeout 60 rublk add loop -n 1 -f /bench/u_src > /dev/null || fail rublk
wait_for 10 devs sh -c "test -b /dev/ublkb0 && test -b /dev/ublkb1"
cat /sys/kernel/mm/transparent_hugepage/enabled
MP=$(ublk-mirror list --json | sed -n 's/.*"pid": \([0-9]*\).*/\1/p' | head -1)
RP=$(ps -o pid,args | awk '/rublk add/ && !/awk/ {print $1}' | head -1)
MP=$(ublk-mirror list --json | sed -n "s/.*\"pid\": \([0-9]*\).*/\1/p" | head -1)
for p in $MP $RP; do echo "== $p"; grep -E "AnonHuge|Rss|Anonymous" /proc/$p/smaps_rollup; awk '/^[0-9a-f]+-[0-9a-f]+ /{r=$1; n=$6} /^Size:/{s=$2} /^AnonHugePages:/{ if ($2>0 || s>=65536) print r, n, "size", s, "thp", $2}' /proc/$p/smaps | head -30; done
run_timeout 120 fio --name=fill --filename=/dev/ublkb0 --rw=randread --bs=4k --iodepth=32 --ioengine=io_uring --direct=1 --size=64M --output=/tmp/f.out; echo after-io; awk "/^[0-9a-f]+-[0-9a-f]+ /{r=\$1} /^Size:/{s=\$2} /^AnonHugePages:/{ if (\$2>0 || s>=65536) print r, \"size\", s, \"thp\", \$2}" /proc/$MP/smaps
