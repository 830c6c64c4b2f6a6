# Shell functions shared by the gateway benches (idempotency.sh,
# renewal.sh). Source it; it defines functions only. Every loop is bounded.

log() { printf '==> %s\n' "$*" >&2; }

ensure_wrk() {
    if ! command -v wrk >/dev/null; then
        log "installing wrk"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
    fi
}

# wait_port HOST:PORT [TRIES]: until something accepts there (TRIES x 50 ms,
# default 200).
wait_port() {
    for _ in $(seq 1 "${2:-200}"); do
        if (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    echo "error: $1 did not come up" >&2; exit 1
}

# port_free HOST:PORT: nothing listens there yet.
port_free() {
    ! (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null
}

# wait_ready ADMIN_HOST:PORT [TRIES]: until keel's /readyz answers 200 (the
# store is connected).
wait_ready() {
    for _ in $(seq 1 "${2:-200}"); do
        if curl -sf --max-time 2 "http://$1/readyz" >/dev/null; then return 0; fi
        sleep 0.05
    done
    echo "error: keel did not become ready" >&2; exit 1
}

# write_keyed_lua FILE: a wrk script POSTing the same JSON body with a fresh
# Idempotency-Key per request (run id + counter), built in the Lua
# request() hook so that a route ignoring the header pays the same wrk cost.
write_keyed_lua() {
    cat > "$1" <<'LUA'
wrk.method = "POST"
wrk.body = '{"amount":100,"currency":"EUR"}'
wrk.headers["Content-Type"] = "application/json"
math.randomseed(os.time())
local run = tostring(os.time()) .. "-" .. tostring(math.random(1, 1000000000))
local n = 0
request = function()
  n = n + 1
  wrk.headers["Idempotency-Key"] = run .. "-" .. n
  return wrk.format()
end
LUA
}

# cpu_ticks PID: user + system clock ticks the process has used.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# stop PID TRIES [TARGET]: SIGTERM to TARGET (default PID), then up to
# TRIES x 0.1 s for PID to exit (keel drains first, valgrind writes its
# output, strace its summary once its tracee is gone); SIGKILL and fail
# past that.
stop() {
    local state
    kill -TERM "${3:-$1}" 2>/dev/null || true
    for _ in $(seq 1 "$2"); do
        state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null || echo gone)
        if [ "$state" = Z ] || [ "$state" = gone ]; then
            wait "$1" 2>/dev/null || true
            return 0
        fi
        sleep 0.1
    done
    kill -KILL "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
    echo "error: pid $1 did not stop on SIGTERM" >&2
    return 1
}
