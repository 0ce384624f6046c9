#!/usr/bin/env bash
# Benchmark of `ublk-mirror sync` to an NBD export over TLS, against the same over plain NBD and
# against `qemu-img convert` over TLS to the same server.
#
#   sudo bench/nbd-tls.sh | tee bench/results/nbd-tls-$(date +%F).txt
#
# One run, same files: a dense random source of SIZE_MIB on BENCH_DIR, copied over TCP on
# loopback to qemu-nbd, which serves one export in clear and another with tls-creds-x509
# (certificates made here with openssl: a CA, and a server certificate for 127.0.0.1). Two
# settings:
#   mem:  the exports are files on tmpfs (SHM_DIR) and the source stays in the page cache: no
#         disk, so the protocol path on the CPUs is measured (the worst case for TLS: both ends
#         encrypt or decrypt every byte);
#   disk: the exports are files on BENCH_DIR served with O_DIRECT (qemu-nbd --cache=none), the
#         source read with O_DIRECT, the page cache dropped before each run.
# Each round runs, per setting: ublk-mirror over plain NBD, ublk-mirror over TLS, qemu-img over
# TLS, qemu-img over plain NBD. Wall-clock time of each whole command (connect, handshake,
# copy, final flush); the CPU seconds of the client (user+sys) and of the server (qemu-nbd's
# utime+stime across the run) are reported too. Medians of REPEAT rounds; ratios (throughput):
#   ublk-mirror TLS / ublk-mirror plain   goal >= 0.8
#   ublk-mirror TLS / qemu-img TLS        goal >= 1.0
#
# Environment: BENCH_DIR (default /var/tmp/ublk-mirror-bench; not tmpfs), BIN, REPEAT (5),
# SIZE_MIB (1024), SHM_DIR (/dev/shm; empty: no mem setting), KEEP=1.
set -euo pipefail
export LC_ALL=C

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
BENCH_DIR=${BENCH_DIR:-/var/tmp/ublk-mirror-bench}
BIN=${BIN:-$REPO/target/release/ublk-mirror}
REPEAT=${REPEAT:-5}
SIZE_MIB=${SIZE_MIB:-1024}
SHM_DIR=${SHM_DIR-/dev/shm}
KEEP=${KEEP:-0}
T_RUN=600
T_SMALL=120

die() { echo "nbd-tls.sh: $*" >&2; exit 1; }
log() { echo "  $*"; }
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"
[ -x /usr/bin/time ] || die "/usr/bin/time is not installed (apt-get install time)"
bench_preflight "dd qemu-img qemu-nbd openssl python3 timeout bc" "apt-get install qemu-utils openssl; or scripts/deps.sh" $((SIZE_MIB * 3 + 512))

W=$(mktemp -d "$BENCH_DIR/nbd-tls.XXXXXX")
SETTINGS=(disk)
if [ -n "$SHM_DIR" ]; then
  [ "$(df --output=fstype "$SHM_DIR" | tail -1 | tr -d ' ')" = tmpfs ] || die "SHM_DIR=$SHM_DIR is not tmpfs"
  WM=$(mktemp -d "$SHM_DIR/ublk-mirror-nbd-tls.XXXXXX")
  SETTINGS=(mem disk)
fi
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  if [ "$KEEP" = 1 ]; then echo "kept $W ${WM:-}"; else rm -rf -- "$W" "${WM:-}"; fi
}
trap cleanup EXIT

# --- certificates: a CA, the server's certificate (127.0.0.1), the client's view (the CA) ---
C=$W/pki; mkdir -p "$C/server" "$C/client"
ossl() { timeout "$T_SMALL" openssl "$@" 2>/dev/null; }
ossl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$C/ca-key.pem" -out "$C/server/ca-cert.pem" \
  -days 2 -subj "/CN=bench CA" -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
ossl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$C/server/server-key.pem" -out "$C/server.csr" -subj "/CN=127.0.0.1"
printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >"$C/ext.cnf"
ossl x509 -req -in "$C/server.csr" -CA "$C/server/ca-cert.pem" -CAkey "$C/ca-key.pem" -CAcreateserial \
  -out "$C/server/server-cert.pem" -days 2 -extfile "$C/ext.cnf"
cp "$C/server/ca-cert.pem" "$C/client/ca-cert.pem"
CA=$C/client/ca-cert.pem

S=$W/src; B=$W/bitmap
cpu_of() { awk '{printf "%.2f", ($14 + $15) / 100}' "/proc/$1/stat"; }

declare -A PORT SPID URI SRVOPTS UMOPTS QIOPTS DROP
start_server() {  # start_server SETTING KIND(plain|tls) FILE
  local st=$1 kind=$2 file=$3 p tls=() lf
  p=$(free_port)
  [ "$kind" = tls ] && tls=(--object "tls-creds-x509,id=t0,dir=$C/server,endpoint=server,verify-peer=no" --tls-creds t0)
  lf=$W/qemu-nbd.$st.$kind.log
  # shellcheck disable=SC2086
  qemu-nbd -f raw -x bench --persistent --shared=8 ${SRVOPTS[$st]} -p "$p" -b 127.0.0.1 "${tls[@]}" "$file" >"$lf" 2>&1 &
  SPID[$st.$kind]=$!; PIDS+=($!)
  PORT[$st.$kind]=$p
  if [ "$kind" = tls ]; then URI[$st.$kind]="nbds://127.0.0.1:$p/bench"; else URI[$st.$kind]="nbd://127.0.0.1:$p/bench"; fi
  timeout "$T_SMALL" sh -c "until python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", $p)).close()' 2>/dev/null; do sleep 0.1; done" \
    || die "qemu-nbd ($st $kind) did not come up: $(cat "$lf")"
}

echo "=== ublk-mirror NBD-over-TLS sync benchmark ==="
echo "date:        $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
echo "kernel:      $(uname -srvm); nproc $(nproc); cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
echo "binary:      $BIN ($("$BIN" --version), sha256 $(sha256sum "$BIN" | cut -c1-16)); repo HEAD $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')"
echo "qemu:        $(qemu-img --version | head -1); $(openssl version)"
echo "settings:    SIZE=${SIZE_MIB} MiB, REPEAT=$REPEAT, settings: ${SETTINGS[*]}"
echo

timeout 900 dd if=/dev/urandom of="$S" bs=1M count="$SIZE_MIB" iflag=fullblock status=none
for st in "${SETTINGS[@]}"; do
  dir=$W; [ "$st" = mem ] && dir=$WM
  if [ "$st" = disk ]; then
    SRVOPTS[$st]="--cache=none"; UMOPTS[$st]=""; QIOPTS[$st]="-T none"; DROP[$st]=1
  else
    SRVOPTS[$st]=""; UMOPTS[$st]="--direct never"; QIOPTS[$st]=""; DROP[$st]=0
  fi
  for kind in plain tls; do
    timeout 900 dd if=/dev/zero of="$dir/tgt.$kind" bs=1M count="$SIZE_MIB" status=none
    start_server "$st" "$kind" "$dir/tgt.$kind"
  done
done
echo "=== exact commands ==="
for st in "${SETTINGS[@]}"; do
  echo "$st servers:  qemu-nbd -f raw -x bench --persistent --shared=8 ${SRVOPTS[$st]} -p PORT -b 127.0.0.1 [--object tls-creds-x509,id=t0,dir=$C/server,endpoint=server,verify-peer=no --tls-creds t0] FILE"
  echo "$st um plain: $BIN sync -s $S -t ${URI[$st.plain]} -b $B ${UMOPTS[$st]}"
  echo "$st um tls:   $BIN sync -s $S -t ${URI[$st.tls]} -b $B --tls-ca $CA ${UMOPTS[$st]}"
  echo "$st qemu tls: qemu-img convert -n -f raw ${QIOPTS[$st]} --object tls-creds-x509,id=t0,dir=$C/client,endpoint=client --target-image-opts $S driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=${PORT[$st.tls]},export=bench,tls-creds=t0"
  echo "$st qemu plain: qemu-img convert -n -f raw -O raw ${QIOPTS[$st]} $S ${URI[$st.plain]}"
done
echo "(disk: every timed run is preceded by: sync; echo 3 > /proc/sys/vm/drop_caches)"
echo

declare -A R CC SC ORDER_SEEN; ORDER=()
# run NAME SETTING KIND cmd...: times the command; records wall, client CPU, server CPU.
run() {
  local name=$1 st=$2 kind=$3; shift 3
  local spid=${SPID[$st.$kind]} s0 s1 t
  if [ "${DROP[$st]}" = 1 ]; then drop_caches; else timeout "$T_RUN" cat "$S" >/dev/null; fi
  s0=$(cpu_of "$spid")
  /usr/bin/time -o "$W/time" -f '%e %U %S' timeout "$T_RUN" "$@" >/dev/null 2>"$W/err" || die "$name failed: $(cat "$W/err")"
  t=$(tail -1 "$W/time")
  s1=$(cpu_of "$spid")
  read -r wall u sy <<<"$t"
  R[$name]="${R[$name]:-} $wall"
  CC[$name]="${CC[$name]:-} $(echo "$u + $sy" | bc -l)"
  SC[$name]="${SC[$name]:-} $(echo "$s1 - $s0" | bc -l)"
  [ -n "${ORDER_SEEN[$name]:-}" ] || { ORDER+=("$name"); ORDER_SEEN[$name]=1; }
  log "$name: ${wall}s wall, client cpu $(echo "$u + $sy" | bc -l)s, server cpu $(echo "$s1 - $s0" | bc -l)s"
}

for round in $(seq 1 "$REPEAT"); do
  echo "--- round $round"
  for st in "${SETTINGS[@]}"; do
    # shellcheck disable=SC2086
    { rm -f "$B"; run "$st um-plain" "$st" plain "$BIN" sync -s "$S" -t "${URI[$st.plain]}" -b "$B" ${UMOPTS[$st]}; }
    # shellcheck disable=SC2086
    { rm -f "$B"; run "$st um-tls" "$st" tls "$BIN" sync -s "$S" -t "${URI[$st.tls]}" -b "$B" --tls-ca "$CA" ${UMOPTS[$st]}; }
    # shellcheck disable=SC2086
    run "$st qemu-img-tls" "$st" tls qemu-img convert -n -f raw ${QIOPTS[$st]} \
      --object "tls-creds-x509,id=t0,dir=$C/client,endpoint=client" --target-image-opts "$S" \
      "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=${PORT[$st.tls]},export=bench,tls-creds=t0"
    # shellcheck disable=SC2086
    run "$st qemu-img-plain" "$st" plain qemu-img convert -n -f raw -O raw ${QIOPTS[$st]} "$S" "${URI[$st.plain]}"
  done
done
for st in "${SETTINGS[@]}"; do
  for kind in plain tls; do
    tls=(); [ "$kind" = tls ] && tls=(--tls-ca "$CA")
    timeout "$T_RUN" "$BIN" verify -s "$S" -t "${URI[$st.$kind]}" "${tls[@]}" >/dev/null || die "verify $st $kind: the export differs"
  done
done
log "verify: all four exports identical to the source"
echo

echo "=== RESULTS (median of $REPEAT; MiB/s from the wall-clock time of the whole command) ==="
printf '%-22s %9s %9s %13s %13s  %s\n' "measurement" "median s" "MiB/s" "client cpu s" "server cpu s" "runs (s)"
declare -A M
for k in "${ORDER[@]}"; do
  # shellcheck disable=SC2086
  M[$k]=$(median ${R[$k]})
  # shellcheck disable=SC2086
  printf '%-22s %9.3f %9.1f %13.2f %13.2f  %s\n' "$k" "${M[$k]}" "$(echo "$SIZE_MIB / ${M[$k]}" | bc -l)" "$(median ${CC[$k]})" "$(median ${SC[$k]})" "${R[$k]}"
done
echo
echo "=== RATIOS (throughput) ==="
for st in "${SETTINGS[@]}"; do
  r=$(ratio "${M[$st um-plain]}" "${M[$st um-tls]}")
  printf '%-44s %7s   >= 0.8: %s\n' "$st: ublk-mirror TLS / ublk-mirror plain" "$r" "$(verdict "$r >= 0.8")"
  r=$(ratio "${M[$st qemu-img-tls]}" "${M[$st um-tls]}")
  printf '%-44s %7s   >= 1.0: %s\n' "$st: ublk-mirror TLS / qemu-img TLS" "$r" "$(verdict "$r >= 1.0")"
  r=$(ratio "${M[$st qemu-img-plain]}" "${M[$st qemu-img-tls]}")
  printf '%-44s %7s   (reference)\n' "$st: qemu-img TLS / qemu-img plain" "$r"
done
echo "done: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
