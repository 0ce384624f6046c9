#!/usr/bin/env bash
# The VM half of the scale benchmark (issue 14), 2 TiB in a guest with 1 GiB of memory:
#   1. tests/vm/scale-2tib.sh, the CI scenario: time of `add` until /dev/ublkb0 exists and until
#      the sparse 2 TiB pair is synced, the daemon's VmHWM against 3 x bitmap + 32 MiB;
#   2. bench/guest-scale-latency.sh: 4k random write latency p50/p99 with `status` asked
#      10 times a second (a watcher over the control socket; a process per call; processes
#      alone) against nothing, order rotated; goal: p99 with the watcher within 10 %.
#   3. the same on a source with latency of its own, one boot per entry of SOURCE_DELAYS:
#      dm:N = dm-delay of N ms over a loop device over the sparse file; nullb:N = null_blk
#      completed N us after submission (memory backed; that boot gets 2 GiB for the data written).
#   bench/scale-vm.sh | tee bench/results/scale-vm-$(date +%F).txt
# Env: BENCH_RUNTIME (8 s per fio run), BENCH_ROUNDS (4), SCENARIO_ROUNDS (3 boots of scenario 1),
# BENCH_PARTS ("1 2 3"), SOURCE_DELAYS ("dm:1 nullb:1000"), UBLK_MIRROR_BIN (the binary).
# Needs target/release/ublk-mirror (cargo build --release) and vm/ (vm/setup.sh runs if needed).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${UBLK_MIRROR_BIN:-target/release/ublk-mirror}
PARTS=" ${BENCH_PARTS:-1 2 3} "
[ -x "$BIN" ] || { echo "build first: cargo build --release" >&2; exit 1; }
echo "=== ublk-mirror scale benchmark, VM part: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
echo "host: $(nproc) cores, $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg); $(git rev-parse --short HEAD) ($(git status --porcelain | wc -l) files modified)"
echo "binary: $BIN ($("$BIN" --version), sha256 $(sha256sum "$BIN" | cut -c1-16)); guest: Debian 6.12 under qemu TCG, 2 vCPUs, 1 GiB"
log=$(mktemp)
trap 'rm -f "$log"' EXIT

# latency_table LOG: the per-mode summary of the LAT lines in LOG, with the p99 ratios per round.
latency_table() {
grep -a '^LAT' "$1" | python3 -c '
import sys, statistics as st
rows = [l.split() for l in sys.stdin]
modes = ("idle", "watch", "poll", "spawn")
by = {m: {int(r[2]): r for r in rows if r[1] == m} for m in modes}
rounds = sorted(by["idle"])
print("mode   runs  p50 us (median)  p99 us (median)  iops (median)  calls/run  p99 vs idle per round       median")
for m in modes:
    rs = list(by[m].values())
    p50 = st.median(int(r[3]) for r in rs); p99 = st.median(int(r[4]) for r in rs)
    rat = [int(by[m][k][4]) / int(by["idle"][k][4]) for k in rounds]
    print(f"{m:6} {len(rs):4}  {p50:15.0f}  {p99:15.0f}  {st.median(int(r[5]) for r in rs):13.0f}  {st.median(int(r[6]) for r in rs):9}  " + " ".join(f"{x:.2f}" for x in rat) + f"   {st.median(rat):.3f}")
w = st.median(int(by["watch"][k][4]) / int(by["idle"][k][4]) for k in rounds)
verdict = "PASS" if w <= 1.10 else "FAIL"
print(f"p99 with status asked 10/s by a watcher / without (median of rounds): {w:.3f}  goal <= 1.10: {verdict}")
'
}

if [[ $PARTS == *" 1 "* ]]; then
echo
echo "=== 1. add / synced / VmHWM at 2 TiB (tests/vm/scale-2tib.sh), ${SCENARIO_ROUNDS:-3} boots"
args=$(sed -n 's/^# vm-args: //p' tests/vm/scale-2tib.sh)
for i in $(seq 1 "${SCENARIO_ROUNDS:-3}"); do
    # shellcheck disable=SC2086
    vm/run.sh -t 600 -r 3 -b "$BIN" $args tests/vm/scale-2tib.sh > "$log" 2>&1 || { cat "$log"; echo "FAIL: scenario"; exit 1; }
    grep -a 'SCALE-2TIB\|add returned\|VmHWM\|del took\|PASS' "$log" | sed 's/^/  /'
done
fi

if [[ $PARTS == *" 2 "* ]]; then
echo
echo "=== 2. 4k random write latency on the 2 TiB device: idle, watch (status 10/s over the socket), poll (a status process 10/s), spawn (a process 10/s, no status)"
vm/run.sh -t 1500 -r 3 -m 1G -d data=8G -b "$BIN" \
    -a "BENCH_RUNTIME=${BENCH_RUNTIME:-8} BENCH_ROUNDS=${BENCH_ROUNDS:-4}" \
    bench/guest-scale-latency.sh > "$log" 2>&1 || { cat "$log"; echo "FAIL: latency run"; exit 1; }
grep -a '^LAT\|VmHWM\|PASS' "$log" | sed 's/^/  /'
latency_table "$log"
fi

if [[ $PARTS == *" 3 "* ]]; then
for d in ${SOURCE_DELAYS:-dm:1 nullb:1000}; do
    case $d in
        dm:[0-9]*) env="SOURCE_DELAY_MS=${d#dm:}" mem=1G what="dm-delay ${d#dm:} ms (HZ=250: 4 ms steps) over a loop device (direct I/O) over the sparse file" ;;
        nullb:[0-9]*) env="SOURCE_NULLB_US=${d#nullb:}" mem=2G what="null_blk completed ${d#nullb:} us after submission (hrtimer, memory backed; 2 GiB guest for the data written)" ;;
        *) echo "SOURCE_DELAYS: '$d' is neither dm:MS nor nullb:US" >&2; exit 2 ;;
    esac
    echo
    echo "=== 3. the same four modes, the 2 TiB source with latency: $what"
    vm/run.sh -t 1500 -r 3 -m "$mem" -d data=8G -b "$BIN" \
        -a "BENCH_RUNTIME=${BENCH_RUNTIME:-8} BENCH_ROUNDS=${BENCH_ROUNDS:-4} $env" \
        bench/guest-scale-latency.sh > "$log" 2>&1 || { cat "$log"; echo "FAIL: latency run ($d)"; exit 1; }
    grep -a '^LAT\|^SRC\|source:\|VmHWM\|dm-delay-flush-worker CPU\|no verify\|PASS' "$log" | sed 's/^/  /'
    echo "  (SRC = the source alone before the mirror: p50 us, p99 us, iops of 4k random reads QD1)"
    latency_table "$log"
done
fi
echo "(calls/run = status answers (watch) or processes started (poll, spawn) during one fio run of BENCH_RUNTIME + 1 s ramp: 10/s would be 10 x that; absolute latencies under TCG mean little, the ratios are the figures)"
echo "done: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
