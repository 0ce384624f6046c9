#!/bin/sh
# Bad input to add: a clear error each, and no device or daemon left behind (scenario 6).
# shellcheck source=/dev/null
. /vm/lib.sh
truncate -s 64M /tmp/s /tmp/t /tmp/s2 /tmp/t2
truncate -s 32M /tmp/small
no_leftovers() {
    [ -z "$(ls /sys/class/ublk-char 2>/dev/null)" ] || fail "$1: a ublk device was left behind: $(ls /sys/class/ublk-char)"
    # The command itself, not busybox timeout's watchdog (which names it and lingers up to 1 s).
    _left=$(_kd_match "^([^ ]*/)?ublk-mirror ")
    [ -z "$_left" ] || fail "$1: a daemon was left behind: $(ps -o pid,args | grep ublk-mirror)"
}
expect_fail() { # WHAT PATTERN CMD...
    what=$1 pat=$2; shift 2
    if run_timeout 60 "$@" > /tmp/out 2> /tmp/err; then fail "$what: succeeded"; fi
    show_expected /tmp/err
    grep -q "$pat" /tmp/err || fail "$what: the error does not say '$pat'"
}
step "missing source"
expect_fail "missing source" "nope" ublk-mirror add -s /tmp/nope -t /tmp/t -b /tmp/b1
no_leftovers "missing source"
step "target too small"
expect_fail "short target" "smaller than the source" ublk-mirror add -s /tmp/s -t /tmp/small -b /tmp/b2
[ ! -e /tmp/b2 ] || fail "a bitmap was created for a refused add"
no_leftovers "short target"
step "another device's bitmap"
run_timeout 60 ublk-mirror sync -s /tmp/s2 -t /tmp/t2 -b /tmp/b3 > /dev/null || fail "sync"
expect_fail "other pair's bitmap" "belongs to another pair" ublk-mirror add -s /tmp/s -t /tmp/t -b /tmp/b3
no_leftovers "other bitmap"
step "busy device id"
run_timeout 60 ublk-mirror add -n 3 -s /tmp/s -t /tmp/t -b /tmp/b4 > /dev/null || fail "first add"
expect_fail "busy id" "id 3" ublk-mirror add -n 3 -s /tmp/s2 -t /tmp/t2 -b /tmp/b5
[ "$(ls /sys/class/ublk-char)" = ublkc3 ] || fail "devices: $(ls /sys/class/ublk-char)"
step "a name in use"
expect_fail "name in use" "a device named s exists already" ublk-mirror add -s /tmp/s -t /tmp/t2 -b /tmp/b6
step "the bitmap of a live device"
expect_fail "bitmap in use" "another ublk-mirror process" ublk-mirror add --name other -s /tmp/s -t /tmp/t -b /tmp/b4
run_timeout 60 ublk-mirror del -n 3 || fail "del"
no_leftovers "after del"
step "del and recover of a device that does not exist"
expect_fail "del missing" "no ublk device 7" ublk-mirror del -n 7
expect_fail "recover missing" "no ublk device 7" ublk-mirror recover -n 7
log ok
