"""The sandboxes' DNS resolver: domain rules for allow_out, served on each tap's gateway.

Each sandbox's guest is told to use its gateway (NetConfig.dns) and the filter lets UDP/TCP 53
to the gateway through. Here, per sandbox, UDP and TCP sockets on gateway4:53 and gateway6:53:

- a policy without domains: every query is forwarded to the host's resolver and the answer
  relayed (what the guest reaches is then decided by the IP rules alone);
- a policy with domains (E2B requires deny_out to hold 0.0.0.0/0 then): a query for an allowed
  name (exact, or `*.suffix` for names strictly below suffix, case-insensitive) is forwarded,
  and every A/AAAA address in the answer is pinned into the sandbox's allow list *before* the
  answer is relayed, for max(TTL, MIN_PIN) + GRACE seconds (a re-query renews it). Any other
  name gets NXDOMAIN without leaving the host.

Limits, honestly:
- The pin allows the address, not the name: every port and protocol to that IP, and every other
  site sharing the IP (CDNs) becomes reachable while the pin lasts. A guest that learns an
  allowed name's IP can use it by literal while pinned.
- Pins are per sandbox and time-bound; the filter is stateless, so a connection that outlives
  its pin (longer than TTL + GRACE without a new lookup) is cut.
- Exfiltration through query names is possible to anyone who controls an allowed domain (for
  `*.` patterns) or the upstream path; with domain rules, other names never leave the host.
- UDP and TCP (RFC 7766 framing; a TCP query is forwarded over TCP, so a truncated UDP answer
  can be retried). Answers are relayed verbatim (the guest's own EDNS size applies).
- Not a cache and not DNSSEC-aware; the upstream is trusted. At most MAX_IN_FLIGHT queries and
  TCP connections per sandbox at once; more are dropped (the guest retries).
"""

from __future__ import annotations

import ipaddress
import logging
import struct
from collections.abc import Coroutine
from typing import Any

import trio

from cube.net import netns
from cube.net.policy import domain_matches
from cube.net.rules import RuleSet

log = logging.getLogger(__name__)

MIN_PIN = 60.0  # seconds: a TTL-0 answer must still let the connection that follows through
GRACE = 300.0  # seconds beyond the TTL, so that a guest's cached answer stays usable
UPSTREAM_TIMEOUT = 5.0
TCP_IDLE = 10.0  # seconds a guest's DNS-over-TCP connection may sit idle
MAX_IN_FLIGHT = 64
MAX_PINS = 2048  # per sandbox, well under the allow map's capacity (layout.ALLOW_ENTRIES)

_HEADER = struct.Struct("!HHHHHH")
A, AAAA = 1, 28
NXDOMAIN, SERVFAIL, FORMERR = 3, 2, 1


class DnsError(ValueError):
    """A message that is not a well-formed single-question query or answer."""


def _skip_name(msg: bytes, at: int) -> int:
    """Offset after the (possibly compressed) name at `at`."""
    while True:
        if at >= len(msg):
            raise DnsError("name runs past the message")
        length = msg[at]
        if length & 0xC0 == 0xC0:
            return at + 2
        if length & 0xC0:
            raise DnsError("bad label")
        at += 1 + length
        if length == 0:
            return at


def question(msg: bytes) -> tuple[str, int]:
    """(name, end offset of the question) of a standard query with exactly one question."""
    if len(msg) < _HEADER.size:
        raise DnsError("short message")
    _, flags, qdcount, _, _, _ = _HEADER.unpack_from(msg)
    if flags & 0x8000 or (flags >> 11) & 0xF or qdcount != 1:
        raise DnsError("not a standard query with one question")
    labels, at = [], _HEADER.size
    while msg[at : at + 1] not in (b"\0", b""):
        length = msg[at]
        if length > 63:
            raise DnsError("compressed or oversized label in a question")
        labels.append(msg[at + 1 : at + 1 + length].decode("ascii", "replace").lower())
        at += 1 + length
    end = at + 5  # root label, qtype, qclass
    if end > len(msg):
        raise DnsError("truncated question")
    return ".".join(labels), end


def answers(msg: bytes) -> list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]]:
    """(address, TTL) of every A/AAAA record in the answer section; DnsError if malformed."""
    try:
        _, _, qdcount, ancount, _, _ = _HEADER.unpack_from(msg)
        at = _HEADER.size
        for _ in range(qdcount):
            at = _skip_name(msg, at) + 4
        found = []
        for _ in range(ancount):
            at = _skip_name(msg, at)
            rtype, _, ttl, size = struct.unpack_from("!HHIH", msg, at)
            data = msg[at + 10 : at + 10 + size]
            if len(data) != size:
                raise DnsError("record data runs past the message")
            if rtype == A and size == 4:
                found.append((ipaddress.IPv4Address(data), ttl))
            elif rtype == AAAA and size == 16:
                found.append((ipaddress.IPv6Address(data), ttl))
            at += 10 + size
    except struct.error as e:
        raise DnsError(f"truncated answer: {e}") from None
    return found


def error_reply(query: bytes, end: int, rcode: int) -> bytes:
    """An answer to `query` with no records and `rcode`, echoing its question."""
    qid, flags = struct.unpack_from("!HH", query)
    flags = 0x8000 | (flags & 0x0100) | 0x0080 | rcode  # QR, keep RD, RA
    return _HEADER.pack(qid, flags, 1, 0, 0, 0) + query[_HEADER.size : end]


class SandboxResolver:
    """Answers one sandbox's queries on its gateway addresses, UDP and TCP (see module doc)."""

    def __init__(
        self, ns: str | None, listen: list[str], upstream: tuple[str, int], rules: RuleSet
    ) -> None:
        self._ns = ns
        self._listen = listen
        self._upstream = upstream
        self._rules = rules
        self._in_flight = 0
        self._socks: list[trio.socket.SocketType] = []
        self._scope = trio.CancelScope()

    def _socket(self, address: str, kind: int) -> trio.socket.SocketType:
        family = trio.socket.AF_INET6 if ":" in address else trio.socket.AF_INET
        with netns.entered(self._ns):
            return trio.socket.socket(family, kind)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind the gateway addresses, report started, answer until `close`."""
        with self._scope:
            try:
                async with trio.open_nursery() as nursery:
                    for address in self._listen:
                        udp = self._socket(address, trio.socket.SOCK_DGRAM)
                        tcp = self._socket(address, trio.socket.SOCK_STREAM)
                        self._socks += [udp, tcp]
                        tcp.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
                        await udp.bind((address, 53))
                        await tcp.bind((address, 53))
                        tcp.listen(MAX_IN_FLIGHT)
                        nursery.start_soon(self._receive, udp, nursery)
                        nursery.start_soon(self._accept, tcp, nursery)
                    task_status.started()
            finally:
                self.close()

    def close(self) -> None:
        """Stop at once: the sockets close now, so the addresses can be bound again."""
        self._scope.cancel()
        for sock in self._socks:
            sock.close()

    def _admit(self) -> bool:
        """Take one of MAX_IN_FLIGHT slots for a query or connection, if one is free."""
        if self._in_flight >= MAX_IN_FLIGHT:
            return False
        self._in_flight += 1
        return True

    async def _receive(self, sock: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        try:
            while True:
                query, client = await sock.recvfrom(4096)
                if self._admit():
                    nursery.start_soon(self._guarded, self._answer_udp(sock, query, client))
        except trio.ClosedResourceError:
            return

    async def _accept(self, sock: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        try:
            while True:
                conn, _ = await sock.accept()
                if self._admit():
                    nursery.start_soon(self._guarded, self._session(conn))
                else:
                    conn.close()
        except trio.ClosedResourceError:
            return

    async def _guarded(self, work: Coroutine[Any, Any, None]) -> None:
        """Run one query's (or TCP session's) work; whatever goes wrong costs only that work.

        Queries are hostile input: a bug in handling one must not stop the resolver (and with
        it the daemon's nursery)."""
        try:
            await work
        except (trio.ClosedResourceError, OSError):
            pass  # closed meanwhile, or the guest is gone
        except Exception:
            log.exception("sandbox DNS query failed")
        finally:
            self._in_flight -= 1

    async def _answer_udp(self, sock: trio.socket.SocketType, query: bytes, client: tuple) -> None:
        reply = await self._resolve(query, tcp=False)
        if reply is not None:
            await sock.sendto(reply, client)

    async def _session(self, conn: trio.socket.SocketType) -> None:
        """RFC 7766: length-prefixed queries on one connection until EOF or TCP_IDLE."""
        async with trio.SocketStream(conn) as stream:
            while True:
                query = None
                with trio.move_on_after(TCP_IDLE):
                    query = await _read_framed(stream)
                if query is None:
                    return
                reply = await self._resolve(query, tcp=True)
                if reply is None:
                    return
                await stream.send_all(struct.pack("!H", len(reply)) + reply)

    async def _resolve(self, query: bytes, tcp: bool) -> bytes | None:
        try:
            name, end = question(query)
        except DnsError:
            return None if len(query) < _HEADER.size else error_reply(query, 12, FORMERR)
        rules = self._rules
        domains = rules.policy.domains
        if domains and not domain_matches(name, domains):
            return error_reply(query, end, NXDOMAIN)
        reply = await self._forward(query, tcp)
        if reply is None:
            return error_reply(query, end, SERVFAIL)
        if domains:
            try:
                found = answers(reply)
            except DnsError:
                return error_reply(query, end, SERVFAIL)
            if rules.pinned + len(found) > MAX_PINS:
                return error_reply(query, end, SERVFAIL)
            for address, ttl in found:
                rules.pin(name, [address], max(float(ttl), MIN_PIN) + GRACE)
        return reply

    async def _forward(self, query: bytes, tcp: bool) -> bytes | None:
        """The upstream's answer to `query` (matched by ID; over TCP if the guest used TCP),
        or None on timeout or error."""
        kind = trio.socket.SOCK_STREAM if tcp else trio.socket.SOCK_DGRAM
        with self._socket(self._upstream[0], kind) as sock, trio.move_on_after(UPSTREAM_TIMEOUT):
            try:
                await sock.connect(self._upstream)
                if tcp:
                    stream = trio.SocketStream(sock)
                    await stream.send_all(struct.pack("!H", len(query)) + query)
                    reply = await _read_framed(stream)
                    return reply if reply is not None and reply[:2] == query[:2] else None
                await sock.send(query)
                while True:
                    reply = await sock.recv(65535)
                    if reply[:2] == query[:2]:
                        return reply
            except OSError:
                return None
        return None


async def _read_exactly(stream: trio.SocketStream, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


async def _read_framed(stream: trio.SocketStream) -> bytes | None:
    """One length-prefixed DNS message from a TCP stream, or None at EOF."""
    head = await _read_exactly(stream, 2)
    return None if head is None else await _read_exactly(stream, struct.unpack("!H", head)[0])


def host_resolver(resolv_conf: str = "/etc/resolv.conf") -> tuple[str, int]:
    """The first nameserver the host itself uses."""
    with open(resolv_conf) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                return parts[1].split("%")[0], 53
    raise DnsError(f"no nameserver in {resolv_conf}")
