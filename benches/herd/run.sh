#!/usr/bin/env bash
# Reconnect-storm benchmark: a keel gateway in front of two in-process
# WebSocket upstreams (blue, green), N clients from many 127.x.y.z source
# addresses, blue drained through the admin API, reconnects counted at
# green per 100 ms until all are back. Also: how many idle tunnels one
# gateway holds and the gateway's RSS per idle tunnel.
#
# Usage: bash benches/herd/run.sh
# Knobs: CLIENTS=8000 (herd runs)  HOLD=9500 (hold runs). About 3 minutes.
# Loopback only; every wait in the tool is bounded (two minutes at most per
# phase), and each run is under `timeout`.
set -euo pipefail
cd "$(dirname "$0")/../.."

# Each tunnel costs the gateway two descriptors and this tool two more
# (client and upstream side). Raise the soft limit to the hard one, and the
# hard one too when allowed (root with CAP_SYS_RESOURCE, up to fs.nr_open).
HOLD=${HOLD:-9500}
WANT=$(( HOLD * 2 + 1000 ))
ulimit -Hn "$WANT" 2>/dev/null || echo "cannot raise the hard open-file limit above $(ulimit -Hn)" >&2
ulimit -n "$(ulimit -Hn)"
LIMIT=$(ulimit -n)
MAX=$(( (LIMIT - 500) / 2 ))
[ "$HOLD" -gt "$MAX" ] && HOLD=$MAX
CLIENTS=${CLIENTS:-8000}
[ "$CLIENTS" -gt "$MAX" ] && CLIENTS=$MAX
echo "open-file limit $LIMIT: hold $HOLD, herd $CLIENTS" >&2

# Built separately: an example build enables dev-dependency features
# (tokio test-util) that must not reach the measured gateway binary.
cargo build --release -q -p keel --bin keel
cargo build --release -q -p keel --example herd
herd() { timeout 300 target/release/examples/herd --keel target/release/keel --sources 50 "$@"; }

echo "== hold: $HOLD idle tunnels, one worker, then two"
herd --mode hold --clients "$HOLD" --workers 1
herd --mode hold --clients "$HOLD" --workers 2
echo "== hold: $HOLD idle tunnels opened one at a time (heap of concurrent handshakes not counted)"
herd --mode hold --clients "$HOLD" --workers 1 --in-flight 1

for mode in immediate fixed jitter; do
    echo "== abrupt close (all at once, no pacing), clients: $mode"
    herd --mode "$mode" --clients "$CLIENTS" --batch-size "$CLIENTS" --batch-interval-ms 100 \
        --drain-jitter false --window-ms 5000 --fixed-delay-ms 1000
done
for mode in immediate fixed jitter; do
    echo "== paced close (1000 every 500 ms, jitter), clients: $mode"
    herd --mode "$mode" --clients "$CLIENTS" --batch-size 1000 --batch-interval-ms 500 \
        --window-ms 5000 --fixed-delay-ms 1000
done
echo "== gradual close over 20 s, hint window 10 s, clients: jitter"
herd --mode jitter --clients "$CLIENTS" --strategy gradual --gradual-over-ms 20000 --window-ms 10000
