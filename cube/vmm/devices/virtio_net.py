"""virtio-net over a host tap (virtio 1.2 §5.1; vmm-facts.md §7): one RX and one TX queue.

Copies: none in this process. The tap speaks the same 12-byte virtio_net_hdr the guest uses
(IFF_VNET_HDR, see tap.py), so a TX chain goes to the tap with one `os.writev` over views of
the guest's buffers, and an RX frame lands in the guest's buffers with one `os.readv`. The only
bytes we write ourselves are header fields the tap leaves to us (num_buffers, and the flags when
the guest did not ask for checksum offload). The readv gets a one-byte scratch buffer after the
guest's: a frame that does not fit spills into it, which is how we see truncation (the tap
reports only what it copied), and such a frame is dropped and counted, never delivered cut.

Offloads, because in Python the cost is per frame, not per byte: checksum (CSUM, GUEST_CSUM)
and TCP segmentation (HOST_TSO4/6, GUEST_TSO4/6), so bulk TCP moves in frames of up to 64 KiB.
Guest-side offloads become TUNSETOFFLOAD flags when the driver negotiates them. No UFO/USO and
no ECN: a guest frame that asks for an offload it did not negotiate is dropped and counted
before it reaches the host kernel. MRG_RXBUF lets a large frame span several small receive
buffers (Linux otherwise posts ~64 KiB chains per RX slot once GUEST_TSO is on, which costs the
guest 16 MiB of RAM per ring). With it, receive buffers are taken from the ring ahead of time
(the stash) until they hold the largest frame the tap may hand us, since a frame's size is only
known once read; the stash goes back to the ring on `pause()`, so a snapshot never loses them.

Threads: one per direction, each blocked in poll() on its queue's kick eventfd (which KVM
signals through ioeventfd, so a guest kick costs no VM exit), the tap, and a stop eventfd. A
blocked thread holds no GIL and wakes straight into the device code, where a trio task would
pay a scheduler round and share the trio thread with the API and vsock. Each direction owns
its queue, so the two threads share nothing but the transport, whose interrupt path is
thread-safe. RX stops polling the tap while the guest has too few receive buffers and sleeps
until the guest's RX kick: frames then wait in the tap's queue, and what overflows it is counted
by the kernel as the tap's tx_dropped (the network layer reads that), not here. `pause()` parks
both threads for snapshots. A driver reset is not waited for (the transport calls `reset` under
its own lock, which a step may need to raise an interrupt): as in the other devices, a step in
flight when the guest resets may still finish against the old queue.

Guest input is untrusted: a chain with the wrong direction of buffers, a receive buffer too
small for a header, or more buffers than one readv takes is a broken queue (NEEDS_RESET, as in
the other devices); a bad frame is only dropped. If the tap goes away under us (the network
layer deleted it), TX frames are dropped and counted and RX stops polling the dead fd. A
device made with no tap at all (a snapshot restored where the daemon runs without sandbox
networking) starts in that state: the guest keeps its NIC, and nothing passes.
"""

from __future__ import annotations

import contextlib
import functools
import os
import select
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast

import msgspec
import trio

from cube.vmm.devices import tap
from cube.vmm.devices.virtio_mmio import VirtioMmio
from cube.vmm.virtqueue import Chain, GuestMemoryAccess, QueueError, Virtqueue

DEVICE_ID = 1
RX, TX = 0, 1
F_CSUM = 1 << 0
F_GUEST_CSUM = 1 << 1
F_MAC = 1 << 5
F_GUEST_TSO4 = 1 << 7
F_GUEST_TSO6 = 1 << 8
F_HOST_TSO4 = 1 << 11
F_HOST_TSO6 = 1 << 12
F_MRG_RXBUF = 1 << 15
HDR_F_NEEDS_CSUM = 1
GSO_NONE, GSO_TCPV4, GSO_TCPV6 = 0, 1, 4
HDR_SIZE = tap.VNET_HDR_SIZE
MAX_FRAME = HDR_SIZE + 65550  # a 64 KiB GSO frame with its Ethernet header (FC's bound too)
PLAIN_FRAME = HDR_SIZE + 1518  # the largest frame without GUEST_TSO (MTU 1500, VLAN tag)
MAX_IOVECS = 1023  # IOV_MAX, less the spill buffer
BATCH = 64  # frames per interrupt while a direction keeps busy
_GSO_FEATURE = {GSO_TCPV4: F_HOST_TSO4, GSO_TCPV6: F_HOST_TSO6}  # what a TX GSO type needs

# What a thread waits for besides its kick and the stop signal: (fd, poll events), or nothing.
Wait = tuple[int, int] | None


class ViewableMemory(GuestMemoryAccess, Protocol):
    """Guest RAM that lends out views of itself (GuestRam; the tests' RAM)."""

    def view(self, gpa: int, size: int) -> memoryview: ...


class NetState(msgspec.Struct, frozen=True):
    """What a snapshot keeps beyond the transport's `MmioState` (queues, acked features).

    The tap is not part of it: a restored VM, and every clone of it, gets its own.
    """

    mac: str


@dataclass
class NetCounters:
    """Per-device traffic counters; each field is written by one thread only."""

    tx_frames: int = 0
    tx_bytes: int = 0
    tx_dropped: int = 0  # guest frames refused: forbidden header, oversized, or by the tap
    rx_frames: int = 0
    rx_bytes: int = 0
    rx_dropped: int = 0  # host frames larger than the guest's receive buffers
    rx_stalls: int = 0  # times RX ran out of guest buffers and waited for the guest
    tap_lost: bool = False  # the tap failed (deleted under us): RX stopped reading it


@dataclass(frozen=True)
class _RxBuffer:
    """A receive chain taken from the ring but not yet used, as views of guest memory."""

    head: int
    views: list[memoryview]
    size: int


def parse_mac(mac: str) -> bytes:
    parts = mac.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"MAC {mac!r} is not six colon-separated octets")
    raw = bytes(int(p, 16) for p in parts)
    if raw[0] & 1:
        raise ValueError(f"MAC {mac!r} is a multicast address")
    return raw


def tun_offload(features: int) -> int:
    """The TUN_F_* flags that tell the tap what the guest's driver accepts."""
    if not features & F_GUEST_CSUM:
        return 0  # segmentation offloads need checksum offload (virtio 1.2 §5.1.3.1)
    flags = tap.TUN_F_CSUM
    flags |= tap.TUN_F_TSO4 if features & F_GUEST_TSO4 else 0
    flags |= tap.TUN_F_TSO6 if features & F_GUEST_TSO6 else 0
    return flags


class VirtioNet:
    device_id = DEVICE_ID
    queue_sizes = (256, 256)

    def __init__(self, tap_name: str | None, mac: str) -> None:
        self.mac = mac
        self._mac = parse_mac(mac)
        self.tap_name = tap_name
        self.counters = NetCounters(tap_lost=tap_name is None)
        self._transport: VirtioMmio | None = None
        self._generation = 0  # bumped by activate and reset: a stash from before is void
        self._stash: deque[_RxBuffer] = deque()
        self._stash_generation = 0
        self._stash_room = 0
        self._rx_dry = False
        self._spill = bytearray(1)
        self._gate = threading.Condition()
        self._paused = self._stopping = False
        self._busy = 0  # threads inside a step
        self._tap_fd = tap.open_tap(tap_name) if tap_name is not None else None
        self._stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        # One eventfd per queue, in queue order: the VM binds each to that queue's ioeventfd.
        self.kick_fds = tuple(
            os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in self.queue_sizes
        )

    @classmethod
    def from_state(cls, state: NetState, tap_name: str | None) -> VirtioNet:
        """The device of a snapshot, attached to `tap_name` (a clone's own tap), or to none."""
        return cls(tap_name, state.mac)

    def state(self) -> NetState:
        return NetState(self.mac)

    # Backend protocol (vCPU threads; a restore calls `activate` on the building thread).

    def features(self) -> int:
        return (
            F_MAC | F_CSUM | F_GUEST_CSUM | F_HOST_TSO4 | F_HOST_TSO6 | F_GUEST_TSO4
            | F_GUEST_TSO6 | F_MRG_RXBUF
        )  # fmt: skip

    def read_config(self, offset: int, size: int) -> bytes:
        return self._mac[offset : offset + size].ljust(size, b"\0")

    def write_config(self, offset: int, data: bytes) -> None:
        pass  # the MAC is ours to set, not the driver's (we do not offer CTRL_MAC_ADDR)

    def activate(self, transport: VirtioMmio) -> None:
        try:
            if self._tap_fd is not None:
                tap.set_offload(self._tap_fd, tun_offload(transport.acked_features))
        except OSError:
            self.counters.tap_lost = True  # a vCPU thread must not die of a deleted tap
        self._generation += 1
        self._transport = transport
        self._kick_all()

    def notify(self, queue_index: int) -> None:
        os.eventfd_write(self.kick_fds[queue_index], 1)

    def reset(self) -> None:
        self._transport = None
        self._generation += 1
        self._kick_all()

    def _kick_all(self) -> None:
        for fd in self.kick_fds:
            os.eventfd_write(fd, 1)

    def close(self) -> None:
        """Release the tap and the eventfds; `run()` must have returned."""
        for fd in (self._tap_fd, self._stop_fd, *self.kick_fds):
            if fd is not None:
                os.close(fd)

    # Threads.

    async def run(self) -> None:
        """Serve both directions on their own threads until cancelled; the VM's nursery owns it."""
        limiter = trio.CapacityLimiter(2)
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._stop_fd)  # a VM may be run again after a stop
        self._stopping = False
        async with trio.open_nursery() as nursery:
            for kick, step in ((self.kick_fds[TX], self._transmit),
                               (self.kick_fds[RX], self._receive)):  # fmt: skip
                serve = functools.partial(self._serve, kick, step)
                nursery.start_soon(
                    functools.partial(trio.to_thread.run_sync, serve, limiter=limiter)
                )
            try:
                await trio.sleep_forever()
            finally:
                with self._gate:  # threads cannot be cancelled: ask them, paused or not
                    self._stopping = True
                    self._gate.notify_all()
                os.eventfd_write(self._stop_fd, 1)

    def pause(self) -> None:
        """Return once neither thread touches guest memory or the queues, until `resume()`.

        A snapshot needs this: the vCPUs are parked, but the tap would go on filling RX
        buffers while memory and queue state are written out. Stashed receive buffers go back
        to the ring, so the snapshot's queue state hands them to the guest's next device.
        """
        with self._gate:
            self._paused = True
            self._gate.wait_for(lambda: self._busy == 0)
            transport = self._transport
            if transport is not None and self._stash_generation == self._generation:
                for _ in self._stash:
                    transport.queues[RX].unpop()
            self._clear_stash()

    def resume(self) -> None:
        with self._gate:
            self._paused = False
            self._gate.notify_all()

    def _serve(self, kick_fd: int, step: Callable[[], Wait]) -> None:
        """One direction's thread: do what the queue allows, then sleep until something changes.

        The kick is consumed before the step looks at the ring, so a kick that arrives while the
        step runs wakes the next poll instead of being lost.
        """
        while True:
            with self._gate:
                self._gate.wait_for(lambda: self._stopping or not self._paused)
                if self._stopping:
                    return
                self._busy += 1
            try:
                extra = step()
            finally:
                with self._gate:
                    self._busy -= 1
                    self._gate.notify_all()
            poller = select.poll()
            poller.register(self._stop_fd, select.POLLIN)
            poller.register(kick_fd, select.POLLIN)
            if extra is not None:
                poller.register(*extra)
            ready = {fd for fd, _ in poller.poll()}
            if kick_fd in ready:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(kick_fd)

    def _fail(self, transport: VirtioMmio, generation: int, error: Exception) -> None:
        """Mark the device broken, unless the driver reset it while we were at work (then the
        error is the reset pulling the queue from under us, and the new device is fine)."""
        if generation == self._generation:
            transport.fail(QueueError(str(error)))

    def _live(self) -> tuple[VirtioMmio, ViewableMemory] | None:
        transport = self._transport
        if transport is None or not transport.activated:
            return None  # activation kicks both threads
        return transport, cast(ViewableMemory, transport.memory)

    # TX.

    def _transmit(self) -> Wait:
        """Move the guest's TX chains to the tap; wait on the tap only if it pushes back."""
        live = self._live()
        if live is None:
            return None
        transport, mem = live
        queue, generation = transport.queues[TX], self._generation
        sent, wait = 0, None
        try:
            while (chain := queue.pop(mem)) is not None:
                if not self._send(transport, mem, chain):
                    queue.unpop()
                    wait = (self._tap_fd, select.POLLOUT)
                    break
                queue.add_used(mem, chain.head, 0)
                sent += 1
                if sent % BATCH == 0:
                    transport.signal_used(queue)
        except (QueueError, ValueError) as error:
            self._fail(transport, generation, error)
            return None
        transport.signal_used(queue)
        return wait

    def _send(self, transport: VirtioMmio, mem: ViewableMemory, chain: Chain) -> bool:
        """Write one frame to the tap, or drop it; False if the tap is full (retry the chain)."""
        if any(b.writable for b in chain.buffers):
            raise QueueError("virtio-net TX chain has a device-writable buffer")
        length = sum(b.length for b in chain.buffers)
        if length < HDR_SIZE:
            raise QueueError("virtio-net TX chain is shorter than its header")
        c = self.counters
        views = [mem.view(b.addr, b.length) for b in chain.buffers if b.length]
        flags, gso_type = _first_bytes(views, 2)
        allowed = _tx_header_allowed(transport.acked_features, flags, gso_type)
        if self._tap_fd is None or length > MAX_FRAME or not allowed:
            c.tx_dropped += 1
            return True
        try:
            os.writev(self._tap_fd, views)
        except BlockingIOError:
            return False
        except OSError:
            c.tx_dropped += 1  # the tap refused the frame (malformed, link down, tap gone)
            return True
        c.tx_frames += 1
        c.tx_bytes += length - HDR_SIZE
        return True

    # RX.

    def _receive(self) -> Wait:
        """Move frames from the tap into the guest's RX buffers while both have some."""
        live = self._live()
        if live is None:
            return None
        transport, mem = live
        queue, generation = transport.queues[RX], self._generation
        if self._stash_generation != generation:
            self._clear_stash()
            self._stash_generation = generation
        features = transport.acked_features
        tso = tun_offload(features) & (tap.TUN_F_TSO4 | tap.TUN_F_TSO6)
        wanted = (MAX_FRAME if tso else PLAIN_FRAME) if features & F_MRG_RXBUF else 1
        received, wait = 0, None
        try:
            while not self.counters.tap_lost:
                if not self._fill_stash(queue, mem, wanted):
                    if not self._rx_dry:
                        self.counters.rx_stalls += 1
                    self._rx_dry = True
                    break  # the guest's RX kick brings buffers, and wakes us
                self._rx_dry = False
                if not self._deliver(queue, mem, features):
                    wait = None if self.counters.tap_lost else (self._tap_fd, select.POLLIN)
                    break
                received += 1
                if received % BATCH == 0:
                    transport.signal_used(queue)
        except (QueueError, ValueError) as error:
            self._clear_stash()
            self._fail(transport, generation, error)
            return None
        transport.signal_used(queue)
        return wait

    def _fill_stash(self, queue: Virtqueue, mem: ViewableMemory, wanted: int) -> bool:
        """Take chains until the stash holds `wanted` bytes (or one chain, for `wanted` 1)."""
        iovecs = sum(len(b.views) for b in self._stash)
        while self._stash_room < wanted:
            chain = queue.pop(mem)
            if chain is None:
                return False
            buffers = chain.buffers
            if not all(b.writable for b in buffers):
                raise QueueError("virtio-net RX chain has a device-readable buffer")
            if buffers[0].length < HDR_SIZE:
                raise QueueError("virtio-net RX buffer is smaller than the header")
            views = [mem.view(b.addr, b.length) for b in buffers if b.length]
            iovecs += len(views)
            if iovecs > MAX_IOVECS:
                raise QueueError("virtio-net RX buffers span more descriptors than a readv takes")
            size = sum(len(v) for v in views)
            self._stash.append(_RxBuffer(chain.head, views, size))
            self._stash_room += size
        return True

    def _deliver(self, queue: Virtqueue, mem: ViewableMemory, features: int) -> bool:
        """Read one frame into the stash and hand its chains to the guest; False if none came.

        A frame larger than the stash is dropped (it spilled), and the stash kept for the next.
        """
        iovecs = [v for b in self._stash for v in b.views]
        iovecs.append(self._spill)
        c = self.counters
        while True:
            try:
                n = os.readv(self._tap_fd, iovecs)
            except BlockingIOError:
                return False
            except OSError:
                c.tap_lost = True
                return False
            if n <= self._stash_room:
                break
            c.rx_dropped += 1
        chains, covered = 0, 0
        while covered < n:
            covered += self._stash[chains].size
            chains += 1
        head = self._stash[0].views[0]
        if not features & F_GUEST_CSUM:
            head[0:1] = b"\0"  # no checksum offload negotiated: the spec wants flags 0
        head[10:12] = chains.to_bytes(2, "little")  # num_buffers, before the guest can look
        left = n
        for _ in range(chains):
            buf = self._stash.popleft()
            self._stash_room -= buf.size
            queue.add_used(mem, buf.head, min(left, buf.size))
            left -= buf.size
        c.rx_frames += 1
        c.rx_bytes += n - HDR_SIZE
        return True

    def _clear_stash(self) -> None:
        self._stash.clear()
        self._stash_room = 0


def _tx_header_allowed(features: int, flags: int, gso_type: int) -> bool:
    """Whether a guest frame asks only for offloads its driver negotiated."""
    csum = features & F_CSUM
    if flags & ~(HDR_F_NEEDS_CSUM if csum else 0):
        return False
    if gso_type == GSO_NONE:
        return True
    return bool(csum and features & _GSO_FEATURE.get(gso_type, 0))


def _first_bytes(views: list[memoryview], count: int) -> bytes:
    """The first `count` bytes of a chain, which a driver may split over descriptors."""
    if views and len(views[0]) >= count:
        return bytes(views[0][:count])
    return b"".join(bytes(v) for v in views)[:count]
