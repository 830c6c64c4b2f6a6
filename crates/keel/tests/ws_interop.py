"""Both ends of a WebSocket drain test, on the Python `websockets` library
(a third-party implementation, so the gateway's closes are judged by a
client and a server it was not written with).

    python3 ws_interop.py upstream <max-message> <fragment> <pause-ms>
        Serves on 127.0.0.1 (two ports: prints "PORTS <a> <b>"). Each
        connection streams binary messages of up to <max-message> bytes,
        in fragments of <fragment> bytes <pause-ms> apart, with a ping
        between every other two; each message is a SHA-256 digest
        followed by the payload it covers. When a connection ends it prints
        one line "CONN <json>": the port, the close code it received (null
        when no close frame came) and whether the TCP connection was reset.

    python3 ws_interop.py clients <ws-url> <n>
        Opens n connections, checks every message's digest, prints "READY"
        once every connection has received a message, one line
        "RESULT <json>" per connection as it closes (messages intact and
        corrupt, the close code and reason received and the close code it
        answered with: 1002 when it judged the close a protocol error), and
        "DONE" when all have.
"""

import asyncio
import hashlib
import json
import random
import sys

from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed



class Recorded(ServerConnection):
    """A server connection that remembers how its transport ended."""

    lost_with = None

    def connection_lost(self, exc):
        self.lost_with = exc
        super().connection_lost(exc)


async def stream(ws, rng, max_message, fragment, pause):
    """Sends digest-prefixed messages forever, each in fragments with a ping
    between every other two and a pause between all, so a drain almost
    always finds a message in flight."""
    while True:
        payload = rng.randbytes(rng.randint(1, max_message))
        message = hashlib.sha256(payload).digest() + payload

        async def fragments():
            for i, at in enumerate(range(0, len(message), fragment)):
                if i % 2 == 1:
                    await ws.ping()
                await asyncio.sleep(pause)
                yield message[at : at + fragment]

        await ws.send(fragments())


async def upstream(max_message, fragment, pause):
    seed = 0

    async def handler(ws):
        nonlocal seed
        seed += 1
        port = ws.local_address[1]
        rng = random.Random(seed)
        sender = asyncio.create_task(stream(ws, rng, max_message, fragment, pause))
        try:
            async for _ in ws:
                pass
        except ConnectionClosed:
            pass
        sender.cancel()
        await ws.wait_closed()
        rcvd = ws.protocol.close_rcvd.code if ws.protocol.close_rcvd else None
        reset = isinstance(ws.lost_with, ConnectionError)
        line = {"port": port, "rcvd": rcvd, "reset": reset, "lost": repr(ws.lost_with)}
        print("CONN " + json.dumps(line), flush=True)

    options = dict(
        compression=None,
        max_size=None,
        ping_interval=None,
        create_connection=Recorded,
    )
    async with serve(handler, "127.0.0.1", 0, **options) as a, serve(
        handler, "127.0.0.1", 0, **options
    ) as b:
        ports = [s.sockets[0].getsockname()[1] for s in (a, b)]
        print("PORTS %d %d" % tuple(ports), flush=True)
        await asyncio.Future()


async def client(url, index, received_one):
    result = {"index": index, "intact": 0, "corrupt": 0}
    try:
        async with connect(
            url, compression=None, max_size=None, ping_interval=None, open_timeout=30
        ) as ws:
            try:
                async for message in ws:
                    digest, payload = message[:32], message[32:]
                    if hashlib.sha256(payload).digest() == digest:
                        result["intact"] += 1
                    else:
                        result["corrupt"] += 1
                    received_one.set()
            except ConnectionClosed:
                pass
            received_one.set()
            await ws.wait_closed()
            result["rcvd"] = ws.protocol.close_rcvd.code if ws.protocol.close_rcvd else None
            result["reason"] = ws.protocol.close_rcvd.reason if ws.protocol.close_rcvd else None
            result["sent"] = ws.protocol.close_sent.code if ws.protocol.close_sent else None
    except Exception as e:  # noqa: BLE001 - reported to the test, which fails
        result["error"] = repr(e)
        received_one.set()
    print("RESULT " + json.dumps(result), flush=True)


async def clients(url, n):
    events = [asyncio.Event() for _ in range(n)]
    tasks = [asyncio.create_task(client(url, i, events[i])) for i in range(n)]
    await asyncio.gather(*(e.wait() for e in events))
    print("READY", flush=True)
    await asyncio.gather(*tasks)
    print("DONE", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "upstream":
        max_message, fragment, pause_ms = map(int, sys.argv[2:5])
        asyncio.run(upstream(max_message, fragment, pause_ms / 1000))
    else:
        asyncio.run(clients(sys.argv[2], int(sys.argv[3])))
