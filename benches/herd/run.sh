#!/usr/bin/env bash
# Reconnect-storm benchmark: a keel gateway in front of two in-process
# WebSocket upstreams (blue, green), N clients from many 127.0.0.x source
# addresses, blue drained through the admin API, reconnects counted at
# green per 100 ms. Also: how many idle tunnels one gateway holds and the
# gateway's RSS per idle tunnel.
#
# Usage: bash benches/herd/run.sh
# Knobs: CLIENTS=20000 (herd runs)  HOLD=100000 (hold run)  WINDOW_MS=5000
#        BATCH=2500 INTERVAL_MS=500 (the drain plan)  FIXED_MS=1000
# Loopback only; every wait in the tool is bounded (at most a few minutes).
set -euo pipefail
cd "$(dirname "$0")/../.."

CLIENTS=${CLIENTS:-20000}
HOLD=${HOLD:-100000}
WINDOW_MS=${WINDOW_MS:-5000}
BATCH=${BATCH:-2500}
INTERVAL_MS=${INTERVAL_MS:-500}
FIXED_MS=${FIXED_MS:-1000}

# Every tunnel costs the gateway two descriptors and this tool two more;
# root may raise the hard limit up to fs.nr_open.
WANT=$(( HOLD * 2 + 10000 ))
NR_OPEN=$(cat /proc/sys/fs/nr_open 2>/dev/null || echo 1048576)
[ "$WANT" -gt "$NR_OPEN" ] && WANT=$NR_OPEN
ulimit -Hn "$WANT" 2>/dev/null || true
ulimit -n "$(ulimit -Hn)"
echo "open-file limit: $(ulimit -n)" >&2

cargo build --release -q -p keel --bin keel --example herd
HERD=target/release/examples/herd
KEEL=target/release/keel

echo "== hold: $HOLD idle tunnels (source addresses 127.1.x.y, 5 upstream ports)"
timeout 900 "$HERD" --keel "$KEEL" --mode hold --clients "$HOLD" --sources 200 --upstream-ports 5 || true

for mode in immediate fixed jitter; do
    echo "== $mode: $CLIENTS clients, drain $BATCH every ${INTERVAL_MS}ms, hint window ${WINDOW_MS}ms"
    timeout 600 "$HERD" --keel "$KEEL" --mode "$mode" --clients "$CLIENTS" --sources 50 \
        --batch-size "$BATCH" --batch-interval-ms "$INTERVAL_MS" \
        --window-ms "$WINDOW_MS" --fixed-delay-ms "$FIXED_MS"
done
