#!/usr/bin/env bash
# The Debian package (README.md "Install"; scripts/test.sh runs this). As root, on Debian 12:
#   1. builds it: cargo deb (target/debian/ublk-mirror_VERSION-1_amd64.deb, from Cargo.toml's
#      [package.metadata.deb]);
#   2. checks its contents (dpkg-deb -c): every file of scripts/install.sh, in Debian's paths;
#      nothing under /usr/local; the version is Cargo.toml's and debian/changelog's;
#   3. lintian: any error or warning fails, except the overrides the package ships
#      (debian/ublk-mirror.lintian-overrides, each with its reason);
#   4. installs it with apt, as the README says, into a throw-away Debian 12 root (a chroot
#      unpacked from a cached mmdebstrap tarball of minbase + systemd, udev, kmod), and there runs
#      `ublk-mirror --version`, `systemd-analyze verify` on an instance of the installed unit,
#      and `udevadm test` with the installed rules against a block device of this machine (the
#      rule that starts a configured mirror's unit must fire, through the installed helper);
#      then `apt-get purge` must leave none of its files behind.
# It never skips: anything it cannot do fails the run. The first run builds the root tarball
# (about 130 MB of downloads from $UBLK_MIRROR_DEB_MIRROR, default deb.debian.org) under
# ${UBLK_MIRROR_DEB_CACHE:-~/.cache/ublk-mirror-deb}; later runs unpack it.
# Usage: scripts/package-test.sh [--no-build]   (--no-build: package the binary already built)
set -euo pipefail
cd "$(dirname "$0")/.."

# --- 4b. (internal) inside a private mount namespace: the checks in the unpacked root R ---
if [ "${1:-}" = --in-root ]; then
    R=$2 DEB=$3
    fail() { echo "package-test: FAILED: $*" >&2; exit 1; }
    in_root() { chroot "$R" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 \
        DEBIAN_FRONTEND=noninteractive "$@"; }
    mount -t proc proc "$R/proc"
    mount -t sysfs -o ro sysfs "$R/sys"
    mount -t devpts -o newinstance devpts "$R/dev/pts"
    [ -c "$R/dev/null" ] || fail "the root has no /dev/null"
    cp "$DEB" "$R/tmp/"
    echo "-- apt install ./$(basename "$DEB") (in a Debian 12 root)"
    in_root apt-get install -y -q "/tmp/$(basename "$DEB")" > "$R/tmp/apt.out" 2>&1 \
        || { tail -n 20 "$R/tmp/apt.out" >&2; fail "apt could not install the package"; }
    grep -a -i -E '^[WE]: |warning|error' "$R/tmp/apt.out" >&2 && fail "apt or a maintainer script complained (above)"
    version=$(in_root ublk-mirror --version) || fail "ublk-mirror --version failed"
    echo "   ublk-mirror --version: $version"
    [ "$version" = "ublk-mirror $VERSION" ] || fail "ublk-mirror --version says '$version', not 'ublk-mirror $VERSION'"
    # The installed files are the repository's (man pages gzipped).
    for pair in usr/share/man/man8/ublk-mirror.8.gz=man/ublk-mirror.8 \
        usr/share/man/man5/ublk-mirror.conf.5.gz=man/ublk-mirror.conf.5 \
        lib/systemd/system/ublk-mirror@.service=systemd/ublk-mirror@.service \
        lib/udev/rules.d/60-ublk-mirror.rules=udev/60-ublk-mirror.rules \
        usr/share/doc/ublk-mirror/examples/example.conf=systemd/ublk-mirror.conf.example \
        usr/share/bash-completion/completions/ublk-mirror=completions/ublk-mirror.bash \
        usr/share/zsh/vendor-completions/_ublk-mirror=completions/_ublk-mirror \
        usr/share/fish/vendor_completions.d/ublk-mirror.fish=completions/ublk-mirror.fish; do
        inst=$R/${pair%%=*} src=${pair#*=}
        case $inst in
            *.gz) gzip -dc "$inst" | cmp -s - "$src" || fail "${pair%%=*} is not $src" ;;
            *) cmp -s "$inst" "$src" || fail "${pair%%=*} is not $src" ;;
        esac
    done
    # Every program the unit and the rules run is installed and executable.
    progs=$(sed -n 's/^Exec[A-Za-z]*=[-@!+:]*\(\/[^ ]*\).*/\1/p' "$R/lib/systemd/system/ublk-mirror@.service"
        sed -n 's/.*PROGRAM="\(\/[^ "]*\).*/\1/p' "$R/lib/udev/rules.d/60-ublk-mirror.rules")
    [ "$(echo "$progs" | grep -c /)" -ge 4 ] || fail "found too few programs in the unit and the rules: $progs"
    for p in $progs; do
        in_root test -x "$p" || fail "$p (run by the unit or the rules) is not installed in the root"
    done
    # A device configured as the README says: the installed example, with a block device of this
    # machine as its source (one that rule 2 of the udev rules considers).
    dev=$(ls /sys/class/block | grep -v -E '^(ublkb|loop|ram|zram)' | head -n 1) || true
    [ -n "$dev" ] || fail "this machine has no block device other than loop/ram/zram for udevadm test"
    mkdir -p "$R/etc/ublk-mirror"
    sed "s#^SOURCE=.*#SOURCE=/dev/$dev#" "$R/usr/share/doc/ublk-mirror/examples/example.conf" > "$R/etc/ublk-mirror/pkgtest.conf"
    echo "-- systemd-analyze verify ublk-mirror@pkgtest.service"
    in_root systemd-analyze verify --man=no /lib/systemd/system/ublk-mirror@pkgtest.service > "$R/tmp/verify.out" 2>&1 \
        || { cat "$R/tmp/verify.out" >&2; fail "systemd-analyze verify failed on the installed unit"; }
    if grep -a 'ublk-mirror' "$R/tmp/verify.out" >&2; then fail "systemd-analyze verify reports the unit (above)"; fi
    # udevadm verify needs systemd 253; Debian 12 has 252, whose `udevadm test` parses every rules
    # file (logging each syntax error with file:line) and runs the rules against a device.
    # First a negative control: a broken rule must be reported, so that silence below means
    # something.
    mkdir -p "$R/run/udev" "$R/etc/udev/rules.d"
    echo 'KERNEL=="'"$dev"'", NOSUCHKEY="x"' > "$R/etc/udev/rules.d/99-pkgtest-broken.rules"
    in_root udevadm test --action=add "/sys/class/block/$dev" > "$R/tmp/udev-bad.out" 2>&1 || true
    # A syntax error: "FILE:LINE message" while reading the rules; a failing PROGRAM: "DEV: FILE:LINE
    # Command ... returned N (error)".
    errors() { grep -a -E "^/[^ ]*$1:[0-9]+ |$1:[0-9]+ .*(error|fail)" "$2"; }
    errors '99-pkgtest-broken\.rules' "$R/tmp/udev-bad.out" > /dev/null \
        || { tail -n 20 "$R/tmp/udev-bad.out" >&2; fail "udevadm test did not report a broken rule: this check cannot work here"; }
    rm "$R/etc/udev/rules.d/99-pkgtest-broken.rules"
    echo "-- udevadm test --action=add /sys/class/block/$dev (installed rules)"
    in_root udevadm test --action=add "/sys/class/block/$dev" > "$R/tmp/udev.out" 2>&1 \
        || { tail -n 30 "$R/tmp/udev.out" >&2; fail "udevadm test failed"; }
    grep -a -q '60-ublk-mirror.rules' "$R/tmp/udev.out" || { tail -n 30 "$R/tmp/udev.out" >&2; fail "udevadm did not read the installed rules"; }
    if errors '60-ublk-mirror\.rules' "$R/tmp/udev.out" >&2; then fail "udevadm reports errors in the installed rules (above)"; fi
    grep -a -q 'SYSTEMD_WANTS=ublk-mirror@pkgtest.service' "$R/tmp/udev.out" \
        || { tail -n 30 "$R/tmp/udev.out" >&2; fail "the installed rules do not start ublk-mirror@pkgtest for $dev, its configured source"; }
    echo "   $dev wants ublk-mirror@pkgtest.service"
    rm "$R/etc/ublk-mirror/pkgtest.conf"
    echo "-- apt-get purge ublk-mirror"
    in_root apt-get purge -y -q ublk-mirror > "$R/tmp/purge.out" 2>&1 || { tail -n 20 "$R/tmp/purge.out" >&2; fail "apt-get purge failed"; }
    left=()
    while read -r f; do
        [ -e "$R/$f" ] && [ ! -d "$R/$f" ] && left+=("$f")
    done < <(dpkg-deb --fsys-tarfile "$DEB" | tar -t | sed 's#^\./##')
    [ ${#left[@]} -eq 0 ] || fail "purge left ${left[*]}"
    exit 0
fi

BUILD=1
[ "${1:-}" = --no-build ] && BUILD=0
t0=$(date +%s)
fail() { echo "package-test: FAILED: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || fail "run as root (the install test uses chroot and mount)"
for c in dpkg-deb lintian mmdebstrap unshare chroot; do
    command -v "$c" > /dev/null || fail "$c is missing: run scripts/deps.sh"
done
cargo deb --version > /dev/null 2>&1 || fail "cargo deb is missing: run scripts/deps.sh"
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
export VERSION
TARGET_DIR=${CARGO_TARGET_DIR:-target}

# --- 1. build ---
echo "== cargo deb"
rm -rf "$TARGET_DIR/debian"
if [ "$BUILD" = 1 ]; then cargo deb --locked; else cargo deb --no-build; fi
DEB=$(ls "$TARGET_DIR"/debian/ublk-mirror_*.deb)
[ "$(echo "$DEB" | wc -l)" = 1 ] || fail "expected one package in $TARGET_DIR/debian: $DEB"
echo "   $DEB ($(du -k "$DEB" | cut -f1) KiB)"
t1=$(date +%s)

# --- 2. contents ---
echo "== contents (dpkg-deb -c)"
dpkg-deb -c "$DEB" | awk '{print $1, $NF}' | sed 's# \./# /#'
list=$(dpkg-deb -c "$DEB" | awk '{print $NF}' | sed 's#^\./#/#')
missing=()
for f in /usr/bin/ublk-mirror \
    /usr/share/man/man8/ublk-mirror.8.gz /usr/share/man/man5/ublk-mirror.conf.5.gz \
    /usr/share/bash-completion/completions/ublk-mirror /usr/share/zsh/vendor-completions/_ublk-mirror \
    /usr/share/fish/vendor_completions.d/ublk-mirror.fish \
    /lib/systemd/system/ublk-mirror@.service /lib/udev/rules.d/60-ublk-mirror.rules \
    /usr/share/doc/ublk-mirror/examples/example.conf /usr/share/doc/ublk-mirror/copyright \
    /usr/share/doc/ublk-mirror/changelog.Debian.gz /usr/share/lintian/overrides/ublk-mirror; do
    grep -qxF "$f" <<< "$list" || missing+=("$f")
done
control=$(dpkg-deb --ctrl-tarfile "$DEB" | tar -t)
for f in postinst postrm; do
    grep -qx "./$f" <<< "$control" || missing+=("$f (maintainer script)")
done
[ ${#missing[@]} -eq 0 ] || fail "the package lacks: ${missing[*]}"
if grep '^/usr/local' <<< "$list"; then fail "the package installs under /usr/local (above)"; fi
deb_version=$(dpkg-deb -f "$DEB" Version)
[ "${deb_version%-*}" = "$VERSION" ] || fail "package version $deb_version is not Cargo.toml's $VERSION"
changelog_version=$(sed -n '1s/^ublk-mirror (\(.*\)).*/\1/p' debian/changelog)
[ "$changelog_version" = "$deb_version" ] || fail "debian/changelog's first entry is $changelog_version, the package is $deb_version: add an entry"
dpkg-deb -f "$DEB" Package Version Section Priority Depends Recommends | sed 's/^/   /'

# --- 3. lintian ---
echo "== lintian"
# Errors and warnings fail; info tags (I:) are printed, overridden ones (O:) with their reason.
# The info tags of 0.1.0: hardening-no-fortify-functions (Rust calls no fortifiable libc string
# functions), no-md5sums-control-file (cargo deb writes none; dpkg computes them at install),
# spelling-error-in-binary (a false match in the binary's data). The -dbgsym .ddeb beside the
# package is cargo deb's by-product for debuggers and is not checked here.
lint=$(lintian --fail-on none --display-info --show-overrides "$DEB" 2>&1) || fail "lintian did not run: $lint"
lint=$(grep -v '^running with root privileges' <<< "$lint" || true)
if [ -n "$lint" ]; then echo "$lint" | sed "s/^/   /"; else echo "   (nothing to report)"; fi
if grep -E '^[EW]: ' <<< "$lint" > /dev/null; then
    fail "lintian errors or warnings (above): fix them, or override a tag in debian/ublk-mirror.lintian-overrides with the reason"
fi
t2=$(date +%s)

# --- 4. install in a throw-away Debian 12 root ---
echo "== install in a Debian 12 root"
CACHE=${UBLK_MIRROR_DEB_CACHE:-$HOME/.cache/ublk-mirror-deb}
MIRROR=${UBLK_MIRROR_DEB_MIRROR:-http://deb.debian.org/debian}
ROOT_ARGS=(--variant=minbase --include=systemd,udev,kmod --mode=root --format=tar bookworm)
key=$(printf '%s\n' "${ROOT_ARGS[@]}" "$MIRROR" | sha256sum | cut -c1-12)
TAR=$CACHE/bookworm-$key.tar
mkdir -p "$CACHE"
if [ ! -s "$TAR" ]; then
    echo "   building the root once: mmdebstrap ${ROOT_ARGS[*]} $MIRROR -> $TAR"
    rm -f "$TAR.tmp"
    timeout 900 mmdebstrap -q "${ROOT_ARGS[@]}" "$TAR.tmp" "$MIRROR" || fail "mmdebstrap could not build the Debian 12 root"
    mv "$TAR.tmp" "$TAR"
    find "$CACHE" -maxdepth 1 -name 'bookworm-*.tar' ! -name "$(basename "$TAR")" -delete
fi
R=$(mktemp -d "${TMPDIR:-/tmp}/ublk-mirror-deb-root.XXXXXX")
# Mounts live in a private mount namespace: they go with it, whatever happens.
trap 'rm -rf --one-file-system "$R"' EXIT
tar -C "$R" -xf "$TAR"
unshare --mount --propagation private -- "$(pwd)/scripts/package-test.sh" --in-root "$R" "$(realpath "$DEB")"
t3=$(date +%s)
echo "== package test passed in $((t3 - t0)) s (build $((t1 - t0)) s, lintian $((t2 - t1)) s, install test $((t3 - t2)) s)"
