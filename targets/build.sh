#!/usr/bin/env bash
# Static release builds of the agent (profile release-small) and the center
# (profile release) for the shipped musl targets.
#
#   bash targets/build.sh <target|all> [agent|center|both]
#
# targets: x86_64-unknown-linux-musl aarch64-unknown-linux-musl
#          armv7-unknown-linux-musleabihf mips-unknown-linux-musl
#          mipsel-unknown-linux-musl riscv64gc-unknown-linux-musl
# Artifacts (stripped) are copied to target/ship/<target>/{elkeid-agent,elkeid-center}.
#
# armv7, MIPS, riscv64: rustup (here) has no prebuilt std for them, so std is
# built from source (rust-src) with -Zbuild-std on the pinned stable
# toolchain, which needs RUSTC_BOOTSTRAP=1 (scoped to that one cargo
# invocation). The agent on every router target (aarch64 too) is built that
# way, with std size-tuned: see agent_release_env in targets/lib.sh.
# Linkers/CC come from .cargo/config.toml; `bash targets/setup.sh` first.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=targets/lib.sh
. targets/lib.sh

want=${1:-all}
tdir=${CARGO_TARGET_DIR:-target}
what=${2:-both}
case "$what" in agent|center|both) ;; *) die "second argument: agent|center|both, got '$what'" ;; esac

build_one() {
    local t=$1 out
    cargo_env "$t"
    out=target/ship/$t
    mkdir -p "$out"

    if [ "$what" != center ]; then
        agent_release_env "$t"
        log "$t: elkeid-agent (profile release-small${CARGO_EXTRA:+, ${CARGO_EXTRA[*]}})"
        env "${CARGO_ENV[@]}" cargo build --profile release-small -p elkeid-agent --bin elkeid-agent \
            --target "$t" "${CARGO_EXTRA[@]}"
        cargo_env "$t"
        install -m 0755 "$tdir/$t/release-small/elkeid-agent" "$out/elkeid-agent"
        # Symbols, and the unwind tables (.eh_frame + its index, ~14% of the
        # stripped file): release-small is panic=abort and std is built
        # without the backtrace feature, so nothing ever walks the stack.
        # A panic still prints its message and location, then aborts.
        "$(strip_tool "$t")" -R .eh_frame -R .eh_frame_hdr "$out/elkeid-agent"
        check_static "$out/elkeid-agent"
    fi
    if [ "$what" != agent ]; then
        log "$t: elkeid-center (profile release)"
        env "${CARGO_ENV[@]}" cargo build --release -p elkeid-center --bin elkeid-center \
            --target "$t" "${CARGO_EXTRA[@]}"
        install -m 0755 "$tdir/$t/release/elkeid-center" "$out/elkeid-center"
        "$(strip_tool "$t")" "$out/elkeid-center"
        check_static "$out/elkeid-center"
    fi
}

for t in $(expand_targets "$want"); do
    build_one "$t"
done
log "artifacts under target/ship/"
