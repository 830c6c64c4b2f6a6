"""The fixed-count client of the callgrind benchmarks (split.sh, renewal.sh).

Usage: client.py HOST:PORT POST_PATH PREFIX CONNS PHASE...
A PHASE is KIND:COUNT, KIND one of
  get     GET / ;
  new     idempotent POSTs to POST_PATH with fresh keys PREFIX-N;
  replay  the same POSTs with the first COUNT keys again (replayed).
Each phase spreads its requests over CONNS keep-alive connections, one
thread each, and every answer is checked: 200, the bench backend's body,
`Idempotent-Replayed` on replays only. Exits 1 on any unexpected answer.
"""
import http.client
import sys
import threading

addr, post_path, prefix, conns = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
host, port = addr.rsplit(":", 1)
body = b'{"amount":100,"currency":"EUR"}'
expected = b"hello from the backend\n"
connections = [http.client.HTTPConnection(host, int(port), timeout=300) for _ in range(conns)]
bad = []


def run(conn, kind, keys):
    for k in keys:
        if kind == "get":
            conn.request("GET", "/")
        else:
            conn.request("POST", post_path, body, {"Content-Type": "application/json",
                                                   "Idempotency-Key": f"{prefix}-{k}"})
        r = conn.getresponse()
        got = r.read()
        replayed = r.getheader("idempotent-replayed") == "true"
        if r.status != 200 or got != expected or replayed != (kind == "replay"):
            bad.append((kind, k, r.status, replayed))


created = 0
for phase in sys.argv[5:]:
    kind, count = phase.split(":")
    count = int(count)
    if count == 0:
        continue
    keys = range(created, created + count) if kind == "new" else range(count)
    threads = [threading.Thread(target=run, args=(c, kind, keys[i::conns]))
               for i, c in enumerate(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if kind == "new":
        created += count
for c in connections:
    c.close()
if bad:
    print(f"client: {len(bad)} unexpected answers, first {bad[:5]}", file=sys.stderr)
    sys.exit(1)
