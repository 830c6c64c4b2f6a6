#!/usr/bin/env bash
# The gateway as libraries (issue 16): keel at the working tree against a
# base revision from before the split into crates (BASE, default d122397).
#
#  1. CPU cost per request, repeatable: keel under callgrind, an exact
#     number of requests from a fixed-count client over keep-alive
#     connections; user-space instructions (Ir) per request from the
#     difference of runs with N and 2N requests (startup and shutdown
#     cancel out):
#       (a) plain GET / proxied to the bench backend (run.sh's config);
#       (b) idempotent POST with a fresh key, and its replay, memory store
#           (renewal.sh's config).
#  2. Wall clock: wrk GET / through keel (run.sh's config and pinning),
#     base and new alternated for ROUNDS rounds (base first in odd rounds,
#     new first in even ones, so that a drifting machine favours neither),
#     a fresh keel per run; median req/s and p99 of each and their ratio.
#     Before it, the script waits (up to CI_WAIT seconds, polling every
#     30 s) while a CI run (`bash .ci/run`) is going: it would skew the
#     timings. The callgrind part runs meanwhile (its counts do not move).
#  3. Where the instructions differ: for each measure, the exclusive Ir per
#     request of every function (callgrind_annotate --inclusive=no on the N
#     and 2N outputs, difference / N), new minus base, largest first, in
#     RESULTS/diff-*.txt.
#
# The base is built as renewal.sh does, in a kept git worktree at
# /tmp/keel-bench-base-<sha> with its own target dir
# /tmp/keel-bench-target-<sha> (remove them with `git worktree remove
# --force /tmp/keel-bench-base-<sha>` and `rm -rf
# /tmp/keel-bench-target-<sha>`). Pinning as run.sh: keel on CPU 0, the
# clients, wrk and the backend on CPU 1. Callgrind outputs, wrk outputs and
# logs are kept in RESULTS.
#
# LTO=thin (or fat) builds both revisions' keel with that link-time
# optimisation (CARGO_PROFILE_RELEASE_LTO), in their own target dirs
# (/tmp/keel-bench-target-<sha>-lto-<LTO> and
# /tmp/keel-bench-target-new-lto-<LTO>, or BASE_TARGET / NEW_TARGET): it
# shows what is left of a difference once inlining crosses crate
# boundaries, as it did inside the one gateway crate.
#
# Usage: bash benches/proxy/split.sh
# Knobs: BASE=d122397  N=3000 (requests per callgrind step)  ROUNDS=6
#        DURATION=10 (seconds per wrk run)  CONNECTIONS=50  CLIENT_CONNS=4
#        CI_WAIT=2400 (seconds, 0: do not wait)  SKIP_BUILD=1
#        SKIP_CALLGRIND=1  LTO=  BASE_TARGET=  NEW_TARGET=
#        RESULTS=/tmp/keel-split-bench
# Loopback only; every loop below is bounded.
set -euo pipefail
cd "$(dirname "$0")/../.."
. benches/proxy/lib.sh

BASE=${BASE:-d122397}
N=${N:-3000}
ROUNDS=${ROUNDS:-6}
DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-50}
CLIENT_CONNS=${CLIENT_CONNS:-4}
CI_WAIT=${CI_WAIT:-2400}
RESULTS=${RESULTS:-/tmp/keel-split-bench}
BACKEND=127.0.0.1:18481
KEEL=127.0.0.1:18482
KEEL_ADMIN=127.0.0.1:18492
WORK=$(mktemp -d /tmp/keel-split-bench.XXXXXX)
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
if [ -z "${SKIP_CALLGRIND:-}" ]; then
    for tool in valgrind callgrind_annotate; do
        command -v "$tool" >/dev/null || { echo "error: $tool is not installed" >&2; exit 1; }
    done
fi
ensure_wrk

# --- builds ------------------------------------------------------------------
BASE_SHA=$(git rev-parse --verify "$BASE^{commit}")
BASE_SHORT=${BASE_SHA:0:7}
BASE_TREE=/tmp/keel-bench-base-$BASE_SHORT
NEW_DESC=$(git describe --always --dirty --abbrev=7)
BACKEND_TARGET=${CARGO_TARGET_DIR:-target}
LTO=${LTO:-}
if [ -n "$LTO" ]; then
    BASE_TARGET=${BASE_TARGET:-/tmp/keel-bench-target-$BASE_SHORT-lto-$LTO}
    NEW_TARGET=${NEW_TARGET:-/tmp/keel-bench-target-new-lto-$LTO}
else
    BASE_TARGET=${BASE_TARGET:-/tmp/keel-bench-target-$BASE_SHORT}
    NEW_TARGET=${NEW_TARGET:-$BACKEND_TARGET}
fi
keel_build() { # keel_build TARGET_DIR: the gateway binary, with LTO if asked
    if [ -n "$LTO" ]; then
        CARGO_PROFILE_RELEASE_LTO=$LTO CARGO_TARGET_DIR="$1" cargo build --release -q -p keel --bin keel
    else
        CARGO_TARGET_DIR="$1" cargo build --release -q -p keel --bin keel
    fi
}
if [ ! -e "$BASE_TREE/.git" ]; then
    log "git worktree for the base $BASE_SHORT at $BASE_TREE"
    git worktree add -f --detach "$BASE_TREE" "$BASE_SHA" >/dev/null
fi
if [ "$(git -C "$BASE_TREE" rev-parse HEAD)" != "$BASE_SHA" ]; then
    echo "error: $BASE_TREE is not at $BASE_SHA; remove it and run again" >&2; exit 1
fi
if [ -z "${SKIP_BUILD:-}" ]; then
    log "building keel at the base $BASE_SHORT (release${LTO:+, lto = $LTO}, target $BASE_TARGET)"
    (cd "$BASE_TREE" && keel_build "$BASE_TARGET")
    log "building keel at the working tree $NEW_DESC (release${LTO:+, lto = $LTO}, target $NEW_TARGET) and the backend"
    # Built separately: an example build enables dev-dependency features
    # (tokio test-util) that must not reach the measured gateway binary.
    keel_build "$NEW_TARGET"
    CARGO_TARGET_DIR="$BACKEND_TARGET" cargo build --release -q -p keel --example bench_backend
fi
declare -A KEEL_BIN=([base]="$BASE_TARGET/release/keel" [new]="$NEW_TARGET/release/keel")
BACKEND_BIN=$BACKEND_TARGET/release/examples/bench_backend
for f in "${KEEL_BIN[@]}" "$BACKEND_BIN"; do
    [ -x "$f" ] || { echo "error: $f is missing (run without SKIP_BUILD)" >&2; exit 1; }
done
rm -rf "$RESULTS"
mkdir -p "$RESULTS"

# --- shared pieces -------------------------------------------------------------
taskset -c 1 "$BACKEND_BIN" "$BACKEND" >/dev/null &
PIDS+=($!)
wait_port "$BACKEND"

# The fixed-count client: phases get:K (K plain GETs of /), new:K (the
# next K keys of PREFIX POSTed to /on, each a fresh claim) and replay:K
# (keys 0..K-1 again), spread over CONNS keep-alive connections. Every
# answer must be 200 with the backend's body; a replay must be marked by
# Idempotent-Replayed and a new key not; anything else fails the run.
client() { # client PREFIX PHASE... (pinned next to the backend)
    taskset -c 1 python3 benches/proxy/client.py "$KEEL" /on "$1" "$CLIENT_CONNS" "${@:2}"
}

# run.sh's config (plain GET) and renewal.sh's (an idempotent route, memory
# store), on this script's ports.
cat > "$WORK/plain.toml" <<TOML
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
cat > "$WORK/memory.toml" <<TOML
[server]
listen = "$KEEL"
admin_listen = "$KEEL_ADMIN"
workers = 1

[store]
kind = "memory"

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


# --- 1. callgrind ----------------------------------------------------------------
# cg_run REV CONFIG NAME PHASE...: sets CG_IR to the total Ir of one keel
# process serving PHASEs (client phases), from start to exit; the output is
# RESULTS/callgrind.cg-REV-NAME.out. (Run in this shell, not in $(...), so
# that a failure leaves no keel behind.)
cg_run() {
    local rev=$1 config=$2 name=cg-$1-$3 out pid
    out=$RESULTS/callgrind.$name.out
    taskset -c 0 valgrind --tool=callgrind --callgrind-out-file="$out" \
        "${KEEL_BIN[$rev]}" serve --config "$WORK/$config.toml" >"$RESULTS/$name.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    wait_port "$KEEL" 2400
    wait_ready "$KEEL_ADMIN" 2400
    client "$name-$RANDOM" "${@:4}"
    stop "$pid" 1200
    CG_IR=$(awk '$1 == "totals:" {t = $2} $1 == "summary:" {s = $2} END {print (t != "" ? t : s)}' "$out")
    [ -n "$CG_IR" ] || { echo "error: no totals in $out" >&2; exit 1; }
}
per_request() { awk -v a="$1" -v b="$2" -v n="$3" 'BEGIN {printf "%.0f", (b - a) / n}'; }

# exclusive IR_FILE: "Ir<TAB>function" per function (exclusive Ir, all
# functions, no source annotation). callgrind_annotate names a
# file:function pair (code inlined from another file counts under that
# file) and the object; both differ between the two builds' paths, so
# only the function name is kept and its lines are summed.
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
# per_function_diff NAME_N NAME_2N TITLE: RESULTS/diff-TITLE.txt, the
# exclusive Ir per request of each function at base and new and the
# difference, largest absolute difference first.
per_function_diff() {
    local one=$1 two=$2 title=$3 rev
    for rev in base new; do
        exclusive "$RESULTS/callgrind.cg-$rev-$one.out" >"$WORK/fn-$rev-$one.tsv"
        exclusive "$RESULTS/callgrind.cg-$rev-$two.out" >"$WORK/fn-$rev-$two.tsv"
    done
    # Files in order: base N, base 2N, new N, new 2N.
    awk -F'\t' -v n="$N" '
        FNR == 1 {file++}
        {seen[$2] = 1}
        file == 1 {b[$2] -= $1}
        file == 2 {b[$2] += $1}
        file == 3 {w[$2] -= $1}
        file == 4 {w[$2] += $1}
        END {
            for (f in seen) {
                pb = b[f] / n; pn = w[f] / n; d = pn - pb
                if (d > 0.5 || d < -0.5) printf "%.1f\t%+9.1f\t%9.1f\t%9.1f\t%s\n", (d < 0 ? -d : d), d, pb, pn, f
            }
        }' "$WORK/fn-base-$one.tsv" "$WORK/fn-base-$two.tsv" "$WORK/fn-new-$one.tsv" "$WORK/fn-new-$two.tsv" \
        | sort -t$'\t' -k1,1 -g -r | cut -f2- \
        >"$WORK/diff.tsv"
    {
        echo "# $title: exclusive Ir per request by function, (Ir(2N) - Ir(N)) / N, N = $N"
        echo "# base $BASE_SHORT, new $NEW_DESC; differences under 0.5 Ir left out"
        echo "#"
        echo "# by group (new - base, base, new); keel's functions changed crate and"
        echo "# module names, so compare them by group and by reading the list below:"
        awk -F'\t' '{
            f = $4
            if (f ~ /keel/) g = "keel crates"
            else if (f ~ /^(_int_|malloc|free|cfree|realloc|calloc|__libc_|__memcpy|__memmove|__memset|__memcmp|memcpy|unlink_chunk|tcache)/) g = "libc malloc/free/memcpy"
            else if (f ~ /tokio/) g = "tokio"
            else if (f ~ /hyper/) g = "hyper"
            else if (f ~ /http/) g = "http"
            else g = "other"
            d[g] += $1; b[g] += $2; n[g] += $3; t += $1
        }
        END {
            for (g in d) printf "#   %+9.1f  %9.1f  %9.1f  %s\n", d[g], b[g], n[g], g
            printf "#   %+9.1f  (total of the listed differences)\n", t
        }' "$WORK/diff.tsv"
        echo "#"
        echo "# new - base | base | new | function"
        cat "$WORK/diff.tsv"
    } >"$RESULTS/diff-$title.txt"
}

# steady REV NAME_N NAME_2N: Ir per request without glibc malloc's inner
# slow paths (_int_malloc, _int_free, malloc_consolidate, unlink_chunk).
# Those depend on the heap's state, which depends on how requests from
# the client's connections interleave, and move the per-request figure by
# up to ~1 % from one run to the next; the rest repeats within ~0.2 % for
# GETs and new-key POSTs (~0.9 % for replays).
steady() {
    awk -F'\t' -v n="$N" 'FNR == 1 {f++}
        $2 !~ /^(_int_malloc|_int_free|malloc_consolidate|unlink_chunk)/ {t += (f == 1 ? -$1 : $1)}
        END {printf "%.0f", t / n}' "$WORK/fn-$1-$2.tsv" "$WORK/fn-$1-$3.tsv"
}
declare -A IR_GET IR_NEW IR_REPLAY IR_GET_STEADY IR_NEW_STEADY IR_REPLAY_STEADY
if [ -z "${SKIP_CALLGRIND:-}" ]; then
    for rev in base new; do
        log "callgrind, $rev: $N, then $((2 * N)) GETs"
        cg_run "$rev" plain "get-$N" "get:$N"
        one=$CG_IR
        cg_run "$rev" plain "get-$((2 * N))" "get:$((2 * N))"
        two=$CG_IR
        IR_GET[$rev]=$(per_request "$one" "$two" "$N")
        log "callgrind, $rev: $N, then $((2 * N)) fresh keys, then $((2 * N)) keys and $N replays"
        cg_run "$rev" memory "new-$N" "new:$N"
        pone=$CG_IR
        cg_run "$rev" memory "new-$((2 * N))" "new:$((2 * N))"
        ptwo=$CG_IR
        cg_run "$rev" memory "replay-$N" "new:$((2 * N))" "replay:$N"
        preplay=$CG_IR
        IR_NEW[$rev]=$(per_request "$pone" "$ptwo" "$N")
        IR_REPLAY[$rev]=$(per_request "$ptwo" "$preplay" "$N")
        log "$rev: GET totals $one / $two Ir -> ${IR_GET[$rev]} Ir per GET; POST totals $pone / $ptwo / $preplay -> ${IR_NEW[$rev]} per new key, ${IR_REPLAY[$rev]} per replay"
    done
    log "per-function differences (callgrind_annotate --inclusive=no)"
    per_function_diff "get-$N" "get-$((2 * N))" get
    per_function_diff "new-$N" "new-$((2 * N))" new-key
    per_function_diff "new-$((2 * N))" "replay-$N" replay
    for rev in base new; do
        IR_GET_STEADY[$rev]=$(steady "$rev" "get-$N" "get-$((2 * N))")
        IR_NEW_STEADY[$rev]=$(steady "$rev" "new-$N" "new-$((2 * N))")
        IR_REPLAY_STEADY[$rev]=$(steady "$rev" "new-$((2 * N))" "replay-$N")
    done
fi

# --- 2. wall clock -----------------------------------------------------------------
ci_running() { pgrep -f "bash .ci/run" >/dev/null; }
CI_NOTE="no CI run during the wall-clock part"
if [ "$ROUNDS" -gt 0 ] && ci_running; then
    log "a CI run is going (pgrep -f 'bash .ci/run'): waiting up to ${CI_WAIT}s for it before the wall clock"
    waited=0
    while ci_running && [ "$waited" -lt "$CI_WAIT" ]; do
        sleep 30
        waited=$((waited + 30))
    done
    if ci_running; then
        echo "warning: a CI run was still going after ${CI_WAIT}s; timing anyway" >&2
        CI_NOTE="a CI run was going during the wall-clock part (waited ${waited}s)"
    else
        CI_NOTE="waited ${waited}s for a CI run to end before the wall-clock part"
    fi
fi

TCK=$(getconf CLK_TCK)
# to_us VALUE-WITH-UNIT -> microseconds
to_us() {
    awk -v v="$1" 'BEGIN {
        n = v + 0; u = v; sub(/^[0-9.]+/, "", u);
        if (u == "us") m = 1; else if (u == "ms") m = 1000; else if (u == "s") m = 1000000; else m = 1;
        printf "%.0f", n * m }'
}
# wall_run REV ROUND: sets W_RPS (req/s), W_P99 (us) and W_CPU (keel's
# user+sys CPU per request, us, from /proc), a fresh keel each run.
wall_run() {
    local rev=$1 round=$2 name pid before after requests
    name=wrk-$rev-$round
    taskset -c 0 "${KEEL_BIN[$rev]}" serve --config "$WORK/plain.toml" >"$RESULTS/$name.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    wait_port "$KEEL"
    wait_ready "$KEEL_ADMIN"
    taskset -c 1 wrk -t1 -c"$CONNECTIONS" -d2s "http://$KEEL/" >/dev/null # warm-up
    before=$(cpu_ticks "$pid")
    taskset -c 1 wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --latency "http://$KEEL/" >"$RESULTS/$name.txt"
    after=$(cpu_ticks "$pid")
    stop "$pid" 300
    if grep -q "Non-2xx\|Socket errors" "$RESULTS/$name.txt"; then
        echo "warning: $name had errors: $(grep 'Non-2xx\|Socket errors' "$RESULTS/$name.txt" | tr '\n' ' ')" >&2
    fi
    requests=$(awk '/requests in/ {print $1}' "$RESULTS/$name.txt")
    W_RPS=$(awk '/^Requests\/sec:/ {printf "%.0f", $2}' "$RESULTS/$name.txt")
    W_P99=$(to_us "$(awk '$1 == "99%" {print $2}' "$RESULTS/$name.txt")")
    W_CPU=$(awk -v t=$((after - before)) -v hz="$TCK" -v n="$requests" 'BEGIN {printf "%.1f", t / hz * 1e6 / n}')
    [ -n "$W_RPS" ] || { echo "error: no req/s in $RESULTS/$name.txt" >&2; exit 1; }
}
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{v[NR] = $1} END {if (NR == 0) print "-"; else print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2)}'; }
range() { tr ' ' '\n' | grep -v '^$' | sort -g | awk 'NR == 1 {lo = $1} {hi = $1} END {print (NR ? lo "-" hi : "-")}'; }
declare -A RPS P99 CPU
RPS[base]="" RPS[new]="" P99[base]="" P99[new]="" CPU[base]="" CPU[new]=""
RATIOS="" P99_RATIOS="" ROUND_ROWS=""
for round in $(seq 1 "$ROUNDS"); do
    if [ $((round % 2)) = 1 ]; then order="base new"; else order="new base"; fi
    log "wall clock round $round/$ROUNDS: ${order/ /, then } (${DURATION}s each, $CONNECTIONS connections)"
    declare -A R_RPS R_P99 R_CPU
    for rev in $order; do
        wall_run "$rev" "$round"
        R_RPS[$rev]=$W_RPS R_P99[$rev]=$W_P99 R_CPU[$rev]=$W_CPU
        RPS[$rev]+="$W_RPS " P99[$rev]+="$W_P99 " CPU[$rev]+="$W_CPU "
    done
    r=$(awk -v a="${R_RPS[new]}" -v b="${R_RPS[base]}" 'BEGIN {printf "%.3f", a / b}')
    p=$(awk -v a="${R_P99[new]}" -v b="${R_P99[base]}" 'BEGIN {printf "%.3f", (b > 0 ? a / b : 0)}')
    RATIOS+="$r " P99_RATIOS+="$p "
    ROUND_ROWS+="| $round | ${order/ / first, then } | ${R_RPS[base]} / ${R_RPS[new]} | $r | ${R_P99[base]} / ${R_P99[new]} | ${R_CPU[base]} / ${R_CPU[new]} |"$'\n'
    log "round $round: base ${R_RPS[base]} req/s p99 ${R_P99[base]} us (${R_CPU[base]} us CPU), new ${R_RPS[new]} req/s p99 ${R_P99[new]} us (${R_CPU[new]} us CPU), ratio $r"
done

# --- table ---------------------------------------------------------------------------
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (a !~ /^[0-9.]+$/ || b !~ /^[0-9.]+$/ || b == 0) print "-"; else printf "%.3f", a / b}'; }
cat <<TABLE

| measure | base $BASE_SHORT${LTO:+ (lto = $LTO)} | new $NEW_DESC${LTO:+ (lto = $LTO)} | new / base |
| --- | ---: | ---: | ---: |
TABLE
if [ -z "${SKIP_CALLGRIND:-}" ]; then
    cat <<TABLE
| callgrind Ir per plain GET | ${IR_GET[base]} | ${IR_GET[new]} | $(ratio "${IR_GET[new]}" "${IR_GET[base]}") |
| callgrind Ir per idempotent new-key POST (memory store) | ${IR_NEW[base]} | ${IR_NEW[new]} | $(ratio "${IR_NEW[new]}" "${IR_NEW[base]}") |
| callgrind Ir per replay (memory store) | ${IR_REPLAY[base]} | ${IR_REPLAY[new]} | $(ratio "${IR_REPLAY[new]}" "${IR_REPLAY[base]}") |
| the same without glibc malloc's slow paths: GET | ${IR_GET_STEADY[base]} | ${IR_GET_STEADY[new]} | $(ratio "${IR_GET_STEADY[new]}" "${IR_GET_STEADY[base]}") |
| the same without glibc malloc's slow paths: new-key POST | ${IR_NEW_STEADY[base]} | ${IR_NEW_STEADY[new]} | $(ratio "${IR_NEW_STEADY[new]}" "${IR_NEW_STEADY[base]}") |
| the same without glibc malloc's slow paths: replay | ${IR_REPLAY_STEADY[base]} | ${IR_REPLAY_STEADY[new]} | $(ratio "${IR_REPLAY_STEADY[new]}" "${IR_REPLAY_STEADY[base]}") |
TABLE
fi
if [ "$ROUNDS" -gt 0 ]; then
    MB=$(median <<<"${RPS[base]}") MN=$(median <<<"${RPS[new]}")
    PB=$(median <<<"${P99[base]}") PN=$(median <<<"${P99[new]}")
    CB=$(median <<<"${CPU[base]}") CN=$(median <<<"${CPU[new]}")
    cat <<TABLE
| wrk GET req/s, median of $ROUNDS | $MB | $MN | $(ratio "$MN" "$MB") (median of the rounds' ratios $(median <<<"$RATIOS"); $(range <<<"$RATIOS")) |
| wrk GET p99 (us), median of $ROUNDS | $PB | $PN | $(ratio "$PN" "$PB") (median of the rounds' ratios $(median <<<"$P99_RATIOS"); $(range <<<"$P99_RATIOS")) |
| keel CPU per request (us, /proc), median of $ROUNDS | $CB | $CN | $(ratio "$CN" "$CB") |

Wall-clock rounds:

| round | order | req/s base / new | new / base | p99 (us) base / new | keel CPU (us) base / new |
| --- | --- | --- | ---: | --- | --- |
$ROUND_ROWS
TABLE
fi
cat <<TABLE

callgrind: N=$N requests per step over $CLIENT_CONNS keep-alive connections, Ir(2N) - Ir(N) per request;
per-function differences in $RESULTS/diff-{get,new-key,replay}.txt;
wrk -t1 -c$CONNECTIONS -d${DURATION}s GET / after a 2 s warm-up, a fresh keel per run; keel (workers = 1) on CPU 0, clients, wrk and backend on CPU 1;
$CI_NOTE; $(nproc) CPUs, $(uname -r), load average at the end: $(cut -d' ' -f1-3 /proc/loadavg); ${SECONDS}s in all.
Callgrind outputs, wrk outputs and logs: $RESULTS
TABLE
