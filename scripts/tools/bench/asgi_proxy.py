"""ASGI proxy of scripts/tools/bench.sh: the stand-in for Ray Serve's proxy architecture.

A plain asyncio ASGI app (served by Debian's uvicorn on TCP) that forwards each request over a
small pool of keep-alive HTTP/1.1 connections to the ASGI replica's Unix socket and relays its
answer. No framework beyond uvicorn. The replica socket comes from ASGI_REPLICA_SOCK and the pool
size from ASGI_POOL (default 16)."""
import asyncio
import os

SOCK = os.environ["ASGI_REPLICA_SOCK"]
POOL = int(os.environ.get("ASGI_POOL", "16"))
HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"host"}
# uvicorn adds its own to the answer.
ANSWER_DROP = HOP | {b"date", b"server"}

_idle = []  # connected (reader, writer) pairs, ready for a request
_slots = None  # bounds the number of connections open at once


async def _request(conn, head, body):
    reader, writer = conn
    writer.write(head + body)
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("replica closed the connection")
    status = int(status_line.split()[1])
    headers, length, chunked = [], 0, False
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and value.lower() == b"chunked":
            chunked = True
        if name not in ANSWER_DROP:
            headers.append((name, value))
    if not chunked:
        return status, headers, await reader.readexactly(length)
    data = bytearray()
    while True:
        size = int((await reader.readline()).split(b";")[0], 16)
        chunk = await reader.readexactly(size + 2)
        if size == 0:
            return status, headers, bytes(data)
        data += chunk[:-2]


async def app(scope, receive, send):
    global _slots
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["type"] != "http":
        return
    body, more = bytearray(), True
    while more:
        msg = await receive()
        body += msg.get("body", b"")
        more = msg.get("more_body", False)
    target = scope["raw_path"] or scope["path"].encode()
    if scope["query_string"]:
        target += b"?" + scope["query_string"]
    head = bytearray(scope["method"].encode() + b" " + target + b" HTTP/1.1\r\nhost: replica\r\n")
    for name, value in scope["headers"]:
        if name not in HOP:
            head += name + b": " + value + b"\r\n"
    head += b"content-length: %d\r\n\r\n" % len(body)
    if _slots is None:
        _slots = asyncio.Semaphore(POOL)
    async with _slots:
        conn = _idle.pop() if _idle else await asyncio.open_unix_connection(SOCK)
        try:
            status, headers, payload = await _request(conn, bytes(head), bytes(body))
        except (ConnectionError, asyncio.IncompleteReadError, ValueError, IndexError):
            conn[1].close()
            await send({"type": "http.response.start", "status": 502,
                        "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"bad gateway"})
            return
        _idle.append(conn)
    headers.append((b"content-length", str(len(payload)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
