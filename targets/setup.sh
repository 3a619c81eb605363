#!/usr/bin/env bash
# Installs what the cross builds, QEMU tests and OpenWrt checks need on a
# Debian 12 x86_64 machine (run as root). Idempotent: every step checks first
# and skips what is already present, so CI can call it on every run.
#
#   bash targets/setup.sh
#
# What and why (docs/TOOLCHAIN.md has the measurements):
# - rustup targets for the pinned toolchain (rust-toolchain.toml):
#   x86_64/aarch64 musl std are prebuilt; armv7 musl std is NOT distributed,
#   so we build it from source with rust-src + -Zbuild-std (targets/build.sh).
# - Debian cross gcc as linkers (with the aarch64 libc headers: ring's C
#   includes <stdint.h>, which the cross gcc forwards to the target libc), musl-dev:armhf for armv7's libc, and
#   qemu-user-static to run foreign binaries.
# - binfmt_misc registration so an emulated agent can exec an emulated plugin.
# - shellcheck, dash and busybox (OpenWrt's ash) for openwrt/test.sh.
# - MIPS (mips/mipsel, soft-float 24Kc) and riscv64: Debian's cross gcc, plus
#   a static musl libc built here from Debian's `musl` source package (Debian
#   12 has no big-endian mips or riscv64 musl-dev, and its mipsel one is
#   hard-float while OpenWrt and Rust's MIPS musl targets are soft-float), and
#   a `<name>-gcc` wrapper in /usr/local/bin that links against it. Cached
#   under $ELKEID_CROSS_DIR (default /opt/elkeid-rs/cross): a rerun with the
#   same musl version, compiler and flags does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'setup: %s\n' "$*"; }

# A mirror caught mid-sync makes `apt-get update` fail for one index while
# the others are fine: retry a few times, then go on with what we have.
apt_update() {
    local i
    for i in 1 2 3; do
        if $SUDO apt-get update -qq; then
            return 0
        fi
        log "apt-get update failed (try $i)"
        [ "$i" = 3 ] || sleep $((i * 5))
    done
    log "WARNING: apt-get update kept failing; installing from the lists we have"
}

SUDO=""
if [ "$(id -u)" != 0 ]; then
    SUDO="sudo"
fi

# --- Debian packages -------------------------------------------------------
PKGS=(qemu-user-static binfmt-support gcc-aarch64-linux-gnu libc6-dev-arm64-cross gcc-arm-linux-gnueabihf
      musl-tools musl-dev:armhf file shellcheck dash busybox python3 openssl
      gcc-mips-linux-gnu gcc-mipsel-linux-gnu gcc-riscv64-linux-gnu
      libc6-dev-mips-cross libc6-dev-mipsel-cross libc6-dev-riscv64-cross dpkg-dev make)

if ! dpkg --print-foreign-architectures | grep -qx armhf; then
    log "adding dpkg architecture armhf"
    $SUDO dpkg --add-architecture armhf
    NEED_UPDATE=1
fi
# deb-src for `apt-get source musl` (MIPS and riscv64 musl are built from it).
SRC_LIST=/etc/apt/sources.list.d/elkeid-musl-src.sources
if [ ! -f "$SRC_LIST" ]; then
    log "adding $SRC_LIST (deb-src bookworm main, for the musl source package)"
    $SUDO tee "$SRC_LIST" >/dev/null <<'EOF'
# Added by elkeid-rs targets/setup.sh: the musl source package (soft-float
# MIPS and riscv64 musl are built from it).
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    NEED_UPDATE=1
fi

missing=()
for p in "${PKGS[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    apt_update
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
elif [ "${NEED_UPDATE:-0}" = 1 ]; then
    apt_update
fi

# std's unwinder (libunwind crate) links -lunwind on musl targets; Debian's
# musl-dev:armhf has no libunwind.a, but libgcc_eh.a provides the same
# _Unwind_* symbols.
UNWIND=/usr/lib/arm-linux-musleabihf/libunwind.a
if [ ! -e "$UNWIND" ]; then
    log "linking $UNWIND -> libgcc_eh.a"
    $SUDO ln -sf "$(arm-linux-gnueabihf-gcc -print-file-name=libgcc_eh.a)" "$UNWIND"
fi

# --- musl for mips / mipsel (soft-float) and riscv64 ---------------------
CROSS_DIR=${ELKEID_CROSS_DIR:-/opt/elkeid-rs/cross}
# name (wrapper /usr/local/bin/<name>-gcc), Debian cross gcc prefix, CFLAGS
MUSL_BUILDS=(
    "mips-linux-muslsf mips-linux-gnu -march=mips32r2 -msoft-float"
    "mipsel-linux-muslsf mipsel-linux-gnu -march=mips32r2 -msoft-float"
    "riscv64-linux-musl riscv64-linux-gnu -march=rv64gc -mabi=lp64d"
)
build_musl() { # name gcc-prefix cflags...
    local name=$1 triple=$2 cc=$2-gcc prefix stamp want build gcc_inc
    shift 2
    local cflags="$*"
    prefix=$CROSS_DIR/$name
    stamp=$prefix/.elkeid-musl
    want="musl $MUSL_VERSION; $cc $($cc -dumpversion); $cflags"
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        log "building musl $MUSL_VERSION for $name ($cc $cflags) into $prefix"
        build=$CROSS_DIR/build-$name
        rm -rf "$build" "$prefix"
        cp -a "$CROSS_DIR/src/musl-$MUSL_VERSION" "$build"
        (
            cd "$build"
            ./configure --prefix="$prefix" --target="$triple" --disable-shared --disable-wrapper \
                CC="$cc" CROSS_COMPILE="$triple-" CFLAGS="-Os -pipe $cflags" >/dev/null
            make -j"$(nproc)" >make.log 2>&1 || { tail -n 30 make.log; exit 1; }
            make install >/dev/null
        )
        rm -rf "$build"
        printf '%s\n' "$want" >"$stamp"
    fi
    # The link glue below is cheap: rewritten on every run.
    # Rust's std links -lunwind on musl: libgcc_eh.a has the _Unwind_* symbols,
    # plus a _dl_find_object() for static musl executables, which Debian's
    # libgcc_eh (built against glibc 2.36) calls (targets/cross/dl_find_object.c;
    # compiled against the glibc cross headers for glibc's struct layout).
    rm -f "$prefix/lib/libunwind.a" "$prefix/lib/dl_find_object.o"
    # shellcheck disable=SC2086 # $cflags holds several flags
    cp "$($cc $cflags -print-file-name=libgcc_eh.a)" "$prefix/lib/libunwind.a"
    # (Default float ABI like libgcc_eh itself: glibc has no soft-float MIPS
    # headers; the shim has no floating point.)
    $cc -Os -fPIC -Wall -Werror -c targets/cross/dl_find_object.c -o "$prefix/lib/dl_find_object.o"
    "$triple-ar" rcs "$prefix/lib/libunwind.a" "$prefix/lib/dl_find_object.o"
    # shellcheck disable=SC2086
    gcc_inc=$($cc $cflags -print-file-name=include)
    # A gcc spec file that swaps glibc's start files and libc for this musl
    # (static executables only; entries must be separated by blank lines).
    # (Headers: the wrapper passes -nostdinc and musl's + gcc's include dirs.)
    cat >"$prefix/lib/elkeid-musl.specs" <<EOF
*link_libgcc:
-L$prefix/lib -L .%s

*libgcc:
libgcc.a%s %:if-exists(libgcc_eh.a%s)

*startfile:
$prefix/lib/crt1.o $prefix/lib/crti.o crtbeginS.o%s

*endfile:
crtendS.o%s $prefix/lib/crtn.o

*link:
-nostdlib %{static:-static} %{rdynamic:-export-dynamic}

EOF
    $SUDO tee "/usr/local/bin/$name-gcc" >/dev/null <<EOF
#!/bin/sh
# Written by elkeid-rs targets/setup.sh: $cc against the static musl in $prefix.
exec $cc $cflags -nostdinc -isystem $prefix/include -isystem $gcc_inc "\$@" -specs "$prefix/lib/elkeid-musl.specs"
EOF
    $SUDO chmod 0755 "/usr/local/bin/$name-gcc"
}
musl_src_version() {
    find "$CROSS_DIR/src" -maxdepth 1 -name 'musl-[0-9]*' -type d -printf '%f\n' | sed 's/^musl-//' | sort -V | tail -n1
}
$SUDO mkdir -p "$CROSS_DIR/src"
MUSL_VERSION=$(musl_src_version)
if [ -z "$MUSL_VERSION" ]; then
    log "apt-get source musl (into $CROSS_DIR/src)"
    (cd "$CROSS_DIR/src" && $SUDO apt-get source -qq musl >/dev/null 2>&1) ||
        { apt_update; (cd "$CROSS_DIR/src" && $SUDO apt-get source -qq musl >/dev/null); }
    MUSL_VERSION=$(musl_src_version)
    [ -n "$MUSL_VERSION" ] || { log "ERROR: apt-get source musl gave no musl-* directory"; exit 1; }
fi
for b in "${MUSL_BUILDS[@]}"; do
    # shellcheck disable=SC2086 # the row is split into its fields on purpose
    build_musl $b
done

# --- Rust targets for the pinned toolchain -------------------------------
installed_targets=$(rustup target list --installed)
for t in x86_64-unknown-linux-musl aarch64-unknown-linux-musl thumbv7em-none-eabihf; do
    if ! grep -qx "$t" <<<"$installed_targets"; then
        log "rustup target add $t"
        rustup target add "$t"
    fi
done
if ! rustup component list --installed | grep -q '^rust-src'; then
    log "rustup component add rust-src (armv7, MIPS and riscv64 musl std are built from source)"
    rustup component add rust-src
fi

# --- binfmt_misc: let emulated processes exec other foreign binaries -----
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    log "mounting binfmt_misc"
    $SUDO mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc || log "WARNING: cannot mount binfmt_misc"
fi
if [ -e /proc/sys/fs/binfmt_misc/register ]; then
    for q in qemu-aarch64 qemu-arm qemu-mips qemu-mipsel qemu-riscv64; do
        if [ ! -e "/proc/sys/fs/binfmt_misc/$q" ] || ! grep -qx enabled "/proc/sys/fs/binfmt_misc/$q"; then
            log "update-binfmts --enable $q"
            $SUDO update-binfmts --enable "$q" || log "WARNING: cannot enable $q"
        fi
    done
fi

log "ok"
