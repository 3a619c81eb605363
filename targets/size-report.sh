#!/usr/bin/env bash
# Stripped sizes of elkeid-agent and elkeid-center per shipped target, as a
# markdown table; fails when an agent is missing or over its budget
# (targets/lib.sh agent_budget: 2 MiB on aarch64, armv7, mips, mipsel,
# riscv64; 2.25 MiB on x86_64).
#
#   bash targets/size-report.sh [--build] [--update-doc] [target...]
#
#   target...     only these targets (default: all of targets/lib.sh)
#   --build       run `targets/build.sh all` first (release builds, slow)
#   --update-doc  also replace the `## Binary sizes` section of
#                 docs/BENCHMARKS.md with the table (section created if absent)
#
# Reads target/ship/<target>/{elkeid-agent,elkeid-center} (targets/build.sh
# writes them stripped; they are stripped again here to be sure).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=targets/lib.sh
. targets/lib.sh

build=no
doc=no
only=()
for a in "$@"; do
    case "$a" in
        --build) build=yes ;;
        --update-doc) doc=yes ;;
        -*) die "unknown argument $a" ;;
        *) only+=("$(expand_targets "$a")") ;;
    esac
done
targets=${only[*]:-$TARGETS_ALL}
if [ "$build" = yes ]; then
    for t in $targets; do bash targets/build.sh "$t"; done
fi

mib() { awk -v b="$1" 'BEGIN { printf "%.2f MiB", b / 1048576 }'; }

TMP=$(mktemp -d "${TMPDIR:-/tmp}/elkeid-size.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
over=0
table="| target | agent (stripped) | agent gzip -9 | center (stripped) | agent budget |
|---|---:|---:|---:|---|"
for t in $targets; do
    budget=$(agent_budget "$t")
    row="| \`$t\` |"
    a=target/ship/$t/elkeid-agent
    if [ -f "$a" ]; then
        cp "$a" "$TMP/a"
        "$(strip_tool "$t")" "$TMP/a"
        sz=$(stat -c %s "$TMP/a")
        gz=$(gzip -9c "$TMP/a" | wc -c)
        if [ "$sz" -le "$budget" ]; then
            verdict="$(mib "$budget"): ok ($(( sz * 100 / budget ))%)"
        else
            verdict="$(mib "$budget"): **OVER** by $(( sz - budget )) B"
            over=1
        fi
        row="$row $(mib "$sz") ($sz B) | $(mib "$gz") |"
    else
        row="$row not built | – |"
        verdict="$(mib "$budget"): **missing**"
        over=1
    fi
    c=target/ship/$t/elkeid-center
    if [ -f "$c" ]; then
        cp "$c" "$TMP/c"
        "$(strip_tool "$t")" "$TMP/c"
        sz=$(stat -c %s "$TMP/c")
        row="$row $(mib "$sz") ($sz B) |"
    else
        row="$row not built |"
    fi
    table="$table
$row $verdict |"
done

rustc_v=$(rustc --version)
note="Static musl, agent profile \`release-small\` (opt-level z, fat LTO, 1 CGU, panic=abort; every target (x86_64 too since 2026-12-02): std from source with \`optimize_for_size\`, \`${AGENT_SIZE_RUSTFLAGS--Zlocation-detail=none -Zfmt-debug=shallow}\`), center profile \`release\`; $rustc_v; $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(date -u +%Y-%m-%d). Command: \`bash targets/size-report.sh --build --update-doc\`."
printf '%s\n\n%s\n' "$table" "$note"

if [ "$doc" = yes ]; then
    f=docs/BENCHMARKS.md
    [ -f "$f" ] || printf '# Benchmarks\n' >"$f"
    python3 - "$f" "$table" "$note" <<'PY'
import re, sys
path, table, note = sys.argv[1], sys.argv[2], sys.argv[3]
text = open(path, encoding="utf-8").read()
section = "## Binary sizes\n\n" + table + "\n\n" + note + "\n"
m = re.search(r"^## Binary sizes\n.*?(?=^## |\Z)", text, flags=re.S | re.M)
if m:
    text = text[:m.start()] + section + ("\n" if m.end() < len(text) else "") + text[m.end():]
else:
    text = text.rstrip("\n") + "\n\n" + section
open(path, "w", encoding="utf-8").write(text)
PY
    log "updated the '## Binary sizes' section of $f"
fi

if [ "$over" != 0 ]; then
    die "an agent binary is missing or over its budget"
fi
