#!/usr/bin/env bash
# Device benchmark, one VM boot: fio 4k randread, 4k randwrite (QD32) and 1M sequential write on
# ublk-mirror (while mirroring), a plain ublk loop (rublk, built from crates.io), the kernel loop
# driver and dm-raid1, interleaved in rounds; prints medians and ratios against the plain ublk
# loop measured in the same boot.
#   bench/device.sh            (env: BENCH_SIZE=256M BENCH_RUNTIME=6 BENCH_ROUNDS=3; the mirror in
#                              background, write-blocking and async mode)
# BENCH_PROFILE=io: the I/O-bound profile instead (bench/guest-device-io.sh): every device on a
# null_blk device with latency (source, target and the bitmap's ext4 each on its own; the plain
# ublk loop on one of the same kind), the ublk-mirror modes of BENCH_MODES against the plain
# loop, and a sustained-load test with an application flush every 100 ms. About 16 minutes with 5 rounds:
#   BENCH_PROFILE=io bench/device.sh   (env: BENCH_SIZE=256M BENCH_RUNTIME=8 BENCH_ROUNDS=5
#       BENCH_LAT_US=5000 (per request and per flush)
#       BENCH_MODES=background,write-blocking,async (comma-separated; each must be a value of
#       `ublk-mirror add --mode`, or the run fails) BENCH_SUSTAIN_SECS=60 BENCH_FLUSH_MS=100
#       BENCH_SUSTAIN_ROUNDS=1 BENCH_MIRROR_ARGS (commas for spaces))
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${UBLK_MIRROR_VM_CACHE:-$HOME/.cache/ublk-mirror-vm}
RUBLK_VERSION=${RUBLK_VERSION:-0.2.15}
scripts/deps.sh
if [ ! -x "$CACHE/rublk-$RUBLK_VERSION/bin/rublk" ]; then
    echo "building rublk $RUBLK_VERSION from crates.io (once)"
    timeout 1200 cargo install --quiet --locked --root "$CACHE/rublk-$RUBLK_VERSION" --version "$RUBLK_VERSION" rublk
fi
cargo build --locked --release
log=$(mktemp)
trap 'rm -f "$log"' EXIT
echo "== $(date -u +%FT%TZ) $(git rev-parse --short HEAD) host: $(nproc) cores, $(uname -r)"
case ${BENCH_PROFILE:-cpu} in
    cpu) ;;
    io)
        # The modes to measure: each must be a value `ublk-mirror add --mode` offers. clap lists
        # them in the --mode block of `add --help`, as "- NAME: ..." lines (or, in the short
        # form, "[possible values: A, B]"). A mode named but missing fails the run here, before
        # the boot; the guest checks the same again with the binary it runs.
        modes=${BENCH_MODES:-background,write-blocking,async}
        offered=$(target/release/ublk-mirror add --help | sed -n '/--mode <MODE>/,/^ *--[a-z]/p' |
            sed -n -e 's/^ *- \([a-z0-9-]*\):.*/\1/p' -e 's/.*\[possible values: \([^]]*\)\].*/\1/p' | tr ',\n' '  ')
        [ -n "${offered// /}" ] || { echo "FAIL: found no values of --mode in 'ublk-mirror add --help'" >&2; exit 1; }
        for m in ${modes//,/ }; do
            case " $offered " in
                *" $m "*) ;;
                *) echo "FAIL: BENCH_MODES names mode '$m', which this ublk-mirror does not offer (add --mode takes: $offered)" >&2; exit 1 ;;
            esac
        done
        # The application flush of the sustained-load test: a static binary (the guest has no libc for it).
        tmp=$(mktemp -d)
        trap 'rm -f "$log"; rm -rf "$tmp"' EXIT
        cc -O2 -static -Wall -o "$tmp/flush-every" bench/flush-every.c
        echo "== profile io: size ${BENCH_SIZE:-256M}, ${BENCH_ROUNDS:-5} rounds of ${BENCH_RUNTIME:-8} s, ${BENCH_LAT_US:-5000} us per request, modes $modes, sustained ${BENCH_SUSTAIN_SECS:-60} s x ${BENCH_SUSTAIN_ROUNDS:-1} with a flush every ${BENCH_FLUSH_MS:-100} ms; load $(cut -d' ' -f1-3 /proc/loadavg)"
        # The guest's time limit follows the work asked for: a round takes about 140 s with four
        # devices (35 s each), a sustained round a minute and a half per device beyond its load.
        ndev=$(( $(tr ',' '\n' <<<"$modes" | grep -c .) + 1 ))
        limit=$(( 600 + ${BENCH_ROUNDS:-5} * ndev * (12 * ${BENCH_RUNTIME:-8} / 2) + ${BENCH_SUSTAIN_ROUNDS:-1} * ndev * (${BENCH_SUSTAIN_SECS:-60} + 90) ))
        [ "$limit" -ge 2400 ] || limit=2400
        vm/run.sh -t "$limit" -r 3 -m 4G -b target/release/ublk-mirror -b "$CACHE/rublk-$RUBLK_VERSION/bin/rublk" -b "$tmp/flush-every" \
            -a "BENCH_SIZE=${BENCH_SIZE:-256M} BENCH_RUNTIME=${BENCH_RUNTIME:-8} BENCH_ROUNDS=${BENCH_ROUNDS:-5} BENCH_LAT_US=${BENCH_LAT_US:-5000} BENCH_MODES=$modes BENCH_SUSTAIN_SECS=${BENCH_SUSTAIN_SECS:-60} BENCH_FLUSH_MS=${BENCH_FLUSH_MS:-100} BENCH_SUSTAIN_ROUNDS=${BENCH_SUSTAIN_ROUNDS:-1} BENCH_MIRROR_ARGS=${BENCH_MIRROR_ARGS:-} softlockup_panic=1" \
            bench/guest-device-io.sh | tee "$log" | grep -a --line-buffered '^RESULT\|^CPU\|^DEVCHECK\|FAIL\|PASS\|MODE-MISSING\|sustained:\|status answers\|null_blk:\|devices:'
        grep -a '^RESULT' "$log" | python3 bench/device-table.py
        exit 0 ;;
    *) echo "BENCH_PROFILE must be cpu (default) or io, got '$BENCH_PROFILE'" >&2; exit 2 ;;
esac
vm/run.sh -t 2400 -r 3 -m 5G -b target/release/ublk-mirror -b "$CACHE/rublk-$RUBLK_VERSION/bin/rublk" \
    -a "BENCH_SIZE=${BENCH_SIZE:-256M} BENCH_RUNTIME=${BENCH_RUNTIME:-6} BENCH_ROUNDS=${BENCH_ROUNDS:-3} BENCH_MIRROR_ARGS=${BENCH_MIRROR_ARGS:-}" \
    bench/guest-device.sh | tee "$log" | grep -a --line-buffered '^RESULT\|FAIL\|PASS'
grep -a '^RESULT' "$log" | python3 bench/device-table.py
