#!/usr/bin/env bash
# Installs what building and testing ublk-mirror needs on a Debian 12 machine (idempotent):
#   libclang-dev  libublk's -sys crate generates its bindings with bindgen at build time;
#   qemu-utils    qemu-img, a baseline of the sync benchmark; qemu-nbd, an NBD server the NBD
#                 target is tested against (tests/nbd.rs) and benchmarked with (bench/nbd.sh);
#   nbdkit        a second NBD server for tests/nbd.rs, with the filters that take WRITE_ZEROES
#                 away and impose block size limits (paths qemu-nbd never exercises);
#   spin          the Promela model check (models/);
#   procps, e2fsprogs  pgrep and mkfs.ext4 for the host-driven VM scenarios;
#   systemd       systemd-analyze, to verify the unit file;
#   udev          udevadm, run in the VM against a real ublk device to check the rules;
# The VM harness (vm/setup.sh) installs its own packages (qemu, busybox, kernel image...).
set -euo pipefail
PKGS=(libclang-dev qemu-utils nbdkit spin procps e2fsprogs systemd udev)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || { echo "deps.sh: missing packages ${missing[*]}; run as root (apt-get install)" >&2; exit 1; }
    echo "deps.sh: installing ${missing[*]}"
    timeout 600 apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -q "${missing[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "deps.sh: cargo not found: install a Rust toolchain (rustup), 1.82 or newer" >&2; exit 1; }
