#!/usr/bin/env bash
# Try the ublk device on a machine without ublk_drv: builds ublk-mirror, boots a Debian kernel
# that has it (under qemu, see vm/README.md) and runs a guest script: by default a guided tour
# (tests/vm/demo.sh); give your own script to run your own scenario.
#   scripts/try-in-vm.sh [GUEST_SCRIPT] [vm/run.sh options...]
set -euo pipefail
cd "$(dirname "$0")/.."
script=${1:-tests/vm/demo.sh}
shift || true
scripts/deps.sh
cargo build --locked --release
exec vm/run.sh -t 600 -r 3 -b target/release/ublk-mirror "$@" "$script"
