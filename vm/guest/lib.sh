# shellcheck shell=sh
# Helpers for guest scripts (busybox ash). vm/run.sh puts this file at /vm/lib.sh in every run:
#
#   . /vm/lib.sh
#
# Every wait in a guest test must be bounded: a stuck ublk server or a DEL_DEV waiting for one
# hangs forever otherwise, and the only way out is the host-side timeout, which costs minutes.

# Guest uptime in seconds (two decimals), from /proc/uptime.
vm_uptime() { read -r _u _ < /proc/uptime; echo "$_u"; }
# Guest uptime in milliseconds, for measuring durations inside a test.
now_ms() { awk '{ printf "%d\n", $1 * 1000 }' /proc/uptime; }

# step MSG: log a test step with the guest uptime, so slow steps stand out in the console log.
step() { echo "=== [$(vm_uptime)s] $*"; }
log() { echo "    [$(vm_uptime)s] $*"; }

# expected WHAT: says that the errors printed next (by a command under test, or by the kernel on
# the console) are the ones the step provokes, so that a passing log does not read as failing.
expected() { echo "    [$(vm_uptime)s] expected errors follow: $*"; }
# show_expected FILE: prints an intended error message with each line marked as expected.
show_expected() { sed 's/^/    (expected) /' "$1"; }

# fail MSG: print MSG and the end of the kernel log (the reason is often there), then exit 1.
fail() {
    echo "FAIL: $*" >&2
    echo "--- last kernel messages:" >&2
    dmesg 2>/dev/null | tail -n 15 >&2
    exit 1
}

# wait_for TIMEOUT_S DESCRIPTION COMMAND...: run COMMAND every 0.1 s until it succeeds;
# after TIMEOUT_S seconds fail with DESCRIPTION. Time is taken from the uptime clock, not from a
# count of tries, because under TCG one try of COMMAND can take long.
#   wait_for 10 "/dev/ublkb0 to appear" test -b /dev/ublkb0
# Use it in a subshell, ( wait_for ... ) || ..., to handle the timeout instead of failing.
wait_for() {
    _wf_t=$1 _wf_what=$2
    shift 2
    _wf_start=$(now_ms)
    while ! "$@" >/dev/null 2>&1; do
        if [ $(( $(now_ms) - _wf_start )) -ge $(( _wf_t * 1000 )) ]; then
            fail "timed out after ${_wf_t}s waiting for $_wf_what"
        fi
        usleep 100000
    done
    log "waited $(( $(now_ms) - _wf_start )) ms for $_wf_what"
}

# run_timeout S CMD...: run CMD, killed (TERM, KILL 5 s later) after S seconds. Returns CMD's
# status; on timeout prints a TIMEOUT line and returns 124. busybox timeout execs CMD in place,
# so a killed CMD shows up as 143/137: that is what is translated here.
run_timeout() {
    _rt_t=$1
    shift
    timeout -k 5 "$_rt_t" "$@"
    _rt_rc=$?
    if [ "$_rt_rc" = 143 ] || [ "$_rt_rc" = 137 ]; then
        echo "TIMEOUT: '$*' did not finish within ${_rt_t}s" >&2
        return 124
    fi
    return "$_rt_rc"
}

# kill_leftover_daemons PATTERN: kill every process whose command line matches PATTERN (an
# extended regex), TERM first, KILL after 3 s. A half-started ublk server still holding
# /dev/ublkcN makes DEL_DEV hang forever, so tests call this before deleting devices and at exit.
kill_leftover_daemons() {
    _kd_pids=$(_kd_match "$1")
    [ -n "$_kd_pids" ] || return 0
    log "killing leftover processes matching '$1': $_kd_pids"
    # shellcheck disable=SC2086 # a list of pids
    kill -TERM $_kd_pids 2>/dev/null
    _kd_i=0
    while [ $_kd_i -lt 30 ]; do
        [ -n "$(_kd_match "$1")" ] || return 0
        usleep 100000
        _kd_i=$((_kd_i + 1))
    done
    _kd_pids=$(_kd_match "$1")
    [ -n "$_kd_pids" ] || return 0
    log "still alive after TERM, sending KILL: $_kd_pids"
    # shellcheck disable=SC2086
    kill -KILL $_kd_pids 2>/dev/null
    usleep 200000
    return 0
}
# Pids whose command line matches, except init and copies of this script (the script and the
# subshells it forks, such as the one running this pipeline, share its command line). One ps and
# one awk: forking a process per /proc entry takes seconds under TCG. The pattern goes through
# the environment so that awk's own command line does not match it.
_kd_match() {
    ps -o pid,args | KD_PAT=$1 KD_SELF=$$ awk '
        NR > 1 {
            pid = $1
            line = $0
            sub(/^ *[0-9]+ +/, "", line)
            args[pid] = line
        }
        END {
            self = args[ENVIRON["KD_SELF"]]
            for (pid in args)
                if (pid != 1 && args[pid] != self && args[pid] ~ ENVIRON["KD_PAT"])
                    printf "%s ", pid
        }'
}

# disk_dev NAME: the /dev/vdX of the disk attached with run.sh -d NAME=...
disk_dev() {
    [ -e "/dev/disk/by-serial/$1" ] || fail "no disk with serial '$1' (attached with run.sh -d $1=...?)"
    readlink -f "/dev/disk/by-serial/$1"
}

# JSON fields from `ublk-mirror ... --json` output on stdin (pretty-printed: one field a line;
# the first match wins). The guest has no jq.
jnum() { sed -n "s/.*\"$1\": \([0-9.e+-]*\).*/\1/p" | head -n 1; }
jstr() { sed -n "s/.*\"$1\": \"\([^\"]*\)\".*/\1/p" | head -n 1; }
# mirror_status ID: the device's status as JSON in /tmp/st.json (fails the script if unreachable).
mirror_status() {
    run_timeout 10 ublk-mirror status -n "$1" --json > /tmp/st.json 2> /tmp/st.err || fail "status -n $1: $(cat /tmp/st.err)"
}
# add_synced S T B [ADD OPTIONS...]: `ublk-mirror add` of device 0 (output in /tmp/add.json),
# waits for /dev/ublkb0 and for the initial sync; fails the script otherwise.
add_synced() {
    _as_s=$1 _as_t=$2 _as_b=$3; shift 3
    run_timeout 60 ublk-mirror add -s "$_as_s" -t "$_as_t" -b "$_as_b" "$@" > /tmp/add.json 2> /tmp/add.err || fail "add: $(cat /tmp/add.err)"
    wait_for 10 /dev/ublkb0 test -b /dev/ublkb0
    run_timeout 120 ublk-mirror status -n 0 --wait-synced --timeout 120 > /dev/null || fail "initial sync"
}
# dm_target DISK: /dev/mapper/tgt, a linear device-mapper target over the VM's disk DISK (its
# path in $T, the disk in $TGT and its size in sectors in $SECT), which dm_target_error and
# dm_target_back switch to failing every I/O and back.
dm_target() {
    modprobe dm-mod || fail "modprobe dm-mod"
    wait_for 5 "/dev/mapper/control" test -c /dev/mapper/control
    TGT=$(disk_dev "$1")
    SECT=$(blockdev --getsz "$TGT")
    dmsetup create tgt --table "0 $SECT linear $TGT 0" || fail "dmsetup create"
    T=/dev/mapper/tgt
}
dm_target_error() {
    expected "the kernel logs I/O errors of the target's device (dm-error) until it comes back"
    dmsetup suspend tgt && dmsetup load tgt --table "0 $SECT error" && dmsetup resume tgt || fail "switch to dm-error"
    log "target now fails every I/O"
}
dm_target_back() {
    dmsetup suspend tgt && dmsetup load tgt --table "0 $SECT linear $TGT 0" && dmsetup resume tgt || fail "switch back"
    log "target back"
}
# queue_cpus PID: the CPU list (Cpus_allowed_list) of each queue thread of daemon PID, one a
# line (queue threads: named like the process, other than its main thread).
queue_cpus() {
    for _qc in /proc/"$1"/task/*; do
        [ "${_qc##*/}" = "$1" ] && continue
        [ "$(cat "$_qc/comm")" = ublk-mirror ] || continue
        sed -n 's/^Cpus_allowed_list:[[:space:]]*//p' "$_qc/status"
    done
}
# fio_verify_bg NAME SIZE: fio 4k randwrite QD32 with crc32c verify on /dev/ublkb0 in the
# background; its pid in FIO, its output in /tmp/fio.out (see wait_fio).
fio_verify_bg() {
    fio --filename=/dev/ublkb0 --ioengine=io_uring --direct=1 --bs=4k --iodepth=32 --rw=randwrite --size="$2" \
        --name="$1" --verify=crc32c --do_verify=1 --output=/tmp/fio.out &
    FIO=$!
}
# wait_fio PID OUT [SECS]: waits (at most SECS, default 300) for the background fio PID and
# fails the script unless it exited 0 and reported no error in OUT.
wait_fio() {
    _wf_t=0
    while kill -0 "$1" 2>/dev/null; do
        sleep 1; _wf_t=$((_wf_t + 1))
        [ $_wf_t -lt "${3:-300}" ] || { kill "$1"; fail "fio did not finish within ${3:-300} s"; }
    done
    wait "$1" || fail "fio failed: $(cat "$2")"
    grep -q "err= 0" "$2" || fail "fio saw errors: $(cat "$2")"
}
# bench_fio_args JOB: the fio options of the device benchmark's rounds (bench/guest-device.sh,
# bench/guest-device-io.sh): randread, randwrite (4k QD32), seqwrite (1M QD8).
bench_fio_args() {
    case $1 in
        randread) echo "--rw=randread --bs=4k --iodepth=32" ;;
        randwrite) echo "--rw=randwrite --bs=4k --iodepth=32" ;;
        seqwrite) echo "--rw=write --bs=1M --iodepth=8" ;;
        *) fail "bench_fio_args: unknown job $1" ;;
    esac
}
