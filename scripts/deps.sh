#!/usr/bin/env bash
# Installs what building and testing ublk-mirror needs on a Debian 12 machine (idempotent):
#   libclang-dev  libublk's -sys crate generates its bindings with bindgen at build time;
#   qemu-utils    qemu-img, a baseline of the sync benchmark; qemu-nbd, an NBD server the NBD
#                 target is tested against (tests/nbd.rs) and benchmarked with (bench/nbd.sh);
#   nbdkit        a second NBD server for tests/nbd.rs, with the filters that take WRITE_ZEROES
#                 away and impose block size limits (paths qemu-nbd never exercises);
#   openssl       makes the certificates of the TLS VM scenario (tests/vm/device-nbd-tls.sh, which
#                 also copies it into the guest) and of bench/nbd-tls.sh (tests/nbd_tls.rs makes
#                 its own with rcgen);
#   spin          the Promela model check (models/);
#   procps, e2fsprogs  pgrep and mkfs.ext4 for the host-driven VM scenarios;
#   systemd       systemd-analyze, to verify the unit file;
#   udev          udevadm, run in the VM against a real ublk device to check the rules;
#   prometheus, python3-prometheus-client  `promtool check metrics` (Prometheus's own parser and
#                 naming lint) and the Python client's parser read the output of `ublk-mirror
#                 metrics` in tests/metrics.rs. Installed without their recommends (no
#                 node_exporter, smartmontools...); the package's Prometheus server service is
#                 enabled by Debian on a machine that runs systemd: `systemctl disable --now
#                 prometheus` if it is not wanted (promtool does not need it);
#   dpkg-dev, binutils  dpkg-shlibdeps (the package's Depends) and objcopy/strip for cargo deb;
#   lintian       checks the Debian package (scripts/package-test.sh);
#   mmdebstrap    builds the throw-away Debian 12 root the package is installed into;
#   cargo-deb     (cargo install, pinned below) builds the package from Cargo.toml's metadata;
# The VM harness (vm/setup.sh) installs its own packages (qemu, busybox, kernel image...).
set -euo pipefail
PKGS=(libclang-dev qemu-utils nbdkit openssl spin procps e2fsprogs systemd udev dpkg-dev binutils lintian mmdebstrap)
# Installed without recommends.
LEAN_PKGS=(prometheus python3-prometheus-client)
missing=() lean=()
for p in "${PKGS[@]}" "${LEAN_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" && continue
    if [[ " ${LEAN_PKGS[*]} " == *" $p "* ]]; then lean+=("$p"); else missing+=("$p"); fi
done
updated=
# Installs "$@" (apt options, then packages) unless apt's plan would remove anything.
apt_install() {
    [ "$(id -u)" = 0 ] || { echo "deps.sh: missing packages ${missing[*]} ${lean[*]}; run as root (apt-get install)" >&2; exit 1; }
    [ -n "$updated" ] || { timeout 600 apt-get update -q >/dev/null; updated=1; }
    # Never remove or downgrade what the machine has: read apt's plan first.
    plan=$(DEBIAN_FRONTEND=noninteractive apt-get -s install "$@" 2>&1) || {
        echo "$plan" | tail -n 15 >&2
        echo "deps.sh: apt cannot install $* (above)" >&2
        exit 1
    }
    bad=$(echo "$plan" | sed -n 's/^Remv \([^ ]*\).*/\1/p' | tr '\n' ' ')
    if [ -n "$bad" ]; then
        echo "deps.sh: installing $* would remove ${bad}(apt's plan); install them yourself at versions that fit, then run again" >&2
        exit 1
    fi
    DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -q "$@" >/dev/null
}
if [ ${#missing[@]} -gt 0 ]; then
    echo "deps.sh: installing ${missing[*]}"
    # qemu-utils and an installed qemu-system-x86 (vm/setup.sh's) come from one source package:
    # apt wants one version of both, so qemu-utils takes the emulator's (from the release it
    # came from), rather than apt replacing the emulator.
    args=() from=()
    # (dpkg-query fails when the emulator is not installed at all: an empty answer then.)
    qsys=$(dpkg-query -W -f='${Status} ${Version}' qemu-system-x86 2>/dev/null | sed -n 's/^install ok installed //p' || true)
    for p in "${missing[@]}"; do
        if [ "$p" = qemu-utils ] && [ -n "$qsys" ]; then
            args+=("qemu-utils=$qsys")
            [[ "$qsys" != *bpo12* ]] || from=(-t bookworm-backports)
        else
            args+=("$p")
        fi
    done
    apt_install "${from[@]}" "${args[@]}"
fi
if [ ${#lean[@]} -gt 0 ]; then
    echo "deps.sh: installing ${lean[*]} (without recommends)"
    apt_install --no-install-recommends "${lean[@]}"
fi
command -v cargo >/dev/null || { echo "deps.sh: cargo not found: install a Rust toolchain (rustup), 1.82 or newer" >&2; exit 1; }
# cargo-deb: this version or a newer one already installed (never replaced by an older one);
# building it takes about 80 s on 2 cores and needs Rust 1.85.
CARGO_DEB_VERSION=3.8.0
have=$(cargo deb --version 2>/dev/null | awk '{print $NF}' || true)
if [ -z "$have" ] || [ "$(printf '%s\n%s\n' "$CARGO_DEB_VERSION" "$have" | sort -V | head -n 1)" != "$CARGO_DEB_VERSION" ]; then
    echo "deps.sh: installing cargo-deb $CARGO_DEB_VERSION${have:+ (have $have)}"
    timeout 900 cargo install --locked --quiet cargo-deb --version "$CARGO_DEB_VERSION"
fi
