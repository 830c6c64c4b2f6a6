#!/usr/bin/env bash
# Idempotent POST through keel with lease renewal (the working tree) against
# a base revision without it (BASE, default 018371d), memory store:
#
#  1. CPU cost per request, repeatable: keel under callgrind, an exact
#     number of fresh-key POSTs and then of replays from a fixed-count
#     client; user-space instructions (Ir) per request from the difference
#     of runs with N and 2N requests (startup and shutdown cancel out).
#  2. Wall clock: wrk with fresh-key POSTs (same Lua as idempotency.sh),
#     base and new alternated for ROUNDS rounds, a fresh keel per run.
#  3. Store round trips per request: keel on a private redis-server (free
#     port, never the shared 6379), commands counted with MONITOR (health
#     probes left out) and INFO commandstats, both revisions.
#
# The base is built in a git worktree at /tmp/keel-bench-base-<sha> with its
# own target dir /tmp/keel-bench-target-<sha>; both are kept, so the next
# run rebuilds nothing (remove them with `git worktree remove --force
# /tmp/keel-bench-base-<sha>` and `rm -rf /tmp/keel-bench-target-<sha>`).
# Pinning as in idempotency.sh: keel on CPU 0, the clients and the backend
# on CPU 1. Callgrind outputs and logs are kept in RESULTS.
#
# Both revisions get the same config (memory store defaults: 1M entries,
# 256 MiB). Every key is kept for its TTL, so a wrk run stores all its keys:
# about 600k at 50k req/s for the 12 s of warm-up and run, within the
# limits; a much longer DURATION can fill the store (new: 503 refusals,
# reported as a warning; base: evictions).
#
# Usage: bash benches/proxy/renewal.sh
# Knobs: BASE=018371d  N=3000 (requests per callgrind step)  ROUNDS=5
#        DURATION=10 (seconds per wrk run)  CONNECTIONS=50  CLIENT_CONNS=4
#        REDIS=auto|1|0  SKIP_BUILD=1  RESULTS=/tmp/keel-renewal-bench
# Loopback only; every loop below is bounded.
set -euo pipefail
cd "$(dirname "$0")/../.."
. benches/proxy/lib.sh

BASE=${BASE:-018371d}
N=${N:-3000}
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-50}
CLIENT_CONNS=${CLIENT_CONNS:-4}
REDIS=${REDIS:-auto}
RESULTS=${RESULTS:-/tmp/keel-renewal-bench}
BACKEND=127.0.0.1:18381
KEEL=127.0.0.1:18382
KEEL_ADMIN=127.0.0.1:18392
WORK=$(mktemp -d /tmp/keel-renewal-bench.XXXXXX)
PIDS=()

cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

for addr in "$BACKEND" "$KEEL" "$KEEL_ADMIN"; do
    port_free "$addr" || { echo "error: $addr is in use" >&2; exit 1; }
done
command -v valgrind >/dev/null || { echo "error: valgrind is not installed" >&2; exit 1; }
ensure_wrk
if [ "$REDIS" = auto ]; then
    if command -v redis-server >/dev/null && command -v redis-cli >/dev/null; then REDIS=1; else REDIS=0; fi
fi

# --- builds --------------------------------------------------------------
BASE_SHA=$(git rev-parse --verify "$BASE^{commit}")
BASE_SHORT=${BASE_SHA:0:7}
BASE_TREE=/tmp/keel-bench-base-$BASE_SHORT
BASE_TARGET=/tmp/keel-bench-target-$BASE_SHORT
NEW_DESC=$(git describe --always --dirty --abbrev=10)
NEW_TARGET=${CARGO_TARGET_DIR:-target}
if [ ! -e "$BASE_TREE/.git" ]; then
    log "git worktree for the base $BASE_SHORT at $BASE_TREE"
    git worktree add -f --detach "$BASE_TREE" "$BASE_SHA" >/dev/null
fi
if [ "$(git -C "$BASE_TREE" rev-parse HEAD)" != "$BASE_SHA" ]; then
    echo "error: $BASE_TREE is not at $BASE_SHA; remove it and run again" >&2; exit 1
fi
if [ -z "${SKIP_BUILD:-}" ]; then
    log "building keel at the base $BASE_SHORT (release, target $BASE_TARGET)"
    (cd "$BASE_TREE" && CARGO_TARGET_DIR="$BASE_TARGET" cargo build --release -q -p keel --bin keel)
    log "building keel at the working tree $NEW_DESC and the backend (release)"
    # Built separately: an example build enables dev-dependency features
    # (tokio test-util) that must not reach the measured gateway binary.
    cargo build --release -q -p keel --bin keel
    cargo build --release -q -p keel --example bench_backend
fi
declare -A KEEL_BIN=([base]="$BASE_TARGET/release/keel" [new]="$NEW_TARGET/release/keel")
BACKEND_BIN=$NEW_TARGET/release/examples/bench_backend
for f in "${KEEL_BIN[@]}" "$BACKEND_BIN"; do
    [ -x "$f" ] || { echo "error: $f is missing (run without SKIP_BUILD)" >&2; exit 1; }
done
rm -rf "$RESULTS"
mkdir -p "$RESULTS"

# --- shared pieces -------------------------------------------------------
taskset -c 1 "$BACKEND_BIN" "$BACKEND" >/dev/null &
PIDS+=($!)
wait_port "$BACKEND"
write_keyed_lua "$WORK/keyed.lua"

# The fixed-count client: phases new:K (the next K keys of PREFIX, each a
# fresh claim) and replay:K (keys 0..K-1 again), spread over CONNS
# keep-alive connections. Every answer must be 200, a replay marked by
# Idempotent-Replayed and a new key not; anything else fails the run.
client() { # client PREFIX PHASE... (pinned next to the backend)
    taskset -c 1 python3 benches/proxy/client.py "$KEEL" /on "$1" "$CLIENT_CONNS" "${@:2}"
}

write_config() { # write_config FILE STORE_TOML
    cat > "$1" <<TOML
[server]
listen = "$KEEL"
admin_listen = "$KEEL_ADMIN"
workers = 1

$2

[upstreams.backend]
endpoints = ["http://$BACKEND"]

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
}
write_config "$WORK/memory.toml" '[store]
kind = "memory"'


# --- 1. callgrind ----------------------------------------------------------
# cg_run REV NEW REPLAY: sets CG_IR to the total Ir of one keel process
# serving NEW fresh keys then REPLAY replays, from start to exit. (Run in
# this shell, not in $(...), so that a failure leaves no keel behind.)
cg_run() {
    local rev=$1 new=$2 replay=$3 name out pid
    name=cg-$rev-$new-$replay
    out=$RESULTS/callgrind.$name.out
    taskset -c 0 valgrind --tool=callgrind --callgrind-out-file="$out" \
        "${KEEL_BIN[$rev]}" serve --config "$WORK/memory.toml" >"$RESULTS/$name.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    wait_port "$KEEL" 2400
    wait_ready "$KEEL_ADMIN" 2400
    client "$name-$RANDOM" "new:$new" "replay:$replay"
    stop "$pid" 1200
    CG_IR=$(awk '$1 == "totals:" {t = $2} $1 == "summary:" {s = $2} END {print (t != "" ? t : s)}' "$out")
    [ -n "$CG_IR" ] || { echo "error: no totals in $out" >&2; exit 1; }
}
per_request() { awk -v a="$1" -v b="$2" -v n="$3" 'BEGIN {printf "%.0f", (b - a) / n}'; }
declare -A IR_NEW IR_REPLAY
for rev in base new; do
    log "callgrind, $rev: $N, then $((2 * N)) fresh keys, then $((2 * N)) keys and $N replays"
    cg_run "$rev" "$N" 0
    one=$CG_IR
    cg_run "$rev" "$((2 * N))" 0
    two=$CG_IR
    cg_run "$rev" "$((2 * N))" "$N"
    replays=$CG_IR
    IR_NEW[$rev]=$(per_request "$one" "$two" "$N")
    IR_REPLAY[$rev]=$(per_request "$two" "$replays" "$N")
    log "$rev: totals $one / $two / $replays Ir -> ${IR_NEW[$rev]} Ir per new key, ${IR_REPLAY[$rev]} per replay"
done

# --- 2. wall clock -----------------------------------------------------------
TCK=$(getconf CLK_TCK)
# wall_run REV ROUND: sets W_RPS (req/s) and W_CPU (keel's user+sys CPU
# per request, us, from /proc), a fresh keel each run.
wall_run() {
    local rev=$1 round=$2 name pid before after requests
    name=wrk-$rev-$round
    taskset -c 0 "${KEEL_BIN[$rev]}" serve --config "$WORK/memory.toml" >"$RESULTS/$name.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    wait_port "$KEEL"
    wait_ready "$KEEL_ADMIN"
    taskset -c 1 wrk -t1 -c"$CONNECTIONS" -d2s -s "$WORK/keyed.lua" "http://$KEEL/on" >/dev/null # warm-up
    before=$(cpu_ticks "$pid")
    taskset -c 1 wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" -s "$WORK/keyed.lua" "http://$KEEL/on" >"$RESULTS/$name.txt"
    after=$(cpu_ticks "$pid")
    stop "$pid" 300
    if grep -q "Non-2xx\|Socket errors" "$RESULTS/$name.txt"; then
        echo "warning: $name had errors: $(grep 'Non-2xx\|Socket errors' "$RESULTS/$name.txt" | tr '\n' ' ')" >&2
    fi
    requests=$(awk '/requests in/ {print $1}' "$RESULTS/$name.txt")
    W_RPS=$(awk '/^Requests\/sec:/ {printf "%.0f", $2}' "$RESULTS/$name.txt")
    W_CPU=$(awk -v t=$((after - before)) -v hz="$TCK" -v n="$requests" 'BEGIN {printf "%.1f", t / hz * 1e6 / n}')
    [ -n "$W_RPS" ] || { echo "error: no req/s in $RESULTS/$name.txt" >&2; exit 1; }
}
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{v[NR] = $1} END {print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2)}'; }
RPS_BASE="" RPS_NEW="" CPU_BASE="" CPU_NEW="" RATIOS="" ROUND_ROWS=""
for round in $(seq 1 "$ROUNDS"); do
    log "wall clock round $round/$ROUNDS: base, then new (${DURATION}s each, $CONNECTIONS connections)"
    wall_run base "$round"
    b=$W_RPS bc=$W_CPU
    wall_run new "$round"
    n=$W_RPS nc=$W_CPU
    r=$(awk -v a="$n" -v b="$b" 'BEGIN {printf "%.3f", a / b}')
    RPS_BASE+="$b " RPS_NEW+="$n " CPU_BASE+="$bc " CPU_NEW+="$nc " RATIOS+="$r "
    ROUND_ROWS+="| $round | $b | $n | $r | $bc / $nc |"$'\n'
    log "round $round: base $b req/s ($bc us CPU), new $n req/s ($nc us CPU), ratio $r"
done
RATIO_MEDIAN=$(median <<<"$RATIOS")
RATIO_RANGE="$(tr ' ' '\n' <<<"$RATIOS" | grep -v '^$' | sort -g | head -1)-$(tr ' ' '\n' <<<"$RATIOS" | grep -v '^$' | sort -g | tail -1)"

# --- 3. store round trips on a private Redis -------------------------------
declare -A TRIPS_NEW TRIPS_REPLAY EVALSHA_NEW EVALSHA_REPLAY
if [ "$REDIS" = 1 ]; then
    REDIS_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    [ "$REDIS_PORT" != 6379 ] || { echo "error: got port 6379" >&2; exit 1; }
    redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save '' --appendonly no \
        --dir "$WORK" --logfile "$RESULTS/redis.log" &
    PIDS+=($!)
    wait_port "127.0.0.1:$REDIS_PORT"
    rcli() { redis-cli -h 127.0.0.1 -p "$REDIS_PORT" "$@"; }
    evalsha_calls() { rcli INFO commandstats | tr -d '\r' | awk -F'[:=,]' '$1 == "cmdstat_evalsha" {print $3} END {}' | grep . || echo 0; }
    write_config "$WORK/redis.toml" "[store]
kind = \"redis\"
url = \"redis://127.0.0.1:$REDIS_PORT/\""
    for rev in base new; do
        log "round trips, $rev: $N fresh keys, then $N replays, on redis at port $REDIS_PORT"
        rcli FLUSHALL >/dev/null
        taskset -c 0 "${KEEL_BIN[$rev]}" serve --config "$WORK/redis.toml" >"$RESULTS/redis-$rev.log" 2>&1 &
        pid=$!
        PIDS+=("$pid")
        wait_port "$KEEL"
        wait_ready "$KEEL_ADMIN"
        # Warm-up: the first use of each script on the server costs a
        # NOSCRIPT answer and a SCRIPT LOAD, once per server.
        client "rt-$rev-warm-$RANDOM" "new:$CLIENT_CONNS" "replay:$CLIENT_CONNS"
        mon=$RESULTS/monitor-$rev.txt
        redis-cli -h 127.0.0.1 -p "$REDIS_PORT" MONITOR >"$mon" &
        mon_pid=$!
        PIDS+=("$mon_pid")
        for _ in $(seq 1 100); do
            rcli ECHO bench-start >/dev/null
            grep -q '"bench-start"' "$mon" && break
            sleep 0.05
        done
        grep -q '"bench-start"' "$mon" || { echo "error: MONITOR did not attach" >&2; exit 1; }
        prefix=rt-$rev-$RANDOM
        e0=$(evalsha_calls)
        client "$prefix" "new:$N"
        e1=$(evalsha_calls)
        rcli ECHO bench-replays >/dev/null
        client "$prefix" "replay:$N"
        e2=$(evalsha_calls)
        rcli ECHO bench-end >/dev/null
        for _ in $(seq 1 100); do
            grep -q '"bench-end"' "$mon" && break
            sleep 0.05
        done
        kill "$mon_pid" 2>/dev/null || true
        wait "$mon_pid" 2>/dev/null || true
        stop "$pid" 300
        # Commands from keel's connections between the markers, without
        # the health probe (a claim and a release on keel-health:<pid>
        # every second) and without the commands a script runs inside
        # Redis (MONITOR shows those as "[0 lua]").
        read -r c_new c_replay <<<"$(awk '
            /"bench-start"/ {phase = 1; next}
            /"bench-replays"/ {phase = 2; next}
            /"bench-end"/ {phase = 0; next}
            phase && $3 != "lua]" && !/keel-health/ && tolower($4) !~ /"(echo|info)"/ {c[phase]++}
            END {print c[1] + 0, c[2] + 0}' "$mon")"
        grep -v '"bench-\|keel-health\| lua\] ' "$mon" | awk '{print toupper($4)}' | sort | uniq -c >"$RESULTS/monitor-$rev.commands"
        TRIPS_NEW[$rev]=$(awk -v c="$c_new" -v n="$N" 'BEGIN {printf "%.2f", c / n}')
        TRIPS_REPLAY[$rev]=$(awk -v c="$c_replay" -v n="$N" 'BEGIN {printf "%.2f", c / n}')
        EVALSHA_NEW[$rev]=$((e1 - e0))
        EVALSHA_REPLAY[$rev]=$((e2 - e1))
        log "$rev: $c_new commands for $N new keys, $c_replay for $N replays (EVALSHA in commandstats, probes included: $((e1 - e0)) / $((e2 - e1)))"
    done
fi

# --- table -----------------------------------------------------------------
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.3f", a / b}'; }
MB=$(median <<<"$RPS_BASE") MN=$(median <<<"$RPS_NEW")
CB=$(median <<<"$CPU_BASE") CN=$(median <<<"$CPU_NEW")
cat <<TABLE

| measure | base $BASE_SHORT | new $NEW_DESC | new / base |
| --- | ---: | ---: | ---: |
| callgrind Ir per new-key POST | ${IR_NEW[base]} | ${IR_NEW[new]} | $(ratio "${IR_NEW[new]}" "${IR_NEW[base]}") |
| callgrind Ir per replay | ${IR_REPLAY[base]} | ${IR_REPLAY[new]} | $(ratio "${IR_REPLAY[new]}" "${IR_REPLAY[base]}") |
| wrk fresh-key POST req/s, median of $ROUNDS | $MB | $MN | $RATIO_MEDIAN (median of rounds; $RATIO_RANGE) |
| keel CPU per request (us), median of $ROUNDS | $CB | $CN | $(ratio "$CN" "$CB") |
TABLE
if [ "$REDIS" = 1 ]; then
    cat <<TABLE
| Redis commands per new request (MONITOR, probes excluded) | ${TRIPS_NEW[base]} | ${TRIPS_NEW[new]} | |
| Redis commands per replay (MONITOR, probes excluded) | ${TRIPS_REPLAY[base]} | ${TRIPS_REPLAY[new]} | |
| EVALSHA calls in INFO commandstats, $N new / $N replays (probes included) | ${EVALSHA_NEW[base]} / ${EVALSHA_REPLAY[base]} | ${EVALSHA_NEW[new]} / ${EVALSHA_REPLAY[new]} | |
TABLE
fi
cat <<TABLE

Wall-clock rounds (req/s, keel CPU us per request base / new):

| round | base | new | new / base | CPU base / new |
| --- | ---: | ---: | ---: | --- |
$ROUND_ROWS
callgrind: N=$N fresh keys per step over $CLIENT_CONNS keep-alive connections, Ir(2N) - Ir(N) per request;
wrk -t1 -c$CONNECTIONS -d${DURATION}s, a fresh keel per run; keel (workers = 1) on CPU 0, clients and backend on CPU 1;
$(nproc) CPUs, $(uname -r), load average at the end: $(cut -d' ' -f1-3 /proc/loadavg); ${SECONDS}s in all.
Callgrind outputs and logs: $RESULTS
TABLE
