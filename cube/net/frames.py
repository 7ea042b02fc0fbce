"""Raw Ethernet frames as a guest writes them into its tap, and a reader for what comes back.

Used by the host-tier tests and by the benchmark to play the guest without a VM. Frames carry
the 10-byte virtio-net header in front because Cube's taps use IFF_VNET_HDR, like the VMM.
Checksums are computed so that the host stack accepts what it receives (TCP would otherwise be
dropped before reaching a socket).
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

ETH_IP, ETH_IPV6, ETH_ARP, ETH_VLAN = 0x0800, 0x86DD, 0x0806, 0x8100
UDP, TCP, ICMPV6 = 17, 6, 58
VNET_HDR = bytes(10)  # virtio_net_hdr with no offloads
TCP_SYN, TCP_ACK, TCP_RST = 0x02, 0x10, 0x04


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _pseudo(src: IPAddress, dst: IPAddress, proto: int, length: int) -> bytes:
    if src.version == 4:
        return src.packed + dst.packed + struct.pack("!BBH", 0, proto, length)
    return src.packed + dst.packed + struct.pack("!I3xB", length, proto)


def l4(
    src: IPAddress,
    dst: IPAddress,
    proto: int,
    sport: int,
    dport: int,
    payload: bytes = b"",
    tcp_flags: int = TCP_SYN,
) -> bytes:
    """A UDP datagram or a TCP segment (flags `tcp_flags`, no options) with its checksum."""
    if proto == UDP:
        head = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)
    else:
        head = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, tcp_flags, 65535, 0, 0)
    seg = head + payload
    csum = checksum(_pseudo(src, dst, proto, len(seg)) + seg) or 0xFFFF
    at = 6 if proto == UDP else 16
    return seg[:at] + struct.pack("!H", csum) + seg[at + 2 :]


def ip(
    src: IPAddress, dst: IPAddress, proto: int, body: bytes, frag: int = 0x4000, hop: int = 64
) -> bytes:
    """An IPv4 header (DF by default; `frag` is the raw flags+offset field) or an IPv6 header."""
    if src.version == 4:
        head = struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), 1, frag, hop, proto, 0, src.packed, dst.packed
        )
        return head[:10] + struct.pack("!H", checksum(head)) + head[12:] + body
    return struct.pack("!IHBB16s16s", 6 << 28, len(body), proto, hop, src.packed, dst.packed) + body


def ether(dst_mac: str, src_mac: str, ethertype: int, body: bytes) -> bytes:
    return mac_bytes(dst_mac) + mac_bytes(src_mac) + struct.pack("!H", ethertype) + body


def packet(
    dst_mac: str, src_mac: str, src: IPAddress, dst: IPAddress, proto: int, *segment: Any
) -> bytes:
    """A whole frame (without the virtio-net header): Ethernet, IP, then `l4(src, dst, proto,
    *segment)`, i.e. segment = (sport, dport[, payload[, tcp_flags]])."""
    body = ip(src, dst, proto, l4(src, dst, proto, *segment))
    return ether(dst_mac, src_mac, ETH_IP if src.version == 4 else ETH_IPV6, body)


def arp_request(src_mac: str, src: ipaddress.IPv4Address, target: ipaddress.IPv4Address) -> bytes:
    body = struct.pack(
        "!HHBBH6s4s6s4s",
        1,
        ETH_IP,
        6,
        4,
        1,
        mac_bytes(src_mac),
        src.packed,
        bytes(6),
        target.packed,
    )
    return ether("ff:ff:ff:ff:ff:ff", src_mac, ETH_ARP, body)


def parse(frame: bytes) -> dict[str, object] | None:
    """The fields tests look at in a frame the host sent to the guest, or None if not IP."""
    ethertype = struct.unpack_from("!H", frame, 12)[0]
    if ethertype == ETH_IP:
        ihl = (frame[14] & 0x0F) * 4
        proto, src, dst = frame[23], frame[26:30], frame[30:34]
        l4_at = 14 + ihl
        addr: type[IPAddress] = ipaddress.IPv4Address
    elif ethertype == ETH_IPV6:
        proto, src, dst = frame[20], frame[22:38], frame[38:54]
        l4_at = 54
        addr = ipaddress.IPv6Address
    else:
        return None
    fields: dict[str, object] = {"proto": proto, "src": addr(src), "dst": addr(dst)}
    if proto in (UDP, TCP):
        fields["sport"], fields["dport"] = struct.unpack_from("!HH", frame, l4_at)
    if proto == UDP:
        fields["payload"] = frame[l4_at + 8 :]
    if proto == TCP:
        fields["flags"] = frame[l4_at + 13]
    return fields
