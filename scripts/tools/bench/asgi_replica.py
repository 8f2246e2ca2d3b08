"""ASGI replica of scripts/tools/bench.sh: answers every request with the two-byte body "ok".

Served by Debian's uvicorn on a Unix socket, behind asgi_proxy.py (the stand-in for a Ray Serve
replica behind its proxy)."""


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    more = True
    while more:  # drain the request body
        more = (await receive()).get("more_body", False)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})
