"""Domain rules: the resolver on the gateway answers allowed names (pinning their addresses
into the allow list) and NXDOMAIN for the rest, without asking upstream."""

from __future__ import annotations

import ipaddress
import os
import struct

import pytest
import trio

from cube.net import dns, frames, netns
from cube.net.manager import NetworkConfig, NetworkManager
from cube.net.policy import EgressPolicy
from tests.net.guest import WAIT, Guest, Sink, allocate, packets
from tests.net.topology import INET4, UPLINK4

pytestmark = pytest.mark.net

RECORDS = {
    ("api.example.com", dns.A): "198.51.100.1",
    ("api.example.com", dns.AAAA): "2001:db8:1::1",
    ("a.wild.example", dns.A): "198.51.100.2",
    ("wild.example", dns.A): "203.0.113.1",
}


def query(name: str, qtype: int, qid: int = 7) -> bytes:
    labels = b"".join(bytes([len(x)]) + x.encode() for x in name.split("."))
    return (
        struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
        + labels
        + b"\0"
        + struct.pack("!HH", qtype, 1)
    )


class Upstream:
    """A tiny authoritative server in the fake internet (UDP and TCP) that records what it was
    asked, and over which transport."""

    def __init__(self, ns: str) -> None:
        self.ns = ns
        self.asked: list[tuple[str, int]] = []
        self.asked_tcp: list[tuple[str, int]] = []

    def answer(self, msg: bytes, log: list[tuple[str, int]]) -> bytes:
        name, end = dns.question(msg)
        qtype = struct.unpack_from("!H", msg, end - 4)[0]
        log.append((name, qtype))
        address = RECORDS.get((name, qtype))
        rdata = ipaddress.ip_address(address).packed if address else b""
        head = msg[:2] + struct.pack("!HHHHH", 0x8180, 1, 1 if address else 0, 0, 0)
        answer = struct.pack("!HHHIH", 0xC00C, qtype, 1, 300, len(rdata)) + rdata
        return head + msg[12:end] + (answer if address else b"")

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with netns.entered(self.ns):
            udp = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
            tcp = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
        with udp, tcp:
            await udp.bind((INET4, 53))
            await tcp.bind((INET4, 53))
            tcp.listen()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._tcp, tcp)
                task_status.started()
                while True:
                    msg, client = await udp.recvfrom(4096)
                    await udp.sendto(self.answer(msg, self.asked), client)

    async def _tcp(self, listener) -> None:
        while True:
            conn, _ = await listener.accept()
            async with trio.SocketStream(conn) as stream:
                size = struct.unpack("!H", await stream.receive_some(2))[0]
                reply = self.answer(await stream.receive_some(size), self.asked_tcp)
                await stream.send_all(struct.pack("!H", len(reply)) + reply)


async def lookup(guest: Guest, name: str, qtype: int) -> tuple[int, list[str]]:
    """Ask the gateway as the guest would; (rcode, addresses) of the answer."""
    guest.send(str(guest.gw4), dport=53, payload=query(name, qtype))
    with trio.fail_after(WAIT):
        while True:
            await trio.lowlevel.wait_readable(guest.fd)
            fields = frames.parse(os.read(guest.fd, 65536)[len(frames.VNET_HDR) :])
            if fields and fields.get("proto") == frames.UDP and fields.get("sport") == 53:
                reply = fields["payload"]
                rcode = struct.unpack_from("!H", reply, 2)[0] & 0xF
                return rcode, [str(a) for a, _ in dns.answers(reply)]


def with_resolver(topo, policy: EgressPolicy, body) -> Upstream:
    """Run `await body(manager, guest)` while the sandbox's resolver and the upstream serve."""
    config = NetworkConfig(pool_size=1, ipv6_forwarding=True, dns_upstream=INET4)
    manager = NetworkManager(config, ns=topo.host)
    manager.start()
    upstream = Upstream(topo.inet)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(upstream.serve)
            await nursery.start(manager.maintain)
            guest = Guest(topo.host, await manager.allocate("sbx1", policy))
            try:
                await body(manager, guest)
            finally:
                guest.close()
                manager.release(guest.net)
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        manager.close()
    return upstream


def test_allowed_names_resolve_and_open_their_addresses(topo):
    policy = EgressPolicy(allow_out=("api.example.com", "*.wild.example"), deny_out=("0.0.0.0/0",))
    results = {}

    async def body(manager: NetworkManager, guest: Guest) -> None:
        sink = Sink(topo.inet)
        try:
            guest.send("198.51.100.1", payload=b"before")
            results["api"] = await lookup(guest, "api.example.com", dns.A)
            results["api6"] = await lookup(guest, "api.example.com", dns.AAAA)
            results["wild"] = await lookup(guest, "A.Wild.Example", dns.A)
            results["apex"] = await lookup(guest, "wild.example", dns.A)
            results["other"] = await lookup(guest, "evil.example", dns.A)
            guest.send("198.51.100.1", payload=b"after")
            guest.send("2001:db8:1::1", payload=b"after6")
            guest.send("203.0.113.1", payload=b"not pinned")
            results["got4"] = sink.until(b"after")
            results["got6"] = sink.until(b"after6", family=6)
            results["packets"] = packets(manager, "sbx1")
        finally:
            sink.close()

    upstream = with_resolver(topo, policy, body)
    assert results["api"] == (0, ["198.51.100.1"])
    assert results["api6"] == (0, ["2001:db8:1::1"])
    assert results["wild"] == (0, ["198.51.100.2"])
    assert results["apex"] == (dns.NXDOMAIN, [])
    assert results["other"] == (dns.NXDOMAIN, [])
    assert upstream.asked == [
        ("api.example.com", dns.A),
        ("api.example.com", dns.AAAA),
        ("a.wild.example", dns.A),
    ]
    assert results["got4"] == [(b"after", UPLINK4)]
    assert [p for p, _ in results["got6"]] == [b"after6"]
    assert results["packets"] == {"PASS_DNS": 5, "PASS_ALLOW": 2, "DROP_DENY": 2}


def test_without_domain_rules_every_name_is_forwarded(topo):
    results = {}

    async def body(manager: NetworkManager, guest: Guest) -> None:
        results["wild"] = await lookup(guest, "wild.example", dns.A)
        results["none"] = await lookup(guest, "nothing.example", dns.A)
        results["packets"] = packets(manager, "sbx1")

    with_resolver(topo, EgressPolicy(), body)
    assert results["wild"] == (0, ["203.0.113.1"])
    assert results["none"] == (0, [])
    assert results["packets"] == {"PASS_DNS": 2}


def test_pins_expire_but_static_rules_stay(manager, topo, monkeypatch):
    policy = EgressPolicy(allow_out=("x.example", "198.51.100.1"), deny_out=("0.0.0.0/0",))
    guest = Guest(topo.host, allocate(manager, "sbx1", policy))
    now = [1000.0]
    monkeypatch.setattr("cube.net.rules.time.monotonic", lambda: now[0])
    rules = manager.rules("sbx1")
    try:
        rules.pin(
            "x.example", [ipaddress.ip_address(a) for a in ("198.51.100.1", "198.51.100.2")], 60
        )
        guest.send("198.51.100.1")
        guest.send("198.51.100.2")
        assert packets(manager, "sbx1") == {"PASS_ALLOW": 2}
        now[0] += 59
        rules.expire()
        assert rules.pinned == 2
        now[0] += 2
        rules.expire()
        assert rules.pinned == 0
        guest.send("198.51.100.1")
        guest.send("198.51.100.2")
    finally:
        guest.close()
    assert packets(manager, "sbx1") == {"PASS_ALLOW": 3, "DROP_DENY": 1}


def test_policy_update_keeps_only_pins_of_still_allowed_domains(manager):
    policy = EgressPolicy(allow_out=("x.example", "y.example"), deny_out=("0.0.0.0/0",))
    allocate(manager, "sbx1", policy)
    rules = manager.rules("sbx1")
    rules.pin("x.example", [ipaddress.ip_address("198.51.100.1")], 60)
    rules.pin("y.example", [ipaddress.ip_address("198.51.100.2")], 60)
    manager.update_policy("sbx1", EgressPolicy(allow_out=("y.example",), deny_out=("0.0.0.0/0",)))
    assert rules.pinned == 1


def test_dns_over_tcp(topo):
    policy = EgressPolicy(allow_out=("api.example.com",), deny_out=("0.0.0.0/0",))
    results = {}

    async def body(manager: NetworkManager, guest: Guest) -> None:
        with netns.entered(topo.host):
            client = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
        with trio.fail_after(WAIT):
            await client.connect((str(guest.gw4), 53))
            stream = trio.SocketStream(client)
            for name in ("api.example.com", "evil.example"):
                msg = query(name, dns.A)
                await stream.send_all(struct.pack("!H", len(msg)) + msg)
                size = struct.unpack("!H", await stream.receive_some(2))[0]
                reply = await stream.receive_some(size)
                rcode = struct.unpack_from("!H", reply, 2)[0] & 0xF
                results[name] = (rcode, [str(a) for a, _ in dns.answers(reply)])
            await stream.aclose()
        results["pinned"] = manager.rules("sbx1").pinned

    upstream = with_resolver(topo, policy, body)
    assert results["api.example.com"] == (0, ["198.51.100.1"])
    assert results["evil.example"] == (dns.NXDOMAIN, [])
    assert results["pinned"] == 1
    assert upstream.asked_tcp == [("api.example.com", dns.A)] and upstream.asked == []
