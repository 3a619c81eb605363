#!/usr/bin/env bash
# Packages a prebuilt static elkeid-agent into an OpenWrt .ipk (the opkg
# format of OpenWrt 23.05 / 24.10), without the OpenWrt SDK:
#
#   bash openwrt/build-ipk.sh <opkg-arch> [binary] [out-dir]
#
#   opkg-arch  aarch64_cortex-a53 | aarch64_cortex-a72 | aarch64_generic |
#              arm_cortex-a7_neon-vfpv4 | arm_cortex-a9_vfpv3-d16 |
#              arm_cortex-a15_neon-vfpv4 | mips_24kc | mipsel_24kc |
#              riscv64_riscv64 | x86_64
#   binary     default: target/ship/<rust-target>/elkeid-agent (targets/build.sh)
#   out-dir    default: target/ipk
#
# Prints the path of the .ipk. The package is a gzip'd tar of ./debian-binary
# ("2.0"), ./data.tar.gz and ./control.tar.gz; every entry owned by root (0:0),
# timestamps from SOURCE_DATE_EPOCH (default: the last commit) so the output
# is reproducible. Env: ELKEID_IPK_VERSION (default <crate version>-r1).
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "build-ipk.sh: error: $*" >&2; exit 1; }

[ $# -ge 1 ] || die "usage: $0 <opkg-arch> [binary] [out-dir]"
arch=$1

# Rust target for the opkg architecture, and the `file` machine it must show.
case "$arch" in
    aarch64_cortex-a53|aarch64_cortex-a72|aarch64_generic)
        rust_target=aarch64-unknown-linux-musl; elf_machine="ARM aarch64" ;;
    # armv7-unknown-linux-musleabihf: ARMv7-A with hard-float VFPv3-D16 at
    # least; every one of these OpenWrt arches qualifies.
    arm_cortex-a7_neon-vfpv4|arm_cortex-a9_vfpv3-d16|arm_cortex-a15_neon-vfpv4)
        rust_target=armv7-unknown-linux-musleabihf; elf_machine="ARM, EABI5" ;;
    # mips(el)-unknown-linux-musl: MIPS32r2 soft-float, what OpenWrt's ath79
    # (mips_24kc) and ramips mt7621/mt76x8 (mipsel_24kc) targets run.
    mips_24kc)
        rust_target=mips-unknown-linux-musl; elf_machine="32-bit MSB executable, MIPS, MIPS32 rel2" ;;
    mipsel_24kc)
        rust_target=mipsel-unknown-linux-musl; elf_machine="32-bit LSB executable, MIPS, MIPS32 rel2" ;;
    riscv64_riscv64)
        rust_target=riscv64gc-unknown-linux-musl; elf_machine="64-bit LSB executable, UCB RISC-V" ;;
    x86_64)
        rust_target=x86_64-unknown-linux-musl; elf_machine="x86-64" ;;
    *) die "unsupported opkg architecture '$arch'" ;;
esac

bin=${2:-target/ship/$rust_target/elkeid-agent}
out=${3:-target/ipk}
[ -f "$bin" ] || die "$bin not found: run 'bash targets/build.sh $rust_target agent' first"

desc=$(file -b "$bin")
case "$desc" in
    *"$elf_machine"*) ;;
    *) die "$bin is not a $elf_machine binary: $desc" ;;
esac
case "$desc" in
    *"statically linked"*|*"static-pie linked"*) ;;
    *) die "$bin is not statically linked: $desc" ;;
esac

crate_version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml)
[ -n "$crate_version" ] || die "cannot read the workspace version from Cargo.toml"
version=${ELKEID_IPK_VERSION:-$crate_version-r1}
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
    SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null || date +%s)
fi
export SOURCE_DATE_EPOCH

pkg=elkeid-agent
work=$(mktemp -d "${TMPDIR:-/tmp}/elkeid-ipk.XXXXXX")
trap 'rm -rf "$work"' EXIT
data=$work/data
ctrl=$work/control
mkdir -p "$data" "$ctrl" "$out"

# --- data.tar.gz: the files installed on the router -----------------------
install -d -m 0755 "$data/usr/bin" "$data/etc/init.d" "$data/etc/config" "$data/lib/upgrade/keep.d"
install -d -m 0700 "$data/etc/elkeid-agent"
install -m 0755 "$bin" "$data/usr/bin/elkeid-agent"
install -m 0755 openwrt/files/elkeid-agent.init "$data/etc/init.d/elkeid-agent"
install -m 0600 openwrt/files/elkeid-agent.config "$data/etc/config/elkeid-agent"
# sysupgrade keeps the TLS material and the persisted agent id.
printf '/etc/elkeid-agent/\n' >"$data/lib/upgrade/keep.d/elkeid-agent"
chmod 0644 "$data/lib/upgrade/keep.d/elkeid-agent"

installed_size=$(find "$data" -type f -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }')

# --- control.tar.gz: metadata and maintainer scripts ----------------------
cat >"$ctrl/control" <<EOF
Package: $pkg
Version: $version
Depends: procd
Source: feeds/elkeid/$pkg
SourceName: $pkg
License: Apache-2.0
Section: net
SourceDateEpoch: $SOURCE_DATE_EPOCH
Architecture: $arch
Installed-Size: $installed_size
Description:  Elkeid-compatible host security agent: one static binary that
 connects to an Elkeid agent center over mutual TLS (gRPC), sends heartbeats,
 runs Elkeid plugins and their tasks. Configure /etc/config/elkeid-agent.
EOF

printf '/etc/config/elkeid-agent\n' >"$ctrl/conffiles"

cat >"$ctrl/postinst" <<'EOF'
#!/bin/sh
# Enable the service. On a live system also (re)start it; while an image is
# being assembled into $IPKG_INSTROOT only create the rc.d links (what
# `/etc/init.d/elkeid-agent enable` does, with START=95 STOP=10).
if [ -z "$IPKG_INSTROOT" ]; then
	/etc/init.d/elkeid-agent enable
	/etc/init.d/elkeid-agent restart
else
	mkdir -p "$IPKG_INSTROOT/etc/rc.d"
	ln -sf ../init.d/elkeid-agent "$IPKG_INSTROOT/etc/rc.d/S95elkeid-agent"
	ln -sf ../init.d/elkeid-agent "$IPKG_INSTROOT/etc/rc.d/K10elkeid-agent"
fi
exit 0
EOF

cat >"$ctrl/prerm" <<'EOF'
#!/bin/sh
# Stop and disable the service on a live system before removal.
[ -z "$IPKG_INSTROOT" ] || exit 0
/etc/init.d/elkeid-agent stop
/etc/init.d/elkeid-agent disable
exit 0
EOF
chmod 0755 "$ctrl/postinst" "$ctrl/prerm"
chmod 0644 "$ctrl/control" "$ctrl/conffiles"

# --- assemble --------------------------------------------------------------
tgz() { # tgz <dir> <out.tar.gz> <entries...>
    local dir=$1 dest=$2
    shift 2
    tar --format=gnu --numeric-owner --owner=0 --group=0 --sort=name \
        --mtime="@$SOURCE_DATE_EPOCH" -C "$dir" -cf - "$@" | gzip -9n >"$dest"
}
tgz "$data" "$work/data.tar.gz" .
tgz "$ctrl" "$work/control.tar.gz" .
printf '2.0\n' >"$work/debian-binary"
chmod 0644 "$work/debian-binary" "$work/data.tar.gz" "$work/control.tar.gz"

ipk=$out/${pkg}_${version}_${arch}.ipk
tar --format=gnu --numeric-owner --owner=0 --group=0 --mtime="@$SOURCE_DATE_EPOCH" \
    -C "$work" -cf - ./debian-binary ./data.tar.gz ./control.tar.gz | gzip -9n >"$ipk.tmp"
mv -f "$ipk.tmp" "$ipk"
echo "$ipk"
