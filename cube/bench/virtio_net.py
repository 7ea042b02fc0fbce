"""Frames per second through the virtio-net device, TX and RX, against a real tap.

No guest: the bench plays the driver on real guest memory (`GuestRam`), reduced to the rings
(the queues are configured by restoring a transport state, not register by register), so what
it times is the device's own path: ring access, views of guest memory, readv/writev on the tap,
interrupts. Each round posts a full ring and times until the device has returned every chain:

- TX: 256 frames go to the tap, addressed to a MAC nobody has, so the namespace's stack drops
  them on arrival (a TSO super-frame is dropped before the host segments it: the TX figure
  with `tso` leaves out the host's segmentation work);
- RX: 256 frames are first queued in the tap from a packet socket while the device has no
  buffers, then the buffers are posted, so the sender's speed does not enter the figure. With
  `tso` they are 64 KiB TCP super-frames the tap hands over whole, into 64 KiB buffers.

The tap lives in a private network namespace (`ScratchNetns`, also used by the tests), so the
host's own network is never touched. Needs root.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import ip_address
from typing import TypeVar

import trio

from cube.net import frames, netns
from cube.vmm.devices import virtio_mmio as mmio
from cube.vmm.devices import virtio_net as vn
from cube.vmm.memory import GuestRam
from cube.vmm.virtqueue import DESC_F_WRITE, QueueState

ETH_P_ALL = 0x0003
BENCH_ETHERTYPE = 0x88B5  # "local experimental": nothing in the namespace handles it
GUEST_MAC = "02:00:00:00:00:02"
OTHER_MAC = "02:00:00:00:00:09"  # nobody's: the namespace drops what the guest sends at once
QSIZE = 256
MAX_TSO_FRAME = 65000
SOL_PACKET, PACKET_VNET_HDR = 263, 15
T = TypeVar("T")


class ScratchNetns:
    """A private network namespace `cube-nettest-<random>` holding one persistent tap."""

    def __init__(self, tap: str = "tap0") -> None:
        self.name = f"cube-nettest-{secrets.token_hex(4)}"
        self.tap = tap
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        try:
            # No IPv6: its autoconfiguration would put unasked-for frames on the tap.
            subprocess.run(
                ["ip", "netns", "exec", self.name, "sysctl", "-qw",
                 "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"],
                check=True, capture_output=True,
            )  # fmt: skip
            self.ip("tuntap", "add", "dev", tap, "mode", "tap")
            self.ip("link", "set", tap, "up")
        except BaseException:
            self.close()
            raise

    def ip(self, *args: str) -> None:
        subprocess.run(["ip", "-n", self.name, *args], check=True, capture_output=True)

    def inside(self, fn: Callable[[], T]) -> T:
        """Call `fn` inside the namespace: the names, sockets and taps it opens are resolved
        there, and keep their namespace afterwards."""
        with netns.entered(self.name):
            return fn()

    def packet_socket(self, tap: str | None = None) -> socket.socket:
        """A raw socket on a tap's host side: what it sends, the guest receives, and back."""

        def make() -> socket.socket:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            sock.bind((tap or self.tap, 0))
            return sock

        return self.inside(make)

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False, capture_output=True)


@contextlib.contextmanager
def scratch_netns(tap: str = "tap0") -> Iterator[ScratchNetns]:
    ns = ScratchNetns(tap)
    try:
        yield ns
    finally:
        ns.close()


class _Rings:
    """The driver's side of one queue on guest RAM: descriptor i always points at buffer i."""

    def __init__(self, ram: GuestRam, base: int, writable: bool, buf_bytes: int) -> None:
        self.ram, self.desc, self.avail, self.used = ram, base, base + 0x1000, base + 0x2000
        self.buffers, self.buf_bytes = base + 0x3000, buf_bytes
        self.avail_idx = 0
        flags = DESC_F_WRITE if writable else 0
        for i in range(QSIZE):
            ram.write(self.desc + 16 * i, struct.pack("<QIHH", self.buf(i), buf_bytes, flags, 0))

    def buf(self, i: int) -> int:
        return self.buffers + i * self.buf_bytes

    @property
    def end(self) -> int:
        return self.buf(QSIZE)

    def state(self) -> QueueState:
        return QueueState(QSIZE, QSIZE, True, self.desc, self.avail, self.used)

    def post_all(self) -> None:
        for i in range(QSIZE):
            slot = (self.avail_idx + i) % QSIZE
            self.ram.write(self.avail + 4 + 2 * slot, struct.pack("<H", i))
        self.avail_idx = (self.avail_idx + QSIZE) & 0xFFFF
        self.ram.fence()
        self.ram.write(self.avail + 2, struct.pack("<H", self.avail_idx))

    def all_used(self) -> bool:
        return struct.unpack("<H", self.ram.read(self.used + 2, 2))[0] == self.avail_idx


@dataclass(frozen=True)
class NetBench:
    tx_fps: float
    rx_fps: float
    frame_bytes: int
    frames: int
    tso: bool

    def table(self) -> str:
        kind = "TCP segmentation-offload frames" if self.tso else "frames"
        mb = self.frame_bytes / 1e6
        return "\n".join(
            [
                f"virtio-net, {self.frame_bytes}-byte {kind}, {self.frames} per direction",
                f"{'':<6} {'frames/s':>12} {'MB/s':>10}",
                f"{'TX':<6} {self.tx_fps:12.0f} {self.tx_fps * mb:10.1f}",
                f"{'RX':<6} {self.rx_fps:12.0f} {self.rx_fps * mb:10.1f}",
            ]
        )


def measure(rounds: int = 40, frame_bytes: int = 1514, tso: bool = False) -> NetBench:
    """TX and RX frames/s through the device, over `rounds` full rings each way.

    With `tso` the frames are TCP super-frames of up to 64 KiB, as a guest that negotiated
    TSO sends and receives bulk TCP.
    """
    if not 60 <= frame_bytes <= (MAX_TSO_FRAME if tso else 1514):
        raise ValueError("frame size must be 60 to 1514 bytes, or up to 65000 with TSO")
    with scratch_netns() as ns:
        ram = GuestRam.anonymous(64 << 20)
        dev = ns.inside(lambda: vn.VirtioNet(ns.tap, GUEST_MAC))
        sender = ns.inside(lambda: _sender(ns.tap, tso))
        try:
            return trio.run(_measure, ram, dev, sender, rounds, frame_bytes, tso)
        finally:
            sender.close()
            dev.close()
            ram.close()


def _sender(tap: str, tso: bool) -> socket.socket:
    """A raw socket that puts frames on the tap's host side (with a virtio header for TSO)."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    if tso:
        sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    sock.bind((tap, 0))
    return sock


def _frame(frame_bytes: int, tso: bool) -> tuple[bytes, bytes]:
    """(virtio header, frame): an unknown EtherType, or a TCP super-frame to be segmented."""
    macs = frames.mac_bytes(OTHER_MAC) + frames.mac_bytes(GUEST_MAC)
    if not tso:
        return bytes(12), (macs + BENCH_ETHERTYPE.to_bytes(2, "big")).ljust(frame_bytes, b"\xa5")
    tcp = struct.pack("!HHIIBBHHH", 40000, 7000, 1, 1, 5 << 4, 0x10, 65535, 0, 0)
    payload = bytes(frame_bytes - 54)
    src, dst = ip_address("10.99.0.2"), ip_address("10.99.0.1")
    frame = frames.ether(
        OTHER_MAC, GUEST_MAC, frames.ETH_IP, frames.ip(src, dst, frames.TCP, tcp + payload)
    )
    hdr = struct.pack("<BBHHHHH", vn.HDR_F_NEEDS_CSUM, vn.GSO_TCPV4, 54, 1448, 34, 16, 0)
    return hdr, frame


async def _measure(
    ram: GuestRam,
    dev: vn.VirtioNet,
    sender: socket.socket,
    rounds: int,
    frame_bytes: int,
    tso: bool,
) -> NetBench:
    irq = threading.Event()
    rx_rings = _Rings(ram, 0x10_0000, True, vn.HDR_SIZE + (MAX_TSO_FRAME if tso else 1514))
    tx_rings = _Rings(ram, rx_rings.end, False, vn.HDR_SIZE + frame_bytes)
    transport = mmio.VirtioMmio(dev, ram, irq.set)
    status = mmio.STATUS_ACKNOWLEDGE | mmio.STATUS_DRIVER | mmio.STATUS_FEATURES_OK
    offloads = vn.F_CSUM | vn.F_GUEST_CSUM | vn.F_HOST_TSO4 | vn.F_GUEST_TSO4 if tso else 0
    transport.restore(
        mmio.MmioState(
            [rx_rings.state(), tx_rings.state()],
            acked_features=mmio.F_VERSION_1 | offloads,
            status=status | mmio.STATUS_DRIVER_OK,
        )
    )
    hdr, frame = _frame(frame_bytes, tso)
    for i in range(QSIZE):
        ram.write(tx_rings.buf(i), hdr + frame)

    async def timed(rings: _Rings, queue: int) -> float:
        irq.clear()
        start = time.perf_counter()
        rings.post_all()
        dev.notify(queue)
        while not rings.all_used():
            await trio.to_thread.run_sync(irq.wait)
            irq.clear()
        return time.perf_counter() - start

    async with trio.open_nursery() as nursery:
        nursery.start_soon(dev.run)
        dev.activate(transport)
        tx = sum([await timed(tx_rings, vn.TX) for _ in range(rounds)])
        rx = 0.0
        outgoing = (hdr[:10] if tso else b"") + frames.mac_bytes(GUEST_MAC) + frame[6:]
        for _ in range(rounds):
            for _ in range(QSIZE):
                sender.send(outgoing)
            rx += await timed(rx_rings, vn.RX)
        nursery.cancel_scope.cancel()
    if dev.counters.rx_frames != rounds * QSIZE:
        raise RuntimeError(f"RX got {dev.counters.rx_frames} of {rounds * QSIZE} frames")
    return NetBench(rounds * QSIZE / tx, rounds * QSIZE / rx, frame_bytes, rounds * QSIZE, tso)
