#!/usr/bin/env bash
# Runs the unit and integration tests of elkeid-core and elkeid-agent for a
# foreign target under qemu-user (cargo's `runner` from .cargo/config.toml):
# the same `cargo test` as on x86_64, no test filtered out.
#
#   bash targets/qemu-test.sh aarch64-unknown-linux-musl [-- <test args>]
#   bash targets/qemu-test.sh armv7-unknown-linux-musleabihf
#   bash targets/qemu-test.sh x86_64-unknown-linux-musl      (native, no qemu)
#
# Tests that spawn other programs exec host binaries (/bin/sh, ...) natively,
# and foreign ones through binfmt_misc (targets/setup.sh registers qemu).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=targets/lib.sh
. targets/lib.sh

[ $# -ge 1 ] || die "usage: $0 <target> [-- test args]"
t=$(expand_targets "$1")
shift
case "$t" in *" "*) die "one target at a time" ;; esac

runner=$(qemu_runner "$t")
if [ -n "$runner" ] && ! command -v "$runner" >/dev/null; then
    die "$runner not found: run targets/setup.sh"
fi

cargo_env "$t"
start=$(date +%s)
log "cargo test -p elkeid-core -p elkeid-agent --target $t ${CARGO_EXTRA[*]} (runner: ${runner:-native})"
env "${CARGO_ENV[@]}" cargo test -p elkeid-core -p elkeid-agent --target "$t" "${CARGO_EXTRA[@]}" "$@"
log "$t: tests passed in $(( $(date +%s) - start ))s"
