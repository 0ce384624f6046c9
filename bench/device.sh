#!/usr/bin/env bash
# Device benchmark, one VM boot: fio 4k randread, 4k randwrite (QD32) and 1M sequential write on
# ublk-mirror (while mirroring), a plain ublk loop (rublk, built from crates.io), the kernel loop
# driver and dm-raid1, interleaved in rounds; prints medians and ratios against the plain ublk
# loop measured in the same boot.
#   bench/device.sh            (env: BENCH_SIZE=256M BENCH_RUNTIME=6 BENCH_ROUNDS=3)
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
vm/run.sh -t 2400 -r 3 -m 4G -b target/release/ublk-mirror -b "$CACHE/rublk-$RUBLK_VERSION/bin/rublk" \
    -a "BENCH_SIZE=${BENCH_SIZE:-256M} BENCH_RUNTIME=${BENCH_RUNTIME:-6} BENCH_ROUNDS=${BENCH_ROUNDS:-3} BENCH_MIRROR_ARGS=${BENCH_MIRROR_ARGS:-}" \
    bench/guest-device.sh | tee "$log" | grep -a '^RESULT\|FAIL\|PASS'
grep -a '^RESULT' "$log" | python3 bench/device-table.py
