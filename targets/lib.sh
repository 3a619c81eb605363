# Shared helpers for the targets/*.sh scripts (sourced, not executed).
# shellcheck shell=bash

TARGETS_ALL="x86_64-unknown-linux-musl aarch64-unknown-linux-musl armv7-unknown-linux-musleabihf"
TARGETS_ALL="$TARGETS_ALL mips-unknown-linux-musl mipsel-unknown-linux-musl riscv64gc-unknown-linux-musl"

log() { printf '%s: %s\n' "$(basename "$0")" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# expand_targets all|<triple> -> list of triples (validated)
expand_targets() {
    case "$1" in
        all) echo "$TARGETS_ALL" ;;
        x86_64-unknown-linux-musl|aarch64-unknown-linux-musl|armv7-unknown-linux-musleabihf) echo "$1" ;;
        mips-unknown-linux-musl|mipsel-unknown-linux-musl|riscv64gc-unknown-linux-musl) echo "$1" ;;
        *) die "unknown target '$1' (one of: all $TARGETS_ALL)" ;;
    esac
}

# No prebuilt std from our rustup mirror: std is built from rust-src.
# (armv7 and riscv64 musl: not distributed here; MIPS: tier 3, none anywhere.)
needs_build_std() {
    case "$1" in
        armv7-unknown-linux-musleabihf|mips-unknown-linux-musl|mipsel-unknown-linux-musl|riscv64gc-unknown-linux-musl) return 0 ;;
        *) return 1 ;;
    esac
}

# cargo arguments/env for a target, as arrays: use
#   cargo_env "$t"; env "${CARGO_ENV[@]}" cargo build "${CARGO_EXTRA[@]}" ...
# shellcheck disable=SC2034,SC2054 # arrays read by the sourcing script; the comma is cargo's
cargo_env() {
    CARGO_ENV=()
    CARGO_EXTRA=()
    if needs_build_std "$1"; then
        CARGO_ENV=(RUSTC_BOOTSTRAP=1)
        CARGO_EXTRA=(-Zbuild-std=std,panic_abort)
    fi
}

# cargo arguments/env for the shipped agent (profile release-small): on the
# router targets std itself is rebuilt from rust-src with the agent's
# opt-level "z" and std's `optimize_for_size` feature, and without std's
# `backtrace` feature (symbolizing backtraces: gimli, addr2line,
# rustc-demangle, ~70 KiB; the shipped binary is stripped, so it could not
# name a frame anyway) and `panic-unwind` (release-small is panic=abort).
# Panic messages are still printed. Since 2026-12-02 x86_64 too (it kept
# the prebuilt std before: 2,888,832 B and 3,052 kB idle VmRSS, against
# 2,120,392 B and ~2.5 MiB with this recipe; docs/BENCHMARKS.md, "Footprint").
# shellcheck disable=SC2034,SC2054
#
# On those targets every crate (std included) is also compiled with
# AGENT_SIZE_RUSTFLAGS (default: `-Zlocation-detail=none -Zfmt-debug=shallow`:
# a panic prints its message without file:line:column, and derived Debug
# prints type/variant names without fields; the 2 MiB budget of issue 11 is
# not met on MIPS without them, docs/BENCHMARKS.md "Size work"). They are added to the
# target's rustflags of .cargo/config.toml (cargo merges --config arrays).
# The profile's own strip is off: the cross strip below does it (and
# `cargo bloat` can then reuse the same build).
# shellcheck disable=SC2034,SC2054
agent_release_env() {
    cargo_env "$1"
    local flags="" f
    for f in ${AGENT_SIZE_RUSTFLAGS--Zlocation-detail=none -Zfmt-debug=shallow}; do
        flags="$flags${flags:+, }'$f'"
    done
    CARGO_ENV=(RUSTC_BOOTSTRAP=1 CARGO_PROFILE_RELEASE_SMALL_STRIP=false)
    CARGO_EXTRA=(-Zbuild-std=std,panic_abort -Zbuild-std-features=optimize_for_size
        --config "target.$1.rustflags=[$flags]")
}

strip_tool() {
    case "$1" in
        x86_64-unknown-linux-musl) echo strip ;;
        aarch64-unknown-linux-musl) echo aarch64-linux-gnu-strip ;;
        armv7-unknown-linux-musleabihf) echo arm-linux-gnueabihf-strip ;;
        mips-unknown-linux-musl) echo mips-linux-gnu-strip ;;
        mipsel-unknown-linux-musl) echo mipsel-linux-gnu-strip ;;
        riscv64gc-unknown-linux-musl) echo riscv64-linux-gnu-strip ;;
        *) die "no strip tool for $1" ;;
    esac
}

# uname -m that the binary reports under emulation (the heartbeat `arch`).
uname_arch() {
    case "$1" in
        x86_64-unknown-linux-musl) echo x86_64 ;;
        aarch64-unknown-linux-musl) echo aarch64 ;;
        armv7-unknown-linux-musleabihf) echo armv7l ;;
        mips-unknown-linux-musl) echo mips ;;
        mipsel-unknown-linux-musl) echo mips ;;
        riscv64gc-unknown-linux-musl) echo riscv64 ;;
        *) die "no arch for $1" ;;
    esac
}

qemu_runner() {
    case "$1" in
        x86_64-unknown-linux-musl) echo "" ;;
        aarch64-unknown-linux-musl) echo qemu-aarch64-static ;;
        armv7-unknown-linux-musleabihf) echo qemu-arm-static ;;
        mips-unknown-linux-musl) echo qemu-mips-static ;;
        mipsel-unknown-linux-musl) echo qemu-mipsel-static ;;
        riscv64gc-unknown-linux-musl) echo qemu-riscv64-static ;;
        *) die "no runner for $1" ;;
    esac
}

# Fails unless $1 is a static executable: no PT_INTERP, no DT_NEEDED.
# `file` prints "statically linked" (or "static-pie linked" for the
# position-independent static executables Rust's musl targets produce).
check_static() {
    local f=$1 desc
    desc=$(file -b "$f")
    case "$desc" in
        *"statically linked"*|*"static-pie linked"*) ;;
        *) die "$f is not static: $desc" ;;
    esac
    if LC_ALL=C readelf -lW "$f" | grep -q 'Requesting program interpreter'; then
        die "$f has a program interpreter"
    fi
    if LC_ALL=C readelf -dW "$f" 2>/dev/null | grep -q '(NEEDED)'; then
        die "$f needs shared libraries"
    fi
    log "static ok: $f: $desc"
}

# Size budget of the stripped agent, in bytes (targets/size-report.sh).
# 2 MiB on the router targets aarch64, armv7, mips, mipsel (issue 11: the
# flash of small routers) and riscv64 (the same build; it measured 1.42 MiB,
# its compressed instructions are the densest code here). x86_64: 2.25 MiB
# (the same recipe since 2026-12-02; 3 MiB before, with the prebuilt std).
agent_budget() {
    case "$1" in
        x86_64-unknown-linux-musl) echo $((2304 * 1024)) ;;
        *) echo $((2 * 1024 * 1024)) ;;
    esac
}

# `file -b` substring every binary of the target must show (ELF machine).
elf_machine() {
    case "$1" in
        x86_64-unknown-linux-musl) echo "x86-64" ;;
        aarch64-unknown-linux-musl) echo "ARM aarch64" ;;
        armv7-unknown-linux-musleabihf) echo "ARM, EABI5" ;;
        mips-unknown-linux-musl) echo "32-bit MSB executable, MIPS, MIPS32 rel2" ;;
        mipsel-unknown-linux-musl) echo "32-bit LSB executable, MIPS, MIPS32 rel2" ;;
        riscv64gc-unknown-linux-musl) echo "64-bit LSB executable, UCB RISC-V" ;;
        *) die "no ELF machine for $1" ;;
    esac
}
