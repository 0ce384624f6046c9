#!/usr/bin/env bash
# Prepare everything vm/run.sh needs to boot a Debian kernel that ships ublk_drv under qemu TCG.
#
#   vm/setup.sh [--force]
#
# Idempotent: every step checks its result first, so a second run takes a fraction of a second.
# --force rebuilds the images (kernel download and unpack are still reused).
#
# Env: UBLK_MIRROR_VM_CACHE (default ~/.cache/ublk-mirror-vm), KVER=6.12.N to choose the kernel.
#
# Result: $VM_CACHE/build-<id>/{vmlinuz,initrd.img,tools.img,manifest.txt}, where <id> hashes the
# harness files, KVER and the versions of the host packages copied into the guest.
set -euo pipefail
umask 022

VM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=hostlib.sh
. "$VM_DIR/hostlib.sh"

FORCE=0
case "${1:-}" in
    --force) FORCE=1 ;;
    "") ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) vm_die "unknown argument: $1 (usage: vm/setup.sh [--force])" ;;
esac

[ "$(id -u)" = 0 ] || vm_die "setup.sh installs packages with apt-get and must run as root"
command -v apt-get >/dev/null || vm_die "apt-get not found: this harness targets Debian 12 (bookworm) hosts"

SETUP_T0=$(vm_now_ms)
SUMMARY=()
# step LABEL CMD...: run a step and record how long it took.
step() {
    local label=$1 t0 dt
    shift
    vm_log "step: $label"
    t0=$(vm_now_ms)
    "$@"
    dt=$(( $(vm_now_ms) - t0 ))
    SUMMARY+=("$(printf '%-44s %s' "$label" "$(vm_fmt_ms "$dt")")")
    vm_log "done: $label ($(vm_fmt_ms "$dt"))"
}
skipped() { SUMMARY+=("$(printf '%-44s %s' "$1" "skipped ($2)")"); vm_log "skip: $1 ($2)"; }

mkdir -p "$VM_CACHE"
# Two runs racing on a fresh machine (say, two test jobs calling run.sh) must not build the same
# directories at once. The bound covers a cold apt install plus a slow mirror.
exec 9>"$VM_CACHE/.setup.lock"
if ! flock -w 1200 9; then
    vm_die "another vm/setup.sh held $VM_CACHE/.setup.lock for 20 minutes; giving up"
fi

# --- apt helpers ---------------------------------------------------------------------------
APT_UPDATED=0
# Another apt/dpkg may be running (unattended upgrades, another session). DPkg::Lock::Timeout
# makes apt wait for the dpkg lock; the loop also covers the lists lock of apt-get update,
# which that option does not cover on every apt version.
apt_retry() {
    local i out
    for i in 1 2 3 4 5 6 7 8 9 10; do
        if out=$(DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 "$@" 2>&1); then
            printf '%s\n' "$out" | tail -n 3 >&2
            return 0
        fi
        if grep -qiE 'could not get lock|unable to lock|is another process using it' <<<"$out"; then
            vm_log "apt is locked by another process; waiting (try $i/10)"
            sleep 15
            continue
        fi
        printf '%s\n' "$out" | tail -n 20 >&2
        return 1
    done
    vm_log "apt lock still held after 10 tries"
    return 1
}
apt_update_once() {
    [ "$APT_UPDATED" = 1 ] && return 0
    apt_retry update || vm_die "apt-get update failed (see above)"
    APT_UPDATED=1
}

# --- 1. apt sources: bookworm-security carries the 6.12 kernels ------------------------------
# has_source SUITE: an apt source names SUITE.
has_source() {
    local f
    # Only *.list and *.sources are read by apt; *.disabled and friends are not.
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        grep -v '^[[:space:]]*#' "$f" | grep -q "$1" && return 0
    done
    return 1
}
# add_source SUITE URI WHY: an apt source for SUITE (deb822, the default on Debian 12; the archive
# keyring ships with every Debian install), then fresh lists.
add_source() {
    cat > "/etc/apt/sources.list.d/ublk-mirror-vm-$1.sources" <<EOF
# Added by ublk-mirror vm/setup.sh: $3
Types: deb
URIs: $2
Suites: $1
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    APT_UPDATED=0
    apt_update_once
}
if has_source bookworm-security; then
    skipped "apt source bookworm-security" "already configured"
else
    grep -q 'VERSION_CODENAME=bookworm' /etc/os-release 2>/dev/null ||
        vm_log "WARNING: host is not Debian bookworm; adding bookworm-security anyway for the kernel package"
    step "apt source bookworm-security (added)" add_source bookworm-security http://deb.debian.org/debian-security \
        "the linux-image-6.12.*-cloud-amd64 kernels live here."
fi

# --- 2. host packages ----------------------------------------------------------------------
# qemu-system-x86: the emulator; busybox-static: the whole guest userland; e2fsprogs, xfsprogs,
# fio, dmsetup, util-linux: copied into the guest; kmod: depmod/modprobe --show-depends on the kernel tree;
# xz-utils: modules are .ko.xz; cpio: initramfs archives. --no-install-recommends keeps the GUI
# and firmware extras of qemu out (seabios, which -kernel boots need, is a hard dependency).
HOST_PKGS="qemu-system-x86 busybox-static e2fsprogs xfsprogs fio dmsetup kmod xz-utils cpio util-linux coreutils gzip libc-bin"
missing_pkgs() {
    local p
    for p in $HOST_PKGS; do
        [ "$(dpkg-query -W -f '${Status}' "$p" 2>/dev/null)" = "install ok installed" ] || printf '%s ' "$p"
    done
}
# qemu-system-x86 comes from the same source package as qemu-utils (qemu-img, qemu-nbd), and apt
# insists on one version for both: installing the distribution's qemu-system-x86 next to a newer
# qemu-utils (say, from bookworm-backports) would remove qemu-utils. So the emulator is installed
# at the version of the qemu packages already there, from bookworm-backports if that is where
# they came from; if no source has that version, setup stops and says so. And no install may
# remove or downgrade anything (checked on apt's own plan first, see plan_is_safe).
QEMU_FAMILY="qemu-system-x86 qemu-system-common qemu-system-data"
installed_version() {
    [ "$(dpkg-query -W -f '${Status}' "$1" 2>/dev/null)" = "install ok installed" ] || return 1
    dpkg-query -W -f '${Version}' "$1"
}
# The version the emulator must have (empty: any), from the first qemu package installed.
qemu_version_wanted() {
    local p v
    for p in qemu-utils qemu-block-extra qemu-system-common qemu-system-data qemu-system-x86; do
        if v=$(installed_version "$p"); then
            echo "$v"
            return 0
        fi
    done
}
version_available() { apt-cache madison "$1" 2>/dev/null | awk -F'|' '{ gsub(/ /, "", $2); print $2 }' | grep -qxF "$2"; }
# plan_is_safe ARGS...: apt's plan for `install ARGS` removes and downgrades nothing.
plan_is_safe() {
    local plan bad=""
    plan=$(DEBIAN_FRONTEND=noninteractive apt-get -s -o DPkg::Lock::Timeout=300 install "$@" 2>&1) || {
        printf '%s\n' "$plan" | tail -n 20 >&2
        vm_die "apt cannot install $* (its plan is above)"
    }
    bad=$(printf '%s\n' "$plan" | awk '/^Remv / { print "removes " $2 " " $3 }')
    [ -z "$bad" ] || bad+=$'\n'
    while read -r pkg old new; do
        [ -n "$pkg" ] || continue
        dpkg --compare-versions "$new" lt "$old" && bad+="downgrades $pkg from $old to $new"$'\n'
    done < <(printf '%s\n' "$plan" | sed -n 's/^Inst \([^ ]*\) \[\([^]]*\)\] (\([^ ]*\) .*/\1 \2 \3/p')
    if [ -n "$bad" ]; then
        printf '%s\n' "$bad" | sed 's/^/    /' >&2
        vm_die "installing $* would change packages you have installed (above): setup never removes or downgrades a package. Install the VM's host packages yourself at versions that fit (apt-get install qemu-system-x86=VERSION ...), then run vm/setup.sh again"
    fi
}
# install_set APT_ARGS...: install after checking apt's plan (lists refreshed if it cannot be
# made: a fresh machine may have empty or stale lists).
install_set() {
    if ! DEBIAN_FRONTEND=noninteractive apt-get -s install "$@" >/dev/null 2>&1; then
        apt_update_once
    fi
    plan_is_safe --no-install-recommends "$@"
    apt_retry install -y -q --no-install-recommends "$@" || vm_die "apt-get install $* failed"
}
install_pkgs() {
    local missing=$1 want p qemu=0 rest=() from=()
    want=$(qemu_version_wanted)
    for p in $missing; do
        if [ -n "$want" ] && [[ " $QEMU_FAMILY " == *" $p "* ]]; then
            qemu=1
        else
            rest+=("$p")
        fi
    done
    if [ "$qemu" = 1 ]; then
        if ! version_available qemu-system-x86 "$want"; then
            apt_update_once
            if ! version_available qemu-system-x86 "$want" && [[ "$want" == *bpo12* ]] && ! has_source bookworm-backports; then
                vm_log "the installed qemu packages ($want) come from bookworm-backports: adding that source"
                add_source bookworm-backports http://deb.debian.org/debian \
                    "the machine's qemu packages come from here, and qemu-system-x86 must have their version (installed by version only)."
            fi
            version_available qemu-system-x86 "$want" ||
                vm_die "qemu-utils $want is installed, and qemu-system-x86 must have the same version (one source package), but no apt source offers qemu-system-x86 $want. Add the source your qemu-utils came from, or install qemu-system-x86 yourself, then run vm/setup.sh again"
        fi
        # The emulator's own dependencies (seabios...) come from the same release as it.
        [[ "$want" != *bpo12* ]] || from=(-t bookworm-backports)
        install_set "${from[@]}" qemu-system-x86="$want" qemu-system-common="$want" qemu-system-data="$want"
    fi
    [ ${#rest[@]} -eq 0 ] || install_set "${rest[@]}"
}
MISSING=$(missing_pkgs)
if [ -n "$MISSING" ]; then
    step "apt-get install $MISSING" install_pkgs "$MISSING"
    MISSING=$(missing_pkgs)
    [ -z "$MISSING" ] || vm_die "packages still missing after install: $MISSING"
else
    skipped "host packages" "all installed"
fi
for t in qemu-system-x86_64 /bin/busybox mke2fs e2fsck debugfs dumpe2fs mkfs.xfs fio dmsetup depmod modprobe xz cpio ldd flock timeout; do
    command -v "$t" >/dev/null || vm_die "required host tool '$t' not found even though its package is installed"
done

# --- 3. kernel package ---------------------------------------------------------------------
kpkg() { echo "linux-image-$1+deb12-cloud-amd64-unsigned"; }
apt_knows() { apt-cache show --no-all-versions "$1" >/dev/null 2>&1; }
newest_known_kver() {
    apt-cache pkgnames linux-image-6.12. 2>/dev/null |
        sed -n 's/^linux-image-\(6\.12\.[0-9]*\)+deb12-cloud-amd64-unsigned$/\1/p' | sort -V | tail -n 1
}
cached_deb() { compgen -G "$VM_CACHE/debs/$(kpkg "$1")_*.deb" | head -n 1 || true; }
download_kernel() {
    local pkg tmp
    pkg=$(kpkg "$1")
    tmp=$(mktemp -d "$VM_CACHE/debs/.dl.XXXXXX")
    # apt drops privileges to _apt for downloads when it can write the directory; avoids a warning.
    chown _apt "$tmp" 2>/dev/null || true
    # apt-get download writes to the current directory; it verifies the hash from the signed index.
    if (cd "$tmp" && apt_retry download -q "$pkg"); then
        mv "$tmp"/*.deb "$VM_CACHE/debs/"
        rmdir "$tmp"
        return 0
    fi
    rm -rf "$tmp"
    return 1
}
mkdir -p "$VM_CACHE/debs"
WANT=${KVER:-$VM_DEFAULT_KVER}
[[ "$WANT" =~ ^6\.12\.[0-9]+$ ]] || vm_die "KVER must look like 6.12.N (got '$WANT')"
KV=$WANT
# A fallback chosen earlier (pinned kernel gone) is remembered, so later runs stay offline.
FALLBACK_FILE=$VM_CACHE/kver-fallback
if [ -z "${KVER:-}" ] && [ -z "$(cached_deb "$KV")" ] && [ -f "$FALLBACK_FILE" ]; then
    read -r fb_from fb_to < "$FALLBACK_FILE" || true
    if [ "${fb_from:-}" = "$KV" ] && [ -n "$(cached_deb "${fb_to:-none}")" ]; then
        vm_log "WARNING: pinned kernel $KV is not available; using $fb_to as chosen before (update VM_DEFAULT_KVER in vm/hostlib.sh)"
        KV=$fb_to
    fi
fi
if [ -n "$(cached_deb "$KV")" ]; then
    skipped "download $(kpkg "$KV")" "cached"
else
    get_kernel() {
        apt_knows "$(kpkg "$KV")" || apt_update_once
        if apt_knows "$(kpkg "$KV")" && download_kernel "$KV"; then return 0; fi
        # The index may be stale (the file was removed from the mirror): refresh once and retry.
        if [ "$APT_UPDATED" = 0 ]; then
            apt_update_once
            if apt_knows "$(kpkg "$KV")" && download_kernel "$KV"; then return 0; fi
        fi
        if [ -n "${KVER:-}" ]; then
            vm_die "kernel $(kpkg "$KV") (KVER=$KVER) is not available from the apt sources; known: $(newest_known_kver)"
        fi
        local alt
        alt=$(newest_known_kver)
        [ -n "$alt" ] || vm_die "no linux-image-6.12.*+deb12-cloud-amd64-unsigned known to apt; is bookworm-security reachable?"
        vm_log "WARNING: pinned kernel $(kpkg "$KV") is no longer available;"
        vm_log "WARNING: falling back to the newest one apt knows: $(kpkg "$alt")"
        vm_log "WARNING: update VM_DEFAULT_KVER in vm/hostlib.sh to $alt"
        KV=$alt
        echo "$WANT $alt" > "$FALLBACK_FILE"
        if [ -z "$(cached_deb "$KV")" ]; then
            download_kernel "$KV" || vm_die "download of $(kpkg "$KV") failed"
        fi
    }
    step "download $(kpkg "$KV")" get_kernel
fi
DEB=$(cached_deb "$KV")
[ -n "$DEB" ] || vm_die "kernel package for $KV missing from $VM_CACHE/debs"

KDIR=$VM_CACHE/kernel/$KV
unpack_kernel() {
    local tmp
    rm -rf "$KDIR" "$KDIR.tmp"
    mkdir -p "$KDIR.tmp"
    tmp=$KDIR.tmp
    dpkg -x "$DEB" "$tmp"
    mv "$tmp" "$KDIR"
}
if [ -d "$KDIR/boot" ]; then skipped "unpack kernel" "done before"; else step "unpack $(basename "$DEB")" unpack_kernel; fi
# The module tree is under lib/modules on bookworm (usr/lib/modules on newer layouts).
MODBASE=
for d in "$KDIR/lib/modules" "$KDIR/usr/lib/modules"; do [ -d "$d" ] && MODBASE=$d; done
[ -n "$MODBASE" ] || vm_die "no lib/modules in $DEB"
KREL=$(ls "$MODBASE")
[ "$(wc -w <<<"$KREL")" = 1 ] || vm_die "expected one kernel release in $MODBASE, found: $KREL"
[ -f "$KDIR/boot/vmlinuz-$KREL" ] || vm_die "no boot/vmlinuz-$KREL in $DEB"
# The package ships no modules.dep (the postinst runs depmod); modprobe --show-depends needs it.
if [ -s "$MODBASE/$KREL/modules.dep" ]; then
    skipped "depmod on kernel tree" "done before"
else
    step "depmod $KREL" depmod -b "$(dirname "$(dirname "$MODBASE")")" "$KREL"
fi

# --- 4. images -----------------------------------------------------------------------------
ID=$(vm_build_id)
BUILD=$VM_CACHE/build-$ID
if [ "$FORCE" = 0 ] && [ -f "$BUILD/ok" ]; then
    skipped "initramfs + tools image" "build-$ID is up to date"
else
    rm -rf "$BUILD" "$BUILD.tmp"
    mkdir -p "$BUILD.tmp"
    B=$BUILD.tmp
    ROOT=$B/rootfs
    cp "$KDIR/boot/vmlinuz-$KREL" "$B/vmlinuz"

    # Modules the tests may need. All must exist in the kernel: a missing one is a setup error,
    # not a surprise halfway through a test. raid1 is listed because dm-raid requests it at run
    # time (md personality), which modules.dep does not record.
    MODULES="ublk_drv virtio_blk loop null_blk brd dm-mod dm-flakey dm-delay dm-log-writes dm-mirror
             dm-log dm-region-hash dm-raid raid1 raid10 dm-snapshot dm-zero dm-thin-pool dm-writecache
             xfs crc32c_generic crc32c-intel libcrc32c"
    # Loaded by /init at boot; everything else through modprobe (kernel.modprobe points to busybox).
    BOOT_MODULES="ublk_drv virtio_blk"

    build_rootfs() {
        mkdir -p "$ROOT"/{bin,sbin,dev,proc,sys,tmp,run,root,mnt,out,payload,tools,etc/ublk-vm}
        mkdir -p "$ROOT"/usr/{bin,sbin,lib,lib64,local/bin,local/sbin}
        # merged-/usr like the host, so ldd paths (/lib/..., /lib64/ld-linux...) resolve as there
        ln -s usr/lib "$ROOT/lib"
        ln -s usr/lib64 "$ROOT/lib64"
        cp /bin/busybox "$ROOT/bin/busybox"
        local a
        for a in $("$ROOT/bin/busybox" --list); do
            [ "$a" = busybox ] || ln -s busybox "$ROOT/bin/$a"
        done
        # Real tools come first in PATH (/usr/sbin before /bin), busybox fills the rest.
        local t
        for t in mke2fs e2fsck debugfs dumpe2fs tune2fs resize2fs; do
            vm_install_elf "$ROOT" "$(command -v "$t")" "usr/sbin/$t"
        done
        for t in mkfs.ext4 mkfs.ext3 mkfs.ext2; do ln -s mke2fs "$ROOT/usr/sbin/$t"; done
        for t in fsck.ext4 fsck.ext3 fsck.ext2; do ln -s e2fsck "$ROOT/usr/sbin/$t"; done
        vm_install_elf "$ROOT" "$(command -v dmsetup)" usr/sbin/dmsetup
        # A second file system for the tests of what a source's file system supports.
        vm_install_elf "$ROOT" "$(command -v mkfs.xfs)" usr/sbin/mkfs.xfs
        # util-linux versions: busybox's blockdev/losetup lack options (--getsize64 is there, but
        # losetup --direct-io, --sector-size are not); busybox has no blkdiscard -z (WRITE_ZEROES)
        # and no fallocate --punch-hole/--zero-range.
        for t in blockdev losetup blkdiscard fallocate; do
            if command -v "$t" >/dev/null; then vm_install_elf "$ROOT" "$(command -v "$t")" "usr/sbin/$t"; fi
        done
        [ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$ROOT/etc/"
        # fio and its ~84 MB of libraries live on tools.img; this wrapper runs it with the loader
        # and libraries of that image, so they never mix with the initramfs' glibc.
        cat > "$ROOT/usr/bin/fio" <<'EOF'
#!/bin/sh
[ -x /tools/bin/fio ] || { echo "fio: the tools disk is not mounted on /tools" >&2; exit 127; }
exec /tools/lib/ld-linux-x86-64.so.2 --library-path /tools/lib /tools/bin/fio "$@"
EOF
        chmod 0755 "$ROOT/usr/bin/fio"
        printf 'root:x:0:0:root:/root:/bin/sh\n' > "$ROOT/etc/passwd"
        printf 'root:x:0:\n' > "$ROOT/etc/group"
        cp "$VM_DIR/guest/init" "$ROOT/init"
        chmod 0755 "$ROOT/init"
        echo "$BOOT_MODULES" | tr ' ' '\n' > "$ROOT/etc/ublk-vm/modules"
        printf 'kernel=%s\nbuild=%s\n' "$KREL" "$ID" > "$ROOT/etc/ublk-vm/release"
    }

    build_modules() {
        local m deps f rel dst kmods=$MODBASE/$KREL
        : > "$B/modules.txt"
        for m in $MODULES; do
            if ! deps=$(modprobe -d "$(dirname "$(dirname "$MODBASE")")" -S "$KREL" --show-depends "$m" 2>&1); then
                vm_die "module $m is not available in $KREL: $deps"
            fi
            if ! grep -q '^insmod ' <<<"$deps"; then
                echo "$m builtin" >> "$B/modules.txt"
                continue
            fi
            echo "$m module" >> "$B/modules.txt"
            while read -r f; do
                rel=${f#"$kmods"/}
                dst=$ROOT/lib/modules/$KREL/${rel%.xz}
                [ -e "$dst" ] && continue
                mkdir -p "$(dirname "$dst")"
                # Decompressed: busybox modprobe hands .ko.xz to finit_module raw, which the
                # kernel first rejects with "Invalid ELF header magic" before falling back.
                case "$f" in
                    *.xz) xz -dc "$f" > "$dst" ;;
                    *.zst) vm_die "zstd-compressed module $f: not handled" ;;
                    *) cp "$f" "$dst" ;;
                esac
            done < <(awk '$1 == "insmod" { print $2 }' <<<"$deps")
        done
        cp "$kmods"/modules.builtin "$kmods"/modules.builtin.modinfo "$kmods"/modules.order "$ROOT/lib/modules/$KREL/"
        # depmod on the subset so busybox modprobe resolves dependencies and aliases in the guest.
        depmod -b "$ROOT" "$KREL"
        [ -s "$ROOT/lib/modules/$KREL/modules.dep" ] || vm_die "depmod produced no modules.dep"
    }

    build_initrd() {
        # Padded to 512 bytes: the kernel only finds an appended uncompressed cpio archive (the
        # per-run payload) at a 4-byte aligned offset, and a gzip stream ends anywhere.
        (cd "$ROOT" && find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort |
            cpio -o -H newc -R 0:0 --quiet) | gzip -1 > "$B/initrd.img"
        local sz
        sz=$(stat -c %s "$B/initrd.img")
        truncate -s $(( (sz + 511) / 512 * 512 )) "$B/initrd.img"
    }

    build_tools() {
        local T=$B/tools-root fio_bin lib libs
        mkdir -p "$T/bin" "$T/lib"
        fio_bin=$(command -v fio)
        cp -L "$fio_bin" "$T/bin/fio"
        libs=$(vm_elf_libs "$fio_bin") || exit 2
        while IFS= read -r lib; do
            [ -n "$lib" ] && cp -L "$lib" "$T/lib/"
        done <<<"$libs"
        [ -e "$T/lib/ld-linux-x86-64.so.2" ] || vm_die "fio's ELF loader was not found by ldd"
        local mb
        mb=$(( $(du -sm "$T" | cut -f1) * 11 / 10 + 16 ))
        # No journal: the image is attached read-only and never written.
        mkfs.ext4 -q -F -O ^has_journal -L tools -E root_owner=0:0 -d "$T" "$B/tools.img" "${mb}M"
        rm -rf "$T"
    }

    step "rootfs: busybox, e2fsprogs, dmsetup, /init" build_rootfs
    step "rootfs: kernel modules (decompressed) + depmod" build_modules
    step "initramfs archive" build_initrd
    step "tools.img (fio + libraries)" build_tools
    {
        echo "build id:      $ID"
        echo "kernel:        $KREL ($(basename "$DEB"))"
        echo "initrd:        $(du -h "$B/initrd.img" | cut -f1) (rootfs $(du -sh "$ROOT" | cut -f1))"
        echo "tools.img:     $(du -h --apparent-size "$B/tools.img" | cut -f1)"
        echo "boot modules:  $BOOT_MODULES"
        echo "modules:"; sed 's/^/  /' "$B/modules.txt"
        echo "host packages:"
        # shellcheck disable=SC2086
        dpkg-query -W -f '  ${Package}=${Version}\n' $VM_GUEST_SOURCE_PKGS 2>/dev/null || true
    } > "$B/manifest.txt"
    rm -rf "$ROOT"
    touch "$B/ok"
    mv "$B" "$BUILD"

    # Keep the three most recent builds (other checkouts may use an older harness version).
    # shellcheck disable=SC2012 # names are build-<hex>, ls -t is fine
    { ls -1dt "$VM_CACHE"/build-*/ 2>/dev/null || true; } | sed 's:/$::' | { grep -v '\.tmp$' || true; } |
        tail -n +4 | while read -r old; do
        vm_log "pruning old build $(basename "$old")"
        rm -rf "$old"
    done
fi

# The manifest and the step summary when something was done; one line when all was in place.
if printf '%s\n' "${SUMMARY[@]}" | grep -qv 'skipped ('; then
    sed 's/^/  /' "$BUILD/manifest.txt" >&2
    {
        echo "setup summary (cache: $VM_CACHE):"
        for s in "${SUMMARY[@]}"; do echo "  $s"; done
        echo "  total                                        $(vm_fmt_ms $(( $(vm_now_ms) - SETUP_T0 )))"
        echo "images: $BUILD"
        echo "next:   vm/run.sh vm/guest/smoke.sh"
    } >&2
else
    echo "vm/setup.sh: everything in place, nothing done (images: $BUILD; manifest: $BUILD/manifest.txt)" >&2
fi
