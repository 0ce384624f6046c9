#!/usr/bin/env bash
# Benchmark of `ublk-mirror sync` (offline copy) against dd and qemu-img, on a real disk.
#
#   sudo bench/sync.sh                       # needs root: it drops the page cache
#   BENCH_DIR=/mnt/scratch sudo bench/sync.sh
#
# Measures, in one run and on the same files (all under $BENCH_DIR, deleted at the end):
#   A. full sync of a dense 2 GiB random file to a preallocated target:
#      ublk-mirror (fresh bitmap each run) vs dd (O_DIRECT) vs qemu-img convert (cache=none)
#   B. full sync of a 2 GiB sparse source holding 10% data (205 x 1 MiB extents at random
#      1 MiB-aligned offsets): time vs the dense sync of A; the target must stay sparse
#   C. resync after dirtying 1% of the 64 KiB regions (source written + bits set in the
#      bitmap): time vs the dense full sync of A
#   D. full sync of a dense file in memory (tmpfs, $TMPFS_DIR): ublk-mirror vs dd. tmpfs answers
#      SEEK_HOLE by walking the file's pages, so a copy loop that asked it once per copy job
#      crawled (126 MiB/s for 1 GiB); the loop now asks once per data segment
# Every timed run is preceded by `sync; echo 3 > /proc/sys/vm/drop_caches`; every
# measurement is repeated $REPEAT times (default 3) and the median is reported.
# Times are wall-clock times of the whole command (process start to exit, including
# opening files, creating the bitmap and the final flush).
#
# Environment:
#   BENCH_DIR   where the files go (default /var/tmp/ublk-mirror-bench); must not be tmpfs
#   BIN         ublk-mirror binary (default <repo>/target/release/ublk-mirror; not built here)
#   REPEAT      repetitions per measurement (default 3)
#   SIZE_MIB    size of the files in MiB (default 2048)
#   VARIANTS    extra ublk-mirror settings for the dense sync, ';'-separated
#               (default "--copies 4;--copies 32;--copies 8 --buffer 4M"; empty to skip)
#   RESYNC_VARIANTS  extra settings for the resync (default "--copies 64"; empty to skip)
#   SEED        seed for the sparse layout and the dirtied regions (default 1)
#   TMPFS_DIR   a tmpfs directory for D (default /dev/shm); TMPFS_MIB its file size (default 1024;
#               twice that must fit in memory); TMPFS_MIB=0 skips D
#   KEEP=1      keep the files
set -euo pipefail
export LC_ALL=C

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
BENCH_DIR=${BENCH_DIR:-/var/tmp/ublk-mirror-bench}
BIN=${BIN:-$REPO/target/release/ublk-mirror}
REPEAT=${REPEAT:-3}
SIZE_MIB=${SIZE_MIB:-2048}
VARIANTS=${VARIANTS---copies 4;--copies 32;--copies 8 --buffer 4M}
RESYNC_VARIANTS=${RESYNC_VARIANTS---copies 64}
SEED=${SEED:-1}
KEEP=${KEEP:-0}
TMPFS_DIR=${TMPFS_DIR:-/dev/shm}
TMPFS_MIB=${TMPFS_MIB:-1024}

GRAN=65536                                   # ublk-mirror's default region size
SIZE=$((SIZE_MIB << 20))
NREGIONS=$((SIZE / GRAN))
NDIRTY=$(( (NREGIONS + 99) / 100 ))          # 1% of the regions, rounded up
NEXTENTS=$(( (SIZE_MIB + 9) / 10 ))          # 10% of the size, in 1 MiB extents

T_GEN=900      # timeout (s) for generating a file
T_RUN=600      # timeout (s) for one timed copy
T_VERIFY=600   # timeout (s) for one verify
T_SMALL=120    # timeout (s) for small steps (drop caches, python, du, one dd of 64 KiB)

die() { echo "sync.sh: $*" >&2; exit 1; }
log() { echo "  $*"; }

# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"
bench_preflight "dd qemu-img python3 timeout du df" "qemu-img: apt-get install qemu-utils" $((SIZE_MIB * 4 + 512))

if [ "$TMPFS_MIB" != 0 ]; then
  [ "$(stat -f -c %T "$TMPFS_DIR" 2>/dev/null)" = tmpfs ] || die "TMPFS_DIR=$TMPFS_DIR is not a tmpfs directory (part D needs one; TMPFS_MIB=0 skips it)"
fi
W=$(mktemp -d "$BENCH_DIR/run.XXXXXX")
WM=
[ "$TMPFS_MIB" = 0 ] || WM=$(mktemp -d "$TMPFS_DIR/ublk-mirror-bench.XXXXXX")
cleanup() {
  if [ "$KEEP" = 1 ]; then echo "kept $W $WM"; else rm -rf -- "$W" ${WM:+"$WM"}; rmdir -- "$BENCH_DIR" 2>/dev/null || true; fi
}
trap cleanup EXIT

S=$W/dense.src; T=$W/dense.tgt; B=$W/dense.bitmap
SS=$W/sparse.src; ST=$W/sparse.tgt; SB=$W/sparse.bitmap
JSON=$W/last.json
H=$W/helper.py

cat > "$H" <<'EOF'
import json, os, random, sys
cmd = sys.argv[1]
if cmd == "mksparse":            # path size_bytes nextents extent_bytes seed
    path, size, n, ext, seed = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
    rng = random.Random(seed)
    slots = sorted(rng.sample(range(size // ext), n))
    with open(path, "wb") as f:
        f.truncate(size)
        for s in slots:
            f.seek(s * ext)
            f.write(os.urandom(ext))
        f.flush()
        os.fsync(f.fileno())
    # a summary of the layout: number of runs of adjacent extents
    runs = sum(1 for i, s in enumerate(slots) if i == 0 or slots[i - 1] + 1 != s)
    print(f"{n} extents of {ext >> 20} MiB in {runs} runs, first at MiB {slots[0]}, last at MiB {slots[-1]}")
elif cmd == "pick":              # nregions n seed -> region numbers, one a line
    nreg, n, seed = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    for r in sorted(random.Random(seed).sample(range(nreg), n)):
        print(r)
elif cmd == "setbits":           # bitmap file-with-regions: set bit r (LSB-first) of byte 4096 + r/8
    bm, lst = sys.argv[2], sys.argv[3]
    regs = [int(l) for l in open(lst) if l.strip()]
    fd = os.open(bm, os.O_RDWR)
    try:
        for r in regs:
            off = 4096 + r // 8
            b = os.pread(fd, 1, off)[0]
            os.pwrite(fd, bytes([b | (1 << (r % 8))]), off)
        os.fsync(fd)
    finally:
        os.close(fd)
elif cmd == "get":               # json-file key[.key]
    v = json.load(open(sys.argv[2]))
    for k in sys.argv[3].split("."):
        v = v[k]
    print(v)
elif cmd == "median":
    xs = sorted(float(x) for x in sys.argv[2:])
    n = len(xs)
    print(f"{(xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2):.4f}")
EOF
py() { timeout "$T_SMALL" python3 "$H" "$@"; }


# timed SECONDS_VAR cmd... : drops the caches, runs cmd under timeout, stores the wall time
timed() {
  local __var=$1; shift
  drop_caches
  local t0 t1
  t0=$(date +%s.%N)
  timeout "$T_RUN" "$@"
  t1=$(date +%s.%N)
  printf -v "$__var" '%.4f' "$(echo "$t1 - $t0" | bc -l)"
}
command -v bc >/dev/null || die "bc is not installed"

verify() {  # verify SRC TGT: must be identical
  local out
  if out=$(timeout "$T_VERIFY" "$BIN" verify -s "$1" -t "$2" 2>&1); then
    log "verify $(basename "$1") -> $(basename "$2"): OK ($out)"
  else
    echo "$out"; die "verify $1 -> $2 FAILED"
  fi
}

alloc_mib() { timeout "$T_SMALL" du -k "$1" | awk '{printf "%.1f", $1/1024}'; }

declare -A R   # R[name]="t1 t2 t3": wall times per measurement
add() { R[$1]="${R[$1]:-}${R[$1]:+ }$2"; }
declare -A RI  # RI[name]="..": ublk-mirror's own "seconds" (from --json) per run
addi() { RI[$1]="${RI[$1]:-}${RI[$1]:+ }$(printf '%.4f' "$(py get "$JSON" seconds)")"; }
med() { py median ${R[$1]}; }
ORDER=()
note() { local k; for k in "${ORDER[@]}"; do [ "$k" = "$1" ] && return; done; ORDER+=("$1"); }


echo "=== ublk-mirror sync benchmark ==="
echo "date:        $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
echo "host:        $(hostname)"
echo "kernel:      $(uname -srvm)"
echo "nproc:       $(nproc)"
echo "cpu:         $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
echo "free -g:"; free -g | sed 's/^/  /'
echo "df -T BENCH_DIR ($BENCH_DIR):"; df -T "$BENCH_DIR" | sed 's/^/  /'
DEV=$(df --output=source "$BENCH_DIR" | tail -1)
if [ -b "$DEV" ]; then
  DEVNAME=$(basename "$(readlink -f "$DEV")" | sed 's/[0-9]*$//')
  echo "device:      $DEV, rotational=$(cat "/sys/block/$DEVNAME/queue/rotational" 2>/dev/null || echo '?')"
fi
echo "binary:      $BIN ($("$BIN" --version), built $(date -u -r "$BIN" '+%Y-%m-%d %H:%M:%S UTC'), sha256 $(sha256sum "$BIN" | cut -c1-16))"
echo "repo HEAD:   $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?') ($(git -C "$REPO" status --porcelain 2>/dev/null | wc -l) files modified in the work tree)"
echo "dd:          $(dd --version | head -1)"
echo "qemu-img:    $(qemu-img --version | head -1)"
echo "settings:    SIZE=${SIZE_MIB} MiB, REPEAT=$REPEAT, granularity 64 KiB ($NREGIONS regions), SEED=$SEED"
echo "variants:    dense: '${VARIANTS}'  resync: '${RESYNC_VARIANTS}'"
echo "work dir:    $W"
echo
echo "=== exact commands (every timed run is preceded by: sync; echo 3 > /proc/sys/vm/drop_caches) ==="
echo "A ublk-mirror: rm -f $B; $BIN sync -s $S -t $T -b $B --json [VARIANT]"
echo "A dd:          dd if=$S of=$T bs=1M iflag=direct oflag=direct conv=notrunc"
echo "A dd+fsync:    dd if=$S of=$T bs=1M iflag=direct oflag=direct conv=notrunc,fsync   (extra row: dd with a final flush, as ublk-mirror and qemu-img do)"
echo "A qemu-img:    qemu-img convert -n -f raw -O raw -t none -T none $S $T"
echo "B ublk-mirror: rm -f $ST $SB; truncate -s $SIZE $ST; $BIN sync -s $SS -t $ST -b $SB --json"
echo "B' (extra):    rm -f $SB; dd if=/dev/zero of=$ST bs=1M count=$SIZE_MIB oflag=direct (untimed: target full of written blocks); $BIN sync -s $SS -t $ST -b $SB --json"
echo "C ublk-mirror: (untimed: $NDIRTY x dd if=/dev/urandom of=$S bs=64K count=1 seek=R oflag=direct conv=notrunc iflag=fullblock; python3 sets bit R of $B)"
echo "               $BIN sync -s $S -t $T -b $B --json [VARIANT]"
[ -z "$WM" ] || echo "D (tmpfs):     rm -f $WM/bitmap; $BIN sync -s $WM/src -t $WM/tgt -b $WM/bitmap --json   and   dd if=$WM/src of=$WM/tgt bs=1M conv=notrunc"
echo

# ---------------------------------------------------------------------------------------------
echo "=== setup ==="
t0=$(date +%s)
timeout "$T_GEN" dd if=/dev/urandom of="$S" bs=1M count="$SIZE_MIB" iflag=fullblock status=none
timeout "$T_GEN" dd if=/dev/zero of="$T" bs=1M count="$SIZE_MIB" oflag=direct status=none
log "dense source: $SIZE_MIB MiB from /dev/urandom ($(alloc_mib "$S") MiB allocated)"
log "dense target: preallocated by writing $SIZE_MIB MiB of zeros with O_DIRECT ($(alloc_mib "$T") MiB allocated)"
log "sparse source: $(py mksparse "$SS" "$SIZE" "$NEXTENTS" $((1 << 20)) "$SEED") ($(alloc_mib "$SS") MiB allocated of $SIZE_MIB)"
log "setup took $(( $(date +%s) - t0 )) s"
echo

# ---------------------------------------------------------------------------------------------
echo "=== A. dense full sync, $SIZE_MIB MiB (rounds interleave the tools) ==="
IFS=';' read -r -a VAR <<<"$VARIANTS"
for round in $(seq 1 "$REPEAT"); do
  rm -f "$B"
  timed t "$BIN" sync -s "$S" -t "$T" -b "$B" --json >"$JSON"
  add dense_um "$t"; addi dense_um; note dense_um
  log "round $round ublk-mirror (default 16x1M): ${t}s wall, internal $(py get "$JSON" seconds)s, copied $(py get "$JSON" bytes_copied) B, mode $(py get "$JSON" open.mode)"
  if [ "$round" = 1 ]; then verify "$S" "$T"; fi

  timed t dd if="$S" of="$T" bs=1M iflag=direct oflag=direct conv=notrunc status=none
  add dense_dd "$t"; note dense_dd; log "round $round dd: ${t}s"

  timed t dd if="$S" of="$T" bs=1M iflag=direct oflag=direct conv=notrunc,fsync status=none
  add dense_ddf "$t"; note dense_ddf; log "round $round dd conv=fsync: ${t}s"

  timed t qemu-img convert -n -f raw -O raw -t none -T none "$S" "$T"
  add dense_qemu "$t"; note dense_qemu; log "round $round qemu-img: ${t}s"

  for i in "${!VAR[@]}"; do
    v=${VAR[$i]}; [ -n "${v// /}" ] || continue
    rm -f "$B"
    # shellcheck disable=SC2086
    timed t "$BIN" sync -s "$S" -t "$T" -b "$B" --json $v >"$JSON"
    add "dense_um_v$i" "$t"; addi "dense_um_v$i"; note "dense_um_v$i"
    log "round $round ublk-mirror $v: ${t}s wall, internal $(py get "$JSON" seconds)s"
  done
done
verify "$S" "$T"
echo

# ---------------------------------------------------------------------------------------------
echo "=== B. sparse full sync: $SIZE_MIB MiB source with $NEXTENTS x 1 MiB data extents ==="
for round in $(seq 1 "$REPEAT"); do
  rm -f "$ST" "$SB"
  timeout "$T_SMALL" truncate -s "$SIZE" "$ST"
  timed t "$BIN" sync -s "$SS" -t "$ST" -b "$SB" --json >"$JSON"
  add sparse_um "$t"; addi sparse_um; note sparse_um
  SPARSE_ALLOC=$(alloc_mib "$ST")
  log "round $round ublk-mirror, empty sparse target: ${t}s wall, internal $(py get "$JSON" seconds)s, copied $(py get "$JSON" bytes_copied) B, zeroed $(py get "$JSON" bytes_zeroed) B; target allocated ${SPARSE_ALLOC} MiB (source $(alloc_mib "$SS") MiB)"
  verify "$SS" "$ST"
done
for round in $(seq 1 "$REPEAT"); do
  rm -f "$SB"
  timeout "$T_GEN" dd if=/dev/zero of="$ST" bs=1M count="$SIZE_MIB" oflag=direct status=none
  before=$(alloc_mib "$ST")
  timed t "$BIN" sync -s "$SS" -t "$ST" -b "$SB" --json >"$JSON"
  add sparse_um_full "$t"; addi sparse_um_full; note sparse_um_full
  SPARSE_FULL_ALLOC=$(alloc_mib "$ST")
  log "round $round ublk-mirror, target full of written blocks: ${t}s wall, internal $(py get "$JSON" seconds)s, copied $(py get "$JSON" bytes_copied) B, zeroed $(py get "$JSON" bytes_zeroed) B; target allocated ${before} -> ${SPARSE_FULL_ALLOC} MiB"
  verify "$SS" "$ST"
done
rm -f "$ST" "$SB"
echo

# ---------------------------------------------------------------------------------------------
echo "=== C. resync with 1% of the regions dirty ($NDIRTY of $NREGIONS regions of 64 KiB) ==="
rm -f "$B"
drop_caches
timeout "$T_RUN" "$BIN" sync -s "$S" -t "$T" -b "$B" --json >"$JSON"
log "untimed full sync to start from a clean pair: copied $(py get "$JSON" bytes_copied) B"
dirty() {  # dirty SEED: writes random data into NDIRTY random regions of S and sets their bits
  local lst=$W/regions.txt r
  py pick "$NREGIONS" "$NDIRTY" "$1" >"$lst"
  while read -r r; do
    timeout "$T_SMALL" dd if=/dev/urandom of="$S" bs=64K count=1 seek="$r" oflag=direct conv=notrunc iflag=fullblock status=none
  done <"$lst"
  py setbits "$B" "$lst"
  local shown
  shown=$(timeout "$T_SMALL" "$BIN" bitmap show "$B" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["dirty_regions"])')
  [ "$shown" = "$NDIRTY" ] || die "bitmap shows $shown dirty regions, expected $NDIRTY"
}
IFS=';' read -r -a RVAR <<<"$RESYNC_VARIANTS"
n=0
for round in $(seq 1 "$REPEAT"); do
  n=$((n + 1)); dirty $((SEED * 1000 + n))
  timed t "$BIN" sync -s "$S" -t "$T" -b "$B" --json >"$JSON"
  add resync_um "$t"; addi resync_um; note resync_um
  copied=$(py get "$JSON" bytes_copied)
  log "round $round ublk-mirror resume: ${t}s wall, internal $(py get "$JSON" seconds)s, mode $(py get "$JSON" open.mode), copied $copied B (expected $((NDIRTY * GRAN)))"
  [ "$copied" = $((NDIRTY * GRAN)) ] || echo "  WARNING: copied $copied bytes, expected $((NDIRTY * GRAN))"
  verify "$S" "$T"
  for i in "${!RVAR[@]}"; do
    v=${RVAR[$i]}; [ -n "${v// /}" ] || continue
    n=$((n + 1)); dirty $((SEED * 1000 + n))
    # shellcheck disable=SC2086
    timed t "$BIN" sync -s "$S" -t "$T" -b "$B" --json $v >"$JSON"
    add "resync_um_v$i" "$t"; addi "resync_um_v$i"; note "resync_um_v$i"
    log "round $round ublk-mirror resume $v: ${t}s wall, internal $(py get "$JSON" seconds)s, copied $(py get "$JSON" bytes_copied) B"
    verify "$S" "$T"
  done
done
echo

# ---------------------------------------------------------------------------------------------
if [ -n "$WM" ]; then
  echo "=== D. dense full sync in memory: $TMPFS_MIB MiB on tmpfs ($TMPFS_DIR) ==="
  MS=$WM/src MT=$WM/tgt MB=$WM/bitmap
  timeout "$T_GEN" dd if=/dev/urandom of="$MS" bs=1M count="$TMPFS_MIB" iflag=fullblock status=none
  timeout "$T_GEN" dd if=/dev/zero of="$MT" bs=1M count="$TMPFS_MIB" status=none
  for round in $(seq 1 "$REPEAT"); do
    rm -f "$MB"
    timed t "$BIN" sync -s "$MS" -t "$MT" -b "$MB" --json >"$JSON"
    add tmpfs_um "$t"; addi tmpfs_um; note tmpfs_um
    log "round $round ublk-mirror: ${t}s wall, internal $(py get "$JSON" seconds)s, copied $(py get "$JSON" bytes_copied) B"
    if [ "$round" = 1 ]; then verify "$MS" "$MT"; fi
    timed t dd if="$MS" of="$MT" bs=1M conv=notrunc status=none
    add tmpfs_dd "$t"; note tmpfs_dd; log "round $round dd: ${t}s"
  done
  echo
fi

# ---------------------------------------------------------------------------------------------
label() {
  case $1 in
    dense_um) echo "A ublk-mirror sync (default: 32 x 1M)" ;;
    dense_um_v*) echo "A ublk-mirror sync ${VAR[${1#dense_um_v}]}" ;;
    dense_dd) echo "A dd iflag/oflag=direct bs=1M" ;;
    dense_ddf) echo "A dd ... conv=notrunc,fsync (extra)" ;;
    dense_qemu) echo "A qemu-img convert -t none -T none" ;;
    sparse_um) echo "B ublk-mirror sparse -> empty target" ;;
    sparse_um_full) echo "B' ublk-mirror sparse -> written target" ;;
    resync_um) echo "C ublk-mirror resync 1% (default)" ;;
    resync_um_v*) echo "C ublk-mirror resync 1% ${RVAR[${1#resync_um_v}]}" ;;
    tmpfs_um) echo "D ublk-mirror sync, tmpfs" ;;
    tmpfs_dd) echo "D dd bs=1M, tmpfs" ;;
  esac
}
data_mib() {
  case $1 in
    dense_*) echo "$SIZE_MIB" ;;
    sparse_*) echo "$NEXTENTS" ;;
    resync_*) echo "$(echo "$NDIRTY * $GRAN / 1048576" | bc -l)" ;;
    tmpfs_*) echo "$TMPFS_MIB" ;;
  esac
}
declare -A M
for k in "${ORDER[@]}"; do M[$k]=$(med "$k"); done

echo "=== RESULTS (median of $REPEAT runs; wall-clock time of the whole command, page cache dropped before each) ==="
printf '%-44s %9s %9s %10s %10s  %s\n' "measurement" "data MiB" "median s" "MiB/s" "internal s" "runs (s)"
for k in "${ORDER[@]}"; do
  d=$(data_mib "$k")
  if [ -n "${RI[$k]:-}" ]; then mi=$(printf '%.3f' "$(py median ${RI[$k]})"); else mi=-; fi
  printf '%-44s %9.1f %9.3f %10.1f %10s  %s\n' "$(label "$k")" "$d" "${M[$k]}" "$(echo "$d / ${M[$k]}" | bc -l)" "$mi" "${R[$k]}"
done
echo "(internal s = median of the \"seconds\" ublk-mirror reports in --json: the copy loop only, without process start, open and final close)"
echo "(MiB/s = data actually copied / time: $SIZE_MIB MiB for A, $NEXTENTS MiB for B, $(data_mib resync_um | xargs printf '%.1f') MiB for C)"
echo
r_dd=$(ratio "${M[dense_dd]}" "${M[dense_um]}")      # throughput ratio = inverse time ratio
r_ddf=$(ratio "${M[dense_ddf]}" "${M[dense_um]}")
r_q=$(ratio "${M[dense_qemu]}" "${M[dense_um]}")
r_sp=$(ratio "${M[sparse_um]}" "${M[dense_um]}")
r_spf=$(ratio "${M[sparse_um_full]}" "${M[dense_um]}")
r_rs=$(ratio "${M[resync_um]}" "${M[dense_um]}")
echo "=== RATIOS ==="
printf '%-58s %7s   %s\n' "ratio" "value" "goal"
printf '%-58s %7s   %s\n' "A ublk-mirror / dd throughput" "$r_dd" ">= 0.90: $(verdict "$r_dd >= 0.9")"
printf '%-58s %7s   %s\n' "A ublk-mirror / dd conv=fsync throughput (extra)" "$r_ddf" "-"
printf '%-58s %7s   %s\n' "A ublk-mirror / qemu-img throughput" "$r_q" "-"
for i in "${!VAR[@]}"; do
  k=dense_um_v$i; [ -n "${M[$k]:-}" ] || continue
  printf '%-58s %7s   %s\n' "A ublk-mirror ${VAR[$i]} / dd throughput" "$(ratio "${M[dense_dd]}" "${M[$k]}")" "-"
done
printf '%-58s %7s   %s\n' "B sparse 10% time / dense full sync time" "$r_sp" "~0.10 (<= 0.15: $(verdict "$r_sp <= 0.15"))"
printf '%-58s %7s   %s\n' "B' sparse 10% onto written target time / dense time" "$r_spf" "-"
printf '%-58s %7s   %s\n' "B target allocation after sync (du), source: $(alloc_mib "$SS") MiB" "${SPARSE_ALLOC}M" "sparse: $(verdict "$SPARSE_ALLOC <= $(alloc_mib "$SS") * 1.05")"
printf '%-58s %7s   %s\n' "B' target allocation after sync (du)" "${SPARSE_FULL_ALLOC}M" "sparse: $(verdict "$SPARSE_FULL_ALLOC <= $(alloc_mib "$SS") * 1.05")"
printf '%-58s %7s   %s\n' "C resync 1% time / dense full sync time" "$r_rs" "<= 0.03: $(verdict "$r_rs <= 0.03")"
for i in "${!RVAR[@]}"; do
  k=resync_um_v$i; [ -n "${M[$k]:-}" ] || continue
  printf '%-58s %7s   %s\n' "C resync 1% ${RVAR[$i]} time / dense full sync time" "$(ratio "${M[$k]}" "${M[dense_um]}")" "-"
done
if [ -n "$WM" ]; then
  r_tm=$(ratio "${M[tmpfs_dd]}" "${M[tmpfs_um]}")
  printf '%-58s %7s   %s\n' "D ublk-mirror / dd throughput, tmpfs" "$r_tm" ">= 0.5: $(verdict "$r_tm >= 0.5")"
fi
echo "verify: all runs checked identical (A after round 1 and at the end, B and C after every run, D after round 1)"
echo "done: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
