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
      musl-tools musl-dev:armhf file shellcheck dash busybox python3 openssl)

if ! dpkg --print-foreign-architectures | grep -qx armhf; then
    log "adding dpkg architecture armhf"
    $SUDO dpkg --add-architecture armhf
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

# --- Rust targets for the pinned toolchain -------------------------------
installed_targets=$(rustup target list --installed)
for t in x86_64-unknown-linux-musl aarch64-unknown-linux-musl thumbv7em-none-eabihf; do
    if ! grep -qx "$t" <<<"$installed_targets"; then
        log "rustup target add $t"
        rustup target add "$t"
    fi
done
if ! rustup component list --installed | grep -q '^rust-src'; then
    log "rustup component add rust-src (armv7 musl std is built from source)"
    rustup component add rust-src
fi

# --- binfmt_misc: let emulated processes exec other foreign binaries -----
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    log "mounting binfmt_misc"
    $SUDO mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc || log "WARNING: cannot mount binfmt_misc"
fi
if [ -e /proc/sys/fs/binfmt_misc/register ]; then
    for q in qemu-aarch64 qemu-arm; do
        if [ ! -e "/proc/sys/fs/binfmt_misc/$q" ] || ! grep -qx enabled "/proc/sys/fs/binfmt_misc/$q"; then
            log "update-binfmts --enable $q"
            $SUDO update-binfmts --enable "$q" || log "WARNING: cannot enable $q"
        fi
    done
fi

log "ok"
