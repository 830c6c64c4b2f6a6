#!/usr/bin/env bash
# Resilience benchmarks for the keel gateway, in one run with the same
# pinning (keel on CPU 0, wrk and the backend on CPU 1):
#  1. throughput on a healthy upstream with breakers + retry accounting on
#     (the defaults) versus off, alternating runs, as a ratio (target >= 0.97);
#  2. fail-fast latency with the breaker open (p50/p99 under wrk) versus a
#     request without protection against a hanging upstream (answers after
#     request_timeout) and a refused one.
#
# Usage: bash benches/proxy/resilience.sh
# Knobs: DURATION=10 (seconds per run)  CONNECTIONS=50  ROUNDS=3
set -euo pipefail
cd "$(dirname "$0")/../.."

DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-50}
ROUNDS=${ROUNDS:-3}
BACKEND=127.0.0.1:18181
HANG=127.0.0.1:18189
DEAD=127.0.0.1:18188
ON=127.0.0.1:18182
OFF=127.0.0.1:18183
OPEN=127.0.0.1:18184
OPEN_ADMIN=127.0.0.1:18194
NOPROT=127.0.0.1:18185
WORK=$(mktemp -d /tmp/keel-res-bench.XXXXXX)
PIDS=()

cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT
log() { printf '==> %s\n' "$*" >&2; }

if ! command -v wrk >/dev/null || ! command -v curl >/dev/null; then
    log "installing wrk and curl"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk curl >/dev/null
fi
log "building keel and the backend (release)"
# Two invocations: building the example in the same one would enable the
# dev-dependencies' features in the gateway binary too.
cargo build --release -q -p keel --bin keel
cargo build --release -q -p keel --example bench_backend
BIN=target/release

wait_port() {
    for _ in $(seq 1 200); do
        if (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    echo "error: $1 did not come up" >&2; exit 1
}

keel() { # keel NAME LISTEN UPSTREAM EXTRA [ADMIN]
    local admin=""
    [ -n "${5:-}" ] && admin="admin_listen = \"$5\""
    cat > "$WORK/$1.toml" <<TOML
[server]
listen = "$2"
$admin
workers = 1

[upstreams.backend]
endpoints = ["http://$3"]
request_timeout = "2s"
$4

[[routes]]
path_prefix = "/"
upstream = "backend"

[log]
level = "error"
access_log = false
TOML
    taskset -c 0 "$BIN/keel" serve --config "$WORK/$1.toml" >"$WORK/$1.log" 2>&1 &
    PIDS+=($!)
    wait_port "$2"
}

taskset -c 1 "$BIN/examples/bench_backend" "$BACKEND" >/dev/null &
PIDS+=($!)
wait_port "$BACKEND"
# A hanging upstream: accepts connections, never answers.
python3 - "$HANG" <<'PY' &
import socket, sys, time
host, port = sys.argv[1].split(":")
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, int(port))); s.listen(1024); held = []
while True:
    c, _ = s.accept(); held.append(c)
PY
PIDS+=($!)
wait_port "$HANG"

OFF_KEYS=$'[upstreams.backend.breaker]\nenabled = false\n[upstreams.backend.retry]\nenabled = false'

# --- 1. throughput: on versus off ----------------------------------------------
keel on "$ON" "$BACKEND" ""
keel off "$OFF" "$BACKEND" "$OFF_KEYS"
rps() { taskset -c 1 wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" "http://$1/" | awk '/Requests\/sec/ {print $2}'; }
taskset -c 1 wrk -t1 -c"$CONNECTIONS" -d2s "http://$ON/" >/dev/null
taskset -c 1 wrk -t1 -c"$CONNECTIONS" -d2s "http://$OFF/" >/dev/null
ON_ALL=(); OFF_ALL=()
for round in $(seq 1 "$ROUNDS"); do
    OFF_ALL+=("$(rps "$OFF")")
    ON_ALL+=("$(rps "$ON")")
    log "round $round: off ${OFF_ALL[-1]} req/s, on ${ON_ALL[-1]} req/s"
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
ON_MED=$(median "${ON_ALL[@]}"); OFF_MED=$(median "${OFF_ALL[@]}")
RATIO=$(awk -v a="$ON_MED" -v b="$OFF_MED" 'BEGIN {printf "%.3f", a / b}')

# --- 2. fail-fast latency --------------------------------------------------------
keel open "$OPEN" "$HANG" "" "$OPEN_ADMIN"
curl -s -X POST "http://$OPEN_ADMIN/breakers/backend/melt" >/dev/null
keel noprot "$NOPROT" "$HANG" "$OFF_KEYS"
keel dead "127.0.0.1:18186" "$DEAD" "$OFF_KEYS"
OPEN_LAT=$(taskset -c 1 wrk -t1 -c4 -d"${DURATION}s" --latency "http://$OPEN/" | awk '/^ +50%/ {p50=$2} /^ +99%/ {p99=$2} /Requests\/sec/ {r=$2} END {print p50, p99, r}')
hang_times=()
for _ in 1 2 3; do
    hang_times+=("$(curl -s -o /dev/null -w '%{time_total}' "http://$NOPROT/")")
done
dead_times=()
for _ in $(seq 1 20); do
    dead_times+=("$(curl -s -o /dev/null -w '%{time_total}' "http://127.0.0.1:18186/")")
done

echo
echo "| measurement | value |"
echo "| --- | --- |"
echo "| healthy upstream, breakers + retry on (median of $ROUNDS, req/s) | $ON_MED |"
echo "| healthy upstream, breakers + retry off (median of $ROUNDS, req/s) | $OFF_MED |"
echo "| throughput ratio on/off (target >= 0.97) | $RATIO |"
read -r p50 p99 r <<<"$OPEN_LAT"
echo "| breaker open, fail fast: p50 / p99 (wrk -c4) | $p50 / $p99 ($r req/s) |"
echo "| no protection, hanging upstream (request_timeout 2s), median of 3 | $(median "${hang_times[@]}") s |"
echo "| no protection, refused connection (loopback), median of 20 | $(median "${dead_times[@]}") s |"
