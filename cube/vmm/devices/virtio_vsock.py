"""virtio-vsock with its host end inside the VMM, served to trio as byte streams.

The daemon talks to every guest agent over vsock (no host network path is needed for control
traffic), so the host end of the transport lives here rather than behind a Unix socket: a host
task calls `connect(port)` for a stream into the guest, or `listen(port)` to accept the guest's
connections to the host (CID 2).

Threads: all queue processing and connection state live on the trio thread, in `run()`. The
vCPU threads only touch the transport's registers; a queue kick (through ioeventfd, or the
transport's `notify`) and activation just write the device's wake-up eventfd, which `run()`
waits on. So connection state needs no locks, and host tasks wait with trio's own primitives.

Guest packets are untrusted: lengths are bounded by the descriptor chain and by the credit we
granted; a packet that overruns its credit, names the wrong CIDs or carries an unknown type gets
the connection reset, never an exception out of the device (virtio 1.2 §5.10; vmm-facts.md §6).
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import math
import os
import secrets
import struct
from collections import deque
from dataclasses import dataclass, field

import trio

from cube.vmm.devices.virtio_mmio import VirtioMmio
from cube.vmm.virtqueue import QueueError

DEVICE_ID = 19
HOST_CID = 2
RX, TX, EVENT = 0, 1, 2


class Op(enum.IntEnum):
    REQUEST = 1
    RESPONSE = 2
    RST = 3
    SHUTDOWN = 4
    RW = 5
    CREDIT_UPDATE = 6
    CREDIT_REQUEST = 7


TYPE_STREAM = 1
SHUTDOWN_RCV, SHUTDOWN_SEND = 1, 2
EVENT_TRANSPORT_RESET = 0

BUF_ALLOC = 256 * 1024  # what each connection may have in flight towards us
MAX_PACKET = 64 * 1024  # the largest payload we put in, or accept from, one packet
CLOSE_TIMEOUT = 2.0  # how long a closed connection waits for the guest's RST
EPHEMERAL_PORTS = range(1 << 30, 1 << 31)

HEADER = struct.Struct("<QQIIIHHIII")


@dataclass(frozen=True)
class Header:
    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int

    def pack(self) -> bytes:
        return HEADER.pack(
            self.src_cid, self.dst_cid, self.src_port, self.dst_port, self.len, self.type,
            self.op, self.flags, self.buf_alloc, self.fwd_cnt,
        )  # fmt: skip


@dataclass(eq=False)
class Connection:
    """One stream; `host_port` is ours, `guest_port` the guest's."""

    device: VirtioVsock
    host_port: int
    guest_port: int
    connected: bool = False
    refused: bool = False
    reset: bool = False
    inbound: bytearray = field(default_factory=bytearray)
    outbound: bytearray = field(default_factory=bytearray)
    peer_shut_send: bool = False  # the guest will send no more: our reads end at EOF
    peer_shut_recv: bool = False  # the guest reads no more: our writes fail
    eof_requested: bool = False
    close_requested: bool = False
    shutdown_sent: bool = False
    close_deadline: float = math.inf
    peer_buf_alloc: int = 0
    peer_fwd_cnt: int = 0
    tx_cnt: int = 0
    fwd_cnt: int = 0
    fwd_cnt_reported: int = 0
    changed: trio.lowlevel.ParkingLot = field(default_factory=trio.lowlevel.ParkingLot)

    @property
    def key(self) -> tuple[int, int]:
        return self.host_port, self.guest_port

    def credit(self) -> int:
        return self.peer_buf_alloc - ((self.tx_cnt - self.peer_fwd_cnt) & 0xFFFF_FFFF)


class VsockStream(trio.abc.HalfCloseableStream):
    """A connected stream to a guest port, for host tasks."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    @property
    def guest_port(self) -> int:
        return self._conn.guest_port

    @property
    def host_port(self) -> int:
        return self._conn.host_port

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        conn, view = self._conn, memoryview(data)
        while view:
            await trio.lowlevel.checkpoint_if_cancelled()
            if conn.reset or conn.peer_shut_recv or conn.eof_requested or conn.close_requested:
                raise trio.BrokenResourceError("vsock connection is closed for writing")
            room = BUF_ALLOC - len(conn.outbound)
            if room <= 0:
                await conn.changed.park()
                continue
            conn.outbound += view[:room]
            view = view[room:]
            conn.device.pump()
        await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        while len(self._conn.outbound) >= BUF_ALLOC and not self._conn.reset:
            await self._conn.changed.park()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        conn = self._conn
        while not conn.inbound:
            if conn.peer_shut_send or conn.reset or conn.close_requested:
                await trio.lowlevel.checkpoint()
                return b""
            await conn.changed.park()
        n = len(conn.inbound) if max_bytes is None else min(max_bytes, len(conn.inbound))
        data = bytes(conn.inbound[:n])
        del conn.inbound[:n]
        conn.fwd_cnt = (conn.fwd_cnt + n) & 0xFFFF_FFFF
        conn.device.consumed(conn)
        await trio.lowlevel.checkpoint()
        return data

    async def send_eof(self) -> None:
        self._conn.eof_requested = True
        self._conn.device.pump()
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        self._conn.device.close(self._conn)
        await trio.lowlevel.checkpoint()


class VsockListener(trio.abc.Listener[VsockStream]):
    """Connections the guest opens to one host port."""

    def __init__(self, device: VirtioVsock, port: int) -> None:
        self.port = port
        self._device = device
        self._send, self._receive = trio.open_memory_channel[VsockStream](64)

    def offer(self, stream: VsockStream) -> bool:
        try:
            self._send.send_nowait(stream)
        except (trio.WouldBlock, trio.ClosedResourceError):
            return False
        return True

    async def accept(self) -> VsockStream:
        try:
            return await self._receive.receive()
        except trio.EndOfChannel:
            raise trio.ClosedResourceError("listener closed") from None

    def close(self) -> None:
        """Stop taking connections; `accept` then raises ClosedResourceError."""
        self._device.unlisten(self.port)
        self._send.close()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()


class VirtioVsock:
    device_id = DEVICE_ID
    queue_sizes = (256, 256, 256)

    def __init__(self, guest_cid: int) -> None:
        if guest_cid <= HOST_CID or guest_cid >= 0xFFFF_FFFF:
            raise ValueError(f"guest CID {guest_cid} is reserved")
        self.guest_cid = guest_cid
        self.kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._transport: VirtioMmio | None = None
        self._conns: dict[tuple[int, int], Connection] = {}
        self._listeners: dict[int, VsockListener] = {}
        self._control: deque[Header] = deque()
        self._sending: deque[Connection] = deque()  # connections with something to put in RX
        self._reset_events = 0
        # After a transport reset, the event queue's avail index from before the guest got the
        # event: the guest re-posts the buffer only after it has reset its sockets, so a moved
        # index means it is safe to open connections (see `connect`).
        self._reset_unacked_at: int | None = None
        self._reset_acked = trio.lowlevel.ParkingLot()
        self._pumping = False
        self._pump_again = False
        self._stopped = False
        # Start at a random port: a clone's guest still remembers the connections of the moment
        # it was snapshotted until it handles the transport reset, and a REQUEST that reuses one
        # of their port pairs is taken as a duplicate and dropped.
        start = secrets.randbelow(len(EPHEMERAL_PORTS))
        self._ports = itertools.cycle(
            itertools.chain(EPHEMERAL_PORTS[start:], EPHEMERAL_PORTS[:start])
        )

    # Backend protocol (called on vCPU threads).

    def features(self) -> int:
        return 0  # stream sockets only

    def read_config(self, offset: int, size: int) -> bytes:
        return struct.pack("<Q", self.guest_cid)[offset : offset + size].ljust(size, b"\0")

    def write_config(self, offset: int, data: bytes) -> None:
        pass

    def activate(self, transport: VirtioMmio) -> None:
        self._transport = transport
        self._kick()

    def notify(self, queue_index: int) -> None:
        self._kick()

    def reset(self) -> None:
        self._transport = None
        self._kick()

    def _kick(self) -> None:
        os.eventfd_write(self.kick_fd, 1)

    def stop(self) -> None:
        """The VM has stopped for good (on the trio thread, once `run` has ended).

        Host tasks may still hold streams (a proxied request, a control call) and would
        otherwise wait on a guest that is gone, or pump queues whose memory and interrupt lines
        are about to be freed. Every connection is reset, so readers see the end of the stream
        and writers BrokenResourceError; listeners close; connecting is refused; and nothing
        touches the queues again. What the guest sent before it stopped (the reply to a
        "poweroff", say) is taken from its TX ring first, while its memory is still mapped.
        """
        self.pump()
        self._stopped = True
        self._transport = None
        for conn in list(self._conns.values()):
            self._drop(conn)
        for listener in list(self._listeners.values()):
            listener.close()

    def close_fd(self) -> None:
        os.close(self.kick_fd)

    # Host side (trio thread).

    def listen(self, port: int) -> VsockListener:
        if port in self._listeners:
            raise OSError(f"vsock port {port} is already being listened on")
        listener = VsockListener(self, port)
        self._listeners[port] = listener
        return listener

    def unlisten(self, port: int) -> None:
        self._listeners.pop(port, None)

    async def connect(self, port: int, timeout: float = 2.0) -> VsockStream:
        """Open a stream to a guest port; ConnectionRefusedError if nothing listens there.

        After a restore this first waits until the guest has handled the transport reset:
        Linux handles the event queue and RX in separate work items, so a connection made
        before the event is handled would be reset with the snapshot's old ones.
        """
        if self._stopped:
            raise ConnectionRefusedError("the VM has stopped")
        with trio.move_on_after(timeout):
            while self._reset_events or self._reset_unacked_at is not None:
                await self._reset_acked.park()
        if self._reset_events or self._reset_unacked_at is not None:
            raise TimeoutError(f"the guest did not handle the vsock reset within {timeout} s")
        host_port = next(p for p in self._ports if not any(k[0] == p for k in self._conns))
        conn = Connection(self, host_port, port)
        self._conns[conn.key] = conn
        self._send_control(conn, Op.REQUEST)
        with trio.move_on_after(timeout):
            while not (conn.connected or conn.refused or conn.reset):
                await conn.changed.park()
        if conn.connected:
            return VsockStream(conn)
        self._conns.pop(conn.key, None)
        if conn.refused or conn.reset:
            raise ConnectionRefusedError(f"guest vsock port {port} refused the connection")
        self._send_control(conn, Op.RST)
        raise TimeoutError(f"guest vsock port {port} did not answer within {timeout} s")

    def transport_reset(self) -> None:
        """After a restore: tell the guest its connections are gone (listeners survive)."""
        for conn in list(self._conns.values()):
            self._drop(conn)
        self._control.clear()
        self._reset_events += 1
        self.pump()

    def consumed(self, conn: Connection) -> None:
        """A host reader took bytes: grant the guest more credit once a good share is free."""
        if (conn.fwd_cnt - conn.fwd_cnt_reported) & 0xFFFF_FFFF >= BUF_ALLOC // 4:
            self._send_control(conn, Op.CREDIT_UPDATE)

    def close(self, conn: Connection) -> None:
        if conn.close_requested or conn.key not in self._conns:
            return
        conn.close_requested = True
        conn.close_deadline = trio.current_time() + CLOSE_TIMEOUT
        conn.changed.unpark_all()
        self.pump()

    async def run(self) -> None:
        """Serve the queues until cancelled; the VM's nursery owns this task."""
        while True:
            deadline = min((c.close_deadline for c in self._conns.values()), default=math.inf)
            with trio.move_on_at(deadline):
                await trio.lowlevel.wait_readable(self.kick_fd)
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self.kick_fd)
            self._expire_closing()
            self.pump()

    # Queue processing.

    def pump(self) -> None:
        """Move everything that can move: guest TX into connections, pending output into RX.

        Handling one packet can queue replies and wake host tasks, which may call back in; a
        call made while pumping only asks the running pump for another round.
        """
        if self._pumping:
            self._pump_again = True
            return
        self._pumping = True
        try:
            self._pump_again = True
            while self._pump_again:
                self._pump_again = False
                transport = self._transport
                if transport is None or not transport.activated:
                    return
                try:
                    self._process_tx(transport)
                    self._process_rx(transport)
                    self._process_events(transport)
                except (QueueError, ValueError) as error:
                    transport.fail(QueueError(str(error)))
                    return
        finally:
            self._pumping = False

    def _process_tx(self, transport: VirtioMmio) -> None:
        queue, mem = transport.queues[TX], transport.memory
        handled = False
        while (chain := queue.pop(mem)) is not None:
            handled = True
            data = b"".join(mem.read(b.addr, b.length) for b in chain.readable[:4])
            if len(data) >= HEADER.size:
                hdr = Header(*HEADER.unpack_from(data))
                self._on_packet(hdr, data[HEADER.size : HEADER.size + min(hdr.len, MAX_PACKET)])
            queue.add_used(mem, chain.head, 0)
        if handled:
            transport.signal_used(queue)

    def _on_packet(self, hdr: Header, payload: bytes) -> None:
        if hdr.src_cid != self.guest_cid or hdr.dst_cid != HOST_CID:
            return  # not from this guest's address: drop, as a NIC drops a spoofed frame
        key = (hdr.dst_port, hdr.src_port)
        conn = self._conns.get(key)
        if hdr.type != TYPE_STREAM or len(payload) != hdr.len:
            if hdr.op != Op.RST:
                self._control.append(self._reply(hdr, Op.RST))
            if conn is not None:
                self._drop(conn)
            return
        if conn is None:
            self._on_unknown(hdr)
            return
        conn.peer_buf_alloc, conn.peer_fwd_cnt = hdr.buf_alloc, hdr.fwd_cnt
        match hdr.op:
            case Op.RESPONSE if not conn.connected:
                conn.connected = True
            case Op.RW if conn.connected:
                if len(conn.inbound) + len(payload) > BUF_ALLOC:
                    self._send_control(conn, Op.RST)  # it ignored the credit we gave it
                    self._drop(conn)
                    return
                conn.inbound += payload
            case Op.CREDIT_REQUEST:
                self._send_control(conn, Op.CREDIT_UPDATE)
            case Op.SHUTDOWN:
                conn.peer_shut_recv |= bool(hdr.flags & SHUTDOWN_RCV)
                conn.peer_shut_send |= bool(hdr.flags & SHUTDOWN_SEND)
                if conn.peer_shut_recv and conn.peer_shut_send:
                    self._send_control(conn, Op.RST)
                    conn.reset = True
                    self._forget(conn)
            case Op.RST:
                conn.refused = not conn.connected
                conn.reset = True
                self._forget(conn)
            case Op.CREDIT_UPDATE:
                pass  # the credit fields were taken above
            case _:
                self._send_control(conn, Op.RST)
                self._drop(conn)
                return
        conn.changed.unpark_all()
        if conn.outbound or conn.close_requested or conn.eof_requested:
            self._want_send(conn)

    def _on_unknown(self, hdr: Header) -> None:
        """A packet for no connection: a new connection to a host port, or a stray."""
        if hdr.op != Op.REQUEST:
            if hdr.op != Op.RST:
                self._control.append(self._reply(hdr, Op.RST))
            return
        listener = self._listeners.get(hdr.dst_port)
        conn = Connection(self, hdr.dst_port, hdr.src_port, connected=True)
        conn.peer_buf_alloc, conn.peer_fwd_cnt = hdr.buf_alloc, hdr.fwd_cnt
        if listener is None or not listener.offer(VsockStream(conn)):
            self._control.append(self._reply(hdr, Op.RST))
            return
        self._conns[conn.key] = conn
        self._send_control(conn, Op.RESPONSE)

    def _reply(self, hdr: Header, op: int) -> Header:
        return Header(HOST_CID, self.guest_cid, hdr.dst_port, hdr.src_port, 0, TYPE_STREAM, op,
                      0, 0, 0)  # fmt: skip

    def _header(self, conn: Connection, op: int, length: int = 0, flags: int = 0) -> Header:
        conn.fwd_cnt_reported = conn.fwd_cnt
        return Header(
            HOST_CID, self.guest_cid, conn.host_port, conn.guest_port, length, TYPE_STREAM, op,
            flags, BUF_ALLOC, conn.fwd_cnt,
        )  # fmt: skip

    def _send_control(self, conn: Connection, op: int, flags: int = 0) -> None:
        self._control.append(self._header(conn, op, flags=flags))
        self.pump()

    def _want_send(self, conn: Connection) -> None:
        """Queue `conn` for RX; the running pump (every caller is inside one) sends it."""
        if conn not in self._sending:
            self._sending.append(conn)

    def _process_rx(self, transport: VirtioMmio) -> None:
        queue, mem = transport.queues[RX], transport.memory
        for conn in self._conns.values():
            if conn.outbound and conn.credit() > 0:
                self._want_send(conn)  # a credit update may have unblocked it
        filled = False
        while self._control or self._sending:
            chain = queue.pop(mem)
            if chain is None:
                break  # the guest's next RX kick brings buffers
            room = sum(b.length for b in chain.writable) - HEADER.size
            if room <= 0:
                raise QueueError("vsock RX buffer is smaller than a packet header")
            packet = self._next_packet(min(room, MAX_PACKET))
            if packet is None:
                queue.unpop()
                break
            hdr, payload = packet
            blob, pos = hdr.pack() + payload, 0
            for buf in chain.writable:
                if pos >= len(blob):
                    break
                mem.write(buf.addr, blob[pos : pos + buf.length])
                pos += buf.length
            queue.add_used(mem, chain.head, len(blob))
            filled = True
        if filled:
            transport.signal_used(queue)

    def _next_packet(self, room: int) -> tuple[Header, bytes] | None:
        if self._control:
            return self._control.popleft(), b""
        while self._sending:
            conn = self._sending.popleft()
            if conn.key not in self._conns or conn.reset:
                continue
            if conn.outbound and conn.connected and not conn.peer_shut_recv:
                n = min(len(conn.outbound), room, conn.credit())
                if n <= 0:
                    continue  # out of credit: the guest's next credit update re-queues it
                payload = bytes(conn.outbound[:n])
                del conn.outbound[:n]
                conn.tx_cnt = (conn.tx_cnt + n) & 0xFFFF_FFFF
                if conn.outbound:
                    self._sending.append(conn)
                conn.changed.unpark_all()
                return self._header(conn, Op.RW, len(payload)), payload
            if conn.outbound:
                continue
            if (conn.close_requested or conn.eof_requested) and not conn.shutdown_sent:
                flags = SHUTDOWN_SEND | (SHUTDOWN_RCV if conn.close_requested else 0)
                conn.shutdown_sent = conn.close_requested
                conn.eof_requested = False
                return self._header(conn, Op.SHUTDOWN, flags=flags), b""
        return None

    def _process_events(self, transport: VirtioMmio) -> None:
        queue, mem = transport.queues[EVENT], transport.memory
        if self._reset_unacked_at is not None and queue.avail_idx(mem) != self._reset_unacked_at:
            self._reset_unacked_at = None
            self._reset_acked.unpark_all()
        sent = False
        if self._reset_events:
            self._reset_unacked_at = queue.avail_idx(mem)
        while self._reset_events and (chain := queue.pop(mem)) is not None:
            writable = chain.writable
            if not writable or writable[0].length < 4:
                raise QueueError("vsock event buffer is smaller than an event")
            mem.write(writable[0].addr, struct.pack("<I", EVENT_TRANSPORT_RESET))
            queue.add_used(mem, chain.head, 4)  # Linux ignores an event whose length is not 4
            self._reset_events -= 1
            sent = True
        if sent:
            queue.kick_on_next_avail(mem)  # the re-posted buffer is the guest's ack
            transport.signal_used(queue)

    # Connection teardown.

    def _forget(self, conn: Connection) -> None:
        self._conns.pop(conn.key, None)
        conn.changed.unpark_all()

    def _drop(self, conn: Connection) -> None:
        conn.reset = True
        self._forget(conn)

    def _expire_closing(self) -> None:
        now = trio.current_time()
        for conn in [c for c in self._conns.values() if c.close_deadline <= now]:
            self._control.append(self._header(conn, Op.RST))
            self._drop(conn)
