"""virtio-net against a scripted driver and a real tap in a private network namespace.

Every test makes its own namespace `cube-nettest-<random>` (scratch_netns) and deletes it; the
host's own network is never touched. The far side of the tap is a packet socket in that
namespace: the guest's frames arrive there, and the frames it sends reach the guest.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Callable, Iterator
from ipaddress import ip_address

import msgspec
import pytest
import trio

from cube.bench import virtio_net as bench
from cube.bench.virtio_net import ScratchNetns, scratch_netns
from cube.net import frames
from cube.vmm.devices import tap
from cube.vmm.devices import virtio_mmio as mmio
from cube.vmm.devices import virtio_net as vn
from cube.vmm.virtqueue import DESC_F_NEXT
from tests.unit.fake_driver import DATA_BASE, Driver

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun"), reason="needs root and /dev/net/tun"
)

GUEST_MAC = "02:00:00:00:00:02"
TAP_MAC = "02:00:00:00:00:01"
HOST_IP, GUEST_IP = "10.0.0.1", "10.0.0.2"
ETHERTYPE = 0x88B5
PACKET_OUTGOING = 4
BASE = vn.F_MAC | mmio.F_VERSION_1
RX_BUF = 2048
RX_AREA_END = 0xC0000  # receive buffers live in [DATA_BASE, here); TX frames are built above
SOL_PACKET, PACKET_VNET_HDR = 263, 15
TSO_RX = vn.F_GUEST_CSUM | vn.F_GUEST_TSO4
TCP_ACK_PSH = 0x18


def out(payload: bytes) -> bytes:
    """A frame from the guest to the host (no virtio header)."""
    return frames.ether(TAP_MAC, GUEST_MAC, ETHERTYPE, payload)


def into(payload: bytes) -> bytes:
    """A frame from the host to the guest."""
    return frames.ether(GUEST_MAC, TAP_MAC, ETHERTYPE, payload)


def wait_until(cond: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + 10  # generous: only a broken device takes this long
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


@pytest.fixture
def ns() -> Iterator[ScratchNetns]:
    with scratch_netns() as scratch:
        scratch.ip("link", "set", scratch.tap, "address", TAP_MAC)
        scratch.ip("addr", "add", f"{HOST_IP}/24", "dev", scratch.tap)
        scratch.ip("neigh", "add", GUEST_IP, "lladdr", GUEST_MAC, "dev", scratch.tap)
        yield scratch


class Guest:
    """The guest's virtio_net driver, the device under test, and the wire on the host side."""

    def __init__(self, ns: ScratchNetns, features: int = BASE, tap_name: str = "tap0") -> None:
        self.ns = ns
        self.dev = ns.inside(lambda: vn.VirtioNet(tap_name, GUEST_MAC))
        self.drv = Driver(self.dev, features)
        self.wire = ns.packet_socket()
        self.wire.settimeout(10)
        self.rx_bufs: dict[int, int] = {}
        self.rx_used: list[tuple[int, int]] = []  # taken from the used ring, not yet looked at
        self.next_rx = DATA_BASE

    def up(self) -> int:
        status = self.drv.bring_up(num_queues=2)
        if status & mmio.STATUS_DRIVER_OK:
            self.rx, self.tx = self.drv.queues
        return status

    def status(self) -> int:
        return self.drv.reg(0x70)

    def transmit(self, frame: bytes, cuts: tuple[int, ...] = ()) -> None:
        """Post `frame` (virtio header included) split at `cuts`, kick, and wait for its return."""
        addr, pieces, start = 0xC0000, [], 0
        self.drv.ram.write(addr, frame)
        for end in (*cuts, len(frame)):
            pieces.append((addr + start, end - start, False))
            start = end
        head = self.tx.post(pieces)
        self.drv.kick(vn.TX)
        used: list[tuple[int, int]] = []
        wait_until(lambda: used.extend(self.tx.take_used()) or used, "the TX chain to be used")
        assert used == [(head, 0)]

    def post_rx(self, count: int = 1, size: int = RX_BUF) -> None:
        """Post one-descriptor receive buffers, as Linux does for small or mergeable buffers."""
        for _ in range(count):
            if self.next_rx + size > RX_AREA_END:
                self.next_rx = DATA_BASE  # earlier buffers are long used by now
            self.rx_bufs[self.rx.post([(self.next_rx, size, True)])] = self.next_rx
            self.next_rx += size
        self.drv.kick(vn.RX)

    def used_rx(self, count: int) -> list[tuple[int, bytes]]:
        """Wait until the device has used `count` more RX chains: (head, what it wrote there)."""
        used = self.rx_used
        wait_until(lambda: used.extend(self.rx.take_used()) or len(used) >= count, "RX chains")
        taken = [used.pop(0) for _ in range(count)]
        return [(head, self.drv.ram.read(self.rx_bufs.pop(head), n)) for head, n in taken]

    def received(self, count: int) -> list[bytes]:
        """Wait for `count` frames (header included), joined from as many buffers as each
        frame's num_buffers says."""
        got: list[bytes] = []
        while len(got) < count:
            ((_, first),) = self.used_rx(1)
            (num_buffers,) = struct.unpack_from("<H", first, 10)
            got.append(first + b"".join(blob for _, blob in self.used_rx(num_buffers - 1)))
        return got

    def on_wire(self) -> bytes:
        """The next frame the guest sent, as the host side of the tap sees it."""
        while True:
            frame, addr = self.wire.recvfrom(65536)
            if addr[2] != PACKET_OUTGOING:
                return frame


def run_guest(ns: ScratchNetns, body: Callable[[Guest], None], features: int = BASE) -> Guest:
    """Bring a guest up, serve its device on the device's own threads, and run `body`."""
    guest = Guest(ns, features)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(guest.dev.run)
            assert guest.up() & mmio.STATUS_DRIVER_OK
            await trio.to_thread.run_sync(body, guest)
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        guest.wire.close()
        guest.dev.close()
    return guest


def test_config_space_holds_the_mac(ns: ScratchNetns) -> None:
    guest = Guest(ns)
    try:
        dev = guest.drv.dev
        assert guest.drv.reg(0x8) == vn.DEVICE_ID
        assert dev.read(0x100, 4) + dev.read(0x104, 2) == frames.mac_bytes(GUEST_MAC)
        assert dev.read(0x105, 1) == frames.mac_bytes(GUEST_MAC)[5:]
        guest.drv.reg(0x70, mmio.STATUS_ACKNOWLEDGE | mmio.STATUS_DRIVER)
        dev.write(0x100, b"\xff" * 6)  # not writable: we do not offer CTRL_MAC_ADDR
        assert dev.read(0x100, 6) == frames.mac_bytes(GUEST_MAC)
    finally:
        guest.wire.close()
        guest.dev.close()


def test_bad_macs_are_refused() -> None:
    for bad in ("02:00:00:00:00", "01:00:5e:00:00:01", "zz:00:00:00:00:00", "2:0:0:0:0:0"):
        with pytest.raises(ValueError):
            vn.parse_mac(bad)


def test_features_offered_and_negotiated(ns: ScratchNetns) -> None:
    offloads = vn.F_CSUM | vn.F_GUEST_CSUM | vn.F_HOST_TSO4 | vn.F_HOST_TSO6
    offloads |= vn.F_GUEST_TSO4 | vn.F_GUEST_TSO6 | vn.F_MRG_RXBUF
    guest_ufo, host_ufo, status, ctrl_vq = 1 << 10, 1 << 14, 1 << 16, 1 << 17
    unoffered = guest_ufo | host_ufo | status | ctrl_vq
    guest = Guest(ns, BASE | offloads | unoffered)
    try:
        guest.drv.reg(0x14, 0)
        assert guest.drv.reg(0x10) & (vn.F_MAC | offloads | unoffered) == vn.F_MAC | offloads
        assert guest.up() & mmio.STATUS_DRIVER_OK
        assert guest.drv.dev.acked_features == BASE | offloads  # the rest was not offered
    finally:
        guest.wire.close()
        guest.dev.close()


def test_tap_offloads_follow_the_guests_features() -> None:
    tso = tap.TUN_F_TSO4 | tap.TUN_F_TSO6
    assert vn.tun_offload(vn.F_GUEST_TSO4 | vn.F_GUEST_TSO6) == 0  # TSO without CSUM is void
    assert vn.tun_offload(vn.F_GUEST_CSUM) == tap.TUN_F_CSUM
    both = vn.F_GUEST_CSUM | vn.F_GUEST_TSO4 | vn.F_GUEST_TSO6
    assert vn.tun_offload(both) == tap.TUN_F_CSUM | tso


def test_tx_single_and_chained_descriptors_reach_the_tap(ns: ScratchNetns) -> None:
    one = bytes(12) + out(b"one" * 20)
    two = bytes(12) + out(b"two" * 300)

    def body(g: Guest) -> None:
        g.transmit(one)
        assert g.on_wire() == one[12:]
        g.transmit(two, cuts=(12, 100))  # header alone, as Linux may lay it out, then 2 pieces
        assert g.on_wire() == two[12:]

    guest = run_guest(ns, body)
    c = guest.dev.counters
    assert (c.tx_frames, c.tx_bytes, c.tx_dropped) == (2, len(one) + len(two) - 24, 0)


def test_rx_frames_land_in_posted_buffers(ns: ScratchNetns) -> None:
    sent = [into(bytes([i]) * (60 + i)) for i in range(3)]

    def body(g: Guest) -> None:
        g.post_rx(3)
        for frame in sent:
            g.wire.send(frame)
        got = g.received(3)
        for blob, frame in zip(got, sent, strict=True):
            flags, gso, _, _, _, _, num_buffers = struct.unpack("<BBHHHHH", blob[:12])
            assert (flags, gso, num_buffers) == (0, 0, 1)
            assert blob[12:] == frame
        assert g.drv.irqs >= 1

    guest = run_guest(ns, body)
    assert guest.dev.counters.rx_frames == 3


def test_rx_waits_for_buffers_and_resumes(ns: ScratchNetns) -> None:
    sent = [into(b"%d" % i * 50) for i in range(3)]

    def body(g: Guest) -> None:
        for frame in sent:
            g.wire.send(frame)  # no buffer posted: the frames wait in the tap
        wait_until(lambda: g.dev.counters.rx_stalls == 1, "RX to find no buffers")
        assert g.rx.take_used() == []
        g.post_rx(2)
        assert [b[12:] for b in g.received(2)] == sent[:2]
        wait_until(lambda: g.dev.counters.rx_stalls == 2, "RX to run dry again")
        g.post_rx(1)
        assert [b[12:] for b in g.received(1)] == sent[2:]

    guest = run_guest(ns, body)
    assert guest.dev.counters.rx_dropped == 0


def test_oversized_rx_frame_is_dropped_and_counted(ns: ScratchNetns) -> None:
    big = into(b"B" * 200)
    small = into(b"s" * 50)

    def body(g: Guest) -> None:
        g.wire.send(big)
        g.wire.send(small)
        g.post_rx(1, size=12 + 100)
        assert [b[12:] for b in g.received(1)] == [small]  # the same buffer, not a cut frame

    assert run_guest(ns, body).dev.counters.rx_dropped == 1


def test_tx_frames_asking_for_unoffered_offloads_are_dropped(ns: ScratchNetns) -> None:
    payload = out(b"x" * 60)
    gso = struct.pack("<BBHHHHH", 0, vn.GSO_TCPV4, 34, 1000, 0, 0, 0) + payload  # not negotiated
    csum = struct.pack("<BBHHHHH", vn.HDR_F_NEEDS_CSUM, 0, 0, 0, 14, 2, 0) + payload

    def body(g: Guest) -> None:
        g.transmit(gso)
        g.transmit(csum)  # CSUM was not negotiated
        g.transmit(bytes(12) + payload)
        assert g.on_wire() == payload  # the first frame through is the good one

    c = run_guest(ns, body).dev.counters
    assert (c.tx_frames, c.tx_dropped) == (1, 2)


def _udp_frame(payload: bytes, checksum: int, csum_flag: bool) -> bytes:
    """A UDP datagram to the host with checksum field `checksum`, virtio header first."""
    udp = struct.pack("!HHHH", 4000, 5000, 8 + len(payload), checksum) + payload
    body = frames.ip(ip_address(GUEST_IP), ip_address(HOST_IP), frames.UDP, udp)
    hdr = struct.pack("<BBHHHHH", vn.HDR_F_NEEDS_CSUM if csum_flag else 0, 0, 0, 0, 34, 6, 0)
    return hdr + frames.ether(TAP_MAC, GUEST_MAC, frames.ETH_IP, body)


def _udp_socket(ns: ScratchNetns, port: int) -> socket.socket:
    def make() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((HOST_IP, port))
        return sock

    return ns.inside(make)


def test_tx_checksum_offload_is_honoured(ns: ScratchNetns) -> None:
    sock = _udp_socket(ns, 5000)
    sock.settimeout(10)

    def body(g: Guest) -> None:
        g.transmit(_udp_frame(b"unflagged", 0xBAD1, csum_flag=False))  # a bad checksum: dropped
        g.transmit(_udp_frame(b"partial", 0xBAD2, csum_flag=True))  # the host finishes it
        assert sock.recv(100) == b"partial"
        sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            sock.recv(100)

    try:
        run_guest(ns, body, features=BASE | vn.F_CSUM)
    finally:
        sock.close()


@pytest.mark.parametrize("guest_csum", [False, True])
def test_rx_checksum_offload_follows_negotiation(ns: ScratchNetns, guest_csum: bool) -> None:
    sock = _udp_socket(ns, 4000)

    def body(g: Guest) -> None:
        g.post_rx(1)
        sock.sendto(b"to the guest", (GUEST_IP, 5000))
        (blob,) = g.received(1)
        flags, csum_start, csum_offset = blob[0], *struct.unpack("<HH", blob[6:10])
        ip, udp = blob[12 + 14 : 12 + 34], blob[12 + 34 :]
        assert udp[8:] == b"to the guest"
        if guest_csum:  # the host left the checksum for the guest to finish
            assert flags == vn.HDR_F_NEEDS_CSUM and (csum_start, csum_offset) == (34, 6)
        else:  # a finished frame, and no flags the guest did not negotiate
            assert flags == 0
            pseudo = ip[12:20] + struct.pack("!BBH", 0, socket.IPPROTO_UDP, len(udp))
            assert frames.checksum(pseudo + udp) == 0

    features = BASE | (vn.F_GUEST_CSUM if guest_csum else 0)
    try:
        run_guest(ns, body, features=features)
    finally:
        sock.close()


def test_snapshot_state_round_trips_onto_another_tap(ns: ScratchNetns) -> None:
    ns.ip("tuntap", "add", "dev", "tap1", "mode", "tap")
    ns.ip("link", "set", "tap1", "up")
    saved: dict[str, bytes] = {}

    def before(g: Guest) -> None:
        g.transmit(bytes(12) + out(b"before" * 10))
        saved["net"] = msgspec.msgpack.encode(g.dev.state())
        saved["mmio"] = msgspec.msgpack.encode(g.drv.dev.state())

    guest = run_guest(ns, before, features=BASE | vn.F_GUEST_CSUM)
    net_state = msgspec.msgpack.decode(saved["net"], type=vn.NetState)
    mmio_state = msgspec.msgpack.decode(saved["mmio"], type=mmio.MmioState)
    assert net_state.mac == GUEST_MAC and mmio_state.acked_features & vn.F_GUEST_CSUM

    restored = ns.inside(lambda: vn.VirtioNet.from_state(net_state, "tap1"))
    transport = mmio.VirtioMmio(restored, guest.drv.ram, irq=lambda: None)
    transport.restore(mmio_state)
    assert transport.state() == mmio_state
    wire = ns.packet_socket("tap1")
    wire.settimeout(10)
    frame = out(b"after" * 10)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(restored.run)
            restored.activate(transport)  # what MicroVm.restore does for a live device
            guest.drv.ram.write(0xC0000, bytes(12) + frame)
            head = guest.tx.post([(0xC0000, 12 + len(frame), False)])
            transport.write(mmio.QUEUE_NOTIFY, struct.pack("<I", vn.TX))
            assert await trio.to_thread.run_sync(wire.recv, 65536) == frame
            used: list[tuple[int, int]] = []
            wait_until(lambda: used.extend(guest.tx.take_used()) or used, "the TX chain")
            assert used == [(head, 0)]  # the ring went on where the snapshot left it
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        wire.close()
        restored.close()


@pytest.mark.parametrize(
    "chain",
    ["tx_writable", "rx_readable", "rx_tiny", "outside_ram", "looping"],
)
def test_bad_chains_break_only_the_device(ns: ScratchNetns, chain: str) -> None:
    def body(g: Guest) -> None:
        if chain == "tx_writable":
            g.tx.post([(0xC0000, 12 + 60, False), (0xC1000, 64, True)])
            g.drv.kick(vn.TX)
        elif chain == "looping":
            head = g.tx.post([(0xC0000, 12, False), (0xC0100, 60, False)])
            g.drv.ram.write(
                g.tx.desc + 16 * (head + 1), struct.pack("<QIHH", 0xC0100, 60, DESC_F_NEXT, head)
            )
            g.drv.kick(vn.TX)
        elif chain == "outside_ram":
            g.tx.post([(1 << 40, 72, False)])
            g.drv.kick(vn.TX)
        else:
            g.rx.post([(0xC0000, RX_BUF if chain == "rx_readable" else 8, chain == "rx_tiny")])
            g.drv.kick(vn.RX)
        wait_until(lambda: g.status() & mmio.STATUS_NEEDS_RESET, "NEEDS_RESET")
        assert g.drv.reg(0x60) & mmio.INT_CONFIG_CHANGE
        assert g.up() & mmio.STATUS_DRIVER_OK  # the driver's reset brings the device back
        assert not g.status() & mmio.STATUS_NEEDS_RESET
        frame = bytes(12) + out(b"ok" * 40)
        g.transmit(frame)
        assert g.on_wire() == frame[12:]

    run_guest(ns, body)


def test_open_tap_refuses_missing_and_invalid_names(ns: ScratchNetns) -> None:
    for name in ("nosuchtap", "", "x" * 16, "a/b"):
        with pytest.raises(tap.TapError):
            ns.inside(lambda name=name: tap.open_tap(name))
    with pytest.raises(OSError):  # and the refused attach left no tap behind
        ns.inside(lambda: socket.if_nametoindex("nosuchtap"))


def _tcp_frame(src: str, dst: str, payload: bytes, dst_mac: str, src_mac: str) -> bytes:
    """An Ethernet/IPv4/TCP frame whose TCP checksum is left for an offload to fill in."""
    tcp = struct.pack("!HHIIBBHHH", 40000, 7000, 1, 1, 5 << 4, TCP_ACK_PSH, 65535, 0, 0)
    body = frames.ip(ip_address(src), ip_address(dst), frames.TCP, tcp + payload)
    return frames.ether(dst_mac, src_mac, frames.ETH_IP, body)


def _gso_header(gso_size: int) -> bytes:
    """A 10-byte virtio_net_hdr asking for TCPv4 segmentation into `gso_size` segments."""
    return struct.pack("<BBHHHH", vn.HDR_F_NEEDS_CSUM, vn.GSO_TCPV4, 54, gso_size, 34, 16)


def _vnet_socket(ns: ScratchNetns) -> socket.socket:
    """A packet socket on the tap that speaks virtio_net_hdr: it sends and sees GSO frames."""

    def make() -> socket.socket:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
        sock.bind((ns.tap, 0))
        sock.settimeout(10)
        return sock

    return ns.inside(make)


def test_tx_tso_frames_reach_the_tap_unsegmented(ns: ScratchNetns) -> None:
    sock = _vnet_socket(ns)
    payload = bytes(range(256)) * 12
    frame = _tcp_frame(GUEST_IP, HOST_IP, payload, TAP_MAC, GUEST_MAC)

    def body(g: Guest) -> None:
        g.transmit(_gso_header(1000) + b"\0\0" + frame, cuts=(12, 100))
        while True:
            blob, addr = sock.recvfrom(65536)
            if addr[2] != PACKET_OUTGOING:
                break
        _, gso_type, _, gso_size = struct.unpack_from("<BBHH", blob)
        assert (gso_type, gso_size) == (vn.GSO_TCPV4, 1000)  # the host kernel segments it
        assert blob[10:] == frame

    features = BASE | vn.F_CSUM | vn.F_HOST_TSO4
    try:
        assert run_guest(ns, body, features=features).dev.counters.tx_frames == 1
    finally:
        sock.close()


@pytest.mark.parametrize("features", [BASE | TSO_RX | vn.F_MRG_RXBUF, BASE | TSO_RX, BASE])
def test_rx_gso_frames_follow_negotiation(ns: ScratchNetns, features: int) -> None:
    sock = _vnet_socket(ns)
    mergeable = bool(features & vn.F_MRG_RXBUF)
    payload = bytes(range(256)) * (80 if mergeable else 20)  # 20 or 5 KiB
    frame = _tcp_frame(HOST_IP, GUEST_IP, payload, GUEST_MAC, TAP_MAC)

    def body(g: Guest) -> None:
        if mergeable:
            g.post_rx(8, size=8200)  # the device stashes 64 KiB worth before it reads
        elif features & vn.F_GUEST_TSO4:  # Linux's "big packets": a header, then pages
            data = [(0xD0000 + i * 10000, 10000, True) for i in range(7)]
            g.rx_bufs[g.rx.post([(0xCF000, 12, True), *data])] = 0xCF000
            g.drv.kick(vn.RX)
        else:
            g.post_rx(8)
        sock.send(_gso_header(1000) + frame)
        if not features & vn.F_GUEST_TSO4:  # the host segmented it: plain frames only
            got = g.received(6)
            assert all(f[1] == vn.GSO_NONE for f in got)
            assert b"".join(f[12 + 54 :] for f in got) == payload
            return
        if mergeable:
            (whole,) = g.received(1)
            assert struct.unpack_from("<H", whole, 10)[0] == 3  # 20 KiB over 8200-byte buffers
        else:
            ((_, header),) = g.used_rx(1)
            whole = header[:12] + g.drv.ram.read(0xD0000, 54 + len(payload))
        flags, gso_type, _, gso_size = struct.unpack_from("<BBHH", whole)
        assert (flags, gso_type, gso_size) == (vn.HDR_F_NEEDS_CSUM, vn.GSO_TCPV4, 1000)
        assert whole[12:] == frame

    try:
        run_guest(ns, body, features=features)
    finally:
        sock.close()


def test_mergeable_buffers_carry_one_frame_across_chains(ns: ScratchNetns) -> None:
    frame = into(b"m" * 1400)

    def body(g: Guest) -> None:
        g.post_rx(4, size=1024)
        g.wire.send(frame)
        used = g.used_rx(2)
        assert [len(blob) for _, blob in used] == [1024, 12 + len(frame) - 1024]
        first = used[0][1]
        assert struct.unpack_from("<H", first, 10)[0] == 2
        assert first[12:] + used[1][1] == frame

    run_guest(ns, body, features=BASE | vn.F_MRG_RXBUF)


def test_pause_gives_stashed_buffers_back_and_holds_rx(ns: ScratchNetns) -> None:
    frame = into(b"p" * 100)

    def body(g: Guest) -> None:
        queue = g.drv.dev.queues[vn.RX]
        g.post_rx(4, size=1024)
        wait_until(lambda: queue.next_avail == 2, "the device to stash two buffers")
        g.dev.pause()
        assert queue.next_avail == 0  # a snapshot now hands all four to the guest's next device
        g.wire.send(frame)
        time.sleep(0.05)  # a paused device must not touch the ring, however long we look
        assert g.rx.take_used() == [] and queue.next_avail == 0
        g.dev.resume()
        assert [f[12:] for f in g.received(1)] == [frame]
        g.dev.pause()  # and a device left paused still stops when the VM does

    run_guest(ns, body, features=BASE | vn.F_MRG_RXBUF)


def test_lost_tap_stops_rx_and_drops_tx(ns: ScratchNetns) -> None:
    def body(g: Guest) -> None:
        g.post_rx(2)
        ns.ip("link", "del", ns.tap)
        wait_until(lambda: g.dev.counters.tap_lost, "RX to notice the tap is gone")
        g.transmit(bytes(12) + out(b"lost" * 20))
        assert g.dev.counters.tx_dropped == 1

    run_guest(ns, body)


@pytest.mark.parametrize(("frame_bytes", "tso"), [(60, False), (65000, True)])
def test_bench_counts_every_frame(frame_bytes: int, tso: bool) -> None:
    result = bench.measure(rounds=1, frame_bytes=frame_bytes, tso=tso)
    assert result.frames == 256 and result.tx_fps > 0 and result.rx_fps > 0


def test_a_device_without_a_tap_drops_tx_and_leaves_rx_empty() -> None:
    """A snapshot restored where the daemon runs without networking: a NIC with nothing behind."""
    dev = vn.VirtioNet(None, GUEST_MAC)
    drv = Driver(dev, BASE)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(dev.run)
            assert drv.bring_up(num_queues=2) & mmio.STATUS_DRIVER_OK
            rx, tx = drv.queues
            rx.post([(DATA_BASE, RX_BUF, True)])
            drv.kick(vn.RX)
            drv.ram.write(0xC0000, bytes(12) + out(b"nowhere" * 10))
            head = tx.post([(0xC0000, 12 + len(out(b"nowhere" * 10)), False)])
            drv.kick(vn.TX)
            with trio.fail_after(10):
                while not (used := tx.take_used()):
                    await trio.sleep(0.001)
            assert used == [(head, 0)] and dev.counters.tx_dropped == 1
            await trio.sleep(0.1)
            assert rx.take_used() == [] and dev.counters.tap_lost
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        dev.close()
