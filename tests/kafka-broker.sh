#!/usr/bin/env bash
# Installs (when missing) and starts/stops a local `tansu` Kafka-protocol
# broker for the Kafka sink tests and the center e2e tests.
#
#   tests/kafka-broker.sh install        # cargo install tansu 0.6.0 unless on PATH
#   eval "$(tests/kafka-broker.sh start)" # start on a free 127.0.0.1 port, print exports
#   tests/kafka-broker.sh stop
#
# `start` prints `export ELKEID_TEST_KAFKA=127.0.0.1:PORT` and
# `export ELKEID_TEST_TANSU=/path/to/tansu` on stdout (everything else goes
# to stderr). State (pid, address, log) lives in $ELKEID_KAFKA_STATE
# (default /tmp/elkeid-kafka-broker). In-memory storage: nothing persists.
#
# tansu must be built with `dynostore,libsql`: without them every storage
# engine silently becomes a null engine (produce succeeds, fetch is empty).
set -euo pipefail

TANSU_VERSION=0.6.0
STATE=${ELKEID_KAFKA_STATE:-/tmp/elkeid-kafka-broker}

log() { echo "kafka-broker: $*" >&2; }

tansu_bin() {
    if [[ -n ${ELKEID_TEST_TANSU:-} && -x ${ELKEID_TEST_TANSU} ]]; then
        echo "$ELKEID_TEST_TANSU"
    elif command -v tansu >/dev/null 2>&1; then
        command -v tansu
    elif [[ -x ${CARGO_HOME:-$HOME/.cargo}/bin/tansu ]]; then
        echo "${CARGO_HOME:-$HOME/.cargo}/bin/tansu"
    else
        return 1
    fi
}

install() {
    if bin=$(tansu_bin); then
        log "tansu already installed: $bin"
        return 0
    fi
    log "installing tansu $TANSU_VERSION (several minutes on 2 cores)"
    # A test broker needs no peak speed: a cheaper release profile (no LTO,
    # opt-level 1, many codegen units) roughly halves the build time in CI.
    CARGO_PROFILE_RELEASE_LTO=false \
    CARGO_PROFILE_RELEASE_OPT_LEVEL=1 \
    CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
    CARGO_PROFILE_RELEASE_DEBUG=false \
    CARGO_PROFILE_RELEASE_STRIP=true \
        cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore,libsql >&2
}

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start() {
    install
    local bin port addr
    bin=$(tansu_bin)
    mkdir -p "$STATE"
    if [[ -f $STATE/pid ]] && kill -0 "$(cat "$STATE/pid")" 2>/dev/null; then
        addr=$(cat "$STATE/addr")
        log "already running (pid $(cat "$STATE/pid")) on $addr"
    else
        port=${1:-}
        if [[ -z $port ]]; then
            for p in $(seq 19092 19192); do
                if port_free "$p"; then port=$p; break; fi
            done
        fi
        [[ -n $port ]] || { log "no free port in 19092..19192"; exit 1; }
        addr=127.0.0.1:$port
        setsid "$bin" broker \
            --listener-url "tcp://$addr" \
            --advertised-listener-url "tcp://$addr" \
            --storage-engine memory://tansu/ \
            </dev/null >"$STATE/log" 2>&1 &
        echo $! >"$STATE/pid"
        echo "$addr" >"$STATE/addr"
        for _ in $(seq 1 300); do
            if ! port_free "$port"; then break; fi
            if ! kill -0 "$(cat "$STATE/pid")" 2>/dev/null; then
                log "tansu exited; its log:"; cat "$STATE/log" >&2; exit 1
            fi
            sleep 0.1
        done
        port_free "$port" && { log "tansu did not listen on $addr within 30 s"; cat "$STATE/log" >&2; exit 1; }
        log "started tansu (pid $(cat "$STATE/pid")) on $addr, log $STATE/log"
    fi
    echo "export ELKEID_TEST_KAFKA=$addr"
    echo "export ELKEID_TEST_TANSU=$bin"
}

stop() {
    if [[ -f $STATE/pid ]]; then
        local pid
        pid=$(cat "$STATE/pid")
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -9 "$pid" 2>/dev/null || true
            log "stopped tansu (pid $pid)"
        fi
        rm -f "$STATE/pid" "$STATE/addr"
    fi
}

case ${1:-} in
    install) install ;;
    start) shift; start "${1:-}" ;;
    stop) stop ;;
    *) echo "usage: $0 install | start [PORT] | stop" >&2; exit 2 ;;
esac
