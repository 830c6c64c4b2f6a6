#!/usr/bin/env bash
# Instructions and syscalls per proxied request: keel against nginx and
# HAProxy (issue 17), the CPU figure to quote on a shared machine.
#
# Each proxy runs with one worker, proxies to the same bench backend
# (crates/keel/examples/bench_backend.rs, a 23-byte answer) and is
# measured as one process:
#   keel     [server] workers = 1, access log off, log level warn
#   nginx    worker_processes 1, master_process off (the one process is
#            the worker), daemon off, access_log off, upstream keepalive
#   HAProxy  nbthread 1, foreground (-db), no log lines, http-reuse always
#
#  1. User-space instructions (Ir): the proxy under
#     `valgrind --tool=callgrind --trace-children=no`; a small
#     deterministic client (Python http.client, one thread, CLIENT_CONNS
#     keep-alive connections used in turn, one request in flight, every
#     answer checked: 200, the backend's body, not a replay) sends WARMUP
#     requests, then an exact count; one process serves WARMUP + N, a
#     second WARMUP + 2N, and Ir per request is (Ir(2N) - Ir(N)) / N, so
#     startup, warm-up and shutdown cancel out.
#  2. Syscalls: the same two runs under `strace -f -c` instead (all
#     threads), (calls(2N) - calls(N)) / N, in total and per syscall.
#  3. Where keel's instructions go: exclusive Ir per request of each
#     function (callgrind_annotate --inclusive=no on the N and 2N outputs,
#     difference / N), largest first, in RESULTS/functions-PROXY-KIND.txt
#     (nginx and HAProxy from Debian are stripped: their lists show
#     addresses and libc only), summed by origin (keel, hyper, http,
#     tokio, glibc) in RESULTS/groups-PROXY-KIND.txt.
#
# Request kinds: GET / ; POST / with a 1 KiB JSON body; and, keel only
# (nginx and HAProxy have no such feature), the same POST to an
# idempotent route (memory store) with a fresh Idempotency-Key each.
#
# Installs what it needs when missing (valgrind, strace, nginx, haproxy
# via apt-get); builds keel release (fat LTO: several minutes from cold)
# and the backend. Pinning as run.sh: proxy on CPU 0, client and backend
# on CPU 1 (instruction counts do not depend on it or on the machine's
# load). Callgrind outputs, strace summaries, logs and configs are kept
# in RESULTS.
#
# Usage: bash benches/proxy/instructions.sh
# Knobs: N=3000 (requests per step)  WARMUP=500  CLIENT_CONNS=4
#        PROXIES="keel nginx haproxy"  SKIP_BUILD=1  SKIP_STRACE=1
#        RESULTS=/tmp/keel-instructions-bench
# Loopback only, fixed high ports (18581-18592); every loop is bounded.
set -euo pipefail
cd "$(dirname "$0")/../.."
. benches/proxy/lib.sh

N=${N:-3000}
WARMUP=${WARMUP:-500}
CLIENT_CONNS=${CLIENT_CONNS:-4}
PROXIES=${PROXIES:-keel nginx haproxy}
RESULTS=${RESULTS:-/tmp/keel-instructions-bench}
BACKEND=127.0.0.1:18581
declare -A ADDR=([keel]=127.0.0.1:18582 [nginx]=127.0.0.1:18583 [haproxy]=127.0.0.1:18584)
KEEL_ADMIN=127.0.0.1:18592
WORK=$(mktemp -d /tmp/keel-instructions-bench.XXXXXX)
PIDS=()

cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

for addr in "$BACKEND" "${ADDR[@]}" "$KEEL_ADMIN"; do
    port_free "$addr" || { echo "error: $addr is in use" >&2; exit 1; }
done

# --- what we need ------------------------------------------------------------
missing=()
command -v valgrind >/dev/null && command -v callgrind_annotate >/dev/null || missing+=(valgrind)
[ -n "${SKIP_STRACE:-}" ] || command -v strace >/dev/null || missing+=(strace)
command -v nginx >/dev/null || missing+=(nginx)
command -v haproxy >/dev/null || missing+=(haproxy)
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
command -v python3 >/dev/null || { echo "error: python3 is needed for the client" >&2; exit 1; }

TARGET=${CARGO_TARGET_DIR:-target}
if [ -z "${SKIP_BUILD:-}" ]; then
    log "building keel (release, lto = \"fat\": several minutes from cold) and the backend"
    # Built separately: an example build enables dev-dependency features
    # (tokio test-util) that must not reach the measured gateway binary.
    cargo build --release -q -p keel --bin keel
    cargo build --release -q -p keel --example bench_backend
fi
KEEL_BIN=$TARGET/release/keel
BACKEND_BIN=$TARGET/release/examples/bench_backend
for f in "$KEEL_BIN" "$BACKEND_BIN"; do
    [ -x "$f" ] || { echo "error: $f is missing (run without SKIP_BUILD)" >&2; exit 1; }
done
KEEL_DESC=$(git describe --always --dirty --abbrev=7)
NGINX_VERSION=$(nginx -v 2>&1 | sed 's/^nginx version: //')
HAPROXY_VERSION=$(haproxy -v | head -n1 | awk '{print $3}')
VALGRIND_VERSION=$(valgrind --version)
STRACE_VERSION=$( [ -n "${SKIP_STRACE:-}" ] && echo - || strace -V | head -n1)
rm -rf "$RESULTS"
mkdir -p "$RESULTS"

taskset -c 1 "$BACKEND_BIN" "$BACKEND" >/dev/null &
PIDS+=($!)
wait_port "$BACKEND"

# --- the client ------------------------------------------------------------------
# client.py ADDR KIND WARMUP COUNT CONNS PREFIX: WARMUP then COUNT requests
# of KIND (get: GET /; post: POST / with a 1 KiB body; idem: the same POST
# to /on with Idempotency-Key PREFIX-i, i fresh for every request), one at
# a time, on CONNS keep-alive connections in turn (request i on connection
# i mod CONNS), so every run sends the same bytes in the same order.
cat > "$WORK/client.py" <<'PY'
import http.client, sys
addr, kind, warmup, count, conns, prefix = sys.argv[1:7]
warmup, count, conns = int(warmup), int(count), int(conns)
host, port = addr.rsplit(":", 1)
expected = b"hello from the backend\n"
pad = 1024 - len(b'{"pad":""}')
body = b'{"pad":"' + b"x" * pad + b'"}'
assert len(body) == 1024
connections = [http.client.HTTPConnection(host, int(port), timeout=600) for _ in range(conns)]
bad = []
for i in range(warmup + count):
    conn = connections[i % conns]
    if kind == "get":
        conn.request("GET", "/")
    elif kind == "post":
        conn.request("POST", "/", body, {"Content-Type": "application/json"})
    elif kind == "idem":
        conn.request("POST", "/on", body, {"Content-Type": "application/json",
                                           "Idempotency-Key": f"{prefix}-{i}"})
    else:
        sys.exit(f"client: unknown kind {kind}")
    r = conn.getresponse()
    got = r.read()
    if r.status != 200 or got != expected or r.getheader("idempotent-replayed") is not None:
        bad.append((i, r.status, got[:60], r.getheader("idempotent-replayed")))
        if len(bad) >= 20:
            break
for c in connections:
    c.close()
if bad:
    print(f"client: unexpected answers, first {bad[:5]}", file=sys.stderr)
    sys.exit(1)
PY

# --- the proxies' configs ------------------------------------------------------------
keel_config() { # keel_config FILE [IDEMPOTENT_ROUTE]
    {
        cat <<TOML
[server]
listen = "${ADDR[keel]}"
admin_listen = "$KEEL_ADMIN"
workers = 1
TOML
        if [ -n "${2:-}" ]; then
            printf '\n[store]\nkind = "memory"\n'
        fi
        cat <<TOML

[upstreams.backend]
endpoints = ["http://$BACKEND"]

[[routes]]
name = "on"
path_prefix = "${2:-/}"
upstream = "backend"
TOML
        if [ -n "${2:-}" ]; then
            printf '\n[routes.idempotency]\nenabled = true\n'
        fi
        cat <<TOML

[log]
level = "warn"
access_log = false
TOML
    } >"$1"
}
keel_config "$RESULTS/keel.toml"
keel_config "$RESULTS/keel-idempotent.toml" /on

mkdir -p "$WORK/nginx-tmp"
cat > "$RESULTS/nginx.conf" <<NGINX
worker_processes 1;
master_process off;
daemon off;
pid $WORK/nginx.pid;
error_log $RESULTS/nginx-error.log warn;
events { worker_connections 1024; }
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
        listen ${ADDR[nginx]};
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
NGINX

cat > "$RESULTS/haproxy.cfg" <<HAPROXY
global
    nbthread 1
    maxconn 1024

defaults
    mode http
    option http-keep-alive
    timeout connect 10s
    timeout client 600s
    timeout server 600s
    http-reuse always

frontend fe
    bind ${ADDR[haproxy]}
    default_backend be

backend be
    server backend $BACKEND
HAPROXY

# proxy_cmd PROXY KIND: the command line serving KIND.
proxy_cmd() {
    case $1 in
        keel)
            if [ "$2" = idem ]; then
                echo "$KEEL_BIN serve --config $RESULTS/keel-idempotent.toml"
            else
                echo "$KEEL_BIN serve --config $RESULTS/keel.toml"
            fi ;;
        nginx) echo "nginx -c $RESULTS/nginx.conf" ;;
        haproxy) echo "haproxy -db -f $RESULTS/haproxy.cfg" ;;
    esac
}


# serve PROXY KIND COUNT NAME WRAPPER...: runs the proxy under WRAPPER (its
# pid must be the proxy's own, or its only child's), sends WARMUP + COUNT
# requests, stops the proxy. Run in this shell so that a failure leaves
# nothing behind (the EXIT trap kills PIDS).
serve() {
    local proxy=$1 kind=$2 count=$3 name=$4 pid target child
    # shellcheck disable=SC2046
    taskset -c 0 "${@:5}" $(proxy_cmd "$proxy" "$kind") >"$RESULTS/$name.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    wait_port "${ADDR[$proxy]}" 2400
    if [ "$proxy" = keel ]; then wait_ready "$KEEL_ADMIN" 2400; fi
    taskset -c 1 python3 "$WORK/client.py" "${ADDR[$proxy]}" "$kind" "$WARMUP" "$count" \
        "$CLIENT_CONNS" "$name-$$-$RANDOM"
    # Under strace the pid is strace's: signal the traced proxy, its child,
    # and let strace write its summary when the proxy is gone.
    target=$pid
    if [ "$5" = strace ]; then
        child=$(pgrep -P "$pid" | head -n1 || true)
        [ -n "$child" ] || { echo "error: no traced process under strace $pid" >&2; exit 1; }
        target=$child
        PIDS+=("$target")
    fi
    stop "$pid" 1200 "$target"
}

# cg_run PROXY KIND COUNT: sets CG_IR, the total Ir of one process serving
# WARMUP + COUNT requests of KIND.
cg_run() {
    local name=cg-$1-$2-$3 out
    out=$RESULTS/callgrind.$name.out
    serve "$1" "$2" "$3" "$name" valgrind --tool=callgrind --trace-children=no \
        --callgrind-out-file="$out"
    CG_IR=$(awk '$1 == "totals:" {t = $2} $1 == "summary:" {s = $2} END {print (t != "" ? t : s)}' "$out")
    [ -n "$CG_IR" ] || { echo "error: no totals in $out" >&2; exit 1; }
}
# strace_run PROXY KIND COUNT: sets SC_CALLS, the total syscalls of one
# process (all threads) serving WARMUP + COUNT requests of KIND; the
# summary is RESULTS/strace.PROXY-KIND-COUNT.txt.
strace_run() {
    local name=strace-$1-$2-$3 out
    out=$RESULTS/$name.txt
    serve "$1" "$2" "$3" "$name" strace -f -c -o "$out"
    SC_CALLS=$(awk '$NF == "total" {print $4}' "$out")
    [ -n "$SC_CALLS" ] || { echo "error: no total in $out" >&2; exit 1; }
}
per_request() { awk -v a="$1" -v b="$2" -v n="$3" 'BEGIN {printf "%.0f", (b - a) / n}'; }

# exclusive IR_FILE: "Ir<TAB>function" per function (exclusive Ir, no
# source annotation), file and object names dropped (as split.sh).
exclusive() {
    callgrind_annotate --inclusive=no --threshold=100 --auto=no "$1" 2>/dev/null \
        | awk '/^ *[0-9,]+ .*[^ ]/ && $0 !~ /PROGRAM TOTALS/ {
            line = $0; sub(/^ +/, "", line)
            ir = line; sub(/ .*/, "", ir); gsub(/,/, "", ir)
            fn = line; sub(/^[0-9,]+ +(\([^)]*\) +)?/, "", fn)
            sub(/^[^:]*:/, "", fn); sub(/ \[[^]]*\]$/, "", fn)
            if (fn ~ /^0x[0-9a-f]+$/) fn = "(code without a symbol)"
            sum[fn] += ir }
            END {for (fn in sum) print sum[fn] "\t" fn}'
}
# functions NAME_N NAME_2N OUT: exclusive Ir per request of every function,
# largest first; sets IR_STEADY, the per-request Ir without glibc malloc's
# inner slow paths (_int_malloc, _int_free, malloc_consolidate,
# unlink_chunk), which follow the heap's state and move ~1 % between runs.
functions() {
    exclusive "$RESULTS/callgrind.$1.out" >"$WORK/fn-1.tsv"
    exclusive "$RESULTS/callgrind.$2.out" >"$WORK/fn-2.tsv"
    awk -F'\t' -v n="$N" 'FNR == 1 {f++} {d[$2] += (f == 1 ? -$1 : $1)}
        END {for (k in d) if (d[k] / n >= 0.5 || d[k] / n <= -0.5) printf "%.1f\t%s\n", d[k] / n, k}' \
        "$WORK/fn-1.tsv" "$WORK/fn-2.tsv" | sort -t$'\t' -k1,1 -g -r >"$3"
    IR_STEADY=$(awk -F'\t' -v n="$N" 'FNR == 1 {f++}
        $2 !~ /^(_int_malloc|_int_free|malloc_consolidate|unlink_chunk)/ {t += (f == 1 ? -$1 : $1)}
        END {printf "%.0f", t / n}' "$WORK/fn-1.tsv" "$WORK/fn-2.tsv")
}
# groups FUNCTIONS_FILE OUT: the per-request Ir of a functions list summed
# by where the code comes from (by name: keel's crates, hyper, http and
# httparse, tokio, glibc malloc/free and mem*, the rest).
groups() {
    awk -F'\t' '{
        f = $2
        if (f ~ /keel/) g = "keel crates"
        else if (f ~ /^(_int_|malloc|free|cfree|realloc|calloc|__libc_|__memcpy|__memmove|__memset|__memcmp|memcpy|memmove|unlink_chunk|tcache)/) g = "glibc malloc/free/mem*"
        else if (f ~ /hyper/) g = "hyper"
        else if (f ~ /tokio/) g = "tokio"
        else if (f ~ /http|httparse/) g = "http, httparse"
        else g = "other"
        s[g] += $1; t += $1
    }
    END {for (g in s) printf "%.0f\t%.1f %%\t%s\n", s[g], 100 * s[g] / t, g}' "$1" | sort -t$'\t' -k1,1 -g -r >"$2"
}
# syscalls NAME_N NAME_2N OUT: calls per request of each syscall.
syscalls() {
    awk -v n="$N" 'FNR == 1 {f++}
        $1 ~ /^[0-9.]+$/ && $NF != "total" && $4 ~ /^[0-9]+$/ {d[$NF] += (f == 1 ? -$4 : $4)}
        END {for (k in d) if (d[k] != 0) printf "%.3f\t%s\n", d[k] / n, k}' \
        "$RESULTS/$1.txt" "$RESULTS/$2.txt" | sort -t$'\t' -k1,1 -g -r >"$3"
}

# --- measure ---------------------------------------------------------------------
declare -A IR STEADY SYS
ROWS=()
for proxy in $PROXIES; do
    kinds="get post"
    [ "$proxy" = keel ] && kinds="get post idem"
    for kind in $kinds; do
        log "$proxy $kind: callgrind, $WARMUP + $N, then $WARMUP + $((2 * N)) requests"
        cg_run "$proxy" "$kind" "$N"
        one=$CG_IR
        cg_run "$proxy" "$kind" "$((2 * N))"
        two=$CG_IR
        IR[$proxy-$kind]=$(per_request "$one" "$two" "$N")
        functions "cg-$proxy-$kind-$N" "cg-$proxy-$kind-$((2 * N))" "$RESULTS/functions-$proxy-$kind.txt"
        STEADY[$proxy-$kind]=$IR_STEADY
        groups "$RESULTS/functions-$proxy-$kind.txt" "$RESULTS/groups-$proxy-$kind.txt"
        SYS[$proxy-$kind]=-
        if [ -z "${SKIP_STRACE:-}" ]; then
            log "$proxy $kind: strace -f -c, the same two runs"
            strace_run "$proxy" "$kind" "$N"
            sone=$SC_CALLS
            strace_run "$proxy" "$kind" "$((2 * N))"
            stwo=$SC_CALLS
            SYS[$proxy-$kind]=$(awk -v a="$sone" -v b="$stwo" -v n="$N" 'BEGIN {printf "%.2f", (b - a) / n}')
            syscalls "strace-$proxy-$kind-$N" "strace-$proxy-$kind-$((2 * N))" "$RESULTS/syscalls-$proxy-$kind.txt"
        fi
        log "$proxy $kind: Ir $one / $two -> ${IR[$proxy-$kind]} per request (${STEADY[$proxy-$kind]} without malloc's slow paths), ${SYS[$proxy-$kind]} syscalls per request"
    done
done

# --- table -----------------------------------------------------------------------
label() { case $1 in keel) echo "keel $KEEL_DESC" ;; nginx) echo "nginx $NGINX_VERSION" ;; haproxy) echo "HAProxy $HAPROXY_VERSION" ;; esac; }
kind_label() { case $1 in get) echo "GET" ;; post) echo "POST 1 KiB" ;; idem) echo "idempotent POST 1 KiB, fresh key (memory store)" ;; esac; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (a !~ /^[0-9.]+$/ || b !~ /^[0-9.]+$/ || b == 0) print "-"; else printf "%.2f", a / b}'; }
group() { # 43135 -> 43,135 (anything not a whole number as it is)
    awk -v v="$1" 'BEGIN {if (v !~ /^[0-9]+$/) {print v; exit}
        s = ""; while (length(v) > 3) {s = "," substr(v, length(v) - 2) s; v = substr(v, 1, length(v) - 3)}
        print v s}'
}
{
    echo
    echo "| proxy | request | Ir per request | without malloc's slow paths | keel / this (Ir) | syscalls per request |"
    echo "| --- | --- | ---: | ---: | ---: | ---: |"
    for proxy in $PROXIES; do
        kinds="get post"
        [ "$proxy" = keel ] && kinds="get post idem"
        for kind in $kinds; do
            k=-
            if [ "$proxy" != keel ] && [ -n "${IR[keel-$kind]:-}" ]; then k=$(ratio "${IR[keel-$kind]}" "${IR[$proxy-$kind]}"); fi
            echo "| $(label "$proxy") | $(kind_label "$kind") | $(group "${IR[$proxy-$kind]}") | $(group "${STEADY[$proxy-$kind]}") | $k | ${SYS[$proxy-$kind]} |"
        done
    done
    if [ -n "${IR[keel-idem]:-}" ] && [ -n "${IR[keel-post]:-}" ]; then
        echo
        echo "keel idempotent POST / plain POST: $(ratio "${IR[keel-idem]}" "${IR[keel-post]}")x Ir (target <= 1.25x)."
    fi
    cat <<NOTE

Ir: callgrind, (Ir(WARMUP + 2N) - Ir(WARMUP + N)) / N, N = $N, WARMUP = $WARMUP,
one request at a time over $CLIENT_CONNS keep-alive connections; syscalls: strace -f -c, same method.
$VALGRIND_VERSION, $STRACE_VERSION, $(nproc) CPUs, $(uname -r), load average at the end: $(cut -d' ' -f1-3 /proc/loadavg); ${SECONDS}s in all.
Per-function and per-syscall lists, callgrind outputs, strace summaries, configs and logs: $RESULTS
NOTE
} | tee "$RESULTS/table.md"
