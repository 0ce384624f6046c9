# shellcheck shell=bash
# Shared by bench/sync.sh and bench/nbd.sh (sourced after they set BIN, BENCH_DIR and die).

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
