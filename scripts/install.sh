#!/usr/bin/env bash
# Installs ublk-mirror and its system files in the standard places:
#   /usr/local/bin/ublk-mirror                      the program (cargo install --path .)
#   /usr/local/share/man/man8/ublk-mirror.8         the man pages (and man5/ublk-mirror.conf.5)
#   /etc/systemd/system/ublk-mirror@.service        the template unit
#   /etc/udev/rules.d/60-ublk-mirror.rules          the udev rules
#   /etc/ublk-mirror/example.conf.sample            the config format (copy to NAME.conf)
#   bash, zsh and fish completions
# The unit and the rules name /usr/bin/ublk-mirror, the Debian package's path (cargo deb,
# Cargo.toml); installed here they name /usr/local/bin/ublk-mirror instead.
# Usage: scripts/install.sh [--destdir DIR] [--bin PATH]   (--bin: install this binary, no build)
set -euo pipefail
cd "$(dirname "$0")/.."
DESTDIR= BIN=
while [ $# -gt 0 ]; do
    case $1 in
        --destdir) DESTDIR=$2; shift 2;;
        --bin) BIN=$2; shift 2;;
        *) echo "usage: $0 [--destdir DIR] [--bin PATH]" >&2; exit 2;;
    esac
done
if [ -z "$BIN" ]; then
    cargo install --locked --path . --root "$DESTDIR/usr/local"
    BIN=$DESTDIR/usr/local/bin/ublk-mirror
else
    install -D -m 0755 "$BIN" "$DESTDIR/usr/local/bin/ublk-mirror"
fi
install -D -m 0644 man/ublk-mirror.8 "$DESTDIR/usr/local/share/man/man8/ublk-mirror.8"
install -D -m 0644 man/ublk-mirror.conf.5 "$DESTDIR/usr/local/share/man/man5/ublk-mirror.conf.5"
local_bin() {
    install -d "$(dirname "$2")"
    sed 's#/usr/bin/ublk-mirror#/usr/local/bin/ublk-mirror#g' "$1" > "$2.tmp"
    chmod 0644 "$2.tmp"
    mv "$2.tmp" "$2"
}
local_bin systemd/ublk-mirror@.service "$DESTDIR/etc/systemd/system/ublk-mirror@.service"
local_bin udev/60-ublk-mirror.rules "$DESTDIR/etc/udev/rules.d/60-ublk-mirror.rules"
install -D -m 0644 systemd/ublk-mirror.conf.example "$DESTDIR/etc/ublk-mirror/example.conf.sample"
mkdir -p "$DESTDIR/usr/local/share/bash-completion/completions" "$DESTDIR/usr/local/share/zsh/site-functions" \
    "$DESTDIR/usr/local/share/fish/vendor_completions.d"
"$BIN" completions bash > "$DESTDIR/usr/local/share/bash-completion/completions/ublk-mirror"
"$BIN" completions zsh > "$DESTDIR/usr/local/share/zsh/site-functions/_ublk-mirror"
"$BIN" completions fish > "$DESTDIR/usr/local/share/fish/vendor_completions.d/ublk-mirror.fish"
echo "installed under ${DESTDIR:-/}"
if [ -z "$DESTDIR" ]; then
    systemctl daemon-reload 2>/dev/null || true
    udevadm control --reload 2>/dev/null || true
    echo "next: write /etc/ublk-mirror/NAME.conf (see example.conf.sample), then systemctl enable --now ublk-mirror@NAME"
fi
