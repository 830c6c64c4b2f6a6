#!/usr/bin/env bash
# CPU cost of idle and slow connections, keel against nginx, side by side.
#
# For each kind of connection, CONNECTIONS of them are opened against one
# server and held; after a settling pause the server's CPU time (utime +
# stime of its process(es), from /proc/PID/stat) is read at the start and at
# the end of a WINDOW-second window:
#
#   h1-slowloris  an HTTP/1.1 request head sent one byte per second per
#                 connection, never finished
#   h2-idle       the HTTP/2 preface and an empty SETTINGS frame, then silence
#   h2-partial    "PRI * HTTP/2.0\r\n" (16 of the 24 preface bytes), then silence
#
# Both servers run one worker pinned to CPU 0; the client (Python asyncio)
# runs on CPU 1. Every timeout of both servers is set above the window
# (60 s), so that each holds every connection for the whole window: the
# figure is the cost of holding them, not of closing them. The client
# reports how many connections were still open at the end, and the growth
# of the server's resident memory (VmRSS, all its processes) from before
# the first connection to the start of the window, per connection.
#
# Usage: bash benches/slow_clients/run.sh
# Knobs: CONNECTIONS=2000  WINDOW=10 (seconds)  ROUNDS=1
#        KEEL_BASELINE=/path/to/another/keel  (also measure that binary,
#        e.g. a build from before a change; it gets a config without the
#        newer [server] keys)
# Loopback only; every loop below is bounded.
set -euo pipefail
cd "$(dirname "$0")/../.."

CONNECTIONS=${CONNECTIONS:-2000}
WINDOW=${WINDOW:-10}
ROUNDS=${ROUNDS:-1}
KEEL_BASELINE=${KEEL_BASELINE:-}
KEEL=127.0.0.1:18182
KEEL_ADMIN=127.0.0.1:18192
BASE=127.0.0.1:18184
BASE_ADMIN=127.0.0.1:18194
NGINX_H1=127.0.0.1:18183
NGINX_H2=127.0.0.1:18185
WORK=$(mktemp -d /tmp/keel-slow-bench.XXXXXX)
PIDS=()

cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    if [ -f "$WORK/nginx.pid" ]; then kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true; fi
    wait 2>/dev/null || true
}
trap cleanup EXIT

log() { printf '==> %s\n' "$*" >&2; }

# --- what we need -----------------------------------------------------------
if ! command -v nginx >/dev/null; then
    log "installing nginx"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null
fi
command -v python3 >/dev/null || { echo "error: python3 is needed" >&2; exit 1; }
HARD=$(ulimit -Hn)
[ "$HARD" = unlimited ] && HARD=1048576
ulimit -n "$HARD"
if [ "$CONNECTIONS" -gt $(( HARD - 500 )) ]; then
    CONNECTIONS=$(( HARD - 500 ))
    log "open-file hard limit is $HARD: $CONNECTIONS connections"
fi
log "building keel (release)"
cargo build --release -q -p keel --bin keel
BIN=target/release

wait_port() { # wait_port HOST:PORT
    for _ in $(seq 1 200); do
        if (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    echo "error: $1 did not come up" >&2; exit 1
}

# --- the servers --------------------------------------------------------------
keel_config() { # keel_config LISTEN ADMIN WITH_NEW_KEYS
    cat <<TOML
[server]
listen = "$1"
admin_listen = "$2"
workers = 1
idle_timeout = "60s"
TOML
    if [ "$3" = yes ]; then
        echo 'header_read_timeout = "60s"'
    fi
    # A route is required; no request ever completes, so the upstream (the
    # nginx below) is never asked.
    cat <<TOML

[upstreams.app]
endpoints = ["http://$NGINX_H1"]

[[routes]]
path_prefix = "/"
upstream = "app"

[log]
level = "warn"
access_log = false
TOML
}
keel_config "$KEEL" "$KEEL_ADMIN" yes >"$WORK/keel.toml"
if [ -n "$KEEL_BASELINE" ]; then
    keel_config "$BASE" "$BASE_ADMIN" no >"$WORK/keel-baseline.toml"
fi

# Cleartext HTTP/2: `listen ... http2` before nginx 1.25.1, `http2 on` after.
NGINX_VERSION=$(nginx -v 2>&1 | sed -n 's|.*nginx/\([0-9.]*\).*|\1|p')
if printf '%s\n1.25.1\n' "$NGINX_VERSION" | sort -V -C; then
    H2_LISTEN="listen $NGINX_H2 http2;"
else
    H2_LISTEN="listen $NGINX_H2; http2 on;"
fi
mkdir -p "$WORK/nginx-tmp"
cat > "$WORK/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
user root;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;
worker_rlimit_nofile $HARD;
events { worker_connections $HARD; }
http {
    access_log off;
    client_body_temp_path $WORK/nginx-tmp/body;
    proxy_temp_path $WORK/nginx-tmp/proxy;
    fastcgi_temp_path $WORK/nginx-tmp/fastcgi;
    uwsgi_temp_path $WORK/nginx-tmp/uwsgi;
    scgi_temp_path $WORK/nginx-tmp/scgi;
    # Above the window, like keel's: every connection is held throughout.
    client_header_timeout 60s;
    keepalive_timeout 60s;
    server {
        listen $NGINX_H1;
        location / { return 200 "ok\n"; }
    }
    server {
        $H2_LISTEN
        location / { return 200 "ok\n"; }
    }
}
NGINX

# Each measurement gets a freshly started server, so that memory freed by
# the previous one is not reused (RSS) and nothing left over from it runs
# on CPU 0 (a build from before the sniffer fix kept polling a closed
# partial preface until its idle timeout).
# start NAME -> sets SERVER_PIDS (comma-separated) and SERVER_ADDR_H1/H2
start() {
    case $1 in
    keel | keel-baseline)
        local bin=$BIN/keel config=$WORK/keel.toml addr=$KEEL
        if [ "$1" = keel-baseline ]; then
            bin=$KEEL_BASELINE config=$WORK/keel-baseline.toml addr=$BASE
        fi
        taskset -c 0 "$bin" serve --config "$config" >>"$WORK/$1.log" 2>&1 &
        SERVER_MAIN=$!
        PIDS+=("$SERVER_MAIN")
        wait_port "$addr"
        SERVER_PIDS=$SERVER_MAIN SERVER_ADDR_H1=$addr SERVER_ADDR_H2=$addr
        ;;
    nginx)
        taskset -c 0 nginx -c "$WORK/nginx.conf" &
        SERVER_MAIN=$!
        PIDS+=("$SERVER_MAIN")
        wait_port "$NGINX_H1"; wait_port "$NGINX_H2"
        local worker=""
        for _ in $(seq 1 100); do
            worker=$(pgrep -P "$SERVER_MAIN" | head -n1 || true)
            [ -n "$worker" ] && break
            sleep 0.05
        done
        [ -n "$worker" ] || { echo "error: no nginx worker" >&2; exit 1; }
        SERVER_PIDS=$SERVER_MAIN,$worker SERVER_ADDR_H1=$NGINX_H1 SERVER_ADDR_H2=$NGINX_H2
        ;;
    esac
}
stop() {
    kill "$SERVER_MAIN" 2>/dev/null || true
    wait "$SERVER_MAIN" 2>/dev/null || true
    # nginx's master waits for its worker; keel is one process.
    for _ in $(seq 1 100); do
        (exec 3<>"/dev/tcp/${SERVER_ADDR_H1%:*}/${SERVER_ADDR_H1#*:}") 2>/dev/null || break
        sleep 0.05
    done
}

# --- the client ---------------------------------------------------------------
cat > "$WORK/hold.py" <<'PY'
"""Holds N idle or slow connections and reads the servers' CPU time over a
window. Usage: hold.py HOST PORT MODE N WINDOW PID[,PID...]"""
import asyncio
import json
import os
import random
import sys
import time

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS = bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
SLOW_HEADER = b"X-Slow: yes\r\n"
TICK = os.sysconf("SC_CLK_TCK")

host, port, mode, n, window, pids = sys.argv[1:7]
port, n, window = int(port), int(n), float(window)
pids = [int(p) for p in pids.split(",")]
closed = 0
stop = asyncio.Event()


def rss_kib():
    """Resident memory of the given processes."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            total += next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
    return total


def cpu():
    """(user, sys) seconds of the given processes, all threads."""
    user = system = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        user += int(fields[11])
        system += int(fields[12])
    return user / TICK, system / TICK


async def hold(opened):
    global closed
    reader, writer = await asyncio.open_connection(host, port)
    if mode == "h1-slowloris":
        writer.write(b"GET / HTTP/1.1\r\nHost: bench\r\n")
    elif mode == "h2-idle":
        writer.write(PREFACE + SETTINGS)
    elif mode == "h2-partial":
        writer.write(PREFACE[:16])
    await writer.drain()
    opened.append(writer)

    async def read_until_closed():
        global closed
        while True:
            try:
                data = await reader.read(65536)
            except OSError:
                data = b""
            if not data:
                closed += 1
                return

    reading = asyncio.create_task(read_until_closed())
    if mode == "h1-slowloris":
        # One header byte per second, spread over the second.
        await asyncio.sleep(random.random())
        i = 0
        while not stop.is_set() and not reading.done():
            writer.write(SLOW_HEADER[i % len(SLOW_HEADER):][:1])
            i += 1
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
    else:
        await stop.wait()
    reading.cancel()


async def main():
    opened = []
    tasks = []
    rss_before = rss_kib()
    t0 = time.monotonic()
    for start in range(0, n, 100):
        batch = [asyncio.create_task(hold(opened)) for _ in range(start, min(n, start + 100))]
        tasks += batch
        while len(opened) < min(n, start + 100) and time.monotonic() - t0 < 60:
            if any(t.done() and t.exception() for t in batch):
                break
            await asyncio.sleep(0.01)
    failed = sum(1 for t in tasks if t.done() and t.exception())
    await asyncio.sleep(2)  # settle: every connection past its first bytes
    open_at_start = len(opened) - closed
    rss_held = rss_kib()
    u0, s0 = cpu()
    w0 = time.monotonic()
    await asyncio.sleep(window)
    u1, s1 = cpu()
    wall = time.monotonic() - w0
    open_at_end = len(opened) - closed
    stop.set()
    for w in opened:
        w.close()
    await asyncio.wait(tasks, timeout=10)
    print(json.dumps({
        "mode": mode, "connections": n, "failed": failed,
        "open_at_start": open_at_start, "open_at_end": open_at_end,
        "window_s": round(wall, 2),
        "cpu_ms": round((u1 - u0 + s1 - s0) * 1000),
        "user_ms": round((u1 - u0) * 1000), "sys_ms": round((s1 - s0) * 1000),
        "rss_kib_per_connection": round((rss_held - rss_before) / max(1, open_at_start), 2),
    }))


asyncio.run(asyncio.wait_for(main(), 60 + 2 + window + 30))
PY

# measure NAME MODE -> prints one JSON line
measure() {
    local name=$1 mode=$2 addr out
    start "$name"
    addr=$SERVER_ADDR_H2
    [ "$mode" = h1-slowloris ] && addr=$SERVER_ADDR_H1
    out=$(taskset -c 1 python3 "$WORK/hold.py" "${addr%:*}" "${addr#*:}" "$mode" \
        "$CONNECTIONS" "$WINDOW" "$SERVER_PIDS")
    stop
    echo "$out" | sed "s/^{/{\"server\": \"$name\", /"
}

log "$CONNECTIONS connections per run, ${WINDOW}s window, servers on CPU 0, client on CPU 1"
RESULTS="$WORK/results.jsonl"
for round in $(seq 1 "$ROUNDS"); do
    for mode in h1-slowloris h2-idle h2-partial; do
        log "round $round: $mode"
        measure keel "$mode" | tee -a "$RESULTS"
        if [ -n "$KEEL_BASELINE" ]; then
            measure keel-baseline "$mode" | tee -a "$RESULTS"
        fi
        measure nginx "$mode" | tee -a "$RESULTS"
    done
done

# --- summary ------------------------------------------------------------------
python3 - "$RESULTS" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print()
print("| connections | server | open at start / end | CPU in the window (user / sys) | CPU per connection-second | RSS per connection |")
print("| --- | --- | ---: | ---: | ---: | ---: |")
for r in rows:
    per = r["cpu_ms"] * 1000 / max(1, r["open_at_start"]) / r["window_s"]
    print(f"| {r['mode']} | {r['server']} | {r['open_at_start']} / {r['open_at_end']} "
          f"| {r['cpu_ms']} ms ({r['user_ms']} / {r['sys_ms']}) | {per:.2f} us "
          f"| {r['rss_kib_per_connection']:.2f} KiB |")
PY
