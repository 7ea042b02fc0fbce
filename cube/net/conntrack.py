"""Forget a released sandbox's connections, so that replies meant for it never reach the next.

A slot's addresses are reused. Conntrack keeps masqueraded flows for minutes (UDP) to days (TCP
established), and a late reply to one of them would be un-NATed to the guest address and
delivered to whichever sandbox holds it now. Deleting every entry whose original source is the
old guest closes that channel.

This speaks ctnetlink directly (one dump, then one delete per match, each carrying the entry's
original tuple copied verbatim): pyroute2's conntrack client takes ~30 ms even for an empty
table and its kernel-side filter rejects IPv6. Runs in the current thread's network namespace.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Iterator

NETLINK_NETFILTER = 12
CT_GET, CT_DELETE = (1 << 8) | 1, (1 << 8) | 2  # NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_*
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
CTA_TUPLE_ORIG, CTA_TUPLE_IP, CTA_ZONE = 1, 1, 18
CTA_IP_V4_SRC, CTA_IP_V6_SRC = 1, 3
NLA_NESTED = 0x8000
_NLMSG = struct.Struct("=IHHII")
_NLA = struct.Struct("=HH")


def _attrs(data: bytes) -> Iterator[tuple[int, bytes, bytes]]:
    """(type, payload, whole attribute) for each netlink attribute in `data`."""
    at = 0
    while at + 4 <= len(data):
        length, kind = _NLA.unpack_from(data, at)
        if length < 4:
            return
        yield kind & ~NLA_NESTED, data[at + 4 : at + length], data[at : at + length]
        at += (length + 3) & ~3


def _attr(data: bytes, kind: int) -> bytes | None:
    return next((payload for k, payload, _ in _attrs(data) if k == kind), None)


def _source(tuple_orig: bytes) -> bytes | None:
    """The original source address (4 or 16 bytes) inside a CTA_TUPLE_ORIG payload."""
    tuple_ip = _attr(tuple_orig, CTA_TUPLE_IP) or b""
    return _attr(tuple_ip, CTA_IP_V4_SRC) or _attr(tuple_ip, CTA_IP_V6_SRC)


def _request(kind: int, flags: int, family: int, body: bytes = b"") -> bytes:
    payload = struct.pack("=BBH", family, 0, 0) + body
    return _NLMSG.pack(_NLMSG.size + len(payload), kind, NLM_F_REQUEST | flags, 1, 0) + payload


def _messages(sock: socket.socket) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of replies until DONE or an ACK/error; raises on a netlink error."""
    while True:
        data = sock.recv(1 << 16)
        at = 0
        while at < len(data):
            length, kind, _, _, _ = _NLMSG.unpack_from(data, at)
            payload = data[at + _NLMSG.size : at + length]
            at += (length + 3) & ~3
            if kind == NLMSG_DONE:
                return
            if kind == NLMSG_ERROR:
                (code,) = struct.unpack_from("=i", payload)
                if code:
                    raise OSError(-code, f"ctnetlink: {os.strerror(-code)}")
                return
            yield kind, payload


def forget(addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> int:
    """Delete conntrack entries originated by any of `addresses`; returns how many."""
    wanted = {a.packed for a in addresses}
    doomed = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as sock:
        sock.send(_request(CT_GET, NLM_F_DUMP, socket.AF_UNSPEC))
        for _, payload in _messages(sock):
            family, attrs = payload[0], payload[4:]
            found = {k: (value, whole) for k, value, whole in _attrs(attrs)}
            if CTA_TUPLE_ORIG in found and _source(found[CTA_TUPLE_ORIG][0]) in wanted:
                zone = found.get(CTA_ZONE, (b"", b""))[1]
                doomed.append((family, found[CTA_TUPLE_ORIG][1] + zone))
        deleted = 0
        for family, body in doomed:
            sock.send(_request(CT_DELETE, NLM_F_ACK, family, body))
            try:
                list(_messages(sock))
                deleted += 1
            except OSError as e:  # gone meanwhile (timed out or closed)
                if e.errno != errno.ENOENT:
                    raise
    return deleted
