"""The relay: CONNECT lines, splicing both ways with half-close, and refusals."""

from __future__ import annotations

import functools
import socket
from pathlib import Path

import trio

from cube.guest.agent.relay import Relay
from tests.unit.agent.harness import Agent


def _relay_line(sock: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        line += chunk
    return line


def test_relay_to_envd_of_a_running_agent(agent: Agent) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(agent.relay_socket)
        s.sendall(
            b"CONNECT %d\nGET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % agent.port
        )
        s.shutdown(socket.SHUT_WR)  # hypercorn closes only once the client has
        assert _relay_line(s) == b"OK\n"
        response = b""
        while chunk := s.recv(4096):
            response += chunk
    assert response.startswith(b"HTTP/1.1 204")


def test_relay_refuses_closed_ports_and_bad_lines(agent: Agent) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    for request in (b"CONNECT %d\n" % closed_port, b"HELLO\n", b"CONNECT 70000\n"):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(agent.relay_socket)
            s.sendall(request)
            assert _relay_line(s).startswith(b"ERR ")
            assert s.recv(1) == b""


async def _echo_after_eof(stream: trio.SocketStream) -> None:
    """Reads everything until the peer half-closes, then answers and closes."""
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    await stream.send_all(b"got " + str(len(data)).encode())
    await stream.aclose()


def test_relay_forwards_half_close(tmp_path: Path) -> None:
    async def scenario() -> bytes:
        async with trio.open_nursery() as nursery:
            serve = functools.partial(trio.serve_tcp, host="127.0.0.1")
            (target,) = await nursery.start(serve, _echo_after_eof, 0)
            port = target.socket.getsockname()[1]
            path = str(tmp_path / "relay.sock")
            sock = trio.socket.socket(socket.AF_UNIX)
            await sock.bind(path)
            sock.listen()
            nursery.start_soon(trio.serve_listeners, Relay().handle, [trio.SocketListener(sock)])
            client = await trio.open_unix_socket(path)
            await client.send_all(b"CONNECT %d\n" % port + b"x" * 100_000)
            await client.send_eof()
            received = b""
            while chunk := await client.receive_some(65536):
                received += chunk
            await client.aclose()
            nursery.cancel_scope.cancel()
        return received

    assert trio.run(scenario) == b"OK\ngot 100000"
