"""The sandbox traffic proxy: SDK requests for envd, the code interpreter or any user server,
streamed into the sandbox over the backend's relay.

Routing (protocol doc §2): the ``E2b-Sandbox-Id`` + ``E2b-Sandbox-Port`` headers when present,
else a Host of ``<port>-<id>.<domain>``, else, for a signed ``/files`` URL that names no sandbox,
the live sandbox whose access token reproduces the URL's signature.

Each request gets its own relay stream and speaks HTTP/1.1 to the guest with h11; bodies are
forwarded chunk by chunk in both directions while they flow (the request body is pumped in one
task while the response is relayed in another), so uploads, long process streams and
client-streaming RPCs are never buffered whole. Keep-alive with the client is Hypercorn's job;
the relay stream is closed after each exchange, which keeps upstream framing trivially correct.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import h11
import msgspec
import trio

from cube.api.context import ApiContext
from cube.guest.wire import ENVD_PORT
from cube.pool.backend import BackendError, Instance, PortClosed
from cube.pool.sandboxes import Sandbox

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

READ_CHUNK = 64 * 1024
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
_HOST_LABEL = re.compile(r"^(\d{1,5})-([a-z0-9]+)$")
NOT_FOUND = "The sandbox was not found"
PORT_CLOSED = "The sandbox is running but port is not open"


class Target(msgspec.Struct, frozen=True):
    sandbox_id: str
    port: int


class BadRoute(Exception):
    """The request names a sandbox in a malformed way."""


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def sign(path: str, operation: str, username: str, token: str, expiration: str | None) -> str:
    """E2B's v1 file URL signature (protocol doc §3.2)."""
    raw = f"{path}:{operation}:{username}:{token}"
    if expiration:
        raw += f":{expiration}"
    digest = hashlib.sha256(raw.encode()).digest()
    return "v1_" + base64.b64encode(digest).rstrip(b"=").decode("ascii")


def signed_owner(scope: Scope, sandboxes: Iterable[Sandbox]) -> str | None:
    """The sandbox whose token produced a signed ``/files`` URL's signature, if any."""
    query = urllib.parse.parse_qs(scope["query_string"].decode("latin-1"), keep_blank_values=True)
    signature = query.get("signature", [""])[0]
    if not signature:
        return None
    operation = "write" if scope["method"] == "POST" else "read"
    path = query.get("path", [""])[0]
    username = query.get("username", [""])[0]
    expiration = query.get("signature_expiration", [None])[0]
    for sandbox in sandboxes:
        record = sandbox.record
        if sign(path, operation, username, record.access_token, expiration) == signature:
            return record.sandbox_id
    return None


def route(scope: Scope, sandboxes: Iterable[Sandbox]) -> Target | None:
    """Where a request goes, or None if it is for the control plane."""
    sandbox_id = _header(scope, b"e2b-sandbox-id")
    port = _header(scope, b"e2b-sandbox-port")
    if sandbox_id is not None or port is not None:
        if sandbox_id is None or port is None:
            raise BadRoute("E2b-Sandbox-Id and E2b-Sandbox-Port must be sent together")
        return Target(sandbox_id, _port(port))
    host = (_header(scope, b"host") or "").split(":", 1)[0]
    label, dot, _ = host.partition(".")
    match = _HOST_LABEL.match(label) if dot else None
    if match:
        return Target(match.group(2), _port(match.group(1)))
    if scope["path"] == "/files" and b"signature=" in scope["query_string"]:
        return Target(signed_owner(scope, sandboxes) or "", ENVD_PORT)
    return None


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise BadRoute(f"bad sandbox port {text[:8]!r}")
    return int(text)


async def send_json(send: Send, status: int, body: object) -> None:
    payload = msgspec.json.encode(body)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(payload))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload, "more_body": False})


class Proxy:
    def __init__(self, ctx: ApiContext) -> None:
        self._ctx = ctx

    def route(self, scope: Scope) -> Target | None:
        return route(scope, (s for s in self._ctx.sandboxes.all() if s.instance is not None))

    async def handle(self, scope: Scope, receive: Receive, send: Send, target: Target) -> None:
        self._ctx.metrics.events["proxied"] += 1
        sandbox = await self._ctx.sandboxes.wake(target.sandbox_id) if target.sandbox_id else None
        if sandbox is None or sandbox.instance is None:
            await _bad_gateway(send, target, NOT_FOUND)
            return
        if not _traffic_allowed(scope, sandbox, target.port):
            message = "missing or invalid traffic access token (E2B-Traffic-Access-Token)"
            await send_json(send, 403, {"code": 403, "message": message})
            return
        client = _Client(send)
        # Pausing or killing the sandbox cuts this exchange rather than leave it hanging.
        with trio.CancelScope() as cut:
            sandbox.traffic.add(cut)
            try:
                await self._forward(sandbox.instance, target, scope, receive, client)
            finally:
                sandbox.traffic.discard(cut)
        if cut.cancelled_caught and not client.started:
            await _bad_gateway(send, target, NOT_FOUND)

    async def _forward(
        self, instance: Instance, target: Target, scope: Scope, receive: Receive, client: _Client
    ) -> None:
        try:
            stream = await self._ctx.backend.connect(instance, target.port)
        except PortClosed:
            await _bad_gateway(client.send, target, PORT_CLOSED, port=target.port)
            return
        except BackendError as exc:  # it died between the lookup and now, or does not answer
            log.warning(
                "cannot reach sandbox",
                extra={"sandbox": target.sandbox_id, "port": target.port, "error": str(exc)},
            )
            await _bad_gateway(client.send, target, NOT_FOUND)
            return
        async with stream:
            await _exchange(stream, scope, receive, client)


class _Client:
    """The client side of one exchange; remembers whether the response has begun (after that,
    an error can only drop the connection)."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False

    async def send(self, message: dict[str, Any]) -> None:
        self.started = True
        await self._send(message)


def _traffic_allowed(scope: Scope, sandbox: Sandbox, port: int) -> bool:
    """A sandbox created with public traffic off takes requests on its ports only with its
    traffic token; envd has its own access token and is exempt, as in E2B."""
    token = sandbox.record.traffic_token
    if token is None or port == ENVD_PORT:
        return True
    given = _header(scope, b"e2b-traffic-access-token") or ""
    return hmac.compare_digest(given.encode(), token.encode())


async def _bad_gateway(send: Send, target: Target, message: str, **extra: object) -> None:
    """E2B's proxy errors, which the SDK recognises by their message."""
    body = {"sandboxId": target.sandbox_id, "message": message, **extra, "code": 502}
    await send_json(send, 502, body)


def _request_head(scope: Scope) -> tuple[h11.Request, bool]:
    """The upstream request line and headers, and whether a body follows."""
    headers = []
    has_length = chunked = False
    for key, value in scope["headers"]:
        name = key.lower()
        if name == b"transfer-encoding":
            chunked = True
        if name in HOP_BY_HOP:
            continue
        has_length = has_length or name == b"content-length"
        headers.append((name, value))
    if chunked and not has_length:
        headers.append((b"transfer-encoding", b"chunked"))
    if not any(name == b"host" for name, _ in headers):  # HTTP/2 clients send :authority
        headers.append((b"host", b"localhost"))
    target = scope["raw_path"] or scope["path"].encode()
    if scope["query_string"]:
        target += b"?" + scope["query_string"]
    method = scope["method"].encode()
    return h11.Request(method=method, target=target, headers=headers), has_length or chunked


async def _exchange(
    stream: trio.abc.Stream, scope: Scope, receive: Receive, client: _Client
) -> None:
    conn = h11.Connection(h11.CLIENT)
    request, has_body = _request_head(scope)

    async def send_upstream(event: h11.Event) -> None:
        """Write to the guest; once it stops reading (it answered early, or died) the rest of
        the client's body is dropped, and the response decides what the client sees."""
        if conn.our_state is not h11.ERROR:
            try:
                await stream.send_all(conn.send(event))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                conn.send_failed()

    async def pump_request(done: trio.CancelScope) -> None:
        """Forward the body as it arrives, then wait for the client to go away (so that a
        disconnect ends a long response stream)."""
        await send_upstream(request)
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                done.cancel()
                return
            chunk = message.get("body", b"")
            if chunk and has_body:
                await send_upstream(h11.Data(data=chunk))
            if not message.get("more_body", False):
                break
        await send_upstream(h11.EndOfMessage())
        while (await receive())["type"] != "http.disconnect":
            pass
        done.cancel()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump_request, nursery.cancel_scope)
            await _relay_response(conn, stream, client.send)
            nursery.cancel_scope.cancel()
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError) as exc:
        if client.started:
            raise  # mid-response: all that is left is to drop the client connection
        log.info("guest port closed the relayed connection", extra={"error": str(exc)})
        await send_json(client.send, 502, {"message": PORT_CLOSED, "code": 502})


async def _relay_response(conn: h11.Connection, stream: trio.abc.Stream, send: Send) -> None:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(READ_CHUNK))
        elif isinstance(event, h11.Response):
            headers = [(k, v) for k, v in event.headers if k.lower() not in HOP_BY_HOP]
            start = {"type": "http.response.start", "status": event.status_code}
            await send({**start, "headers": headers})
        elif isinstance(event, h11.Data):
            await send({"type": "http.response.body", "body": bytes(event.data), "more_body": True})
        elif isinstance(event, h11.EndOfMessage):
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        elif isinstance(event, h11.ConnectionClosed):
            raise trio.BrokenResourceError("upstream closed before the response ended")
        # InformationalResponse (100 Continue) is consumed here; the client never asked.
