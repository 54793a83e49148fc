"""``fedtune flower gateway``: the only public listener of a deployment; it serves the Fleet API alone.

Flower 1.41's SuperLink serves its Fleet API (SuperNodes), Control API (``flwr run``, ``flwr ls``,
``flwr supernode register``) and Runtime API (the ServerApp's process) on one HTTP port, and the
open-source build authenticates no Control or Runtime caller (account authentication is part of
Flower's enterprise edition). Anyone who reaches that port could therefore list runs, register a
SuperNode key and start an app whose ServerApp code runs on the SuperLink's machine. So the
SuperLink listens on 127.0.0.1 only and this gateway, on the public address, forwards
``POST /v1/fleet/<call>`` to it and refuses everything else with 403. The SuperNodes' own
authentication is untouched: their signed headers pass through to the SuperLink, which checks
them.
"""

from __future__ import annotations

import re
import ssl
from pathlib import Path
from typing import Any

#: a Fleet call by name only: no dot segments, percent-escapes or query that could reach
#: another API once the upstream URL is normalised
FLEET_CALL = re.compile(r"/v1/fleet/[a-z][a-z-]{0,63}")
#: hop-by-hop headers (RFC 9110 7.6.1) and Host, which belong to each connection, not the call
HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "host"}
REFUSED = "fedtune gateway: only the Flower Fleet API is served on this address\n"


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` as (host, port); a bad address is a one-line ValueError."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not HOST:PORT")
    return host, int(port)


def gateway_app(upstream: str, ca_file: Path | None = None, transport: Any = None) -> Any:
    """An ASGI app forwarding Fleet calls to ``https://upstream`` (verified against ``ca_file``)."""
    import httpx
    from starlette.background import BackgroundTask
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, Response, StreamingResponse

    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(ca_file)) if ca_file else True
    # a generous gap between bytes and no overall deadline: Flower's own clients time out
    # their calls, and bodies can be model-sized
    client = httpx.AsyncClient(
        base_url=f"https://{upstream}", verify=verify, transport=transport, timeout=httpx.Timeout(300.0, connect=10.0)
    )

    def allowed(scope: dict[str, Any]) -> bool:
        path, raw = scope["path"], scope.get("raw_path")
        # the decoded path must be the raw one: a percent-escape could hide a "/" or ".."
        plain = raw is None or raw.decode("latin-1") == path
        return scope["method"] == "POST" and plain and not scope.get("query_string") and FLEET_CALL.fullmatch(path) is not None

    async def forward(request: Request) -> Response:
        if not allowed(request.scope):
            return PlainTextResponse(REFUSED, status_code=403)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_HEADERS]
        outgoing = client.build_request("POST", request.scope["path"], headers=headers, content=request.stream())
        try:
            reply = await client.send(outgoing, stream=True)
        except httpx.HTTPError as err:
            return PlainTextResponse(f"fedtune gateway: the SuperLink is unreachable ({type(err).__name__})\n", status_code=502)
        return StreamingResponse(
            reply.aiter_raw(),
            status_code=reply.status_code,
            headers={k: v for k, v in reply.headers.items() if k.lower() not in HOP_HEADERS},
            background=BackgroundTask(reply.aclose),
        )

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await client.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1008})
            return
        response = await forward(Request(scope, receive))
        await response(scope, receive, send)

    return app


def run_gateway(listen: str, upstream: str, certs: Path) -> None:
    """Serve the gateway on ``listen`` with the SuperLink's certificate from ``certs``."""
    import uvicorn

    files = {"ca": certs / "ca.crt", "cert": certs / "server.pem", "key": certs / "server.key"}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"--certs {certs}: missing {', '.join(missing)} (make them with `fedtune flower tls`)")
    host, port = parse_address(listen)
    parse_address(upstream)
    uvicorn.run(
        gateway_app(upstream, files["ca"]),
        host=host,
        port=port,
        ssl_certfile=str(files["cert"]),
        ssl_keyfile=str(files["key"]),
        log_level="info",
        workers=1,
    )
