"""The relay port: each host connection names a guest TCP port and is spliced to it.

The host proxy opens a vsock connection per client connection, sends ``CONNECT <port>\\n`` and
then bytes flow both ways unchanged (``cube.guest.wire``). Half-closes are forwarded, so a
request/response protocol that shuts down its sending side still gets its answer. Everything
the relay reaches is on the guest's loopback, which is why envd may bind 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import logging

import trio

from cube.guest.wire import MAX_LINE, RELAY_OK, RelayError, parse_relay_request

log = logging.getLogger(__name__)

MAX_RELAYS = 1024  # concurrent spliced connections
REQUEST_TIMEOUT = 30.0  # seconds a fresh connection may take to send its CONNECT line
BUFFER = 64 << 10


async def _read_line(stream: trio.abc.ReceiveStream) -> tuple[bytes, bytes]:
    """The request line (with its newline) and whatever arrived after it."""
    data = b""
    while b"\n" not in data:
        if len(data) > MAX_LINE:
            raise RelayError("request line too long")
        chunk = await stream.receive_some(MAX_LINE)
        if not chunk:
            raise RelayError("connection closed before the request line")
        data += chunk
    line, _, rest = data.partition(b"\n")
    return line + b"\n", rest


async def _pipe(
    source: trio.abc.ReceiveStream, sink: trio.abc.HalfCloseableStream, scope: trio.CancelScope
) -> None:
    try:
        while data := await source.receive_some(BUFFER):
            await sink.send_all(data)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await sink.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        scope.cancel()  # a reset on either side ends both directions


class Relay:
    def __init__(self, target_host: str = "127.0.0.1") -> None:
        self._target_host = target_host
        self._slots = trio.CapacityLimiter(MAX_RELAYS)

    async def handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                self._slots.acquire_nowait()
            except trio.WouldBlock:
                await self._refuse(stream, "too many relayed connections")
                return
            try:
                await self._serve(stream)
            finally:
                self._slots.release()

    async def _refuse(self, stream: trio.SocketStream, reason: str) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(b"ERR " + reason.encode() + b"\n")

    async def _serve(self, stream: trio.SocketStream) -> None:
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                line, rest = await _read_line(stream)
            port = parse_relay_request(line)
        except (RelayError, trio.TooSlowError, trio.BrokenResourceError) as e:
            await self._refuse(stream, str(e) or "no request line")
            return
        try:
            target = await trio.open_tcp_stream(self._target_host, port)
        except OSError as e:
            await self._refuse(stream, f"port {port} is not open: {e.strerror or e}")
            return
        async with target:
            try:
                await stream.send_all(RELAY_OK)
                if rest:
                    await target.send_all(rest)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_pipe, stream, target, nursery.cancel_scope)
                nursery.start_soon(_pipe, target, stream, nursery.cancel_scope)
