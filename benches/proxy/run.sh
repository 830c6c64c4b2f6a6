#!/usr/bin/env bash
# Side-by-side proxy benchmark: direct to the backend, keel, and nginx
# proxy_pass, in one run with the same pinning (proxy on CPU 0, wrk and the
# backend on CPU 1), then idle WebSocket tunnel memory for keel and nginx.
#
# Usage: bash benches/proxy/run.sh
# Knobs: DURATION=10 (seconds per run)  CONNECTIONS=50  TUNNELS=10000
# Loopback only; every loop below is bounded.
set -euo pipefail
cd "$(dirname "$0")/../.."

DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-50}
TUNNELS=${TUNNELS:-10000}
BACKEND=127.0.0.1:18081
KEEL=127.0.0.1:18082
KEEL_ADMIN=127.0.0.1:18092
NGINX=127.0.0.1:18083
WORK=$(mktemp -d /tmp/keel-bench.XXXXXX)
PIDS=()

cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    if [ -f "$WORK/nginx.pid" ]; then kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true; fi
    wait 2>/dev/null || true
}
trap cleanup EXIT

log() { printf '==> %s\n' "$*" >&2; }

# --- what we need -----------------------------------------------------------
if ! command -v nginx >/dev/null || ! command -v wrk >/dev/null; then
    log "installing nginx and wrk"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx wrk >/dev/null
fi
# Each tunnel costs the proxy two descriptors; stay within the hard limit.
HARD=$(ulimit -Hn)
[ "$HARD" = unlimited ] && HARD=1048576
ulimit -n "$HARD"
# nginx also counts its listeners and cached upstream connections: keep a margin.
MAX_TUNNELS=$(( (HARD - 4000) / 2 ))
if [ "$TUNNELS" -gt "$MAX_TUNNELS" ]; then
    log "open-file hard limit is $HARD: holding $MAX_TUNNELS tunnels instead of $TUNNELS"
    TUNNELS=$MAX_TUNNELS
fi
log "building keel and the benchmark helpers (release)"
# Built separately: an example build enables dev-dependency features
# (tokio test-util) that must not reach the measured gateway binary.
cargo build --release -q -p keel --bin keel
cargo build --release -q -p keel --example bench_backend --example ws_hold
BIN=target/release

wait_port() { # wait_port HOST:PORT
    for _ in $(seq 1 200); do
        if (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    echo "error: $1 did not come up" >&2; exit 1
}

# --- the three targets --------------------------------------------------------
taskset -c 1 "$BIN/examples/bench_backend" "$BACKEND" >/dev/null &
PIDS+=($!)

cat > "$WORK/keel.toml" <<TOML
[server]
listen = "$KEEL"
admin_listen = "$KEEL_ADMIN"
workers = 1

[upstreams.backend]
endpoints = ["http://$BACKEND"]

[[routes]]
path_prefix = "/"
upstream = "backend"

[log]
level = "warn"
access_log = false
TOML
taskset -c 0 "$BIN/keel" serve --config "$WORK/keel.toml" >"$WORK/keel.log" 2>&1 &
KEEL_PID=$!
PIDS+=("$KEEL_PID")

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
    upstream backend {
        server $BACKEND;
        keepalive 64;
    }
    server {
        listen $NGINX;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
        location /ws {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Upgrade \$http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_read_timeout 3600s;
        }
    }
}
NGINX
taskset -c 0 nginx -c "$WORK/nginx.conf" &
NGINX_MASTER=$!
PIDS+=("$NGINX_MASTER")

wait_port "$BACKEND"; wait_port "$KEEL"; wait_port "$NGINX"
NGINX_WORKER=""
for _ in $(seq 1 100); do
    NGINX_WORKER=$(pgrep -P "$NGINX_MASTER" | head -n1 || true)
    [ -n "$NGINX_WORKER" ] && break
    sleep 0.05
done
[ -n "$NGINX_WORKER" ] || { echo "error: no nginx worker" >&2; exit 1; }

TCK=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }  # user sys
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

# to_us VALUE-WITH-UNIT -> microseconds
to_us() {
    awk -v v="$1" 'BEGIN {
        n = v + 0; u = v; sub(/^[0-9.]+/, "", u);
        if (u == "us") m = 1; else if (u == "ms") m = 1000; else if (u == "s") m = 1000000; else m = 1;
        printf "%.0f", n * m }'
}

# run NAME URL PID -> prints "rps p50_us p99_us cpu_us_per_req user_us sys_us"
run() {
    local name=$1 url=$2 pid=$3
    taskset -c 1 wrk -t1 -c"$CONNECTIONS" -d2s "$url" >/dev/null  # warm-up
    local u0=0 s0=0 u1=0 s1=0
    [ -n "$pid" ] && read -r u0 s0 < <(cpu_ticks "$pid")
    taskset -c 1 wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --latency "$url" >"$WORK/wrk-$name.txt"
    [ -n "$pid" ] && read -r u1 s1 < <(cpu_ticks "$pid")
    local requests rps p50 p99
    requests=$(awk '/requests in/ {print $1}' "$WORK/wrk-$name.txt")
    rps=$(awk '/^Requests\/sec:/ {printf "%.0f", $2}' "$WORK/wrk-$name.txt")
    p50=$(to_us "$(awk '$1 == "50%" {print $2}' "$WORK/wrk-$name.txt")")
    p99=$(to_us "$(awk '$1 == "99%" {print $2}' "$WORK/wrk-$name.txt")")
    local cpu="- - -"
    if [ -n "$pid" ]; then
        cpu=$(awk -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v hz="$TCK" -v n="$requests" \
            'BEGIN {f = 1e6 / hz / n; printf "%.1f %.1f %.1f", (u + s) * f, u * f, s * f}')
    fi
    echo "$rps $p50 $p99 $cpu"
}

log "throughput: ${DURATION}s each, $CONNECTIONS connections, wrk+backend on CPU 1, proxy on CPU 0"
read -r D_RPS D_P50 D_P99 _ <<<"$(run direct "http://$BACKEND/" "")"
read -r K_RPS K_P50 K_P99 K_CPU K_USER K_SYS <<<"$(run keel "http://$KEEL/" "$KEEL_PID")"
read -r N_RPS N_P50 N_P99 N_CPU N_USER N_SYS <<<"$(run nginx "http://$NGINX/" "$NGINX_WORKER")"

# --- idle WebSocket tunnels -------------------------------------------------
tunnels() { # tunnels NAME ADDR PID -> prints KiB per tunnel
    local name=$1 addr=$2 pid=$3 before after
    before=$(rss_kib "$pid")
    taskset -c 1 "$BIN/examples/ws_hold" "$addr" "$TUNNELS" 60 >"$WORK/ws-$name.txt" 2>&1 &
    local holder=$!
    for _ in $(seq 1 1200); do
        grep -q '^ready' "$WORK/ws-$name.txt" 2>/dev/null && break
        kill -0 "$holder" 2>/dev/null || break
        sleep 0.1
    done
    if ! grep -q '^ready' "$WORK/ws-$name.txt"; then
        echo "warning: $name could not hold $TUNNELS tunnels: $(cat "$WORK/ws-$name.txt")" >&2
        kill "$holder" 2>/dev/null || true
        wait "$holder" 2>/dev/null || true
        echo "failed"
        return
    fi
    sleep 1  # let the last upgrades settle before reading RSS
    after=$(rss_kib "$pid")
    kill "$holder" 2>/dev/null || true
    wait "$holder" 2>/dev/null || true
    awk -v a="$after" -v b="$before" -v n="$TUNNELS" 'BEGIN {printf "%.2f", (a - b) / n}'
}
log "throughput (keel / nginx): req/s $K_RPS / $N_RPS, CPU per request $K_CPU / $N_CPU us"
log "idle tunnels: $TUNNELS WebSocket connections held through each proxy"
K_WS=$(tunnels keel "$KEEL" "$KEEL_PID")
N_WS=$(tunnels nginx "$NGINX" "$NGINX_WORKER")

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a !~ /^[0-9.]+$/ || b !~ /^[0-9.]+$/ || b == 0) print "-"; else printf "%.2f", a / b }'; }

cat <<TABLE

| target | req/s | p50 (us) | p99 (us) | proxy CPU per request (us) | of it user / sys (us) | idle tunnel RSS (KiB each) |
| --- | ---: | ---: | ---: | ---: | ---: | ---: |
| direct to backend | $D_RPS | $D_P50 | $D_P99 | - | - | - |
| keel | $K_RPS | $K_P50 | $K_P99 | $K_CPU | $K_USER / $K_SYS | $K_WS |
| nginx proxy_pass | $N_RPS | $N_P50 | $N_P99 | $N_CPU | $N_USER / $N_SYS | $N_WS |
| **keel / nginx** | $(ratio "$K_RPS" "$N_RPS") | $(ratio "$K_P50" "$N_P50") | $(ratio "$K_P99" "$N_P99") | $(ratio "$K_CPU" "$N_CPU") | $(ratio "$K_USER" "$N_USER") / $(ratio "$K_SYS" "$N_SYS") | $(ratio "$K_WS" "$N_WS") |

nginx's kernel share of its own CPU per request: $(ratio "$N_SYS" "$N_CPU") (a proxy that paid nginx's kernel cost and no user-space cost at all would be at this ratio).

wrk -t1 -c$CONNECTIONS -d${DURATION}s, keel and nginx pinned to CPU 0, wrk and backend to CPU 1, $TUNNELS tunnels; $(nproc) CPUs, $(uname -r).
TABLE
