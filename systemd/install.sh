#!/bin/sh
# Install keel for systemd, or remove it again.
#
#   systemd/install.sh [--bin-dir DIR] [--no-reload]      install
#   systemd/install.sh --uninstall [--no-reload]          remove (keeps /etc/keel files
#                                                         you changed and /var/lib/keel)
#
# DESTDIR=/some/root installs into a staging tree (nothing outside it is touched, no
# user is created, systemd is not reloaded). Binaries come from target/release by
# default (build them first: cargo build --release); missing backend binaries are
# skipped with a note, since they are optional.
#
# Layout (under DESTDIR):
#   /usr/local/bin/keel-vmm, keel-vhost-net, keel-vhost-blk
#   /usr/local/libexec/keel/keel-hugepages
#   /usr/local/lib/systemd/system/keel-vmm@.service, keel-vhost-net@.service,
#       keel-vhost-blk@.service, keel.slice, keel-hugepages.service
#   /usr/local/lib/systemd/system-generators/keel-sandbox-generator
#   /usr/local/lib/tmpfiles.d/keel.conf, /usr/local/lib/sysusers.d/keel.conf
#   /usr/local/share/doc/keel/README.md, /usr/local/share/doc/keel/examples/*.toml
#   /etc/keel/{sandboxes,switches,disks}/, /etc/keel/hugepages.conf (not overwritten)
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
destdir="${DESTDIR:-}"
bin_src="$root/target/release"
uninstall=no
reload=yes
while [ $# -gt 0 ]; do
    case $1 in
        --uninstall) uninstall=yes ;;
        --bin-dir) bin_src=$2; shift ;;
        --no-reload) reload=no ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
[ -n "$destdir" ] && reload=no

prefix=/usr/local
bindir=$prefix/bin
libexecdir=$prefix/libexec/keel
unitdir=$prefix/lib/systemd/system
generatordir=$prefix/lib/systemd/system-generators
tmpfilesdir=$prefix/lib/tmpfiles.d
sysusersdir=$prefix/lib/sysusers.d
docdir=$prefix/share/doc/keel
confdir=/etc/keel

binaries="keel-vmm keel-vhost-net keel-vhost-blk"
units="keel-vmm@.service keel-vhost-net@.service keel-vhost-blk@.service keel.slice keel-hugepages.service"

say() { echo "install.sh: $*"; }

# put MODE SRC DEST
put() {
    mkdir -p "$destdir$(dirname "$3")"
    install -m "$1" "$2" "$destdir$3"
}

if [ "$uninstall" = no ]; then
    [ -x "$bin_src/keel-vmm" ] || {
        echo "install.sh: $bin_src/keel-vmm not found: run cargo build --release first" >&2
        exit 1
    }
    for b in $binaries; do
        if [ -x "$bin_src/$b" ]; then
            put 0755 "$bin_src/$b" "$bindir/$b"
        else
            say "note: $bin_src/$b not built; skipped"
        fi
    done
    put 0755 "$here/libexec/keel-hugepages" "$libexecdir/keel-hugepages"
    put 0755 "$here/libexec/keel-sandbox-generator" "$generatordir/keel-sandbox-generator"
    for u in $units; do
        put 0644 "$here/units/$u" "$unitdir/$u"
    done
    put 0644 "$here/tmpfiles.d/keel.conf" "$tmpfilesdir/keel.conf"
    put 0644 "$here/sysusers.d/keel.conf" "$sysusersdir/keel.conf"
    put 0644 "$root/README.md" "$docdir/README.md"
    for e in "$here"/examples/*.toml; do
        put 0644 "$e" "$docdir/examples/$(basename "$e")"
    done
    for d in sandboxes switches disks; do
        mkdir -p "$destdir$confdir/$d"
        chmod 0755 "$destdir$confdir/$d"
    done
    if [ ! -e "$destdir$confdir/hugepages.conf" ]; then
        put 0644 "$here/hugepages.conf" "$confdir/hugepages.conf"
    fi
    if [ -z "$destdir" ]; then
        if command -v systemd-sysusers >/dev/null; then
            systemd-sysusers "$sysusersdir/keel.conf"
        fi
        if command -v systemd-tmpfiles >/dev/null && [ -d /run/systemd/system ]; then
            systemd-tmpfiles --create "$tmpfilesdir/keel.conf"
        fi
    fi
    if [ "$reload" = yes ] && [ -d /run/systemd/system ]; then
        systemctl daemon-reload
    fi
    say "installed into ${destdir:-/}"
    say "next: put sandbox files in $confdir/sandboxes/NAME.toml (examples in $docdir/examples)," \
        "then: systemctl enable --now keel-vmm@NAME.service"
else
    for b in $binaries; do rm -f "$destdir$bindir/$b"; done
    rm -f "$destdir$libexecdir/keel-hugepages"
    rm -f "$destdir$generatordir/keel-sandbox-generator"
    for u in $units; do rm -f "$destdir$unitdir/$u"; done
    rm -f "$destdir$tmpfilesdir/keel.conf" "$destdir$sysusersdir/keel.conf"
    rm -rf "$destdir$docdir"
    # hugepages.conf is removed only when unchanged; operator files stay.
    if [ -f "$destdir$confdir/hugepages.conf" ] &&
        cmp -s "$here/hugepages.conf" "$destdir$confdir/hugepages.conf"; then
        rm -f "$destdir$confdir/hugepages.conf"
    fi
    for d in sandboxes switches disks; do rmdir "$destdir$confdir/$d" 2>/dev/null || true; done
    rmdir "$destdir$confdir" 2>/dev/null || true
    # Remove the now empty directories this script created (never non-empty ones).
    for d in "$libexecdir" "$generatordir" "$unitdir" "$tmpfilesdir" "$sysusersdir" \
        "$bindir" "$prefix/libexec" "$prefix/lib/systemd" "$prefix/lib" "$prefix/share/doc" \
        "$prefix/share" "$prefix" /usr /etc; do
        [ -n "$destdir" ] || case $d in "$prefix"|/usr|/etc|"$bindir"|"$prefix/lib"|"$prefix/share"|"$prefix/share/doc"|"$prefix/libexec") continue ;; esac
        rmdir "$destdir$d" 2>/dev/null || true
    done
    if [ "$reload" = yes ] && [ -d /run/systemd/system ]; then
        systemctl daemon-reload
    fi
    say "removed from ${destdir:-/} (kept: changed files in $confdir, /var/lib/keel, the keel user)"
fi
