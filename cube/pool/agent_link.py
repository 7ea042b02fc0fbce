"""The host side of cube/guest/wire.py over any byte stream: the relay handshake and one
control round trip. Shared by every backend, since vsock (VMM) and TCP (process backend)
streams carry exactly the same bytes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable

import msgspec
import trio

from cube.guest.wire import (
    MAX_CONTROL_MESSAGE,
    MAX_LINE,
    RELAY_OK,
    ControlRequest,
    Ping,
    Reply,
    control_encoder,
    relay_request,
    reply_decoder,
)
from cube.pool.backend import BackendError, PortClosed


async def _read_line(stream: trio.abc.ReceiveStream, limit: int, exact: bool) -> bytes:
    """One ``\\n``-terminated line. ``exact`` reads byte by byte so that nothing after the
    newline is consumed (the relay's spliced bytes follow its answer immediately)."""
    buf = bytearray()
    while not buf.endswith(b"\n"):
        chunk = await stream.receive_some(1 if exact else limit - len(buf))
        if not chunk:
            raise BackendError("agent closed the connection")
        buf += chunk
        if len(buf) > limit:
            raise BackendError("agent sent an oversized line")
    return bytes(buf)


async def relay_handshake(stream: trio.abc.Stream, port: int) -> None:
    """Ask the agent to splice ``stream`` to guest ``port``; PortClosed if it cannot."""
    await stream.send_all(relay_request(port))
    answer = await _read_line(stream, MAX_LINE, exact=True)
    if answer != RELAY_OK:
        raise PortClosed(answer.decode("utf-8", "replace").strip())


async def control_call(stream: trio.abc.Stream, request: ControlRequest) -> Reply:
    """Send one control message and decode its one-line reply."""
    await stream.send_all(control_encoder.encode(request) + b"\n")
    line = await _read_line(stream, MAX_CONTROL_MESSAGE, exact=False)
    try:
        return reply_decoder.decode(line)
    except msgspec.DecodeError as exc:
        raise BackendError(f"bad control reply: {exc}") from exc


POLL_S = 0.02
PING_TIMEOUT_S = 2.0  # one unanswered ping is retried, not waited on for the whole timeout


async def wait_answering(
    control: Callable[[ControlRequest], Awaitable[Reply]], dead: trio.Event, timeout: float
) -> bool:
    """Ping a just-started agent until it answers: True when it does, False if ``dead`` is set
    or ``timeout`` seconds pass first."""
    with trio.move_on_after(timeout):
        while not dead.is_set():
            with contextlib.suppress(BackendError), trio.move_on_after(PING_TIMEOUT_S):
                if (await control(Ping())).ok:
                    return True
            await trio.sleep(POLL_S)
    return False
