#!/usr/bin/env bash
# Idempotent POST throughput through keel, as a ratio of the same POST with
# idempotency off, for the memory and embedded stores. Every idempotent
# request carries a fresh Idempotency-Key (a wrk Lua script numbers them),
# so each one is a new claim plus a stored response: the worst case for
# the store. The embedded store runs twice: as configured by default and
# with durable_claims = false. Same pinning as run.sh: keel on CPU 0, wrk
# and the backend on CPU 1.
#
# Usage: bash benches/proxy/idempotency.sh
# Knobs: DURATION=10 (seconds per run)  CONNECTIONS=50
# Loopback only; every loop below is bounded.
set -euo pipefail
cd "$(dirname "$0")/../.."

DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-50}
BACKEND=127.0.0.1:18181
KEEL=127.0.0.1:18182
KEEL_ADMIN=127.0.0.1:18192
WORK=$(mktemp -d /tmp/keel-idem-bench.XXXXXX)
PIDS=()

cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

. benches/proxy/lib.sh

ensure_wrk
log "building keel and the backend (release)"
# Built separately: an example build enables dev-dependency features
# (tokio test-util) that must not reach the measured gateway binary.
[ -n "${SKIP_BUILD:-}" ] || cargo build --release -q -p keel --bin keel
[ -n "${SKIP_BUILD:-}" ] || cargo build --release -q -p keel --example bench_backend
BIN=target/release

taskset -c 1 "$BIN/examples/bench_backend" "$BACKEND" >/dev/null &
PIDS+=($!)
wait_port "$BACKEND"

# The same POST through the same Lua request() hook (wrk builds each
# request in Lua, which costs wrk time too, so both runs pay it), with a
# fresh Idempotency-Key each: the "off" route ignores the header.
write_keyed_lua "$WORK/keyed.lua"

TCK=$(getconf CLK_TCK)

# rps NAME URL LUA PID -> "req/s cpu_us_per_request" (keel's user+sys
# CPU from /proc divided by requests served: robust to a busy machine)
rps() {
    local name=$1 url=$2 lua=$3 pid=$4 before after requests
    taskset -c 1 wrk -t1 -c"$CONNECTIONS" -d2s -s "$lua" "$url" >/dev/null  # warm-up
    before=$(cpu_ticks "$pid")
    taskset -c 1 wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --latency -s "$lua" "$url" >"$WORK/wrk-$name.txt"
    after=$(cpu_ticks "$pid")
    if grep -q "Non-2xx" "$WORK/wrk-$name.txt"; then
        echo "warning: $name had errors: $(grep Non-2xx "$WORK/wrk-$name.txt")" >&2
    fi
    requests=$(awk '/requests in/ {print $1}' "$WORK/wrk-$name.txt")
    awk '/^Requests\/sec:/ {printf "%.0f ", $2}' "$WORK/wrk-$name.txt"
    awk -v t=$((after - before)) -v hz="$TCK" -v n="$requests" 'BEGIN {printf "%.1f", t / hz * 1e6 / n}'
}
p99() {
    awk '$1 == "99%" {print $2}' "$WORK/wrk-$1.txt"
}

# bench STORE_TOML NAME -> "off_rps on_rps off_p99 on_p99 off_cpu on_cpu"
bench() {
    local store=$1 name=$2
    cat > "$WORK/keel-$name.toml" <<TOML
[server]
listen = "$KEEL"
admin_listen = "$KEEL_ADMIN"
workers = 1

$store

[upstreams.backend]
endpoints = ["http://$BACKEND"]

[[routes]]
name = "off"
path_prefix = "/off"
upstream = "backend"

[[routes]]
name = "on"
path_prefix = "/on"
upstream = "backend"

[routes.idempotency]
enabled = true

[log]
level = "warn"
access_log = false
TOML
    taskset -c 0 "$BIN/keel" serve --config "$WORK/keel-$name.toml" >"$WORK/keel-$name.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    wait_port "$KEEL"
    wait_ready "$KEEL_ADMIN"
    local off on off_cpu on_cpu
    read -r off off_cpu <<<"$(rps "$name-off" "http://$KEEL/off" "$WORK/keyed.lua" "$pid")"
    read -r on on_cpu <<<"$(rps "$name-on" "http://$KEEL/on" "$WORK/keyed.lua" "$pid")"
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    echo "$off $on $(p99 "$name-off") $(p99 "$name-on") $off_cpu $on_cpu"
}

log "${DURATION}s per run, $CONNECTIONS connections, keel on CPU 0, wrk and backend on CPU 1"
read -r M_OFF M_ON M_OFF_P99 M_ON_P99 M_OFF_CPU M_ON_CPU <<<"$(bench '[store]
kind = "memory"' memory)"
read -r E_OFF E_ON E_OFF_P99 E_ON_P99 E_OFF_CPU E_ON_CPU <<<"$(bench "[store]
kind = \"embedded\"
path = \"$WORK/store\"" embedded)"
read -r F_OFF F_ON F_OFF_P99 F_ON_P99 F_OFF_CPU F_ON_CPU <<<"$(bench "[store]
kind = \"embedded\"
path = \"$WORK/store-fast\"
durable_claims = false" embedded-fast)"

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) print "-"; else printf "%.2f", a / b }'; }

cat <<TABLE

| store | POST, idempotency off (req/s) | POST, fresh key each (req/s) | ratio (target >= 0.85) | p99 off / on | keel CPU per request off / on (us) | CPU ratio off / on |
| --- | ---: | ---: | ---: | --- | --- | ---: |
| memory | $M_OFF | $M_ON | $(ratio "$M_ON" "$M_OFF") | $M_OFF_P99 / $M_ON_P99 | $M_OFF_CPU / $M_ON_CPU | $(ratio "$M_OFF_CPU" "$M_ON_CPU") |
| embedded | $E_OFF | $E_ON | $(ratio "$E_ON" "$E_OFF") | $E_OFF_P99 / $E_ON_P99 | $E_OFF_CPU / $E_ON_CPU | $(ratio "$E_OFF_CPU" "$E_ON_CPU") |
| embedded, durable_claims = false | $F_OFF | $F_ON | $(ratio "$F_ON" "$F_OFF") | $F_OFF_P99 / $F_ON_P99 | $F_OFF_CPU / $F_ON_CPU | $(ratio "$F_OFF_CPU" "$F_ON_CPU") |

wrk -t1 -c$CONNECTIONS -d${DURATION}s with a Lua script numbering keys, keel (workers = 1) pinned to CPU 0, wrk and backend to CPU 1; $(nproc) CPUs, $(uname -r).
TABLE
