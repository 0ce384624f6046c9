# shellcheck shell=bash
# Shared by bench/sync.sh, bench/nbd.sh and bench/nbd-tls.sh (sourced after they set BIN,
# BENCH_DIR and die).

# bench_preflight "TOOLS" HINT NEED_MIB: root (for dropping the page cache), the binary, the
# tools (HINT says how to install the missing one), BENCH_DIR on a real disk with NEED_MIB free.
bench_preflight() {
  [ "$(id -u)" = 0 ] || die "must run as root (it drops the page cache)"
  [ -x "$BIN" ] || die "no ublk-mirror binary at $BIN (run: cargo build --release)"
  for t in $1; do
    command -v "$t" >/dev/null || die "$t is not installed ($2)"
  done
  mkdir -p "$BENCH_DIR"
  local fstype need avail
  fstype=$(df --output=fstype "$BENCH_DIR" | tail -1 | tr -d ' ')
  case "$fstype" in
    tmpfs|ramfs|devtmpfs|overlay|squashfs) die "BENCH_DIR=$BENCH_DIR is on $fstype; use a real disk" ;;
  esac
  need=$(( $3 * 1024 ))
  avail=$(df -k --output=avail "$BENCH_DIR" | tail -1 | tr -d ' ')
  [ "$avail" -gt "$need" ] || die "need $3 MiB free in $BENCH_DIR, have $((avail / 1024))"
}

# drop_caches: writes back and drops the page cache (root), bounded by T_SMALL (default 120 s).
drop_caches() { timeout "${T_SMALL:-120}" sh -c 'sync; echo 3 > /proc/sys/vm/drop_caches'; }
# free_port: a free TCP port on 127.0.0.1 (bound and released).
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# median X...: the median of the numbers, to 4 decimals.
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {printf "%.4f", (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
# ratio A B: A / B to 3 decimals; verdict EXPR: MET if the bc expression holds.
ratio() { printf '%.3f' "$(echo "$1 / $2" | bc -l)"; }
verdict() { if [ "$(echo "$1" | bc -l)" = 1 ]; then echo MET; else echo "NOT MET"; fi; }
