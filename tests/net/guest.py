"""Playing the guest without a VM: write frames into a sandbox's tap, read what comes back, and
catch what reaches the fake internet."""

from __future__ import annotations

import ipaddress
import os
import select
import socket

import trio
from pyroute2 import IPRoute

from cube.net import frames, netns, tap
from cube.net.addressing import Lease
from cube.net.manager import NetworkManager
from cube.net.policy import EgressPolicy

PORT = 9000
WAIT = 10.0  # seconds to wait for something that must arrive; never a pass/fail threshold


def allocate(mgr: NetworkManager, sandbox_id: str, policy: EgressPolicy) -> Lease:
    return trio.run(mgr.allocate, sandbox_id, policy)


def packets(mgr: NetworkManager, sandbox_id: str) -> dict[str, int]:
    """The sandbox's non-zero packet counters by reason."""
    return {k: v for k, v in mgr.stats(sandbox_id).packets.items() if v}


class Guest:
    """A sandbox's side of its tap: an fd opened as the VMM opens it, in the host namespace."""

    def __init__(self, ns: str, net: Lease) -> None:
        self.net = net
        with netns.entered(ns):
            self.fd = tap.open_tap(net.tap)
            with IPRoute() as ipr:
                link = ipr.get_links(ipr.link_lookup(ifname=net.tap)[0])[0]
                self.gateway_mac = link.get_attr("IFLA_ADDRESS")
        os.set_blocking(self.fd, False)
        self.mac = net.mac
        self.ip4 = ipaddress.ip_address(net.guest.address.split("/")[0])
        self.gw4 = ipaddress.ip_address(net.guest.gateway)
        self.ip6 = ipaddress.ip_address(net.guest.address6.split("/")[0])
        self.gw6 = ipaddress.ip_address(net.guest.gateway6)

    def close(self) -> None:
        os.close(self.fd)

    def write(self, frame: bytes) -> None:
        os.write(self.fd, frames.VNET_HDR + frame)

    def send(
        self,
        dst: str,
        proto: int = frames.UDP,
        dport: int = PORT,
        payload: bytes = b"",
        src: str | None = None,
        src_mac: str | None = None,
    ) -> None:
        """One UDP datagram (or TCP SYN) from the guest, by default in its own name."""
        d = ipaddress.ip_address(dst)
        s = ipaddress.ip_address(src) if src else (self.ip4 if d.version == 4 else self.ip6)
        self.write(
            frames.packet(
                self.gateway_mac,
                src_mac or self.mac,
                s,
                d,
                proto,
                40000,
                dport,
                payload or dst.encode(),
            )
        )

    def frames_until(self, match, timeout: float = WAIT) -> list[dict]:
        """Frames the host sends to the guest, until one satisfies `match` (or the timeout)."""
        seen = []
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        while poller.poll(timeout * 1000):
            data = os.read(self.fd, 65536)[len(frames.VNET_HDR) :]
            fields = frames.parse(data)
            if fields is not None:
                seen.append(fields)
                if match(fields):
                    break
        return seen


class Sink:
    """UDP sockets on port PORT in the fake internet, one per family."""

    def __init__(self, ns: str) -> None:
        with netns.entered(ns):
            self.v4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.v4.bind(("0.0.0.0", PORT))
            self.v6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            self.v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            self.v6.bind(("::", PORT))

    def close(self) -> None:
        self.v4.close()
        self.v6.close()

    def until(self, marker: bytes, family: int = 4) -> list[tuple[bytes, str]]:
        """(payload, source address) of what arrived, up to and including `marker`."""
        sock = self.v4 if family == 4 else self.v6
        sock.settimeout(WAIT)
        got = []
        while True:
            data, addr = sock.recvfrom(65536)
            got.append((data, addr[0]))
            if data == marker:
                return got
