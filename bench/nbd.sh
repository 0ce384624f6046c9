#!/usr/bin/env bash
# Benchmark of `ublk-mirror sync` to an NBD target against `qemu-img convert` to the same export.
#
#   sudo bench/nbd.sh                        # needs root: it drops the page cache
#   sudo bench/nbd.sh | tee bench/results/nbd-$(date +%F).txt
#
# Measures, in one run, on the same files (all under $BENCH_DIR and $SHM_DIR, deleted at the end):
#   full sync of a dense 2 GiB random file to a qemu-nbd export on loopback, over TCP and over a
#   Unix socket: ublk-mirror (fresh bitmap each run) vs qemu-img convert -n (raw -> raw), both
#   writing to the same qemu-nbd process and export. Two settings:
#   disk: source read from disk with O_DIRECT (page cache dropped before every timed run), the
#         export a file on the same disk served with O_DIRECT (qemu-nbd --cache=none);
#   mem:  source in the page cache, the export a file on tmpfs ($SHM_DIR): no disk involved, so
#         what is measured is the protocol path (client, loopback, server) on the CPUs.
#   REPEAT rounds (default 3); each round runs the tools alternately, setting by setting. Medians
#   and the ratio ublk-mirror/qemu-img (throughput) are printed per setting. Goal: >= 1.0.
# Times are wall-clock times of the whole command (process start to exit, including connecting,
# the handshake and the final flush).
#
# Environment:
#   BENCH_DIR       where the files go (default /var/tmp/ublk-mirror-bench); must not be tmpfs
#   BIN             ublk-mirror binary (default <repo>/target/release/ublk-mirror; not built here)
#   REPEAT          rounds (default 3)
#   SIZE_MIB        size of the source in MiB (default 2048)
#   QEMU_NBD_OPTS   server options for the disk setting (default "--cache=none": the server
#                   writes with O_DIRECT, so the page cache of the target file plays no part)
#   SHM_DIR         tmpfs directory for the mem setting (default /dev/shm; empty to skip it)
#   VARIANTS        extra ublk-mirror settings, ';'-separated (default "--copies 32;--copies 8 --buffer 4M";
#                   empty to skip)
#   KEEP=1          keep the files
set -euo pipefail
export LC_ALL=C

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
BENCH_DIR=${BENCH_DIR:-/var/tmp/ublk-mirror-bench}
BIN=${BIN:-$REPO/target/release/ublk-mirror}
REPEAT=${REPEAT:-3}
SIZE_MIB=${SIZE_MIB:-2048}
QEMU_NBD_OPTS=${QEMU_NBD_OPTS:---cache=none}
SHM_DIR=${SHM_DIR-/dev/shm}
VARIANTS=${VARIANTS---copies 32;--copies 8 --buffer 4M}
KEEP=${KEEP:-0}

T_GEN=900      # timeout (s) for generating a file
T_RUN=600      # timeout (s) for one timed copy
T_VERIFY=600   # timeout (s) for one verify
T_SMALL=120    # timeout (s) for small steps (drop caches, server start)

die() { echo "nbd.sh: $*" >&2; exit 1; }
log() { echo "  $*"; }

# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"
bench_preflight "dd qemu-img qemu-nbd python3 timeout bc df" "qemu-img, qemu-nbd: apt-get install qemu-utils; or scripts/deps.sh" $((SIZE_MIB * 3 + 512))

W=$(mktemp -d "$BENCH_DIR/nbd.XXXXXX")
SETTINGS=(disk:tcp disk:unix)
if [ -n "$SHM_DIR" ]; then
  [ "$(df --output=fstype "$SHM_DIR" | tail -1 | tr -d ' ')" = tmpfs ] || die "SHM_DIR=$SHM_DIR is not tmpfs"
  SHM_AVAIL_KIB=$(df -k --output=avail "$SHM_DIR" | tail -1 | tr -d ' ')
  [ "$SHM_AVAIL_KIB" -gt $(( (SIZE_MIB * 2 + 256) * 1024 )) ] || die "need $((SIZE_MIB * 2 + 256)) MiB free in $SHM_DIR"
  WM=$(mktemp -d "$SHM_DIR/ublk-mirror-nbd.XXXXXX")
  SETTINGS+=(mem:tcp mem:unix)
fi
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  if [ "$KEEP" = 1 ]; then echo "kept $W ${WM:-}"; else
    rm -rf -- "$W" "${WM:-}"; rmdir -- "$BENCH_DIR" 2>/dev/null || true
  fi
}
trap cleanup EXIT

S=$W/src; B=$W/bitmap; JSON=$W/last.json
declare -A URI TGT LISTEN SRVOPTS UMOPTS QIOPTS DROP
for st in "${SETTINGS[@]}"; do
  set_=${st%%:*}; tr=${st#*:}
  dir=$W; [ "$set_" = mem ] && dir=$WM
  TGT[$st]=$dir/tgt.$tr
  if [ "$tr" = tcp ]; then
    p=$(free_port); URI[$st]="nbd://127.0.0.1:$p/bench"; LISTEN[$st]="-p $p -b 127.0.0.1"
  else
    URI[$st]="nbd+unix:///bench?socket=$dir/nbd.sock"; LISTEN[$st]="--socket=$dir/nbd.sock"
  fi
  if [ "$set_" = disk ]; then
    SRVOPTS[$st]=$QEMU_NBD_OPTS; UMOPTS[$st]=""; QIOPTS[$st]="-T none"; DROP[$st]=1
  else
    # tmpfs has no O_DIRECT: the server's default cache; the source is read through the page
    # cache by both tools, and stays there (no dropping).
    SRVOPTS[$st]=""; UMOPTS[$st]="--direct never"; QIOPTS[$st]=""; DROP[$st]=0
  fi
done

getjson() { timeout "$T_SMALL" python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"; }

# timed SECONDS_VAR DROP cmd... : drops the caches if DROP=1, runs cmd under timeout, stores the
# wall time
timed() {
  local __var=$1; shift
  if [ "$1" = 1 ]; then drop_caches; fi
  shift
  local t0 t1
  t0=$(date +%s.%N)
  timeout "$T_RUN" "$@"
  t1=$(date +%s.%N)
  printf -v "$__var" '%.4f' "$(echo "$t1 - $t0" | bc -l)"
}

verify() {  # verify URI: the export must equal the source
  local out
  if out=$(timeout "$T_VERIFY" "$BIN" verify -s "$S" -t "$1" 2>&1); then
    log "verify -> $1: OK ($out)"
  else
    echo "$out"; die "verify $S -> $1 FAILED"
  fi
}

declare -A R   # R[name]="t1 t2 t3"
declare -A RI  # RI[name]: ublk-mirror's own "seconds" per run
add() { R[$1]="${R[$1]:-}${R[$1]:+ }$2"; }
addi() { RI[$1]="${RI[$1]:-}${RI[$1]:+ }$(printf '%.4f' "$(getjson "$JSON" seconds)")"; }
ORDER=()
note() { local k; for k in "${ORDER[@]}"; do [ "$k" = "$1" ] && return; done; ORDER+=("$1"); }
IFS=';' read -r -a VAR <<<"$VARIANTS"

echo "=== ublk-mirror NBD sync benchmark ==="
echo "date:        $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
echo "host:        $(hostname)"
echo "kernel:      $(uname -srvm)"
echo "nproc:       $(nproc)"
echo "cpu:         $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
echo "free -g:"; free -g | sed 's/^/  /'
echo "df -T BENCH_DIR ($BENCH_DIR):"; df -T "$BENCH_DIR" | sed 's/^/  /'
echo "binary:      $BIN ($("$BIN" --version), built $(date -u -r "$BIN" '+%Y-%m-%d %H:%M:%S UTC'), sha256 $(sha256sum "$BIN" | cut -c1-16))"
echo "repo HEAD:   $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?') ($(git -C "$REPO" status --porcelain 2>/dev/null | wc -l) files modified in the work tree)"
echo "qemu-img:    $(qemu-img --version | head -1)"
echo "qemu-nbd:    $(qemu-nbd --version | head -1)"
echo "settings:    SIZE=${SIZE_MIB} MiB, REPEAT=$REPEAT, disk server options: $QEMU_NBD_OPTS, variants: '${VARIANTS}'"
echo "work dir:    $W ${WM:-}"
echo
echo "=== exact commands (disk: every timed run is preceded by: sync; echo 3 > /proc/sys/vm/drop_caches) ==="
for st in "${SETTINGS[@]}"; do
  echo "$st server:      qemu-nbd -f raw -x bench --persistent --shared=8 ${SRVOPTS[$st]} ${LISTEN[$st]} ${TGT[$st]}"
  echo "$st ublk-mirror: rm -f $B; $BIN sync -s $S -t '${URI[$st]}' -b $B --json ${UMOPTS[$st]} [VARIANT]"
  echo "$st qemu-img:    qemu-img convert -n -f raw -O raw ${QIOPTS[$st]} $S '${URI[$st]}'"
done
echo

# ---------------------------------------------------------------------------------------------
echo "=== setup ==="
t0=$(date +%s)
timeout "$T_GEN" dd if=/dev/urandom of="$S" bs=1M count="$SIZE_MIB" iflag=fullblock status=none
for st in "${SETTINGS[@]}"; do
  if [ "${DROP[$st]}" = 1 ]; then
    timeout "$T_GEN" dd if=/dev/zero of="${TGT[$st]}" bs=1M count="$SIZE_MIB" oflag=direct status=none
  else
    timeout "$T_GEN" dd if=/dev/zero of="${TGT[$st]}" bs=1M count="$SIZE_MIB" status=none
  fi
  lf="$W/qemu-nbd.${st/:/.}.log"
  # shellcheck disable=SC2086
  qemu-nbd -f raw -x bench --persistent --shared=8 ${SRVOPTS[$st]} ${LISTEN[$st]} "${TGT[$st]}" >"$lf" 2>&1 &
  PIDS+=($!)
  timeout "$T_SMALL" sh -c "until qemu-img info -f raw '${URI[$st]}' >/dev/null 2>&1; do sleep 0.1; done" \
    || die "qemu-nbd ($st) did not come up: $(cat "$lf")"
done
log "source: $SIZE_MIB MiB from /dev/urandom; targets: $SIZE_MIB MiB of zeros (one per setting and transport); servers up (pids ${PIDS[*]})"
log "setup took $(( $(date +%s) - t0 )) s"
echo

# ---------------------------------------------------------------------------------------------
echo "=== full sync, $SIZE_MIB MiB (rounds alternate the tools) ==="
for round in $(seq 1 "$REPEAT"); do
  for st in "${SETTINGS[@]}"; do
    u=${URI[$st]}; d=${DROP[$st]}
    # The mem setting reads the source from the page cache: make sure it is there.
    if [ "$d" = 0 ]; then timeout "$T_GEN" cat "$S" >/dev/null; fi
    rm -f "$B"
    # shellcheck disable=SC2086
    timed t "$d" "$BIN" sync -s "$S" -t "$u" -b "$B" --json ${UMOPTS[$st]} >"$JSON"
    add "um_$st" "$t"; addi "um_$st"; note "um_$st"
    log "round $round $st ublk-mirror (default 16x1M): ${t}s wall, internal $(getjson "$JSON" seconds)s, copied $(getjson "$JSON" bytes_copied) B"
    if [ "$round" = 1 ]; then verify "$u"; fi

    # shellcheck disable=SC2086
    timed t "$d" qemu-img convert -n -f raw -O raw ${QIOPTS[$st]} "$S" "$u"
    add "qemu_$st" "$t"; note "qemu_$st"; log "round $round $st qemu-img convert: ${t}s"
    if [ "$round" = 1 ]; then verify "$u"; fi

    for i in "${!VAR[@]}"; do
      v=${VAR[$i]}; [ -n "${v// /}" ] || continue
      rm -f "$B"
      # shellcheck disable=SC2086
      timed t "$d" "$BIN" sync -s "$S" -t "$u" -b "$B" --json ${UMOPTS[$st]} $v >"$JSON"
      add "um_${st}_v$i" "$t"; addi "um_${st}_v$i"; note "um_${st}_v$i"
      log "round $round $st ublk-mirror $v: ${t}s wall, internal $(getjson "$JSON" seconds)s"
    done
  done
done
for st in "${SETTINGS[@]}"; do verify "${URI[$st]}"; done
echo

# ---------------------------------------------------------------------------------------------
label() {
  local st=${1#*_}; st=${st%%_*}
  case $1 in
    um_*_v*) echo "$st ublk-mirror sync ${VAR[${1##*_v}]}" ;;
    um_*) echo "$st ublk-mirror sync (default: 16 x 1M)" ;;
    qemu_*) echo "$st qemu-img convert -n ${QIOPTS[$st]}" ;;
  esac
}
declare -A M
for k in "${ORDER[@]}"; do
  # shellcheck disable=SC2086
  M[$k]=$(median ${R[$k]})
done

echo "=== RESULTS (median of $REPEAT runs; wall-clock time of the whole command; disk: page cache dropped before each, mem: source cached) ==="
printf '%-46s %9s %9s %10s %10s  %s\n' "measurement" "data MiB" "median s" "MiB/s" "internal s" "runs (s)"
for k in "${ORDER[@]}"; do
  # shellcheck disable=SC2086
  if [ -n "${RI[$k]:-}" ]; then mi=$(printf '%.3f' "$(median ${RI[$k]})"); else mi=-; fi
  printf '%-46s %9.1f %9.3f %10.1f %10s  %s\n' "$(label "$k")" "$SIZE_MIB" "${M[$k]}" "$(echo "$SIZE_MIB / ${M[$k]}" | bc -l)" "$mi" "${R[$k]}"
done
echo "(internal s = median of the \"seconds\" ublk-mirror reports in --json: the copy loop only)"
echo
echo "=== RATIOS (throughput; = qemu-img time / ublk-mirror time) ==="
printf '%-58s %7s   %s\n' "ratio" "value" "goal"
for st in "${SETTINGS[@]}"; do
  r=$(ratio "${M[qemu_$st]}" "${M[um_$st]}")
  printf '%-58s %7s   %s\n' "$st ublk-mirror / qemu-img" "$r" ">= 1.0: $(verdict "$r >= 1.0")"
  for i in "${!VAR[@]}"; do
    k=um_${st}_v$i; [ -n "${M[$k]:-}" ] || continue
    printf '%-58s %7s   %s\n' "$st ublk-mirror ${VAR[$i]} / qemu-img" "$(ratio "${M[qemu_$st]}" "${M[$k]}")" "-"
  done
done
echo "verify: the export checked identical to the source after round 1 (after each tool) and at the end"
echo "done: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
