# shellcheck shell=bash
# shellcheck disable=SC2034 # the variables are used by the scripts that source this file
# Helpers shared by vm/setup.sh and vm/run.sh (host side). Sourced, not executed.

# The cache lives outside the work tree on purpose: CI and fresh clones in other folders on the
# same machine then reuse the ~140 MB of kernel, initramfs and tools image instead of rebuilding.
VM_CACHE=${UBLK_MIRROR_VM_CACHE:-${HOME:-/root}/.cache/ublk-mirror-vm}
VM_DIR=${VM_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}

# Kernel pinned by default. A cloud flavour is enough (ublk_drv, virtio_blk, dm-* as modules, ext4
# built in) and is a third of the size of the generic one. 6.12.117 was the newest 6.12 in
# bookworm-security when this was written; setup.sh falls back to the newest one apt knows if it
# disappears from the archive, and KVER=6.12.N overrides it.
VM_DEFAULT_KVER=6.12.117

# Host packages whose files end up inside the guest. Their versions are part of the build id so
# that an upgrade (notably libc6) rebuilds the images instead of mixing library versions in the
# guest, where -b payload libraries overwrite the base image's ones.
VM_GUEST_SOURCE_PKGS="busybox-static e2fsprogs xfsprogs fio dmsetup libc6 util-linux"

vm_log() { printf '[vm %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
vm_die() { printf '[vm] ERROR: %s\n' "$*" >&2; exit 2; }

vm_now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
vm_fmt_ms() { printf '%d.%02ds' $(( $1 / 1000 )) $(( ($1 % 1000) / 10 )); }

# vm_build_id: content hash of everything the images are built from. Images live in
# $VM_CACHE/build-<id>, so two checkouts of different harness versions can share one cache
# without rebuilding each other's images back and forth.
vm_build_id() {
    {
        cat "$VM_DIR/setup.sh" "$VM_DIR/hostlib.sh" "$VM_DIR/guest/init"
        echo "KVER=${KVER:-default}"
        # shellcheck disable=SC2086 # word splitting of the package list is intended
        dpkg-query -W -f '${Package}=${Version}\n' $VM_GUEST_SOURCE_PKGS 2>/dev/null || true
    } | sha256sum | cut -c1-16
}

vm_is_elf() { [ "$(head -c 4 "$1" 2>/dev/null | od -An -c | tr -d ' ')" = '177ELF' ]; }

# vm_elf_libs BIN: print the shared libraries BIN loads (ldd-resolved paths, ELF interpreter
# included), one per line; nothing for a static binary. Fails if a library is missing, because
# a binary with an unresolved library would only fail later inside the guest, less clearly.
vm_elf_libs() {
    local bin=$1 out
    if ! out=$(LC_ALL=C ldd "$bin" 2>&1); then
        case "$out" in
            *"not a dynamic executable"*|*"statically linked"*) return 0 ;;
            *) vm_die "ldd $bin failed: $out" ;;
        esac
    fi
    case "$out" in *"statically linked"*) return 0 ;; esac
    if grep -q 'not found' <<<"$out"; then
        vm_die "$bin: unresolved libraries: $(grep 'not found' <<<"$out" | tr -s ' \t' ' ')"
    fi
    # Debian's awk is mawk: no \s, keep the regexes plain.
    awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' <<<"$out" | sort -u
}

# vm_canon_lib PATH: the path under which a library is stored in the guest: its directory
# resolved (merged-/usr: /lib -> /usr/lib) but its file name (the soname) kept. Using canonical
# directories means an appended payload archive never has to write through the /lib symlink.
vm_canon_lib() { echo "$(realpath "$(dirname "$1")")/$(basename "$1")"; }

# vm_install_elf ROOT SRC DEST: copy SRC to ROOT/DEST and its libraries to ROOT/<canonical path>.
vm_install_elf() {
    local root=$1 src=$2 dest=$3 lib c
    mkdir -p "$root/$(dirname "$dest")"
    cp -L "$src" "$root/$dest"
    chmod 0755 "$root/$dest"
    vm_is_elf "$src" || return 0
    # Read the list first: vm_elf_libs may exit via vm_die, which must not happen in a subshell.
    local libs
    libs=$(vm_elf_libs "$src") || exit 2
    while IFS= read -r lib; do
        [ -n "$lib" ] || continue
        c=$(vm_canon_lib "$lib")
        [ -e "$root$c" ] && continue
        mkdir -p "$root$(dirname "$c")"
        cp -L "$lib" "$root$c"
    done <<<"$libs"
}
