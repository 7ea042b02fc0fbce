"""Egress decisions end to end: frames written into a tap, checked by counters and receivers."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from cube.net import frames, netns
from cube.net.policy import EgressPolicy
from tests.net.guest import Guest, Sink, allocate, packets
from tests.net.topology import UPLINK4, UPLINK6, ip

pytestmark = pytest.mark.net


def test_allow_wins_over_deny_and_default_passes(manager, topo):
    policy = EgressPolicy(allow_out=("198.51.100.1",), deny_out=("198.51.100.0/24",))
    guest = Guest(topo.host, allocate(manager, "sbx1", policy))
    sink = Sink(topo.inet)
    try:
        for dst in ("198.51.100.1", "198.51.100.2", "203.0.113.1"):
            guest.send(dst)
        got = sink.until(b"203.0.113.1")
    finally:
        guest.close()
        sink.close()
    assert got == [(b"198.51.100.1", UPLINK4), (b"203.0.113.1", UPLINK4)]  # masqueraded
    assert packets(manager, "sbx1") == {"PASS_ALLOW": 1, "DROP_DENY": 1, "PASS_DEFAULT": 1}


def test_rule_changes_apply_to_the_next_packet(manager, topo):
    guest = Guest(topo.host, allocate(manager, "sbx1", EgressPolicy(deny_out=("198.51.100.2",))))
    sink = Sink(topo.inet)
    try:
        guest.send("198.51.100.2", payload=b"before")
        guest.send("198.51.100.1", payload=b"m1")
        first = sink.until(b"m1")
        manager.update_policy("sbx1", EgressPolicy(deny_out=("198.51.100.1",)))
        guest.send("198.51.100.1", payload=b"after")
        guest.send("198.51.100.2", payload=b"m2")
        second = sink.until(b"m2")
    finally:
        guest.close()
        sink.close()
    assert [p for p, _ in first] == [b"m1"]
    assert [p for p, _ in second] == [b"m2"]
    assert packets(manager, "sbx1") == {"PASS_DEFAULT": 2, "DROP_DENY": 2}


def test_all_traffic_means_both_families(manager, topo):
    policy = EgressPolicy(allow_out=("203.0.113.1", "2001:db8:1::/64"), deny_out=("0.0.0.0/0",))
    guest = Guest(topo.host, allocate(manager, "sbx1", policy))
    sink = Sink(topo.inet)
    try:
        for dst in ("198.51.100.1", "2001:db8:2::1", "2001:db8:1::1", "203.0.113.1"):
            guest.send(dst)
        got4 = sink.until(b"203.0.113.1")
        got6 = sink.until(b"2001:db8:1::1", family=6)
    finally:
        guest.close()
        sink.close()
    assert got4 == [(b"203.0.113.1", UPLINK4)]
    assert got6 == [(b"2001:db8:1::1", UPLINK6)]
    assert packets(manager, "sbx1") == {"PASS_ALLOW": 2, "DROP_DENY": 2}


def test_ipv6_precedence(manager, topo):
    policy = EgressPolicy(allow_out=("2001:db8:1::1",), deny_out=("2001:db8::/32",))
    guest = Guest(topo.host, allocate(manager, "sbx1", policy))
    sink = Sink(topo.inet)
    try:
        guest.send("2001:db8:2::1")
        guest.send("2001:db8:1::1")
        got = sink.until(b"2001:db8:1::1", family=6)
    finally:
        guest.close()
        sink.close()
    assert [p for p, _ in got] == [b"2001:db8:1::1"]
    assert packets(manager, "sbx1") == {"PASS_ALLOW": 1, "DROP_DENY": 1}


ALWAYS_DENIED = (
    "169.254.169.254",  # cloud metadata
    "fd00:ec2::254",
    "10.0.0.1",
    "172.16.0.1",
    "192.168.1.1",
    "100.64.0.1",
    "127.0.0.1",
    "::1",
    "224.0.0.251",
    "255.255.255.255",
    "fe80::1",
    "ff02::fb",
    "::ffff:198.51.100.1",  # v4-mapped: must not reach the IPv4 destination
    "64:ff9b::c633:6401",  # NAT64 of 198.51.100.1
    UPLINK4,  # the host's own addresses
    UPLINK6,
)


def test_always_denied_even_when_allowed(manager, topo):
    everything = EgressPolicy(allow_out=("0.0.0.0/0", "10.0.0.0/8", "fe80::/10"))
    guest = Guest(topo.host, allocate(manager, "sbx1", everything))
    other = allocate(manager, "sbx2", everything)
    sink = Sink(topo.inet)
    targets = [
        *ALWAYS_DENIED,
        other.guest.address.split("/")[0],
        other.guest.gateway,
        other.guest.address6.split("/")[0],
    ]
    try:
        for dst in targets:
            guest.send(dst)
        guest.send("198.51.100.1", payload=b"marker")
        got = sink.until(b"marker")
    finally:
        guest.close()
        sink.close()
    assert got == [(b"marker", UPLINK4)]
    assert packets(manager, "sbx1") == {"DROP_ALWAYS": len(targets), "PASS_ALLOW": 1}
    assert packets(manager, "sbx2") == {}


def test_gateway_answers_dns_only(manager, topo):
    net = allocate(manager, "sbx1", EgressPolicy(deny_out=("0.0.0.0/0",)))
    guest = Guest(topo.host, net)
    with netns.entered(topo.host):
        dns4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        dns4.bind((net.guest.gateway, 53))
        dns6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        dns6.bind((net.guest.gateway6, 53))
    try:
        guest.send(net.guest.gateway, dport=53, payload=b"q4")
        guest.send(net.guest.gateway6, dport=53, payload=b"q6")
        guest.send(net.guest.gateway, dport=22)
        guest.send(net.guest.gateway, proto=frames.TCP, dport=3000)
        for sock in (dns4, dns6):
            sock.settimeout(10)
        assert dns4.recvfrom(100)[0] == b"q4"
        assert dns6.recvfrom(100)[0] == b"q6"
    finally:
        guest.close()
        dns4.close()
        dns6.close()
    assert packets(manager, "sbx1") == {"PASS_DNS": 2, "DROP_ALWAYS": 2}


def test_no_internet_access_means_nothing_out(manager, topo):
    policy = EgressPolicy(allow_internet_access=False, allow_out=("198.51.100.1",))
    net = allocate(manager, "sbx1", policy)
    guest = Guest(topo.host, net)
    try:
        guest.send("198.51.100.1")
        guest.send("2001:db8:1::1")
        guest.send(net.guest.gateway, dport=53)
        guest.write(frames.arp_request(guest.mac, guest.ip4, guest.gw4))
        replies = guest.frames_until(lambda f: False, timeout=0)  # drain, nothing expected
    finally:
        guest.close()
    assert all(f["dst"] != guest.ip4 or f["proto"] != frames.UDP for f in replies)
    assert packets(manager, "sbx1") == {"DROP_NO_INTERNET": 3, "PASS_ARP": 1}
    manager.update_policy("sbx1", EgressPolicy())  # internet back on: the next packet passes
    guest = Guest(topo.host, net)
    try:
        guest.send("198.51.100.1")
    finally:
        guest.close()
    assert packets(manager, "sbx1") == {"DROP_NO_INTERNET": 3, "PASS_ARP": 1, "PASS_DEFAULT": 1}


def test_tcp_handshake_through_nat(manager, topo):
    with netns.entered(topo.inet):
        listener = socket.socket()
        listener.bind(("198.51.100.1", 8080))
        listener.listen()
    guest = Guest(topo.host, allocate(manager, "sbx1", EgressPolicy(deny_out=("203.0.113.1",))))
    try:
        guest.send("203.0.113.1", proto=frames.TCP, dport=8080)
        guest.send("198.51.100.1", proto=frames.TCP, dport=8080)
        seen = guest.frames_until(lambda f: f.get("proto") == frames.TCP)
    finally:
        guest.close()
        listener.close()
    synack = [f for f in seen if f.get("proto") == frames.TCP]
    assert len(synack) == 1
    assert synack[0]["src"] == ipaddress.ip_address("198.51.100.1")
    assert synack[0]["dst"] == guest.ip4
    assert synack[0]["flags"] == frames.TCP_SYN | frames.TCP_ACK
    assert packets(manager, "sbx1") == {"DROP_DENY": 1, "PASS_DEFAULT": 1}


def test_new_host_addresses_join_the_always_deny_list(manager, topo):
    guest = Guest(topo.host, allocate(manager, "sbx1", EgressPolicy()))
    try:
        ip("-n", topo.host, "addr", "add", "203.0.113.200/32", "dev", "lo")
        guest.send("203.0.113.200")  # the filter does not know it yet (nft input still drops)
        manager.refresh_blocklist()
        guest.send("203.0.113.200")
        ip("-n", topo.host, "addr", "del", "203.0.113.200/32", "dev", "lo")
        manager.refresh_blocklist()
        guest.send("203.0.113.200", payload=b"routed again")
    finally:
        guest.close()
    assert packets(manager, "sbx1") == {"PASS_DEFAULT": 2, "DROP_ALWAYS": 1}
