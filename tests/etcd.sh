#!/usr/bin/env bash
# Installs (when missing) and starts/stops a local single-member etcd for
# the cluster tests (center_cluster) and for trying `--etcd` by hand.
#
#   tests/etcd.sh install          # apt-get install etcd-server unless etcd is on PATH
#   eval "$(tests/etcd.sh start)"  # start on free 127.0.0.1 ports, temp data dir, print exports
#   tests/etcd.sh stop             # stop it and remove its data dir
#
# `start` prints `export ELKEID_TEST_ETCD=http://127.0.0.1:PORT` and
# `export ELKEID_TEST_ETCD_BIN=/path/to/etcd` on stdout (everything else goes
# to stderr). The cluster end-to-end test starts its own etcd from
# ELKEID_TEST_ETCD_BIN (it stops and restarts it); ELKEID_TEST_ETCD is for
# anything that just needs one. State (pid, address, data, log) lives in
# $ELKEID_ETCD_STATE (default /tmp/elkeid-etcd).
set -euo pipefail

STATE=${ELKEID_ETCD_STATE:-/tmp/elkeid-etcd}

log() { echo "etcd: $*" >&2; }

etcd_bin() {
    if [[ -n ${ELKEID_TEST_ETCD_BIN:-} && -x ${ELKEID_TEST_ETCD_BIN} ]]; then
        echo "$ELKEID_TEST_ETCD_BIN"
    elif command -v etcd >/dev/null 2>&1; then
        command -v etcd
    else
        return 1
    fi
}

install() {
    if bin=$(etcd_bin); then
        log "etcd already installed: $bin"
        return 0
    fi
    log "installing etcd-server (Debian)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y etcd-server >&2 || { apt-get update >&2 && apt-get install -y etcd-server >&2; }
    # Debian's package may start a system etcd on :2379; the tests use their own ports.
}

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start() {
    install
    local bin port peer addr
    bin=$(etcd_bin)
    mkdir -p "$STATE"
    if [[ -f $STATE/pid ]] && kill -0 "$(cat "$STATE/pid")" 2>/dev/null; then
        addr=$(cat "$STATE/addr")
        log "already running (pid $(cat "$STATE/pid")) on $addr"
    else
        port=""
        for p in $(seq 22379 22479); do
            if port_free "$p" && port_free $((p + 1000)); then port=$p; break; fi
        done
        [[ -n $port ]] || { log "no free port in 22379..22479"; exit 1; }
        peer=$((port + 1000))
        addr=http://127.0.0.1:$port
        rm -rf "$STATE/data"
        setsid "$bin" --name elkeid-test --data-dir "$STATE/data" \
            --listen-client-urls "$addr" --advertise-client-urls "$addr" \
            --listen-peer-urls "http://127.0.0.1:$peer" \
            --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
            --initial-cluster "elkeid-test=http://127.0.0.1:$peer" \
            </dev/null >"$STATE/log" 2>&1 &
        echo $! >"$STATE/pid"
        echo "$addr" >"$STATE/addr"
        for _ in $(seq 1 100); do
            if curl -sf -X POST "$addr/v3/kv/range" -d '{"key":"AA=="}' >/dev/null 2>&1; then break; fi
            if ! kill -0 "$(cat "$STATE/pid")" 2>/dev/null; then
                log "etcd exited; its log:"; cat "$STATE/log" >&2; exit 1
            fi
            sleep 0.1
        done
        log "started etcd (pid $(cat "$STATE/pid")) on $addr, log $STATE/log"
    fi
    echo "export ELKEID_TEST_ETCD=$addr"
    echo "export ELKEID_TEST_ETCD_BIN=$bin"
}

stop() {
    if [[ -f $STATE/pid ]]; then
        local pid
        pid=$(cat "$STATE/pid")
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -9 "$pid" 2>/dev/null || true
            log "stopped etcd (pid $pid)"
        fi
        rm -rf "$STATE/pid" "$STATE/addr" "$STATE/data"
    fi
}

case ${1:-} in
    install) install ;;
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 install | start | stop" >&2; exit 2 ;;
esac
