#!/usr/bin/env bash
# Real disk sizes (issue 14): offline `sync`, `verify`, `bitmap show` and the resync of sparse
# pairs of 1 GiB to 16 TiB holding 16 MiB of scattered data, in wall time and peak RSS, against
# the bound 3 x bitmap + 32 MiB and the goal "4 TiB sparse full sync in at most 5 s"; baselines
# `qemu-img convert -n` (same task: make an existing target equal, holes included) and
# `cp --sparse=always` (data only, onto a new file) measured in the same run.
#   sudo bench/scale.sh | tee bench/results/scale-$(date +%F).txt
# Env: BENCH_DIR (/var/tmp/ublk-mirror-bench), BIN, SIZES ("1G 256G 4T 16383G"), REPEAT (3),
#      SEED (1), DIRTY_PERMILLE (10 = 1 % of the regions), KEEP=1.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
BENCH_DIR=${BENCH_DIR:-/var/tmp/ublk-mirror-bench}
BIN=${BIN:-$REPO/target/release/ublk-mirror}
SIZES=${SIZES:-1G 256G 4T 16383G}
REPEAT=${REPEAT:-3}
SEED=${SEED:-1}
DIRTY_PERMILLE=${DIRTY_PERMILLE:-10}
KEEP=${KEEP:-0}
NEXTENTS=16
T_RUN=300
MIB=1048576

die() { echo "ERROR: $*" >&2; exit 1; }
log() { echo "  [$(date -u +%H:%M:%S)] $*"; }
[ "$(id -u)" = 0 ] || die "run as root (the page cache is dropped before every timed command)"
[ -x "$BIN" ] || die "$BIN not found: cargo build --release first"
for t in qemu-img python3 /usr/bin/time bc; do command -v "$t" >/dev/null || die "$t is not installed"; done
mkdir -p "$BENCH_DIR"
FSTYPE=$(stat -f -c %T "$BENCH_DIR")
case "$FSTYPE" in tmpfs|ramfs|overlayfs|overlay) die "BENCH_DIR $BENCH_DIR is on $FSTYPE: use a real disk";; esac

W=$(mktemp -d "$BENCH_DIR/scale.XXXXXX")
cleanup() { if [ "$KEEP" = 1 ]; then echo "kept $W"; else rm -rf -- "$W"; rmdir -- "$BENCH_DIR" 2>/dev/null || true; fi; }
trap cleanup EXIT
H=$W/helper.py
cat > "$H" <<'EOF'
import json, mmap, os, random, sys
cmd = sys.argv[1]
if cmd == "mksparse":            # path size nextents seed: n extents of 1 MiB at random 1 MiB-aligned offsets
    path, size, n, seed = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    ext = 1 << 20
    rng = random.Random(seed)
    slots = sorted(rng.sample(range(size // ext), n))
    with open(path, "wb") as f:
        f.truncate(size)
        for s in slots:
            f.seek(s * ext)
            f.write(rng.randbytes(ext))
        f.flush(); os.fsync(f.fileno())
    print(" ".join(str(s) for s in slots))
elif cmd == "dirty":             # bitmap permille seed: set bit R%8 of byte 4096+R/8 for permille/1000 of the regions
    bm, pm, seed = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    with open(bm, "r+b") as f:
        m = mmap.mmap(f.fileno(), 0)
        nreg = int.from_bytes(m[48:56], "little")
        n = -(-nreg * pm // 1000)
        for r in random.Random(seed).sample(range(nreg), n):
            m[4096 + r // 8] |= 1 << (r % 8)
        m.flush(); m.close()
        os.fsync(f.fileno())
    print(n)
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
py() { timeout 120 python3 "$H" "$@"; }
drop_caches() { timeout 60 sh -c 'sync; echo 3 > /proc/sys/vm/drop_caches'; }
# timed KEY cmd...: drops the caches, runs cmd under /usr/bin/time; appends wall s and peak RSS KiB
declare -A WALL RSS
timed() {
  local key=$1; shift
  drop_caches
  timeout "$T_RUN" /usr/bin/time -f '%e %M' -o "$W/time" "$@" || die "$* failed"
  read -r s kb < "$W/time"
  WALL[$key]="${WALL[$key]:-}${WALL[$key]:+ }$s"; RSS[$key]="${RSS[$key]:-}${RSS[$key]:+ }$kb"
  LAST="$s s, $((kb / 1024)) MiB"
}
med() { py median $1; }
size_bytes() { numfmt --from=iec "$1"; }

echo "=== ublk-mirror scale benchmark (real disk sizes, issue 14) ==="
echo "date:        $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
echo "kernel:      $(uname -srvm)"
echo "nproc:       $(nproc), cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
echo "free -g:"; free -g | sed 's/^/  /'
echo "df -T BENCH_DIR ($BENCH_DIR):"; df -T "$BENCH_DIR" | sed 's/^/  /'
echo "binary:      $BIN ($("$BIN" --version), built $(date -u -r "$BIN" '+%Y-%m-%d %H:%M:%S UTC'), sha256 $(sha256sum "$BIN" | cut -c1-16))"
echo "repo HEAD:   $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?') ($(git -C "$REPO" status --porcelain 2>/dev/null | wc -l) files modified in the work tree)"
echo "qemu-img:    $(qemu-img --version | head -1); cp: $(cp --version | head -1)"
echo "settings:    SIZES='$SIZES' REPEAT=$REPEAT SEED=$SEED, $NEXTENTS x 1 MiB of random data at random 1 MiB-aligned offsets, $DIRTY_PERMILLE/1000 of the regions dirtied"
echo "load:        $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "=== commands (each timed one: sync; echo 3 > drop_caches; /usr/bin/time -f '%e %M' CMD) ==="
echo "sync:      rm -f BM; rm -f T; truncate -s SIZE T; $BIN sync -s S -t T -b BM --json    (full sync, new bitmap)"
echo "verify:    $BIN verify -s S -t T -b BM"
echo "dirty:     (untimed) python3 mmap: bit R%8 of byte 4096+R/8 for 1% of the regions, random, seeded"
echo "show:      $BIN bitmap show BM    (text: the header and the first runs)"
echo "show-json: $BIN bitmap show BM --json    (every run; checks dirty_regions)"
echo "resync:    $BIN sync -s S -t T -b BM --json    (checks bytes_copied + bytes_zeroed = dirty regions x granularity, then an untimed verify)"
echo "qemu-img:  qemu-img convert -n -f raw -O raw S T    (onto the synced target: the same task, holes included; -t none -T none is left out: with O_DIRECT, qemu-img 7.2 writes a 4 KiB block of zeros every 2 GiB, 44 MiB at 16 TiB, instead of leaving holes)"
echo "cp:        rm -f C; cp --sparse=always S C    (data only, onto a new file: a lower bound)"
echo

ROWS=()
for sz in $SIZES; do
  SIZE=$(size_bytes "$sz")
  S=$W/$sz.src T=$W/$sz.tgt BM=$W/$sz.bm C=$W/$sz.cp J=$W/last.json
  echo "=== $sz ($SIZE bytes) ==="
  slots=$(py mksparse "$S" "$SIZE" "$NEXTENTS" "$SEED")
  log "source: $NEXTENTS x 1 MiB at MiB $(echo "$slots" | tr ' ' ','); $(du -k "$S" | cut -f1) KiB allocated"
  for round in $(seq 1 "$REPEAT"); do
    rm -f "$BM" "$T"; truncate -s "$SIZE" "$T"
    timed "$sz.sync" "$BIN" sync -s "$S" -t "$T" -b "$BM" --json > "$J"
    G=$(py get "$J" granularity); copied=$(py get "$J" bytes_copied)
    [ "$copied" = $((NEXTENTS * MIB)) ] || die "full sync copied $copied bytes, expected $((NEXTENTS * MIB))"
    log "round $round sync: $LAST; granularity $G, copied $copied B, zeroed $(py get "$J" bytes_zeroed) B, internal $(py get "$J" seconds) s"
    timed "$sz.verify" "$BIN" verify -s "$S" -t "$T" -b "$BM" > "$W/verify.out"
    log "round $round verify: $LAST ($(tr '\n' ' ' < "$W/verify.out"))"
    NDIRTY=$(py dirty "$BM" "$DIRTY_PERMILLE" $((SEED * 1000 + round)))
    timed "$sz.show" "$BIN" bitmap show "$BM" > "$W/show.out"
    log "round $round bitmap show: $LAST; $(grep -m1 '^dirty' "$W/show.out")"
    timed "$sz.showj" "$BIN" bitmap show "$BM" --json > "$J"
    shown=$(py get "$J" dirty_regions)
    [ "$shown" = "$NDIRTY" ] || die "bitmap show: $shown dirty regions, $NDIRTY set"
    log "round $round bitmap show --json: $LAST; $shown dirty regions in $(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["dirty_runs"]))' "$J") runs"
    timed "$sz.resync" "$BIN" sync -s "$S" -t "$T" -b "$BM" --json > "$J"
    rc=$(py get "$J" bytes_copied); rz=$(py get "$J" bytes_zeroed)
    [ $((rc + rz)) = $((NDIRTY * G)) ] || die "resync handled $((rc + rz)) bytes, expected $((NDIRTY * G))"
    log "round $round resync: $LAST; mode $(py get "$J" open.mode), copied $rc B, zeroed $rz B, internal $(py get "$J" seconds) s"
    timeout "$T_RUN" "$BIN" verify -s "$S" -t "$T" -b "$BM" > /dev/null || die "verify after the resync failed"
    timed "$sz.qemu" qemu-img convert -n -f raw -O raw "$S" "$T"
    log "round $round qemu-img convert -n: $LAST"
    rm -f "$C"
    timed "$sz.cp" cp --sparse=always "$S" "$C"
    log "round $round cp --sparse=always: $LAST; $(du -k "$C" | cut -f1) KiB allocated"
    rm -f "$C"
  done
  [ "$(du -k "$T" | cut -f1)" -le $(( $(du -k "$S" | cut -f1) + 1024 )) ] || die "the target is not sparse: $(du -k "$T")"
  NREG=$(( (SIZE + G - 1) / G )); BMB=$(( (NREG + 7) / 8 ))
  BOUND_KB=$(( (3 * BMB + 32 * MIB) / 1024 ))
  ROWS+=("$sz $G $NREG $BMB $BOUND_KB $NDIRTY")
  rm -f "$S" "$T" "$BM"
  echo
done

echo "=== RESULTS: median of $REPEAT rounds; wall s / peak RSS MiB (VmHWM of the command, /usr/bin/time %M) ==="
printf '%-7s %6s %9s %8s %9s %8s | %-13s %-13s %-13s %-13s %-14s | %-13s %-13s | %s\n' size gran regions bitmap bound dirty sync verify show resync show-json qemu-img cp "RSS<=bound (sync,verify,show,resync)  show-json  sync/qemu-img"
ALLPASS=1 JFAIL=0
for row in "${ROWS[@]}"; do
  read -r sz G NREG BMB BOUND_KB NDIRTY <<< "$row"
  cells=() worst=0
  for k in sync verify show resync showj qemu cp; do
    w=$(med "${WALL[$sz.$k]}"); r=$(med "${RSS[$sz.$k]}")
    cells+=("$(printf '%.3f/%.1f' "$w" "$(echo "$r / 1024" | bc -l)")")
    case $k in sync|verify|show|resync) for x in ${RSS[$sz.$k]}; do [ "$x" -gt "$worst" ] && worst=$x; done;; esac
  done
  if [ "$worst" -le "$BOUND_KB" ]; then v=PASS; else v=FAIL; ALLPASS=0; fi
  jw=0; for x in ${RSS[$sz.showj]}; do [ "$x" -gt "$jw" ] && jw=$x; done
  if [ "$jw" -le "$BOUND_KB" ]; then jv=PASS; else jv=FAIL; JFAIL=1; fi
  ratio=$(printf '%.2f' "$(echo "$(med "${WALL[$sz.sync]}") / $(med "${WALL[$sz.qemu]}")" | bc -l)")
  printf '%-7s %5sK %9s %7sK %7sM %8s | %-13s %-13s %-13s %-13s %-14s | %-13s %-13s | %s (max %.1f MiB)  %s  %s\n' \
    "$sz" $((G / 1024)) "$NREG" $((BMB / 1024)) $((BOUND_KB / 1024)) "$NDIRTY" "${cells[@]}" "$v" "$(echo "$worst / 1024" | bc -l)" "$jv" "$ratio"
done
echo "(bitmap = regions/8 bytes; bound = 3 x bitmap + 32 MiB; RSS verdict on the largest RSS of any ublk-mirror run at that size)"
echo
echo "=== GOALS ==="
echo "peak RSS of sync, verify, bitmap show and resync within 3 x bitmap + 32 MiB at every size: $([ $ALLPASS = 1 ] && echo PASS || echo FAIL)"
echo "peak RSS of bitmap show --json within the bound at every size: $([ $JFAIL = 0 ] && echo PASS || echo "FAIL (it builds a serde_json::Value per dirty run)")"
for row in "${ROWS[@]}"; do
  read -r sz _ <<< "$row"
  if [ "$sz" = 4T ]; then
    m=$(med "${WALL[4T.sync]}"); max=$(printf '%s\n' ${WALL[4T.sync]} | sort -g | tail -1)
    echo "4 TiB sparse full sync <= 5 s: median $m s, slowest $max s: $([ "$(echo "$max <= 5" | bc -l)" = 1 ] && echo PASS || echo FAIL)"
  fi
done
echo "runs (wall s):"; for k in "${!WALL[@]}"; do echo "  $k: ${WALL[$k]}   RSS KiB: ${RSS[$k]}"; done | sort -V
echo "done: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
