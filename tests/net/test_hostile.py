"""A guest that lies: spoofed sources, VLAN tags, odd ethertypes, fragments, IPv6 extension
headers, truncated and paged headers. Every case is judged by the filter's counters."""

from __future__ import annotations

import ipaddress
import os
import struct

import pytest

from cube.net import frames
from cube.net.policy import EgressPolicy
from tests.net.guest import Guest, allocate, packets

pytestmark = pytest.mark.net

DENIED = ipaddress.ip_address("203.0.113.1")
ALLOWED = ipaddress.ip_address("198.51.100.1")


@pytest.fixture
def guest(manager, topo):
    g = Guest(topo.host, allocate(manager, "sbx1", EgressPolicy(deny_out=(str(DENIED),))))
    yield g
    g.close()


def udp(g: Guest, dst, src=None, **kw) -> bytes:
    src = src or (g.ip4 if dst.version == 4 else g.ip6)
    body = frames.l4(src, dst, frames.UDP, 40000, 9000, b"x")
    return frames.ip(src, dst, frames.UDP, body, **kw)


def test_spoofed_sources_are_dropped(manager, guest):
    other = ipaddress.ip_address("10.20.0.6")  # the next slot's guest
    guest.write(
        frames.packet(
            guest.gateway_mac, "02:00:00:00:00:01", guest.ip4, ALLOWED, frames.UDP, 1, 9000
        )
    )
    guest.write(frames.packet(guest.gateway_mac, guest.mac, other, ALLOWED, frames.UDP, 1, 9000))
    guest.write(
        frames.packet(
            guest.gateway_mac,
            guest.mac,
            ipaddress.ip_address("2001:db8::9"),
            ipaddress.ip_address("2001:db8:1::1"),
            frames.UDP,
            1,
            9000,
        )
    )
    guest.write(frames.arp_request(guest.mac, other, guest.gw4))
    guest.write(frames.arp_request("02:00:00:00:00:01", guest.ip4, guest.gw4))
    guest.write(frames.arp_request(guest.mac, guest.ip4, guest.gw4))
    assert packets(manager, "sbx1") == {"DROP_SPOOF": 5, "PASS_ARP": 1}


def test_vlan_tags_and_other_ethertypes_are_dropped(manager, guest):
    inner = udp(guest, ALLOWED)
    for tpid in (0x8100, 0x88A8):  # 802.1Q and 802.1ad; the stack may strip the first tag
        tagged = struct.pack("!HH", 5, frames.ETH_IP) + inner
        guest.write(frames.ether(guest.gateway_mac, guest.mac, tpid, tagged))
    for ethertype in (0x88CC, 0x8864, 0x0842):  # LLDP, PPPoE, wake-on-LAN
        guest.write(frames.ether(guest.gateway_mac, guest.mac, ethertype, inner))
    assert packets(manager, "sbx1") == {"DROP_ETHERTYPE": 5}


def test_malformed_headers_are_dropped(manager, guest):
    guest.write(frames.ether(guest.gateway_mac, guest.mac, frames.ETH_IP, b"\x45\x00\x00"))
    short_ihl = bytearray(udp(guest, ALLOWED))
    short_ihl[0] = 0x44
    guest.write(frames.ether(guest.gateway_mac, guest.mac, frames.ETH_IP, bytes(short_ihl)))
    guest.write(frames.ether(guest.gateway_mac, guest.mac, frames.ETH_IPV6, b"\x60" + bytes(20)))
    guest.write(frames.ether(guest.gateway_mac, guest.mac, frames.ETH_ARP, b"\x00\x01"))
    assert packets(manager, "sbx1") == {"DROP_MALFORMED": 4}


def test_fragments_are_judged_by_address_and_never_count_as_dns(manager, guest):
    first_fragment = 0x2000  # MF set, offset 0: has ports, but is still a fragment
    later_fragment = 0x0010
    for frag in (first_fragment, later_fragment):
        guest.write(
            frames.ether(guest.gateway_mac, guest.mac, frames.ETH_IP, udp(guest, DENIED, frag=frag))
        )
        guest.write(
            frames.ether(
                guest.gateway_mac, guest.mac, frames.ETH_IP, udp(guest, ALLOWED, frag=frag)
            )
        )
    dns = frames.l4(guest.ip4, guest.gw4, frames.UDP, 40000, 53, b"q")
    guest.write(
        frames.ether(
            guest.gateway_mac,
            guest.mac,
            frames.ETH_IP,
            frames.ip(guest.ip4, guest.gw4, frames.UDP, dns, frag=first_fragment),
        )
    )
    assert packets(manager, "sbx1") == {"DROP_DENY": 2, "PASS_DEFAULT": 2, "DROP_ALWAYS": 1}


def test_ipv6_extension_headers_are_dropped(manager, guest):
    dst = ipaddress.ip_address("2001:db8:1::1")
    body = frames.l4(guest.ip6, dst, frames.UDP, 40000, 9000, b"x")
    hop_by_hop = bytes([frames.UDP, 0, 1, 4, 0, 0, 0, 0])
    fragment = bytes([frames.UDP, 0, 0, 0, 0, 0, 0, 1])
    routing = bytes([frames.UDP, 0, 0, 0, 0, 0, 0, 0])
    for nexthdr, ext in ((0, hop_by_hop), (44, fragment), (43, routing)):
        guest.write(
            frames.ether(
                guest.gateway_mac,
                guest.mac,
                frames.ETH_IPV6,
                frames.ip(guest.ip6, dst, nexthdr, ext + body),
            )
        )
    assert packets(manager, "sbx1") == {"DROP_IPV6_EXT": 3}


def test_neighbour_discovery_only_on_the_link(manager, guest):
    link_local = ipaddress.ip_address("fe80::63:62ff:fe00:0")
    solicited = ipaddress.ip_address("ff02::1:ff00:1")
    ns = bytes([135, 0, 0, 0]) + bytes(4) + guest.gw6.packed
    nd = frames.ip(link_local, solicited, frames.ICMPV6, ns, hop=255)
    guest.write(frames.ether("33:33:ff:00:00:01", guest.mac, frames.ETH_IPV6, nd))
    remote = ipaddress.ip_address("2001:db8:1::1")
    fake_nd = frames.ip(ipaddress.ip_address("2001:db8::66"), remote, frames.ICMPV6, ns, hop=255)
    guest.write(frames.ether(guest.gateway_mac, guest.mac, frames.ETH_IPV6, fake_nd))
    low_hop = frames.ip(link_local, solicited, frames.ICMPV6, ns, hop=64)
    guest.write(frames.ether("33:33:ff:00:00:01", guest.mac, frames.ETH_IPV6, low_hop))
    someone_else = ipaddress.ip_address("2001:db8::66")  # to the gateway, not in our name
    spoofed = frames.ip(someone_else, guest.gw6, frames.ICMPV6, ns, hop=255)
    guest.write(frames.ether(guest.gateway_mac, guest.mac, frames.ETH_IPV6, spoofed))
    dad = frames.ip(ipaddress.ip_address("::"), solicited, frames.ICMPV6, ns, hop=255)
    guest.write(frames.ether("33:33:ff:00:00:01", guest.mac, frames.ETH_IPV6, dad))
    assert packets(manager, "sbx1") == {"PASS_ND": 2, "DROP_SPOOF": 3}


def test_headers_in_paged_data_are_still_parsed(manager, guest):
    # hdr_len=14 makes tun put only the Ethernet header in the linear area (ebpf-here.md P5).
    vnet = struct.pack("<BBHHHH", 0, 0, 14, 0, 0, 0)
    for dst in (DENIED, ALLOWED):
        body = frames.l4(guest.ip4, dst, frames.UDP, 40000, 9000, bytes(5000))
        frame = frames.ether(
            guest.gateway_mac,
            guest.mac,
            frames.ETH_IP,
            frames.ip(guest.ip4, dst, frames.UDP, body, frag=0),
        )
        os.write(guest.fd, vnet + frame)
    assert packets(manager, "sbx1") == {"DROP_DENY": 1, "PASS_DEFAULT": 1}
