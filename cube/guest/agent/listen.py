"""Listening addresses given on the command line: ``vsock:PORT``, ``tcp:HOST:PORT``, ``unix:PATH``.

In the guest the relay and control ports are vsock (the host's only way in) and envd is TCP on
loopback; tests run the same agent on TCP and Unix sockets instead.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass

import trio


class AddressError(ValueError):
    pass


@dataclass(frozen=True)
class Address:
    kind: str  # "tcp", "unix" or "vsock"
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        if self.kind == "vsock":
            return f"vsock:{self.port}"
        return f"tcp:{self.host}:{self.port}"


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise AddressError(f"bad port {text!r}")
    return int(text)


def parse_address(text: str) -> Address:
    kind, sep, rest = text.partition(":")
    if kind == "unix" and sep and rest:
        return Address("unix", path=rest)
    if kind == "vsock" and sep:
        return Address("vsock", port=_port(rest))
    if kind == "tcp" and sep:
        text = rest
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise AddressError(f"bad address {text!r}: use vsock:PORT, tcp:HOST:PORT or unix:PATH")
    return Address("tcp", host=host.strip("[]"), port=_port(port))


def hypercorn_bind(address: Address) -> str:
    if address.kind == "unix":
        return f"unix:{address.path}"
    if address.kind == "tcp":
        host = f"[{address.host}]" if ":" in address.host else address.host
        return f"{host}:{address.port}"
    raise AddressError("envd listens on TCP or a Unix socket, not vsock")


async def open_listener(address: Address) -> trio.SocketListener:
    if address.kind == "tcp":
        listeners = await trio.open_tcp_listeners(address.port, host=address.host)
        for extra in listeners[1:]:
            await extra.aclose()
        return listeners[0]
    if address.kind == "unix":
        with contextlib.suppress(FileNotFoundError):
            os.unlink(address.path)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(address.path)
    else:
        sock = trio.socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        await sock.bind((socket.VMADDR_CID_ANY, address.port))
    sock.listen(128)
    return trio.SocketListener(sock)
