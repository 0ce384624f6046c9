#!/bin/sh
# Guest side of `BENCH_PROFILE=io bench/device.sh`: the I/O-bound device benchmark. Every device
# the benchmark uses is a null_blk device made through configfs (memory backed, a volatile write
# cache, each request and each flush completed by an hrtimer BENCH_LAT_US after submission:
# irqmode=2), so the machine waits for the "disk" instead of emulating copies on tmpfs:
#   nbloop              the plain ublk loop's backing device (rublk `add loop -f`): the baseline
#   nb<i>src nb<i>tgt   source and target of the ublk-mirror device of mode i
#   nb<i>bm             an ext4 file system holding that mirror's bitmap file
# Why null_blk and not dm-delay: bench/README.md ("I/O-bound profile").
#
# Devices measured (fio, io_uring, O_DIRECT), interleaved in rounds, the order rotated per round:
#   ublk            rublk's plain loop (/dev/ublkb0 over nbloop)
#   mirror-<mode>   `ublk-mirror add --mode <mode> --sync none` (/dev/ublkb<1+i>), one per entry
#                   of BENCH_MODES, default settings otherwise (background: --busy-speed 4M)
# Jobs per round: 4k randread QD32, 4k randwrite QD32, 1M sequential write QD8 (as the CPU
# profile), BENCH_RUNTIME s after a 1 s ramp. Then the sustained-load test per device:
# BENCH_SUSTAIN_SECS of 4k randwrite QD32 with an fsync of the device every BENCH_FLUSH_MS
# (flush-every, a static helper: each fsync is a FLUSH request to the device).
#
# Prints:
#   RESULT <device> <job> <round> <iops> <KiB/s>
#   LAT <device> <job> <round> clat-us mean M p50 A p99 B p99.9 C   (fio's completion latency)
#   CPU <device> <job> <round> ...: guest busy share, CPU per 1000 requests by thread, the
#       mirror's lock waits and bitmap flushes per 1000 requests
#   RESULT-SUSTAIN <device> <round> <iops> <KiB/s> <max lag s> <max dirty MiB> <consistent
#       points/min> <target bytes per app byte, at fio's end> <the same, once synced again>
#       <flushes the device served> <s to synced after fio>       ("-" where it does not apply)
#   DEVCHECK ... : what one null_blk device does alone (latency of reads, writes, flushes)
# Env (kernel command line, so no spaces): BENCH_SIZE (256M), BENCH_RUNTIME (8), BENCH_ROUNDS (5),
# BENCH_LAT_US (5000), BENCH_MODES (background,write-blocking,async),
# BENCH_SUSTAIN_SECS (60), BENCH_FLUSH_MS (100), BENCH_SUSTAIN_ROUNDS (1), BENCH_MIRROR_ARGS
# (extra `add` options, commas for spaces).
# shellcheck source=/dev/null
. /vm/lib.sh
RT=${BENCH_RUNTIME:-8} ROUNDS=${BENCH_ROUNDS:-5} LAT_US=${BENCH_LAT_US:-5000}
MODES=$(echo "${BENCH_MODES:-background,write-blocking,async}" | tr ',' ' ')
SUSTAIN=${BENCH_SUSTAIN_SECS:-60} FLUSH_MS=${BENCH_FLUSH_MS:-100} SUSTAIN_ROUNDS=${BENCH_SUSTAIN_ROUNDS:-1}
MIRROR_ARGS=$(echo "${BENCH_MIRROR_ARGS:-}" | tr ',' ' ')
case ${BENCH_SIZE:-256M} in
    *G) SIZE_MB=$(( ${BENCH_SIZE%G} * 1024 )) ;;
    *M) SIZE_MB=${BENCH_SIZE%M} ;;
    *) fail "BENCH_SIZE must be NM or NG, got '$BENCH_SIZE'" ;;
esac
SIZE=${SIZE_MB}M
BM_MB=64   # the bitmap's file system: 64 MiB holds ext4's journal and the bitmap file of a few KiB

# --- the modes: only those `ublk-mirror add --help` lists; a missing one fails the run ------------
# (device.sh checks the same on the host before booting; this is the binary that actually runs.)
ublk-mirror add --help > /tmp/add-help.txt 2>&1 || fail "ublk-mirror add --help: $(cat /tmp/add-help.txt)"
# clap lists the values of --mode in the option's block of the help, as "- NAME: ..." lines (or,
# in the short form, "[possible values: A, B]").
OFFERED=$(sed -n '/--mode <MODE>/,/^ *--[a-z]/p' /tmp/add-help.txt |
    sed -n -e 's/^ *- \([a-z0-9-]*\):.*/\1/p' -e 's/.*\[possible values: \([^]]*\)\].*/\1/p' | tr ',\n' '  ')
[ -n "$(echo $OFFERED)" ] || fail "found no values of --mode in 'ublk-mirror add --help'"
for m in $MODES; do
    case " $OFFERED " in
        *" $m "*) ;;
        *) echo "MODE-MISSING $m: ublk-mirror add --mode takes only: $OFFERED"
           fail "mode '$m' (BENCH_MODES) is not offered by this ublk-mirror" ;;
    esac
done
log "modes: $MODES (all offered by ublk-mirror add --mode)"

# --- null_blk devices through configfs -----------------------------------------------------------
run_timeout 30 modprobe null_blk nr_devices=0 || fail "modprobe null_blk"
[ -d /sys/kernel/config/nullb ] || mount -t configfs none /sys/kernel/config || fail "mount configfs"
[ -d /sys/kernel/config/nullb ] || fail "no /sys/kernel/config/nullb after loading null_blk"
# mk_nullb NAME SIZE_MB: a memory-backed null_blk /dev/NAME with a volatile write cache (so that
# the queue advertises "write back" and flushes reach the driver, which writes its cache back and
# completes the flush after the same timer) and every request completed LAT_US after submission
# (irqmode 2: an hrtimer, exact, no polling thread). The cache is larger than the device, so a
# write never has to evict from it: null_blk's eviction (null_make_cache_space) spins with the
# device's lock held until the pages it waits for are written back, and with a 16 MiB cache the
# guest locked up in it twice (soft lockup of the requeue worker during the first fill; the
# thread holding those pages was on the same vCPU). The cost is that a flush moves all the data
# written since the last one; `drain` empties every cache before each measurement.
mk_nullb() {
    c=/sys/kernel/config/nullb/$1
    mkdir "$c" || fail "mkdir $c"
    echo "$2" > "$c/size" && echo 1 > "$c/memory_backed" && echo 2 > "$c/irqmode" &&
        echo $((LAT_US * 1000)) > "$c/completion_nsec" && echo $(( $2 + 16 )) > "$c/cache_size" &&
        echo 128 > "$c/hw_queue_depth" && echo 1 > "$c/power" || fail "configuring null_blk $1"
    wait_for 10 "/dev/$1" test -b "/dev/$1"
    wc=$(cat "/sys/block/$1/queue/write_cache")
    [ "$wc" = "write back" ] || fail "/dev/$1: write_cache is '$wc', not 'write back': flushes would not reach it"
}
# stat_field DEV N: field N of /sys/block/DEV/stat (7: sectors written, 16: flushes completed).
stat_field() { awk -v n="$2" '{ print $n }' "/sys/block/$1/stat"; }
# drain: one flush of every null_blk device, so that each measurement starts with empty write
# caches (no earlier job's data left for the next flush to write back).
drain() {
    for _dn in $(cd /sys/kernel/config/nullb && for x in *; do [ -d "$x" ] && echo "$x"; done); do
        run_timeout 60 flush-every "/dev/$_dn" 0 0 || fail "flush of /dev/$_dn"
    done
}

mk_nullb nbloop "$SIZE_MB"
i=0
for m in $MODES; do
    mk_nullb nb${i}src "$SIZE_MB"; mk_nullb nb${i}tgt "$SIZE_MB"; mk_nullb nb${i}bm $BM_MB
    i=$((i + 1))
done
log "null_blk: $(cd /sys/kernel/config/nullb && for x in *; do [ -d "$x" ] && printf '%s ' "$x"; done); ${LAT_US} us per request, a write cache of the device's size + 16 MiB, $(cat /sys/block/nbloop/queue/logical_block_size)-byte blocks"

# --- what one device does alone: reads, writes and flushes all take LAT_US ------------------------
for rw in randread randwrite; do
    run_timeout 60 fio --name=chk --eta=never --filename=/dev/nbloop --ioengine=io_uring --direct=1 --rw=$rw --bs=4k \
        --iodepth=1 --time_based --runtime=2 --percentile_list=50:99 --output-format=terse --terse-version=3 \
        > /tmp/chk.out || fail "fio $rw on nbloop alone"
    # terse v3: read p50/p99 in fields 18/19, write p50/p99 in 59/60 (clat, us), iops 8 / 49
    awk -F';' -v rw=$rw '{ if (rw == "randread") { p = $18; q = $19; i = $8 } else { p = $59; q = $60; i = $49 }
        split(p, a, "="); split(q, b, "="); printf "DEVCHECK nbloop %s QD1: p50 %s us, p99 %s us, %d IOPS\n", rw, a[2], b[2], i }' /tmp/chk.out
done
f0=$(stat_field nbloop 16)
out=$(run_timeout 30 flush-every /dev/nbloop 100 2) || fail "flush-every on nbloop alone"
echo "DEVCHECK nbloop fsync every 100 ms for 2 s: $out; flushes counted by the device: $(( $(stat_field nbloop 16) - f0 ))"

# --- the bitmaps' file systems (inode tables and journal written now, not by a lazy-init thread
# during the measurements) ------------------------------------------------------------------------
i=0
for m in $MODES; do
    run_timeout 120 mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 /dev/nb${i}bm || fail "mkfs.ext4 nb${i}bm"
    mkdir -p /bm$i && mount -t ext4 /dev/nb${i}bm /bm$i || fail "mount nb${i}bm"
    i=$((i + 1))
done

# --- the ublk devices: 0 the plain loop, 1+i the mirror of mode i -------------------------------
run_timeout 60 rublk add loop -n 0 -f /dev/nbloop > /dev/null || fail "rublk add loop"
DEVS="ublk:0" MIRRORS=""
i=0
for m in $MODES; do
    # Both sides read as zeros (fresh null_blk): --sync none declares them identical.
    # shellcheck disable=SC2086
    run_timeout 60 ublk-mirror add -n $((1 + i)) --sync none --mode "$m" $MIRROR_ARGS \
        -s /dev/nb${i}src -t /dev/nb${i}tgt -b /bm$i/bitmap > /tmp/add.out 2>&1 || fail "ublk-mirror add --mode $m: $(cat /tmp/add.out)"
    DEVS="$DEVS mirror-$m:$((1 + i))" MIRRORS="$MIRRORS $((1 + i))"
    i=$((i + 1))
done
for d in $DEVS; do wait_for 10 "/dev/ublkb${d#*:}" test -b "/dev/ublkb${d#*:}"; done
log "devices: $DEVS; ublk write_cache: $(cat /sys/block/ublkb0/queue/write_cache) (loop) / $(cat /sys/block/ublkb1/queue/write_cache) (mirror)"

# synced: every mirror has copied what earlier jobs dirtied, so that no copy runs during the next
# measurement (the sustained test measures the copy under load on purpose).
synced() {   # (sh has no local variables: _sn is this function's own name, not to clobber a caller's)
    for _sn in $MIRRORS; do
        run_timeout 330 ublk-mirror status -n "$_sn" --wait-synced --timeout 300 > /dev/null || fail "mirror $_sn not synced within 300 s ($1)"
    done
}
# Data everywhere first, so that reads hit written blocks (null_blk reads unwritten ones as zeros
# without copying). --eta=never: fio's progress line on the console ends without a newline and
# would swallow the start of the next RESULT line.
for d in $DEVS; do
    run_timeout 120 fio --name=fill --eta=never --filename=/dev/ublkb${d#*:} --rw=write --bs=1M --iodepth=8 --ioengine=io_uring \
        --direct=1 --size=$SIZE --output=/tmp/fill.out || fail "fill of ${d%%:*}: $(cat /tmp/fill.out)"
done
synced "after the fill"

# --- where the CPU goes: under TCG a mode's cost per write shows as CPU time, and CPU time on
# the path of a request as latency. Per job and device: the share of the guest's CPUs busy (/proc/stat), and the
# serving process's CPU per 1000 requests, in total (/proc/PID/stat: exited threads included) and
# by thread name (io_uring workers "iou-wrk-N" summed as "iou-wrk-"; ticks of USER_HZ = 100).
# status_num N KEY: the number KEY of mirror N's status.
status_num() { run_timeout 20 ublk-mirror status -n "$1" --json > /tmp/st.json 2> /tmp/st.err || fail "status -n $1: $(cat /tmp/st.err)"; jnum "$2" < /tmp/st.json; }
# daemon_pid N: the process serving /dev/ublkbN (rublk for the plain loop, device 0).
daemon_pid() {
    if [ "$1" = 0 ]; then
        for _p in /proc/[0-9]*; do [ "$(cat "$_p/comm" 2> /dev/null)" = rublk ] && { echo "${_p#/proc/}"; return; }; done
    else
        status_num "$1" pid
    fi
}
# cpu_snap PID: "total T", "sys BUSY ALL" and "<thread name> T" lines (T: utime + stime ticks).
cpu_snap() {
    awk '{ print "sys", $2 + $3 + $4 + $7 + $8, $2 + $3 + $4 + $5 + $6 + $7 + $8; exit }' /proc/stat
    _ps=$(cat "/proc/$1/stat") && echo "total $(echo "${_ps##*) }" | awk '{ print $12 + $13 }')"
    for _t in /proc/$1/task/*; do
        _s=$(cat "$_t/stat" 2> /dev/null) || continue
        echo "$(cat "$_t/comm" 2> /dev/null) ${_s##*) }"
    done | awk '{ n = $1; sub(/[0-9]+$/, "", n); t[n] += $13 + $14 } END { for (k in t) print k, t[k] }'
}
# reqs DEV: reads and writes the device completed (ramp included, as in the CPU times).
reqs() { awk '{ print $1 + $5 }' "/sys/block/$1/stat"; }
# counters N: "LOCK_WAITS BITMAP_FLUSHES EARLY WAKEUPS" of mirror N (its state lock found held;
# fdatasyncs of its bitmap, each an intent some write waited for or a bit cleared; shipped writes
# its queue issued itself; wake-ups written to its loop); "0 0 0 0" for the plain loop.
counters() {
    if [ "$1" = 0 ]; then echo "0 0 0 0"; return; fi
    status_num "$1" lock_waits > /dev/null
    q=$(jnum issued_by_queues < /tmp/st.json) # absent outside async mode
    echo "$(jnum lock_waits < /tmp/st.json) $(jnum bitmap_flushes < /tmp/st.json) ${q:-0} $(jnum loop_wakeups < /tmp/st.json)"
}
# cpu_line NAME JOB ROUND IOS BEFORE AFTER WAITS FLUSHES EARLY WAKEUPS: the CPU line of one
# measurement (the mirror's counters meanwhile, per 1000 requests: see counters).
cpu_line() {
    printf '%s\n%s\n' "$5" "$6" | awk -v n="$1" -v j="$2" -v r="$3" -v ios="$4" -v waits="$7" -v bmf="$8" -v early="$9" -v wakes="${10}" '
        $1 == "sys" { snap++; if (snap == 1) { sb = $2; sa = $3 } else { busy = ($2 - sb) / ($3 - sa + 1e-9) }; next }
        snap == 1 { a[$1] = $2; next }
        { d[$1] = $2 - a[$1] }
        END { per = ios > 0 ? 1000 * 10 / ios : 0
              printf "CPU %s %s %d busy %.0f%% ms/1000req total %.1f", n, j, r, 100 * busy, d["total"] * per
              for (k in d) if (k != "total" && d[k] > 0) printf " %s=%.1f", k, d[k] * per
              if (ios > 0) printf " lock-waits/1000req %.0f bitmap-flushes/1000req %.1f queue-shipped/1000req %.0f loop-wakeups/1000req %.0f", 1000 * waits / ios, 1000 * bmf / ios, 1000 * early / ios, 1000 * wakes / ios
              printf "\n" }'
}

# --- rounds ---------------------------------------------------------------------------------------
ndev=$(echo $DEVS | wc -w)
r=1
while [ "$r" -le "$ROUNDS" ]; do
    # Rotate the device order by one each round: no device always runs first or last.
    order=$(echo $DEVS | awk -v k=$(( (r - 1) % ndev )) '{ for (j = 0; j < NF; j++) printf "%s ", $((j + k) % NF + 1) }')
    for job in randread randwrite seqwrite; do
        a=$(bench_fio_args "$job")
        for d in $order; do
            synced "before $job on ${d%%:*}"
            drain
            pid=$(daemon_pid "${d#*:}")
            [ -n "$pid" ] || fail "no serving process found for ${d%%:*}"
            k0=$(counters "${d#*:}") c0=$(cpu_snap "$pid") q0=$(reqs "ublkb${d#*:}")
            # shellcheck disable=SC2086
            out=$(run_timeout $((RT + 60)) fio --name=b --filename=/dev/ublkb${d#*:} $a --ioengine=io_uring --direct=1 --size=$SIZE \
                --time_based --runtime=$RT --ramp_time=1 --output-format=terse --terse-version=3) || fail "fio $job on ${d%%:*}"
            c1=$(cpu_snap "$pid") q1=$(reqs "ublkb${d#*:}") k1=$(counters "${d#*:}")
            echo "$out" | awk -F';' -v n="${d%%:*}" -v j=$job -v r=$r '{ printf "RESULT %s %s %d %d %d\n", n, j, r, $8 + $49, $7 + $48 }'
            # Completion latency of the job's direction (terse v3: clat from field 14 for reads,
            # 55 for writes: min, max, mean, deviation, then the percentiles as "P%=usec").
            echo "$out" | awk -F';' -v n="${d%%:*}" -v j=$job -v r=$r '{
                b = (j == "randread") ? 14 : 55
                split($(b + 10), p50, "="); split($(b + 16), p99, "="); split($(b + 18), p999, "=")
                printf "LAT %s %s %d clat-us mean %.0f p50 %s p99 %s p99.9 %s\n", n, j, r, $(b + 2), p50[2], p99[2], p999[2] }'
            cpu_line "${d%%:*}" "$job" "$r" $((q1 - q0)) "$c0" "$c1" $(echo "$k0 $k1" | awk '{ print $5 - $1, $6 - $2, $7 - $3, $8 - $4 }')
        done
    done
    r=$((r + 1))
done

# --- sustained load: randwrite QD32 for SUSTAIN s, an application flush every FLUSH_MS --------------
# json_max FILE KEY: the largest value of "KEY":<number> over the JSON lines of FILE.
json_max() { sed -n "s/.*\"$2\":\([0-9.e+-]*\).*/\1/p" "$1" | awk 'BEGIN { m = 0 } $1 + 0 > m { m = $1 + 0 } END { print m }'; }
# dirty_max FILE: the largest dirty_bytes + copying_bytes (what the target lacks) over FILE's lines.
dirty_max() {
    awk 'BEGIN { m = 0 } {
        d = $0; sub(/.*"dirty_bytes":/, "", d); c = $0; sub(/.*"copying_bytes":/, "", c)
        v = (d + 0) + (c + 0); if (v > m) m = v } END { printf "%d\n", m }' "$1"
}
sr=1
while [ "$sr" -le "$SUSTAIN_ROUNDS" ]; do
    # Rotated like the rounds: with BENCH_SUSTAIN_ROUNDS a multiple of the devices, each runs
    # at every place once (the machine's state late in a run, its memory, differs from early).
    order=$(echo $DEVS | awk -v k=$(( (sr - 1) % ndev )) '{ for (j = 0; j < NF; j++) printf "%s ", $((j + k) % NF + 1) }')
    for d in $order; do
        name=${d%%:*} n=${d#*:}
        synced "before the sustained test on $name"
        drain
        dev=ublkb$n
        if [ "$name" = ublk ]; then tgt="" src=nbloop; else tgt=nb$((n - 1))tgt src=nb$((n - 1))src; fi
        fl0=$(stat_field $dev 16) sf0=$(stat_field $src 16)
        if [ -n "$tgt" ]; then
            tw0=$(stat_field "$tgt" 7) tf0=$(stat_field "$tgt" 16) cp0=$(status_num "$n" consistent_points)
            # status polled once a second for the whole test (one process, over the control socket)
            ublk-mirror status -n "$n" --watch --json --interval 1 > /tmp/watch.out 2> /tmp/watch.err & WP=$!
        fi
        t0=$(now_ms)
        flush-every /dev/$dev "$FLUSH_MS" "$SUSTAIN" > /tmp/flusher.out 2>&1 & FP=$!
        out=$(run_timeout $((SUSTAIN + 60)) fio --name=s --filename=/dev/$dev --rw=randwrite --bs=4k --iodepth=32 --ioengine=io_uring \
            --direct=1 --size=$SIZE --time_based --runtime="$SUSTAIN" --output-format=terse --terse-version=3) || fail "sustained fio on $name"
        t1=$(now_ms)
        # The flusher ends on its own SUSTAIN s after its start; bounded wait all the same.
        k=0
        while kill -0 $FP 2> /dev/null; do
            [ $k -lt 300 ] || { kill $FP; fail "flush-every did not end 30 s after fio"; }
            usleep 100000; k=$((k + 1))
        done
        wait $FP || fail "flush-every on $name: $(cat /tmp/flusher.out)"
        flushes=$(( $(stat_field $dev 16) - fl0 ))
        app=$(echo "$out" | awk -F';' '{ print $47 * 1024 }')     # fio's written KiB (terse field 47)
        iops=$(echo "$out" | awk -F';' '{ print $49 }') kib=$(echo "$out" | awk -F';' '{ print $48 }')
        log "$name sustained: $(cat /tmp/flusher.out); flushes served: $flushes by /dev/$dev, $(( $(stat_field $src 16) - sf0 )) by its backing /dev/$src$([ -z "$tgt" ] || echo ", $(( $(stat_field $tgt 16) - tf0 )) by /dev/$tgt"); fio $iops IOPS, $app bytes"
        if [ -n "$tgt" ]; then
            cp1=$(status_num "$n" consistent_points) tw1=$(stat_field "$tgt" 7)
            synced "after the sustained test on $name"
            t2=$(now_ms)
            kill $WP; wait $WP 2> /dev/null
            tw2=$(stat_field "$tgt" 7)
            [ "$(wc -l < /tmp/watch.out)" -ge $((SUSTAIN / 2)) ] || fail "status --watch gave $(wc -l < /tmp/watch.out) answers in ${SUSTAIN}+ s: $(cat /tmp/watch.err)"
            lag=$(json_max /tmp/watch.out lag_secs) dirty=$(dirty_max /tmp/watch.out)
            echo "RESULT-SUSTAIN $name $sr $iops $kib $lag $dirty $cp0 $cp1 $t0 $t1 $t2 $tw0 $tw1 $tw2 $app $flushes" | awk '{
                secs = ($11 - $10) / 1000
                printf "RESULT-SUSTAIN %s %d %d %d %.1f %.1f %.1f %.3f %.3f %d %.1f\n", $2, $3, $4, $5, $6, $7 / 1048576,
                    ($9 - $8) * 60 / secs, ($14 - $13) * 512 / $16, ($15 - $13) * 512 / $16, $17, ($12 - $11) / 1000 }'
            log "$name: $(wc -l < /tmp/watch.out) status answers; consistent points $cp0 -> $cp1; target sectors written $tw0 -> $tw1 (fio end) -> $tw2 (synced)"
        else
            echo "RESULT-SUSTAIN $name $sr $iops $kib - - - - - $flushes -"
        fi
    done
    sr=$((sr + 1))
done

# --- end: every mirror synced, deleted, and its target identical to its source -------------------
for n in $MIRRORS; do ublk-mirror status -n "$n"; done
i=0
for m in $MODES; do
    run_timeout 330 ublk-mirror del -n $((1 + i)) --wait-synced --timeout 300 || fail "del of the $m mirror"
    run_timeout 300 ublk-mirror verify -s /dev/nb${i}src -t /dev/nb${i}tgt -b /bm$i/bitmap || fail "the $m mirror's target differs from its source"
    i=$((i + 1))
done
run_timeout 60 rublk del -n 0 || fail "rublk del"
log "PASS: the I/O profile ran; every mirror verified identical"
