#!/usr/bin/env bash
# The test command of ublk-mirror (README.md; .ci/run calls it). Installs what it needs, then:
#   1. clippy with warnings as errors;
#   2. cargo test: the engine, bitmap, mirror loop and offline commands on real files through
#      io_uring, property tests against reference models;
#   3. the Debian package (scripts/package-test.sh): cargo deb, its contents, lintian, and an
#      install into a throw-away Debian 12 root;
#   4. the VM layer: boots a Debian kernel with ublk_drv under qemu (vm/) and runs the guest
#      scenarios. Neither skips: if one cannot run, this script fails.
# Set UBLK_MIRROR_SKIP_VM=1 to run only layers 1-3 on a developer's machine (never in CI).
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
scripts/deps.sh
echo "== clippy"
cargo clippy --locked --all-targets -- -D warnings
echo "== cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --locked 2>&1 | tee "$log"
passed=$(sed -n 's/^test result: [a-z]*\. \([0-9]*\) passed.*/\1/p' "$log" | awk '{s+=$1} END {print s+0}')
failed=0
vm_passed=0
echo "== model check (spin): the implemented protocol passes, the negative controls must fail"
models/check.sh
echo "== deterministic simulation with crashes (release build)"
SIM_RUNS=${SIM_RUNS:-300000} cargo test --locked --release --test sim -- --nocapture 2>&1 | tee -a "$log" | grep -a '^sim:\|test result\|FAILED\|panicked\|seed'
echo "== Debian package (scripts/package-test.sh)"
t_pkg=$(date +%s)
scripts/package-test.sh
echo "== Debian package checked in $(( $(date +%s) - t_pkg )) s"
if [ "${UBLK_MIRROR_SKIP_VM:-0}" = 1 ]; then
    [ "${CI:-}" = true ] && { echo "UBLK_MIRROR_SKIP_VM is not allowed in CI" >&2; exit 1; }
    echo "== VM layer skipped (UBLK_MIRROR_SKIP_VM=1)"
else
    echo "== VM layer"
    # The examples are guest tools of tests/vm/power-loss.sh (passed with -b on its vm-args line).
    cargo build --locked --release --bins --examples
    vm/setup.sh
    # Every scenario runs, even after a failure; each failure is reported, and the run fails
    # at the end. The README's main command first, as a new user runs it: the tour
    # (tests/vm/demo.sh) through scripts/try-in-vm.sh.
    scenario() {
        local name=$1
        shift
        echo "-- $name"
        if "$@"; then
            vm_passed=$((vm_passed + 1))
        else
            echo "-- FAILED: $name" >&2
            failed=$((failed + 1))
            failed_names+=("$name")
        fi
    }
    failed_names=()
    scenario "scripts/try-in-vm.sh (the README's main command)" scripts/try-in-vm.sh
    for t in tests/vm/*.sh; do
        [ "$(basename "$t")" = demo.sh ] && continue  # run above, through scripts/try-in-vm.sh
        # A scenario states the VM options it needs (extra disks...) on a '# vm-args:' line.
        # ... and files it needs in /payload on a '# vm-files:' line (paths from the repository).
        read -r -a args <<< "$(sed -n 's/^# vm-args: //p' "$t")"
        read -r -a files <<< "$(sed -n 's/^# vm-files: //p' "$t")"
        scenario "$t ${args[*]}" vm/run.sh -t 600 -r 3 -b target/release/ublk-mirror "${args[@]}" "$t" "${files[@]}"
    done
    # Scenarios that drive the VM from the host (a machine crash, two boots over the same disks).
    for t in tests/vm-host/*.sh; do
        scenario "$t" "$t" target/release/ublk-mirror
    done
fi
echo "$((passed + vm_passed)) passed, $failed failed"
if [ "$failed" -gt 0 ]; then
    echo "== FAILED after $(( $(date +%s) - t0 )) s: ${failed_names[*]}" >&2
    exit 1
fi
echo "== all tests passed in $(( $(date +%s) - t0 )) s ($passed cargo tests, $vm_passed VM scenarios)"
