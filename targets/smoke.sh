#!/usr/bin/env bash
# End-to-end smoke test of a foreign-architecture agent under qemu-user:
#
#   bash targets/smoke.sh aarch64-unknown-linux-musl
#   bash targets/smoke.sh armv7-unknown-linux-musleabihf
#   bash targets/smoke.sh mips-unknown-linux-musl   (also mipsel-, riscv64gc-)
#   bash targets/smoke.sh x86_64-unknown-linux-musl        (native)
#
# 1. builds the host elkeid-center (debug) and, for the target, elkeid-agent
#    and the example plugin (core/src/bin/elkeid-example-plugin.rs);
#    SMOKE_PROFILE=release-small uses the shipped profile for the agent
#    (default: dev; not shared with targets/qemu-test.sh, whose build
#    resolves dependency features with the dev-dependencies', e.g. tokio's
#    test-util, so this compiles the agent's dependencies again);
#    SMOKE_AGENT=<path> runs that agent binary instead (e.g. the shipped
#    target/ship/<target>/elkeid-agent from targets/build.sh, or
#    <target dir>/<target>/debug/elkeid-agent right after qemu-test.sh, as
#    .ci/run does with target/ci-cross);
#    SMOKE_AGENT_LOG="<flags>" replaces the agent's `--log-level debug
#    --foreground` (e.g. SMOKE_AGENT_LOG= for the defaults: info, to the
#    log files only, as the footprint figures are taken);
#    SMOKE_HEARTBEAT=<s> sets the agent's --heartbeat-secs (default 5; 60 is
#    the agent's own default, used for the idle-footprint figure);
#    SMOKE_CENTER=<path> uses that host center; SMOKE_SETTLE=<s> (default 5)
#    is how long the agent idles with both plugins before its footprint is
#    logged; SMOKE_SMAPS=<file> keeps its /proc/<pid>/smaps of that moment;
# 2. packs the plugin as example-1.0.0.tar.gz, served by a local HTTP server
#    on 127.0.0.1, and lists it in the center's components file;
# 3. starts the center (generated dev PKI, NDJSON sink) and the agent under
#    qemu-<arch>-static, over mutual TLS;
# 4. waits until the center's <data-dir>/records/*.ndjson holds, from that
#    agent: a 1000 heartbeat whose `arch` is the emulated machine (aarch64 /
#    armv7l / mips / riscv64; mips and mipsel both say `mips`, so the
#    plugin's ELF header is checked for the byte order too), records of the plugin (data_type 8000, run as a foreign binary
#    through binfmt_misc) and the plugin's 1001 heartbeat; then a task sent
#    through the center's signed HTTP API comes back as the plugin's 6000;
# 5. stops the agent with SIGTERM and expects exit code 0 and the plugin gone.
#
# Needs targets/setup.sh (qemu-user-static, binfmt_misc registration).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=targets/lib.sh
. targets/lib.sh

[ $# -eq 1 ] || die "usage: $0 <target>"
t=$(expand_targets "$1")
case "$t" in *" "*) die "one target at a time" ;; esac
arch=$(uname_arch "$t")
runner=$(qemu_runner "$t")
profile=${SMOKE_PROFILE:-dev}
timeout_s=${SMOKE_TIMEOUT:-300}
start=$(date +%s)

if [ -n "$runner" ]; then
    command -v "$runner" >/dev/null || die "$runner not found: run targets/setup.sh"
    q=${runner%-static}
    # The agent runs under $runner explicitly, but the plugin it execs is a
    # foreign binary too: only binfmt_misc makes that exec work.
    [ "$(head -n1 "/proc/sys/fs/binfmt_misc/$q" 2>/dev/null)" = enabled ] ||
        die "binfmt_misc has no enabled $q entry (the agent could not exec the plugin): run targets/setup.sh"
fi

# --- 1. build ---------------------------------------------------------------
log "building elkeid-center (host) and elkeid-agent + elkeid-example-plugin ($t, $profile)"
# SMOKE_CENTER=<path>: use that host center binary instead of building one.
[ -n "${SMOKE_CENTER:-}" ] || cargo build -q -p elkeid-center --bin elkeid-center
cargo_env "$t"
[ -n "${SMOKE_AGENT:-}" ] ||
    env "${CARGO_ENV[@]}" cargo build -q --profile "$profile" -p elkeid-agent --bin elkeid-agent --target "$t" "${CARGO_EXTRA[@]}"
env "${CARGO_ENV[@]}" cargo build -q -p elkeid-core --bin elkeid-example-plugin --target "$t" "${CARGO_EXTRA[@]}"
pdir=$profile
[ "$profile" = dev ] && pdir=debug
tdir=${CARGO_TARGET_DIR:-target}
center=${SMOKE_CENTER:-$tdir/debug/elkeid-center}
agent=${SMOKE_AGENT:-$tdir/$t/$pdir/elkeid-agent}
plugin=$tdir/$t/debug/elkeid-example-plugin
check_static "$agent"
check_static "$plugin"
build_s=$(( $(date +%s) - start ))

# --- 2. serve the plugin ----------------------------------------------------
TMP=$(mktemp -d "${TMPDIR:-/tmp}/elkeid-smoke-$arch.XXXXXX")
CENTER_PID="" AGENT_PID="" HTTP_PID=""
stop_pid() { # PID: SIGTERM, then SIGKILL after 10 s
    local p=$1
    [ -n "$p" ] || return 0
    kill "$p" 2>/dev/null || return 0
    for _ in $(seq 1 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
}
# Plugin processes (own process group, started by the agent) are found by
# their working directory inside this run's temp dir.
plugin_pids() {
    local p
    for p in /proc/[0-9]*; do
        case "$(readlink "$p/cwd" 2>/dev/null)" in "$TMP"/agent/plugin/*) echo "${p#/proc/}" ;; esac
    done
}
cleanup() {
    local rc=$?
    stop_pid "$AGENT_PID"
    for p in $(plugin_pids); do kill -9 "$p" 2>/dev/null || true; done
    stop_pid "$CENTER_PID"
    stop_pid "$HTTP_PID"
    if [ "$rc" != 0 ]; then
        log "FAILED; logs follow (kept in $TMP)"
        for f in "$TMP/center.log" "$TMP/agent.log" "$TMP"/agent/plugin/example/example.stderr "$TMP/http.log"; do
            [ -f "$f" ] && { echo "----- $f (last 40 lines)"; tail -n 40 "$f"; }
        done
    else
        rm -rf "$TMP"
    fi
}
trap cleanup EXIT

mkdir -p "$TMP/www" "$TMP/pkg" "$TMP/center" "$TMP/agent"
# Two plugins from the same binary (a plugin's name is its directory), so the
# agent's footprint below is measured with two plugins attached.
for name in example example2; do
    cp "$plugin" "$TMP/pkg/$name"
    chmod 0755 "$TMP/pkg/$name"
    tar --owner=0 --group=0 -C "$TMP/pkg" -czf "$TMP/www/$name-1.0.0.tar.gz" "$name"
done
sha=$(sha256sum "$TMP/www/example-1.0.0.tar.gz" | cut -d' ' -f1)
sha2=$(sha256sum "$TMP/www/example2-1.0.0.tar.gz" | cut -d' ' -f1)

python3 -u - "$TMP/www" "$TMP/http.port" >"$TMP/http.log" 2>&1 <<'PY' &
import functools, http.server, sys
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[1])
srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
open(sys.argv[2] + ".tmp", "w").write(str(srv.server_address[1]))
import os; os.rename(sys.argv[2] + ".tmp", sys.argv[2])
srv.serve_forever()
PY
HTTP_PID=$!
for _ in $(seq 1 100); do [ -s "$TMP/http.port" ] && break; sleep 0.1; done
[ -s "$TMP/http.port" ] || die "the HTTP server did not start"
http_port=$(cat "$TMP/http.port")

cat >"$TMP/center/components.json" <<EOF
{"default": [{"name": "example", "type": "tar.gz", "version": "1.0.0", "sha256": "$sha", "signature": "",
  "download_url": ["http://127.0.0.1:$http_port/example-1.0.0.tar.gz"], "detail": "interval=500"},
 {"name": "example2", "type": "tar.gz", "version": "1.0.0", "sha256": "$sha2", "signature": "",
  "download_url": ["http://127.0.0.1:$http_port/example2-1.0.0.tar.gz"], "detail": "interval=500"}]}
EOF

# --- 3. center and agent ----------------------------------------------------
"$center" --data-dir "$TMP/center" --grpc-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 >"$TMP/center.log" 2>&1 &
CENTER_PID=$!
for _ in $(seq 1 300); do [ -s "$TMP/center/listen.json" ] && break; kill -0 "$CENTER_PID" || break; sleep 0.1; done
grpc=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["grpc"])' "$TMP/center/listen.json") ||
    die "the center did not write listen.json"
pki=$TMP/center/pki
log "center on $grpc; agent $agent under ${runner:-native} execution"

agent_start=$(date +%s)
# shellcheck disable=SC2086 # SMOKE_AGENT_LOG is a list of flags
${runner:+"$runner"} "$agent" --server "$grpc" --ca "$pki/ca.crt" --cert "$pki/client.crt" --key "$pki/client.key" \
    --work-dir "$TMP/agent" --heartbeat-secs "${SMOKE_HEARTBEAT:-5}" ${SMOKE_AGENT_LOG---log-level debug --foreground} >"$TMP/agent.log" 2>&1 &
AGENT_PID=$!

# --- 4. what the center received --------------------------------------------
python3 - "$TMP/center/records" "$arch" "$timeout_s" "$AGENT_PID" <<'PY'
import glob, json, os, sys, time
rec_dir, arch, timeout, agent_pid = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
deadline = time.monotonic() + timeout
want = {"heartbeat 1000 with arch=" + arch: None, "plugin records 8000": None, "plugin heartbeat 1001": None}
while True:
    recs = []
    for f in sorted(glob.glob(os.path.join(rec_dir, "*.ndjson"))):
        for line in open(f, encoding="utf-8", errors="replace"):
            try:
                recs.append(json.loads(line))
            except ValueError:
                pass  # a line being written
    hb = [r for r in recs if r.get("data_type") == 1000 and r.get("product") == "elkeid-agent"]
    ours = [r for r in hb if r.get("fields", {}).get("arch") == arch]
    agent_id = ours[0]["agent_id"] if ours else None
    ticks = [r for r in recs if r.get("data_type") == 8000 and r.get("agent_id") == agent_id
             and r.get("fields", {}).get("kind") == "tick"]
    phb = [r for r in recs if r.get("data_type") == 1001 and r.get("agent_id") == agent_id
           and r.get("fields", {}).get("name") == "example"]
    tick_pids = {r["fields"].get("pid") for r in ticks}
    phb_live = [r for r in phb if r["fields"].get("pid") in tick_pids]
    want["heartbeat 1000 with arch=" + arch] = ours[0] if ours else None
    want["plugin records 8000"] = ticks[0] if ticks else None
    want["plugin heartbeat 1001"] = phb_live[0] if phb_live else None
    if all(want.values()):
        break
    try:
        os.kill(agent_pid, 0)
    except OSError:
        sys.exit("smoke: the agent exited early")
    if time.monotonic() > deadline:
        seen = sorted({(r.get("data_type"), r.get("fields", {}).get("arch")) for r in recs}, key=str)
        sys.exit("smoke: timed out; missing: %s; seen (data_type, arch): %s; heartbeat archs: %s"
                 % ([k for k, v in want.items() if not v], seen, [r.get("fields", {}).get("arch") for r in hb]))
    time.sleep(0.5)
h = want["heartbeat 1000 with arch=" + arch]["fields"]
print("smoke: agent %s (%s): arch=%s platform=%s/%s kernel=%s rss=%s; %d plugin records, %d plugin heartbeats"
      % (agent_id, want["heartbeat 1000 with arch=" + arch].get("version"), h.get("arch"), h.get("platform"),
         h.get("platform_version"), h.get("kernel_version"), h.get("rss"), len(ticks), len(phb)))
PY
deliver_s=$(( $(date +%s) - agent_start ))

# Footprint of the connected agent with its two plugins, after a few quiet
# seconds. Under emulation this is the qemu-user process (emulator + guest +
# translated-code cache): an upper bound of what the agent needs natively.
for _ in $(seq 1 100); do
    [ "$(plugin_pids | wc -l)" -ge 2 ] && break
    sleep 0.2
done
sleep "${SMOKE_SETTLE:-5}"
rss=$(awk '/^(VmRSS|VmHWM|Threads):/ { printf "%s %s%s ", $1, $2, ($3 ? " " $3 : "") }' "/proc/$AGENT_PID/status")
log "agent footprint with $(plugin_pids | wc -l) plugin processes (${runner:-native}, $profile): $rss"
# SMOKE_SMAPS=<file>: keep the agent's /proc/<pid>/smaps of that moment (where
# the RSS goes: text pages, heap, thread stacks; docs/BENCHMARKS.md).
[ -z "${SMOKE_SMAPS:-}" ] || cp "/proc/$AGENT_PID/smaps" "$SMOKE_SMAPS"
# Under qemu-user, the guest's own share: qemu-user (7.2, 64-bit host) puts
# the guest's mappings (its binary, heap, mmaps, stack) at guest addresses
# below 0x5000_0000_0000, its own (binary, [heap], translated-code buffer,
# thread stacks) above. The guest's /proc/self/statm is the qemu process's.
if [ -n "$runner" ]; then
    guest=$(awk '/^[0-9a-f]+-[0-9a-f]+ /{ split($1, a, "-"); g = (length(a[1]) < 12 || a[1] < "500000000000") && $6 != "[heap]" }
                 /^Rss:/ { if (g) gr += $2; else qr += $2 }
                 /^Anonymous:/ { if (g) ga += $2 }
                 END { printf "guest mappings Rss %d kB (anonymous %d kB), qemu itself %d kB", gr, ga, qr }' \
        "/proc/$AGENT_PID/smaps")
    log "agent footprint, guest view: $guest"
fi

# A task through the center's signed HTTP API (POST /command/) to the plugin
# (fd 3 under emulation), echoed back as a 6000 record.
python3 - "$TMP/center" "$arch" "$timeout_s" <<'PY'
import glob, hashlib, hmac, json, os, ssl, sys, time, tomllib, urllib.request
data_dir, arch, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
listen = json.load(open(os.path.join(data_dir, "listen.json")))
ak, sk = next(iter(tomllib.load(open(os.path.join(data_dir, "api-keys.toml"), "rb"))["aksk"].items()))
def records():
    out = []
    for f in sorted(glob.glob(os.path.join(data_dir, "records", "*.ndjson"))):
        for line in open(f, encoding="utf-8", errors="replace"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out
agent_id = next(r["agent_id"] for r in records()
                if r.get("data_type") == 1000 and r.get("fields", {}).get("arch") == arch)
token = "smoke-" + arch
body = json.dumps({"agent_id": agent_id, "command": {"task": {
    "data_type": 1234, "name": "example", "data": "hello from " + arch, "token": token}}}).encode()
ts = str(int(time.time()))
to_sign = "\\n".join(["POST", "/command", "", ak, ts, hashlib.sha256(body).hexdigest()])
sig = hmac.new(sk.encode(), to_sign.encode(), hashlib.sha256).hexdigest()
# The API is HTTPS by default, with the center's server certificate (SAN 127.0.0.1).
tls = ssl.create_default_context(cafile=os.path.join(data_dir, "pki", "ca.crt"))
req = urllib.request.Request("https://%s/command/" % listen["http"], data=body, method="POST", headers={
    "Content-Type": "application/json", "AccessKey": ak, "Signature": sig, "TimeStamp": ts})
reply = json.load(urllib.request.urlopen(req, timeout=30, context=tls))
if reply.get("code") != 0:
    sys.exit("smoke: POST /command/ refused: %s" % reply)
deadline = time.monotonic() + timeout
while True:
    echo = [r for r in records() if r.get("data_type") == 6000 and r.get("agent_id") == agent_id
            and r.get("fields", {}).get("token") == token]
    if echo:
        f = echo[0]["fields"]
        if f.get("data") != "hello from " + arch or f.get("plugin") != "example":
            sys.exit("smoke: task echo has the wrong content: %s" % f)
        print("smoke: task %s round-tripped through the %s plugin" % (token, arch))
        break
    if time.monotonic() > deadline:
        sys.exit("smoke: no 6000 echo of task %s" % token)
    time.sleep(0.5)
PY
desc=$(file -b "$TMP/agent/plugin/example/example")
log "the plugin the agent ran: $desc"
want_elf=$(elf_machine "$t")
grep -q "$want_elf" <<<"$desc" || die "the plugin is not a '$want_elf' binary"

# --- 5. graceful stop ------------------------------------------------------
kill -TERM "$AGENT_PID"
rc=0
for _ in $(seq 1 600); do kill -0 "$AGENT_PID" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$AGENT_PID" 2>/dev/null; then die "the agent did not exit within 60 s of SIGTERM"; fi
wait "$AGENT_PID" || rc=$?
AGENT_PID=""
[ "$rc" = 0 ] || die "the agent exited with $rc after SIGTERM"
left=$(plugin_pids)
[ -z "$left" ] || die "plugin processes left after the agent stopped: $left"

log "$t: PASS (build ${build_s}s, first records+heartbeats after ${deliver_s}s, total $(( $(date +%s) - start ))s)"
