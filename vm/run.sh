#!/usr/bin/env bash
# shellcheck disable=SC2054 # the commas inside qemu arguments are qemu's option syntax
# Boot the ublk test VM (Debian 6.12 kernel with ublk_drv, qemu TCG) and run one guest script.
#
#   vm/run.sh [options] SCRIPT [FILES...]
#   vm/run.sh -S [options] [SCRIPT [FILES...]]
#
# SCRIPT runs in the guest as /payload/run.sh under busybox sh, cwd /payload, with FILES copied
# next to it. Guest helpers: `. /vm/lib.sh` (vm/guest/lib.sh). Extra disks are at
# /dev/disk/by-serial/NAME and in $VM_DISK_<NAME> (upper case, '-' -> '_').
#
# Options:
#   -b BIN          copy a host binary (with its ldd libraries) into the guest's /usr/local/bin;
#                   repeatable. This is how target/release/ublk-mirror gets in.
#   -d NAME=SPEC    extra virtio disk with serial NAME (<= 20 chars of [A-Za-z0-9_-]); SPEC is an
#                   existing raw image file (kept: use it across boots) or a size such as 512M
#                   (a sparse temporary file, deleted afterwards); repeatable
#   -o DIR          copy what the guest leaves in /out into DIR (also after a failure)
#   -t SECONDS      overall timeout, boot retries included (default 600)
#   -m MEM          guest memory (default 2G)
#   -c CPUS         guest vCPUs (default 2)
#   -r N            retry a boot that died before the payload started, up to N times (default 2)
#   -a ARGS         extra kernel command line arguments
#   -S              interactive shell instead of running SCRIPT (Ctrl-A X quits qemu)
#   -h              this help
#
# Environment:
#   UBLK_MIRROR_VM_CACHE          cache directory (default ~/.cache/ublk-mirror-vm)
#   UBLK_MIRROR_VM_TCG_THREAD     multi (default) or single: single never showed the rare boot
#                                 oops of multi-threaded TCG (it was ~1 s slower per boot in
#                                 the vmlab trial; about even on this harness)
#   UBLK_MIRROR_VM_BOOT_TIMEOUT   seconds for the guest to reach the payload (default 120)
#   UBLK_MIRROR_VM_NO_AUTO_SETUP  1: do not run vm/setup.sh when host tools or images are missing
#   UBLK_MIRROR_VM_SETUP          the setup command to run then (default vm/setup.sh; tests)
#   KVER                          kernel version, as for vm/setup.sh
#
# Exit status: the guest script's status. Otherwise 124 when the timeout hit, 125 when the VM
# ended without reporting a status (panic, boot failure), 2 for usage or setup errors.
set -euo pipefail
umask 022

VM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=hostlib.sh
. "$VM_DIR/hostlib.sh"

# The help text is the comment block at the top of this file (after the shellcheck line).
usage() { awk 'NR > 2 && /^#/ { sub(/^# ?/, ""); print; next } NR > 2 { exit }' "$0"; exit "${1:-2}"; }

BINS=() DISKS=() OUTDIR='' TIMEOUT=600 MEM=2G CPUS=2 RETRIES=2 KARGS='' SHELL_ONLY=0
while getopts b:d:o:t:m:c:r:a:Sh opt; do
    case $opt in
        b) BINS+=("$OPTARG") ;;
        d) DISKS+=("$OPTARG") ;;
        o) OUTDIR=$OPTARG ;;
        t) TIMEOUT=$OPTARG ;;
        m) MEM=$OPTARG ;;
        c) CPUS=$OPTARG ;;
        r) RETRIES=$OPTARG ;;
        a) KARGS=$OPTARG ;;
        S) SHELL_ONLY=1 ;;
        h) usage 0 ;;
        *) usage 2 ;;
    esac
done
shift $((OPTIND - 1))
[ $# -ge 1 ] || [ "$SHELL_ONLY" = 1 ] || usage 2
[[ "$TIMEOUT" =~ ^[1-9][0-9]*$ ]] || vm_die "-t wants a number of seconds, got '$TIMEOUT'"
[[ "$RETRIES" =~ ^[0-9]+$ ]] || vm_die "-r wants a number, got '$RETRIES'"
[[ "$CPUS" =~ ^[1-9][0-9]*$ ]] || vm_die "-c wants a number, got '$CPUS'"
BOOT_TIMEOUT=${UBLK_MIRROR_VM_BOOT_TIMEOUT:-120}
TCG_THREAD=${UBLK_MIRROR_VM_TCG_THREAD:-multi}
case "$TCG_THREAD" in multi|single) ;; *) vm_die "UBLK_MIRROR_VM_TCG_THREAD must be multi or single" ;; esac
HOST_TOOLS="qemu-system-x86_64 cpio timeout"
missing_tools() {
    local t
    for t in $HOST_TOOLS; do command -v "$t" >/dev/null || printf '%s ' "$t"; done
}

START_MS=$(vm_now_ms)
DEADLINE_MS=$(( START_MS + TIMEOUT * 1000 ))

# --- host tools and images (setup.sh installs and builds them on first use) ----------------
BUILD=$VM_CACHE/build-$(vm_build_id)
MISSING_TOOLS=$(missing_tools)
if [ -n "$MISSING_TOOLS" ] || [ ! -f "$BUILD/ok" ]; then
    why="VM images missing or out of date"
    [ -z "$MISSING_TOOLS" ] || why="host tools missing: $MISSING_TOOLS"
    if [ "${UBLK_MIRROR_VM_NO_AUTO_SETUP:-0}" = 1 ]; then
        vm_die "$why; run: sudo $VM_DIR/setup.sh"
    fi
    SETUP=${UBLK_MIRROR_VM_SETUP:-$VM_DIR/setup.sh}
    vm_log "$why; running $SETUP first"
    "$SETUP" >&2 || vm_die "$SETUP failed"
    BUILD=$VM_CACHE/build-$(vm_build_id)
    [ -f "$BUILD/ok" ] || vm_die "setup.sh ran but $BUILD is still missing"
    MISSING_TOOLS=$(missing_tools)
    [ -z "$MISSING_TOOLS" ] || vm_die "setup.sh ran but these host tools are still missing: $MISSING_TOOLS"
    START_MS=$(vm_now_ms)   # setup time does not count against the test's timeout
    DEADLINE_MS=$(( START_MS + TIMEOUT * 1000 ))
fi
touch "$BUILD"   # most recently used: setup.sh prunes the oldest builds by mtime

WORK=$(mktemp -d "${TMPDIR:-/tmp}/ublk-mirror-vm.XXXXXX")
QEMU_PIDFILE=$WORK/qemu.pid
BG=
# shellcheck disable=SC2317 # called through the trap
cleanup() {
    # qemu may still run if we were interrupted; it is ours (pidfile), so end it.
    if [ -s "$QEMU_PIDFILE" ]; then kill "$(cat "$QEMU_PIDFILE")" 2>/dev/null || true; fi
    if [ -n "$BG" ]; then wait "$BG" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- payload: a second cpio archive appended to the base initramfs --------------------------
P=$WORK/payload-root
mkdir -p "$P/payload" "$P/vm"
cp "$VM_DIR/guest/lib.sh" "$P/vm/lib.sh"
if [ $# -ge 1 ]; then
    [ -f "$1" ] || vm_die "script $1 not found"
    cp "$1" "$P/payload/run.sh"
    shift
    for f in "$@"; do
        [ -e "$f" ] || vm_die "file $f not found"
        [ "$(basename "$f")" != run.sh ] || vm_die "a FILE may not be called run.sh (that name is the script's)"
        cp -a -L "$f" "$P/payload/"
    done
fi
for b in "${BINS[@]}"; do
    if [ ! -f "$b" ] || [ ! -x "$b" ]; then vm_die "-b $b: not an executable file"; fi
    vm_install_elf "$P" "$b" "usr/local/bin/$(basename "$b")"
done
# Uncompressed: nothing to gain from compressing a few MB that the guest unpacks from RAM.
(cd "$P" && find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) > "$WORK/payload.cpio"
cat "$BUILD/initrd.img" "$WORK/payload.cpio" > "$WORK/initrd.img"

# --- qemu command line ---------------------------------------------------------------------
QEMU=(qemu-system-x86_64 -accel "tcg,thread=$TCG_THREAD" -cpu max -m "$MEM" -smp "$CPUS"
      -kernel "$BUILD/vmlinuz" -initrd "$WORK/initrd.img"
      -nographic -no-reboot -nic none -pidfile "$QEMU_PIDFILE")
# Read-only, so concurrent runs can share the one image.
QEMU+=(-drive "file=$BUILD/tools.img,format=raw,if=none,id=tools,readonly=on"
       -device virtio-blk-pci,drive=tools,serial=tools)
NDISKS=1
# qemu 7.2 refuses -drive ...,serial=: the serial goes on the -device.
declare -A SEEN=()
i=0
for spec in "${DISKS[@]}"; do
    name=${spec%%=*} val=${spec#*=}
    [[ "$spec" == *=* && "$name" =~ ^[A-Za-z0-9_-]{1,20}$ ]] || vm_die "-d wants NAME=FILE|SIZE with NAME of at most 20 [A-Za-z0-9_-], got '$spec'"
    case "$name" in tools|out) vm_die "-d: disk name '$name' is reserved" ;; esac
    [ -z "${SEEN[$name]:-}" ] || vm_die "-d: disk name '$name' given twice"
    SEEN[$name]=1
    if [ -f "$val" ]; then
        img=$(realpath "$val")
    elif [[ "$val" =~ ^[0-9]+[KMGT]?$ ]]; then
        img=$WORK/disk-$name.img
        truncate -s "$val" "$img"
    else
        vm_die "-d $spec: '$val' is neither an existing file nor a size like 512M (create a persistent image first: truncate -s 1G FILE)"
    fi
    i=$((i + 1))
    QEMU+=(-drive "file=$img,format=raw,if=none,id=d$i,discard=unmap"
           -device "virtio-blk-pci,drive=d$i,serial=$name")
    NDISKS=$((NDISKS + 1))
done
if [ -n "$OUTDIR" ]; then
    QEMU+=(-drive "file=$WORK/out.img,format=raw,if=none,id=out"
           -device virtio-blk-pci,drive=out,serial=out)
    NDISKS=$((NDISKS + 1))
fi

mkdir -p "$VM_CACHE/logs"
LOG=$VM_CACHE/logs/run-$(date +%Y%m%d-%H%M%S)-$$.log
ln -sfn "$(basename "$LOG")" "$VM_CACHE/logs/last.log"
# Keep the newest 200 console logs.
# shellcheck disable=SC2012 # names are run-<date>-<pid>*.log
{ ls -1t "$VM_CACHE"/logs/run-*.log 2>/dev/null || true; } | tail -n +201 | while read -r old; do rm -f "$old"; done

remaining_s() { echo $(( (DEADLINE_MS - $(vm_now_ms)) / 1000 )); }
kill_qemu() { [ -s "$QEMU_PIDFILE" ] && kill "$(cat "$QEMU_PIDFILE")" 2>/dev/null; true; }

# --- interactive shell ---------------------------------------------------------------------
attempt=0 boot_hung=0
if [ "$SHELL_ONLY" = 1 ]; then
    [ -n "$OUTDIR" ] && truncate -s 512M "$WORK/out.img"
    vm_log "console log: $LOG (Ctrl-A X quits qemu)"
    T0=$(vm_now_ms)
    set +e
    # --foreground: qemu must stay in the terminal's foreground process group to read it.
    timeout --foreground "$TIMEOUT" "${QEMU[@]}" \
        -append "console=ttyS0 quiet panic=-1 ublkvm.shell=1 ublkvm.disks=$NDISKS $KARGS" 2>&1 | tee "$LOG"
    qrc=${PIPESTATUS[0]}
    set -e
    WALL_MS=$(( $(vm_now_ms) - T0 ))
fi

# --- run, retrying boots that die before the payload starts --------------------------------
# tsc=reliable: the rare multi-threaded-TCG boot panic is an int3 in sched_clock_cpu while the
# kernel live-patches the sched_clock static key, which it flips when it finds the emulated TSC
# unstable. Declaring the TSC reliable keeps that key still. Seen: 2 panics in 3 boots on a
# loaded host without it, 0 in 18 boots with it (0 in 10 without it on an idle host).
# The firmware and the kernel's console write terminal controls (a reset, screen clears, line
# wrap off) that a log shows as raw bytes: dropped, with the carriage returns, line by line.
strip_controls() { sed -u -e 's/\x1bc//g' -e 's/\x1b\[[0-9;?]*[A-Za-z]//g' -e 's/\r//g'; }
started() { grep -aqE 'UBLK-MIRROR-VM-(RUN|SHELL)' "$1"; }
while [ "$SHELL_ONLY" = 0 ]; do
    rem=$(remaining_s)
    [ "$rem" -ge 10 ] || { vm_log "FAIL: no time left for a boot (timeout -t $TIMEOUT)"; exit 124; }
    # The guest kills its payload a little before qemu is killed, so that /init still reports
    # rc=124 and archives /out (logs of a hung test are the most useful ones). The guest counts
    # from its boot (uptime), which starts a fraction of a second after qemu does.
    margin=$(( rem / 4 )); [ "$margin" -le 30 ] || margin=30; [ "$margin" -ge 4 ] || margin=4
    guest_deadline=$(( rem - margin ))
    if [ -n "$OUTDIR" ]; then rm -f "$WORK/out.img"; truncate -s 512M "$WORK/out.img"; fi
    rm -f "$QEMU_PIDFILE" "$WORK/qemu.rc"
    : > "$LOG"
    vm_log "boot $((attempt + 1))/$((RETRIES + 1)): tcg thread=$TCG_THREAD, timeout ${rem}s; console log: $LOG"
    T0=$(vm_now_ms)
    (
        set +e
        timeout -k 10 "$rem" "${QEMU[@]}" \
            -append "console=ttyS0 quiet panic=-1 tsc=reliable ublkvm.deadline=$guest_deadline ublkvm.disks=$NDISKS $KARGS" \
            < /dev/null 2>&1 | strip_controls | tee -a "$LOG"
        echo "${PIPESTATUS[0]}" > "$WORK/qemu.rc"
    ) &
    BG=$!
    # Boot watchdog: a boot that hangs (rather than panics) would otherwise eat the whole timeout.
    boot_hung=0
    while kill -0 "$BG" 2>/dev/null; do
        started "$LOG" && break
        if [ $(( $(vm_now_ms) - T0 )) -gt $(( BOOT_TIMEOUT * 1000 )) ]; then
            vm_log "guest did not reach the payload within ${BOOT_TIMEOUT}s; killing qemu"
            boot_hung=1
            kill_qemu
            break
        fi
        sleep 0.2
    done
    wait "$BG" || true
    BG=
    qrc=$(cat "$WORK/qemu.rc" 2>/dev/null || echo '?')
    WALL_MS=$(( $(vm_now_ms) - T0 ))
    if started "$LOG" || [ "$attempt" -ge "$RETRIES" ]; then break; fi
    attempt=$((attempt + 1))
    cp "$LOG" "${LOG%.log}-bootfail$attempt.log"
    vm_log "boot failed before the payload started (qemu exit $qrc, hung=$boot_hung); log kept as ${LOG%.log}-bootfail$attempt.log; retrying"
done

if [ -n "$OUTDIR" ]; then
    mkdir -p "$OUTDIR"
    # An all-zero disk means the guest archived nothing.
    if [ -n "$(head -c 1024 "$WORK/out.img" | tr -d '\0' | head -c 1)" ]; then
        tar -xf "$WORK/out.img" -C "$OUTDIR" || vm_log "WARNING: extracting /out failed"
        vm_log "guest /out extracted into $OUTDIR"
    else
        vm_log "guest left nothing in /out"
    fi
fi

end_line=$(grep -aoE 'UBLK-MIRROR-VM-END rc=[0-9]+' "$LOG" | tail -n 1 || true)
boot_s=$(grep -aoE 'UBLK-MIRROR-VM-RUN uptime=[0-9.]+' "$LOG" | head -n 1 | sed 's/.*=//' || true)
summary="wall $(vm_fmt_ms "$WALL_MS"), guest reached payload at ${boot_s:-?}s uptime, boots $((attempt + 1)), qemu exit $qrc"
if [ -n "$end_line" ]; then
    rc=${end_line##*rc=}
    if [ "$rc" = 124 ] && grep -aq 'UBLK-MIRROR-VM: TIMEOUT' "$LOG"; then
        vm_log "FAIL: guest script timed out (-t $TIMEOUT); $summary; log $LOG"
    elif [ "$rc" = 0 ]; then
        vm_log "PASS: $summary; log $LOG"
    else
        vm_log "FAIL: guest script exited $rc; $summary; log $LOG"
    fi
    exit "$rc"
fi
if [ "$qrc" = 124 ] || [ "$qrc" = 137 ]; then
    vm_log "FAIL: timeout: qemu killed after ${TIMEOUT}s overall without an end marker; $summary; log $LOG"
    exit 124
fi
if ! started "$LOG"; then
    if [ "$boot_hung" = 1 ]; then why="the last boot hung for ${BOOT_TIMEOUT}s"; else why="the last boot ended early"; fi
    vm_log "FAIL: the VM never reached the payload ($((attempt + 1)) boots; $why); $summary; log $LOG"
else
    why=$(grep -aoE 'Kernel panic[^\r]*|BUG:[^\r]*|Oops[^\r]*' "$LOG" | head -n 1 || true)
    vm_log "FAIL: the VM ended without reporting the script's status${why:+ ($why)}; $summary; log $LOG"
fi
exit 125
