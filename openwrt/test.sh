#!/usr/bin/env bash
# OpenWrt package checks (called by .ci/run):
#   1. every shell script in the repository parses (sh -n, dash -n, busybox
#      sh -n, or bash -n for bash scripts); shellcheck on openwrt/ and targets/
#      (and error-level shellcheck on the others);
#   2. .ipk packages for aarch64_cortex-a53, aarch64_generic,
#      arm_cortex-a7_neon-vfpv4, mips_24kc, mipsel_24kc and riscv64_riscv64
#      (plus: a big-endian MIPS binary refused as mipsel_24kc), unpacked with tar/gzip: layout, control
#      fields, modes, owners, conffiles, maintainer scripts;
#   3. the init script's UCI -> TOML translation under dash, busybox ash and
#      bash --posix against fixture configs (valid and invalid), its
#      start_service procd parameters, and the real agent accepting the TOML.
#
#   bash openwrt/test.sh
#
# Agent binaries for the ipks: target/ship/<t>/elkeid-agent (targets/build.sh)
# when present, else the release-small or debug build of that target (in
# OPENWRT_AGENT_DIR/<t>/debug first when that is set: .ci/run points it at
# its cross test builds), else a debug build is made (stripped before
# packaging). The host agent that must accept the generated TOML is built
# with `cargo build`, or OPENWRT_HOST_AGENT=<path> names one.
# shellcheck disable=SC2086 # $sh holds a command and its arguments: split on purpose
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=targets/lib.sh
. targets/lib.sh

PASS=0
FAIL=0
ok() { PASS=$((PASS + 1)); printf 'ok - %s\n' "$*"; }
bad() { FAIL=$((FAIL + 1)); printf 'not ok - %s\n' "$*"; }
# check DESCRIPTION COMMAND...: runs COMMAND, ok/bad by its status.
check() {
    local d=$1
    shift
    if "$@"; then ok "$d"; else bad "$d"; fi
}

TMP=$(mktemp -d "${TMPDIR:-/tmp}/elkeid-openwrt-test.XXXXXX")
AGENT_PID=""
cleanup() {
    if [ -n "$AGENT_PID" ]; then kill "$AGENT_PID" 2>/dev/null || true; wait "$AGENT_PID" 2>/dev/null || true; fi
    rm -rf "$TMP"
}
trap cleanup EXIT

SHELLS=(dash "busybox sh" "bash --posix")
for s in dash busybox shellcheck python3; do
    command -v "$s" >/dev/null || die "$s is missing: run targets/setup.sh"
done

# ---------------------------------------------------------------------------
echo "# 1. shell syntax"
is_mine() { case "$1" in openwrt/*|targets/*) return 0 ;; *) return 1 ;; esac; }
syntax_check() { # FILE KIND(sh|bash)
    local f=$1 kind=$2 sev=style
    is_mine "$f" || sev=error
    if [ "$kind" = bash ]; then
        check "bash -n $f" bash -n "$f"
        check "shellcheck -S $sev $f" shellcheck -x -S "$sev" -s bash "$f"
    else
        check "sh -n $f" sh -n "$f"
        check "dash -n $f" dash -n "$f"
        check "busybox sh -n $f" busybox sh -n "$f"
        check "shellcheck -S $sev $f" shellcheck -x -S "$sev" "$f"
    fi
}
while IFS= read -r f; do
    [ -f "$f" ] || continue
    first=$(head -n1 "$f")
    case "$f:$first" in
        *:'#!'*bash*) syntax_check "$f" bash ;;
        *:'#!'*/sh*|*:'#!'*' sh'*) syntax_check "$f" sh ;;
        *.sh:*)
            # sourced files: their shellcheck directive says which shell
            if grep -q '^# shellcheck shell=bash' "$f"; then syntax_check "$f" bash; else syntax_check "$f" sh; fi ;;
    esac
done < <(git ls-files --cached --others --exclude-standard | grep -v '^target/' | sort -u)

# ---------------------------------------------------------------------------
echo "# 2. ipk packages"
agent_bin_for() { # rust target -> a stripped static agent binary for it
    local t=$1 b=""
    for cand in "target/ship/$t/elkeid-agent" "target/$t/release-small/elkeid-agent" \
        ${OPENWRT_AGENT_DIR:+"$OPENWRT_AGENT_DIR/$t/debug/elkeid-agent"} "target/$t/debug/elkeid-agent"; do
        if [ -f "$cand" ]; then b=$cand; break; fi
    done
    if [ -z "$b" ]; then
        cargo_env "$t"
        log "building a debug elkeid-agent for $t"
        env "${CARGO_ENV[@]}" cargo build -q -p elkeid-agent --bin elkeid-agent --target "$t" "${CARGO_EXTRA[@]}" >&2
        b="target/$t/debug/elkeid-agent"
    fi
    mkdir -p "$TMP/bin/$t"
    cp "$b" "$TMP/bin/$t/elkeid-agent"
    "$(strip_tool "$t")" "$TMP/bin/$t/elkeid-agent"
    log "packaging $b (stripped copy) for $t"
    echo "$TMP/bin/$t/elkeid-agent"
}

field() { sed -n "s/^$2: //p" "$1"; }

inspect_ipk() { # IPK ARCH ELF_MACHINE BIN
    local ipk=$1 arch=$2 machine=$3 bin=$4 d
    d=$TMP/x-$arch
    mkdir -p "$d/outer" "$d/control" "$d/data"
    check "$arch: outer archive is a gzip'd tar" gzip -t "$ipk"
    check "$arch: outer members are exactly debian-binary, data.tar.gz, control.tar.gz" \
        test "$(tar -tzf "$ipk" | sort | tr '\n' ' ')" = "./control.tar.gz ./data.tar.gz ./debian-binary "
    tar -xzf "$ipk" -C "$d/outer"
    check "$arch: debian-binary is '2.0\\n'" test "$(od -An -c "$d/outer/debian-binary" | tr -d ' ')" = '2.0\n'
    check "$arch: outer members owned by 0/0" bash -c "! tar -tvzf '$ipk' | awk '{print \$2}' | grep -vx '0/0'"

    check "$arch: control.tar.gz is gzip" gzip -t "$d/outer/control.tar.gz"
    check "$arch: control members" \
        test "$(tar -tzf "$d/outer/control.tar.gz" | sort | tr '\n' ' ')" = "./ ./conffiles ./control ./postinst ./prerm "
    check "$arch: control members owned by 0/0" bash -c "! tar -tvzf '$d/outer/control.tar.gz' | awk '{print \$2}' | grep -vx '0/0'"
    tar -xzf "$d/outer/control.tar.gz" -C "$d/control"
    local c=$d/control/control
    check "$arch: Package" test "$(field "$c" Package)" = elkeid-agent
    check "$arch: Version is <crate version>-r1" bash -c "field() { sed -n \"s/^\$2: //p\" \"\$1\"; }; [[ \"\$(field '$c' Version)\" =~ ^[0-9]+\.[0-9]+\.[0-9]+-r[0-9]+$ ]]"
    check "$arch: Architecture" test "$(field "$c" Architecture)" = "$arch"
    check "$arch: Depends" test "$(field "$c" Depends)" = procd
    check "$arch: Source" test "$(field "$c" Source)" = feeds/elkeid/elkeid-agent
    check "$arch: SourceName" test "$(field "$c" SourceName)" = elkeid-agent
    check "$arch: License" test "$(field "$c" License)" = Apache-2.0
    check "$arch: Section" test "$(field "$c" Section)" = net
    check "$arch: Description present" test -n "$(field "$c" Description)"
    check "$arch: conffiles lists /etc/config/elkeid-agent" test "$(cat "$d/control/conffiles")" = /etc/config/elkeid-agent
    check "$arch: postinst/prerm are 0755" test "$(stat -c %a "$d/control/postinst" "$d/control/prerm" | tr '\n' ' ')" = "755 755 "
    for s in postinst prerm; do
        for sh in "${SHELLS[@]}"; do
            check "$arch: $s parses under $sh" $sh -n "$d/control/$s"
        done
        check "$arch: shellcheck $s" shellcheck "$d/control/$s"
        # shellcheck disable=SC2016 # a literal $IPKG_INSTROOT is searched for
        check "$arch: $s guards live-system actions with IPKG_INSTROOT" grep -q '\[ -z "$IPKG_INSTROOT" \]' "$d/control/$s"
    done
    check "$arch: postinst enables and restarts" bash -c "grep -q '/etc/init.d/elkeid-agent enable' '$d/control/postinst' && grep -q '/etc/init.d/elkeid-agent restart' '$d/control/postinst'"
    check "$arch: prerm stops and disables" bash -c "grep -q '/etc/init.d/elkeid-agent stop' '$d/control/prerm' && grep -q '/etc/init.d/elkeid-agent disable' '$d/control/prerm'"
    # Image-build mode: only rc.d links, matching the init script's START/STOP.
    local root=$d/instroot start stop
    mkdir -p "$root"
    start=$(sed -n 's/^START=//p' openwrt/files/elkeid-agent.init)
    stop=$(sed -n 's/^STOP=//p' openwrt/files/elkeid-agent.init)
    check "$arch: postinst with IPKG_INSTROOT creates rc.d links S$start/K$stop" \
        bash -c "IPKG_INSTROOT='$root' sh '$d/control/postinst' && [ \"\$(readlink '$root/etc/rc.d/S${start}elkeid-agent')\" = ../init.d/elkeid-agent ] && [ \"\$(readlink '$root/etc/rc.d/K${stop}elkeid-agent')\" = ../init.d/elkeid-agent ]"
    check "$arch: prerm with IPKG_INSTROOT does nothing and succeeds" env IPKG_INSTROOT="$root" sh "$d/control/prerm"

    check "$arch: data.tar.gz is gzip" gzip -t "$d/outer/data.tar.gz"
    check "$arch: data entries owned by 0/0" bash -c "! tar -tvzf '$d/outer/data.tar.gz' | awk '{print \$2}' | grep -vx '0/0'"
    local want got
    want="./ ./etc/ ./etc/config/ ./etc/config/elkeid-agent ./etc/elkeid-agent/ ./etc/init.d/ ./etc/init.d/elkeid-agent ./lib/ ./lib/upgrade/ ./lib/upgrade/keep.d/ ./lib/upgrade/keep.d/elkeid-agent ./usr/ ./usr/bin/ ./usr/bin/elkeid-agent "
    got=$(tar -tzf "$d/outer/data.tar.gz" | sort | tr '\n' ' ')
    check "$arch: data layout" test "$got" = "$want"
    tar -xzpf "$d/outer/data.tar.gz" -C "$d/data"
    check "$arch: /usr/bin/elkeid-agent 0755" test "$(stat -c %a "$d/data/usr/bin/elkeid-agent")" = 755
    check "$arch: /etc/init.d/elkeid-agent 0755" test "$(stat -c %a "$d/data/etc/init.d/elkeid-agent")" = 755
    check "$arch: /etc/config/elkeid-agent 0600" test "$(stat -c %a "$d/data/etc/config/elkeid-agent")" = 600
    check "$arch: /etc/elkeid-agent/ 0700" test "$(stat -c %a "$d/data/etc/elkeid-agent")" = 700
    check "$arch: keep.d keeps /etc/elkeid-agent/" test "$(cat "$d/data/lib/upgrade/keep.d/elkeid-agent")" = /etc/elkeid-agent/
    check "$arch: init script is openwrt/files/elkeid-agent.init" cmp -s "$d/data/etc/init.d/elkeid-agent" openwrt/files/elkeid-agent.init
    check "$arch: config is openwrt/files/elkeid-agent.config" cmp -s "$d/data/etc/config/elkeid-agent" openwrt/files/elkeid-agent.config
    check "$arch: binary is the packaged one" cmp -s "$d/data/usr/bin/elkeid-agent" "$bin"
    local desc
    desc=$(file -b "$d/data/usr/bin/elkeid-agent")
    check "$arch: binary is $machine" grep -q "$machine" <<<"$desc"
    check "$arch: binary is static" grep -Eq 'statically linked|static-pie linked' <<<"$desc"
    check "$arch: Installed-Size is the sum of the file sizes" \
        test "$(field "$c" Installed-Size)" = "$(find "$d/data" -type f -printf '%s\n' | awk '{s+=$1} END {print s}')"
}

declare -A RUST_TARGET=([aarch64_cortex-a53]=aarch64-unknown-linux-musl [aarch64_generic]=aarch64-unknown-linux-musl
                        [arm_cortex-a7_neon-vfpv4]=armv7-unknown-linux-musleabihf
                        [mips_24kc]=mips-unknown-linux-musl [mipsel_24kc]=mipsel-unknown-linux-musl
                        [riscv64_riscv64]=riscv64gc-unknown-linux-musl)
declare -A BIN=()
# OPENWRT_TEST_ARCHS narrows the set (e.g. while only some targets are built);
# it must keep aarch64_generic and one of arm_cortex-a7_neon-vfpv4/mipsel_24kc.
for arch in ${OPENWRT_TEST_ARCHS:-aarch64_cortex-a53 aarch64_generic arm_cortex-a7_neon-vfpv4 mips_24kc mipsel_24kc riscv64_riscv64}; do
    t=${RUST_TARGET[$arch]}
    if [ -z "${BIN[$t]:-}" ]; then BIN[$t]=$(agent_bin_for "$t"); fi
    ipk=$(bash openwrt/build-ipk.sh "$arch" "${BIN[$t]}" "$TMP/ipk")
    check "$arch: built $(basename "$ipk")" test -s "$ipk"
    inspect_ipk "$ipk" "$arch" "$(elf_machine "$t")" "${BIN[$t]}"
done
# (aarch64 is always among OPENWRT_TEST_ARCHS; the foreign binary is armv7's,
# or mipsel's when the set was narrowed.)
wrong=${BIN[armv7-unknown-linux-musleabihf]:-${BIN[mipsel-unknown-linux-musl]:-}}
[ -n "$wrong" ] || die "OPENWRT_TEST_ARCHS needs an armv7 or mipsel architecture too"
check "build-ipk.sh refuses a binary of the wrong architecture" \
    bash -c "! bash openwrt/build-ipk.sh aarch64_generic '$wrong' '$TMP/ipk-wrong' 2>/dev/null"
if [ -n "${BIN[mips-unknown-linux-musl]:-}" ]; then
    check "build-ipk.sh refuses a big-endian MIPS binary as mipsel_24kc" \
        bash -c "! bash openwrt/build-ipk.sh mipsel_24kc '${BIN[mips-unknown-linux-musl]}' '$TMP/ipk-wrong' 2>/dev/null"
fi
check "build-ipk.sh refuses an unknown architecture" \
    bash -c "! bash openwrt/build-ipk.sh mips64_octeonplus '${BIN[aarch64-unknown-linux-musl]}' '$TMP/ipk-wrong' 2>/dev/null"
a=$(SOURCE_DATE_EPOCH=1700000000 bash openwrt/build-ipk.sh aarch64_generic "${BIN[aarch64-unknown-linux-musl]}" "$TMP/r1")
b=$(SOURCE_DATE_EPOCH=1700000000 bash openwrt/build-ipk.sh aarch64_generic "${BIN[aarch64-unknown-linux-musl]}" "$TMP/r2")
check "ipk builds are reproducible" cmp -s "$a" "$b"

# ---------------------------------------------------------------------------
echo "# 3. init script: UCI -> TOML, start_service"
fixture() { # NAME -> path with @TMP@ substituted
    sed "s|@TMP@|$TMP/fx|g" "openwrt/tests/fixtures/$1" >"$TMP/fx-$1"
    echo "$TMP/fx-$1"
}
mkdir -p "$TMP/fx"
toml_equals() { # TOML_FILE JSON_FILE
    python3 - "$1" "$2" <<'PY'
import json, sys, tomllib
got = tomllib.load(open(sys.argv[1], "rb"))
want = json.load(open(sys.argv[2]))
if got != want:
    print("  got: ", json.dumps(got, sort_keys=True), file=sys.stderr)
    print("  want:", json.dumps(want, sort_keys=True), file=sys.stderr)
    sys.exit(1)
PY
}

for sh in "${SHELLS[@]}"; do
    tag=${sh%% *}
    for fx in default full option-form; do
        uci=openwrt/files/elkeid-agent.config
        [ "$fx" = default ] || uci=$(fixture "$fx.uci")
        out=$TMP/$tag-$fx.toml
        if $sh openwrt/tests/run-init.sh gen-config "$uci" >"$out" 2>"$out.err"; then
            check "$sh: $fx config -> expected TOML" toml_equals "$out" "$(fixture "$fx.json")"
        else
            bad "$sh: $fx config translation failed: $(cat "$out.err")"
        fi
    done

    # Invalid values stop the translation with a message naming the option.
    base=$(fixture option-form.uci)
    while IFS='|' read -r name line want; do
        f=$TMP/bad-$name.uci
        { cat "$base"; printf '\t%s\n' "$line"; } >"$f"
        if [ "$name" = no-server ]; then grep -v "option server" "$base" >"$f"; fi
        if $sh openwrt/tests/run-init.sh gen-config "$f" >/dev/null 2>"$f.err"; then
            bad "$sh: invalid config ($name) accepted"
        else
            check "$sh: invalid config ($name) refused naming '$want'" grep -q -- "$want" "$f.err"
        fi
    done <<'EOF'
bad-port|list public_server 'center:70000'|public_server port
no-port|list sd_server 'center.example.com'|not HOST:PORT
empty-host|list public_server ':6751'|not HOST:PORT
workers-zero|option workers '0'|workers
workers-text|option workers 'two'|workers
level|option log_level 'verbose'|log_level
ring-small|option ring_bytes '4096'|ring_bytes
unacked-small|option unacked_bytes '65536'|unacked_bytes
log-huge|option log_max_bytes '99999999999999999999'|log_max_bytes
heartbeat|option heartbeat_secs '-1'|heartbeat_secs
spool-full|option spool_full 'drop-newest'|spool_full
no-server|#|no 'server'
EOF

    # start_service with the full fixture: procd parameters, config file, env.
    full=$(fixture full.uci)
    conf=$TMP/$tag-var/elkeid-agent.toml
    log_=$TMP/$tag-procd.log
    if $sh openwrt/tests/run-init.sh start-service "$full" "$conf" "$log_" 2>"$log_.err"; then
        ok "$sh: start_service (full) succeeded"
    else
        bad "$sh: start_service (full) failed: $(cat "$log_.err")"
    fi
    expect_line() { check "$sh: start_service $1: $2" grep -qxF -- "$2" "$3"; }
    expect_line full "open_instance " "$log_"
    expect_line full "set_param command /usr/bin/elkeid-agent --config $conf" "$log_"
    expect_line full "append_param command --foreground" "$log_"
    expect_line full "set_param stderr 1" "$log_"
    expect_line full "set_param env SPECIFIED_AGENT_ID=router-42" "$log_"
    expect_line full "set_param respawn 600 10 7" "$log_"
    expect_line full "set_param nice -5" "$log_"
    expect_line full "set_param limits as=67108864 67108864" "$log_"
    expect_line full "set_param term_timeout 20" "$log_"
    expect_line full "set_param file /etc/config/elkeid-agent $conf" "$log_"
    expect_line full "append_param file $TMP/fx/pki/ca.crt" "$log_"
    expect_line full "append_param file $TMP/fx/pki/client.key" "$log_"
    expect_line full "close_instance" "$log_"
    expect_line full "add_reload_trigger elkeid-agent" "$log_"
    check "$sh: start_service wrote the TOML config (0600)" test "$(stat -c %a "$conf" 2>/dev/null)" = 600
    check "$sh: start_service config equals the translation" toml_equals "$conf" "$(fixture full.json)"
    check "$sh: start_service created the work dir" test -d "$TMP/fx/work dir"
    check "$sh: agent_id set: no id file written" test ! -e "$TMP/fx/persist/machine-id"
    rm -rf "$TMP/fx/work dir"

    # Defaults (work dir and id file moved into the temp dir): respawn
    # 3600 5 0, 128 MiB address space, nice 10, a persisted agent id.
    dflt=$TMP/dflt-$tag.uci
    sed -e "s|'/tmp/elkeid-agent'|'$TMP/fx/$tag-work'|" -e "s|'/etc/elkeid-agent/machine-id'|'$TMP/fx/$tag-persist/machine-id'|" \
        openwrt/files/elkeid-agent.config >"$dflt"
    $sh openwrt/tests/run-init.sh start-service "$dflt" "$conf" "$log_" 2>"$log_.err" || bad "$sh: start_service (defaults) failed: $(cat "$log_.err")"
    expect_line defaults "set_param respawn 3600 5 0" "$log_"
    expect_line defaults "set_param nice 10" "$log_"
    expect_line defaults "set_param limits as=134217728 134217728" "$log_"
    check "$sh: start_service defaults: no --foreground, no env" bash -c "! grep -qE 'foreground|SPECIFIED_AGENT_ID' '$log_'"
    idf=$TMP/fx/$tag-persist/machine-id
    check "$sh: start_service persisted a UUID agent id" grep -qE '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' "$idf"
    check "$sh: start_service seeded <work_dir>/machine-id from it" cmp -s "$idf" "$TMP/fx/$tag-work/machine-id"
    check "$sh: id file is 0600" test "$(stat -c %a "$idf")" = 600
    first_id=$(cat "$idf")
    rm -rf "$TMP/fx/$tag-work" # a reboot empties /tmp
    $sh openwrt/tests/run-init.sh start-service "$dflt" "$conf" "$log_" 2>/dev/null || true
    check "$sh: after a 'reboot' the agent id is the same" test "$(cat "$TMP/fx/$tag-work/machine-id")" = "$first_id"

    # Disabled: nothing started. Invalid: refused, nothing started.
    sed "s/option enabled '1'/option enabled '0'/" "$dflt" >"$dflt.off"
    check "$sh: enabled=0 starts nothing" bash -c "$sh openwrt/tests/run-init.sh start-service '$dflt.off' '$conf' '$log_' && ! grep -q open_instance '$log_'"
    printf "\toption workers 'many'\n" >>"$dflt"
    rm -f "$conf"
    check "$sh: invalid config: start_service fails, starts nothing, writes no config" \
        bash -c "! $sh openwrt/tests/run-init.sh start-service '$dflt' '$conf' '$log_' 2>/dev/null && ! grep -q open_instance '$log_' && [ ! -e '$conf' ] && [ ! -e '$conf.new' ]"
done

# The real agent (host build) accepts the generated configuration: it gets
# past configuration parsing (exit code 64 on a bad key) and logs its start.
# TLS material: one self-signed P-256 certificate serves as CA and client cert.
host_agent=${OPENWRT_HOST_AGENT:-target/debug/elkeid-agent}
[ -n "${OPENWRT_HOST_AGENT:-}" ] || cargo build -q -p elkeid-agent --bin elkeid-agent
pki=$TMP/fx/pki
mkdir -p "$pki"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=elkeid-test \
    -keyout "$pki/client.key" -out "$pki/client.crt" 2>/dev/null
cp "$pki/client.crt" "$pki/ca.crt"
for fx in full option-form; do
    toml=$TMP/dash-$fx.toml
    mkdir -p "$TMP/fx/work dir" "$TMP/fx/work"
    out=$TMP/agent-$fx.log
    tls=()
    # option-form relies on material embedded at build time; the test build has none.
    [ "$fx" = option-form ] && tls=(--ca "$pki/ca.crt" --cert "$pki/client.crt" --key "$pki/client.key")
    "$host_agent" --config "$toml" "${tls[@]}" --foreground >"$out" 2>&1 &
    AGENT_PID=$!
    started=no
    for _ in $(seq 1 600); do
        if grep -q 'elkeid-agent starting' "$out"; then started=yes; break; fi
        if ! kill -0 "$AGENT_PID" 2>/dev/null; then break; fi
        sleep 0.1
    done
    kill "$AGENT_PID" 2>/dev/null || true
    wait "$AGENT_PID" 2>/dev/null || true
    AGENT_PID=""
    if [ "$started" = yes ]; then
        ok "elkeid-agent accepts the $fx TOML"
    else
        bad "elkeid-agent rejected the $fx TOML: $(tail -5 "$out")"
    fi
done

echo "openwrt: $PASS passed, $FAIL failed"
[ "$FAIL" = 0 ]
