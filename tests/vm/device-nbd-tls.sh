#!/bin/sh
# vm-args: -m 2G -b /usr/bin/qemu-nbd -b /usr/bin/openssl
# The device mirroring to an NBD server over TLS (issue 18): qemu-nbd with tls-creds-x509,
# verifying its peers (mutual TLS), on a Unix socket in the VM; certificates made here by
# openssl. fio verify on the device while mirroring; the server is killed in the middle and comes
# back with a certificate from another CA: the mirror stays degraded and says why, fio sees no
# error; with the right certificate again, the mirror converges by itself. Then the daemon is
# killed and recovered: the new daemon reconnects with the saved TLS files. Source == target at
# the end, also checked through TLS by verify.
# shellcheck source=/dev/null
. /vm/lib.sh
S=/tmp/src.img T=/tmp/tgt.img B=/tmp/bm DEV=/dev/ublkb0 SOCK=/tmp/nbd.sock EV=/tmp/events.jsonl P=/tmp/pki
truncate -s 128M $S $T

step "certificates: a CA, the server's (nbd-server), the client's; another CA's server certificate"
mkdir -p $P/good $P/rogue $P/client
printf '[req]\ndistinguished_name = dn\n[dn]\n' > $P/openssl.cnf
ossl() { run_timeout 60 openssl "$@" 2> $P/openssl.err || fail "openssl $1: $(cat $P/openssl.err)"; }
ca() {  # ca DIR NAME: DIR/ca-key.pem, DIR/ca-cert.pem
    ossl req -config $P/openssl.cnf -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
        -subj "/CN=$2" -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
        -keyout "$1/ca-key.pem" -out "$1/ca-cert.pem"
}
leaf() {  # leaf CADIR OUT_CERT OUT_KEY CN EXTFILE
    ossl req -config $P/openssl.cnf -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$4" \
        -keyout "$3" -out $P/req.csr
    ossl x509 -req -in $P/req.csr -CA "$1/ca-cert.pem" -CAkey "$1/ca-key.pem" -CAcreateserial -days 2 \
        -extfile "$5" -out "$2"
    chmod 600 "$3"
}
printf 'subjectAltName=DNS:nbd-server\nextendedKeyUsage=serverAuth\n' > $P/server.ext
printf 'extendedKeyUsage=clientAuth\n' > $P/client.ext
ca $P/good "mirror CA"
leaf $P/good $P/good/server-cert.pem $P/good/server-key.pem nbd-server $P/server.ext
leaf $P/good $P/client/client-cert.pem $P/client/client-key.pem mirror-host $P/client.ext
ca $P/rogue "rogue CA"
leaf $P/rogue $P/rogue/server-cert.pem $P/rogue/server-key.pem nbd-server $P/server.ext
# The rogue server presents the rogue certificate; its ca-cert.pem holds both CAs (qemu-nbd
# checks its own certificate against it, and our client certificate).
cat $P/good/ca-cert.pem $P/rogue/ca-cert.pem > $P/rogue/both.pem && mv $P/rogue/both.pem $P/rogue/ca-cert.pem
TLS="--tls-ca $P/good/ca-cert.pem --tls-cert $P/client/client-cert.pem --tls-key $P/client/client-key.pem"

start_server() {  # start_server DIR
    rm -f $SOCK /tmp/nbd.pid
    qemu-nbd -f raw -x tgt --socket=$SOCK --persistent --shared=4 --pid-file=/tmp/nbd.pid --fork \
        --object "tls-creds-x509,id=tls0,dir=$1,endpoint=server,verify-peer=yes" --tls-creds tls0 $T \
        || fail "qemu-nbd did not start"
    wait_for 10 "the NBD socket" test -S $SOCK
}
start_server $P/good
URI="nbds+unix:///tgt?socket=$SOCK&tls-hostname=nbd-server"

step "refusals: no client certificate; a key others may read"
if run_timeout 30 ublk-mirror sync -s $S -t "$URI" -b /tmp/bm-x --tls-ca $P/good/ca-cert.pem > /tmp/o 2>&1; then
    fail "sync without a client certificate succeeded"
fi
grep -q -- "--tls-cert" /tmp/o || fail "no hint to give a client certificate: $(cat /tmp/o)"
test ! -e /tmp/bm-x || fail "a refused sync left a bitmap behind"
cp $P/client/client-key.pem /tmp/loose-key.pem && chmod 644 /tmp/loose-key.pem
if run_timeout 30 ublk-mirror sync -s $S -t "$URI" -b /tmp/bm-x --tls-ca $P/good/ca-cert.pem \
    --tls-cert $P/client/client-cert.pem --tls-key /tmp/loose-key.pem > /tmp/o 2>&1; then
    fail "a key readable by others was taken"
fi
grep -q "chmod o-rwx" /tmp/o || fail "no chmod hint: $(cat /tmp/o)"

step "add over TLS, fio verify while mirroring"
# shellcheck disable=SC2086
run_timeout 60 ublk-mirror add -s $S -t "$URI" -b $B $TLS --event-log $EV > /tmp/add.json 2> /tmp/add.err || fail "add: $(cat /tmp/add.err)"
wait_for 10 "$DEV" test -b $DEV
fio --filename=$DEV --ioengine=io_uring --direct=1 --bs=4k --iodepth=32 --rw=randwrite --size=96M \
    --name=tls --verify=crc32c --do_verify=1 --output=/tmp/fio.out &
FIO=$!
sleep 3

step "kill the server; it comes back with another CA's certificate"
kill "$(cat /tmp/nbd.pid)" || fail "kill qemu-nbd"
start_server $P/rogue
wait_for 60 "degraded, naming the untrusted certificate" sh -c \
    'ublk-mirror status -n 0 --json > /tmp/st.json && grep -q "\"state\": \"degraded\"" /tmp/st.json && grep -q "not signed by a trusted CA" /tmp/st.json'
log "degraded: $(jstr last_error < /tmp/st.json)"
sleep 2
kill "$(cat /tmp/nbd.pid)" || fail "kill the rogue qemu-nbd"
start_server $P/good
log "server back with its certificate"
wait_fio $FIO /tmp/fio.out
run_timeout 240 ublk-mirror status -n 0 --wait-synced --timeout 240 > /dev/null || fail "no convergence after the server came back"
grep -q '"event":"degraded"' $EV && grep -q '"event":"recovered"' $EV || fail "events: $(cat $EV)"

step "SIGKILL of the daemon, recover: the new daemon connects with the saved TLS files"
PID=$(ublk-mirror list --json | sed -n 's/.*"pid": \([0-9]*\).*/\1/p')
[ -n "$PID" ] || fail "no daemon pid"
dd if=/dev/urandom of=$DEV bs=64k count=64 seek=100 oflag=direct 2>/dev/null || fail "write before the kill"
kill -9 "$PID" || fail "kill daemon $PID"
wait_for 20 "the device to wait for a new daemon" sh -c "ublk-mirror list --json | grep -q QUIESCED"
run_timeout 90 ublk-mirror recover -n 0 > /tmp/rec.json 2>/tmp/rec.err || fail "recover: $(cat /tmp/rec.err)"
dd if=/dev/urandom of=$DEV bs=64k count=64 seek=300 oflag=direct 2>/dev/null || fail "write after recover"
run_timeout 120 ublk-mirror status -n 0 --wait-synced --timeout 120 > /dev/null || fail "convergence after recovery"
run_timeout 90 ublk-mirror del -n 0 --wait-synced --timeout 60 || fail "del"
# shellcheck disable=SC2086
run_timeout 60 ublk-mirror verify -s $S -t "$URI" -b $B $TLS || fail "verify through TLS"
kill "$(cat /tmp/nbd.pid)"
cmp $S $T || fail "source and target differ"
log ok
