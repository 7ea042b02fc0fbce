"""virtio-vsock's host end against a scripted guest that speaks the packet protocol."""

import struct
from collections.abc import Awaitable, Callable

import pytest
import trio

from cube.vmm.devices import virtio_vsock as vs
from tests.unit.fake_driver import DATA_BASE, Driver

GUEST_CID = 3
RX_BUF = 4096 + vs.HEADER.size


class Guest:
    """The guest's virtio_transport: RX buffers posted, TX packets sent, replies read back."""

    def __init__(self) -> None:
        self.dev = vs.VirtioVsock(GUEST_CID)
        self.drv = Driver(self.dev)
        self.drv.bring_up(num_queues=3)
        self.rx, self.tx, self.events = self.drv.queues
        self.bufs: dict[int, int] = {}
        for i in range(6):
            self._post_rx(DATA_BASE + i * 0x2000)
        self.drv.ram.write(0xF0000, bytes(8))
        self.events.post([(0xF0000, 8, True)])
        self.drv.kick(2)
        self.inbox: list[tuple[vs.Header, bytes]] = []

    def _post_rx(self, addr: int) -> None:
        self.bufs[self.rx.post([(addr, RX_BUF, True)])] = addr

    async def send(
        self, op: int, src_port: int, dst_port: int, payload: bytes = b"", **kw: int
    ) -> None:
        fields = {"flags": 0, "buf_alloc": 65536, "fwd_cnt": 0, "type": vs.TYPE_STREAM,
                  "src_cid": GUEST_CID, "dst_cid": vs.HOST_CID} | kw  # fmt: skip
        hdr = vs.Header(
            fields["src_cid"], fields["dst_cid"], src_port, dst_port, len(payload),
            fields["type"], op, fields["flags"], fields["buf_alloc"], fields["fwd_cnt"],
        )  # fmt: skip
        self.drv.ram.write(0xE0000, hdr.pack() + payload)
        self.tx.post([(0xE0000, vs.HEADER.size + len(payload), False)])
        self.drv.kick(1)
        while not self.tx.take_used():  # the device's task picks the kick up
            await trio.sleep(0.001)

    def receive(self) -> list[tuple[vs.Header, bytes]]:
        for head, length in self.rx.take_used():
            addr = self.bufs.pop(head)
            blob = self.drv.ram.read(addr, length)
            hdr = vs.Header(*vs.HEADER.unpack_from(blob))
            self.inbox.append((hdr, blob[vs.HEADER.size : vs.HEADER.size + hdr.len]))
            self._post_rx(addr)
        self.drv.kick(0)
        out, self.inbox = self.inbox, []
        return out


async def settle() -> None:
    for _ in range(5):
        await trio.sleep(0.01)


def with_guest(test: Callable[[Guest], Awaitable[None]]) -> Callable[[], None]:
    """Run an async test against a fresh guest, with the device's task in a nursery."""

    def run() -> None:
        async def main() -> None:
            g = Guest()
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(g.dev.run)
                    with trio.fail_after(10):
                        await test(g)
                    nursery.cancel_scope.cancel()
            finally:
                g.dev.close_fd()

        trio.run(main)

    run.__name__ = test.__name__  # pytest must not see the wrapped signature's parameter
    return run


async def _connect(guest: Guest, port: int) -> vs.VsockStream:
    async with trio.open_nursery() as nursery:
        result: list[vs.VsockStream] = []

        async def connect() -> None:
            result.append(await guest.dev.connect(port))

        nursery.start_soon(connect)
        await settle()
        ((req, _),) = guest.receive()
        assert req.op == vs.Op.REQUEST and req.dst_port == port and req.dst_cid == GUEST_CID
        await guest.send(vs.Op.RESPONSE, port, req.src_port)
    return result[0]


@with_guest
async def test_host_connects_and_exchanges_data(guest: Guest) -> None:
    stream = await _connect(guest, 49983)
    await stream.send_all(b"hello")
    await settle()
    ((rw, payload),) = guest.receive()
    assert rw.op == vs.Op.RW and payload == b"hello" and rw.buf_alloc == vs.BUF_ALLOC
    await guest.send(vs.Op.RW, 49983, rw.src_port, b"world")
    assert await stream.receive_some() == b"world"
    await guest.send(vs.Op.SHUTDOWN, 49983, rw.src_port, flags=vs.SHUTDOWN_RCV | vs.SHUTDOWN_SEND)
    assert await stream.receive_some() == b""
    await settle()
    assert [h.op for h, _ in guest.receive()] == [vs.Op.RST]


@with_guest
async def test_connect_to_closed_port_is_refused(guest: Guest) -> None:
    async with trio.open_nursery() as nursery:

        async def attempt() -> None:
            with pytest.raises(ConnectionRefusedError):
                await guest.dev.connect(7)

        nursery.start_soon(attempt)
        await settle()
        ((req, _),) = guest.receive()
        await guest.send(vs.Op.RST, 7, req.src_port)


@with_guest
async def test_guest_connects_to_host_listener(guest: Guest) -> None:
    listener = guest.dev.listen(1024)
    await guest.send(vs.Op.REQUEST, 5000, 1024)
    stream = await listener.accept()
    await settle()
    ((resp, _),) = guest.receive()
    assert resp.op == vs.Op.RESPONSE and resp.dst_port == 5000
    await guest.send(vs.Op.RW, 5000, 1024, b"ping")
    assert await stream.receive_some() == b"ping"
    await guest.send(vs.Op.REQUEST, 5001, 1025)  # nobody listens on 1025
    await settle()
    ((rst, _),) = guest.receive()
    assert rst.op == vs.Op.RST and rst.dst_port == 5001
    await listener.aclose()


@with_guest
async def test_host_writes_respect_guest_credit(guest: Guest) -> None:
    stream = await _connect(guest, 80)
    await guest.send(vs.Op.CREDIT_UPDATE, 80, stream.host_port, buf_alloc=100)
    await stream.send_all(b"x" * 250)
    await settle()
    got = guest.receive()
    assert sum(len(p) for _, p in got) == 100
    await guest.send(vs.Op.CREDIT_UPDATE, 80, stream.host_port, buf_alloc=100, fwd_cnt=100)
    await settle()
    assert sum(len(p) for _, p in guest.receive()) == 100


@with_guest
async def test_guest_overrunning_credit_is_reset(guest: Guest) -> None:
    stream = await _connect(guest, 80)
    port = stream.host_port
    for _ in range(vs.BUF_ALLOC // 4096):
        await guest.send(vs.Op.RW, 80, port, b"y" * 4096)
    await guest.send(vs.Op.RW, 80, port, b"z")
    await settle()
    assert vs.Op.RST in [h.op for h, _ in guest.receive()]
    with pytest.raises(trio.BrokenResourceError):
        await stream.send_all(b"more")


@with_guest
async def test_spoofed_and_malformed_packets_do_not_break_the_device(guest: Guest) -> None:
    await guest.send(vs.Op.REQUEST, 5000, 1024, src_cid=99)  # not this guest's CID: dropped
    await guest.send(vs.Op.REQUEST, 5000, 1024, type=7)  # unknown socket type: reset
    await settle()
    assert [h.op for h, _ in guest.receive()] == [vs.Op.RST]
    stream = await _connect(guest, 80)  # the device still works
    await stream.aclose()


@with_guest
async def test_transport_reset_event_has_length_four(guest: Guest) -> None:
    stream = await _connect(guest, 80)
    guest.dev.transport_reset()
    await settle()
    ((_, length),) = guest.events.take_used()
    assert length == 4 and struct.unpack("<I", guest.drv.ram.read(0xF0000, 4))[0] == 0
    assert await stream.receive_some() == b""


@with_guest
async def test_connect_after_a_reset_waits_for_the_guest_to_handle_it(guest: Guest) -> None:
    guest.dev.transport_reset()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(guest.dev.connect, 80)
        await settle()
        assert guest.receive() == []  # no REQUEST while the reset is unhandled
        ((_, length),) = guest.events.take_used()
        assert length == 4
        guest.events.post([(0xF0000, 8, True)])  # what Linux does after resetting its sockets
        guest.drv.kick(2)
        await settle()
        ((req, _),) = guest.receive()
        assert req.op == vs.Op.REQUEST
        await guest.send(vs.Op.RESPONSE, 80, req.src_port)


@with_guest
async def test_connect_times_out_when_the_reset_is_never_handled(guest: Guest) -> None:
    guest.dev.transport_reset()
    with pytest.raises(TimeoutError, match="reset"):
        await guest.dev.connect(80, timeout=0.2)


@with_guest
async def test_full_rx_ring_holds_data_until_the_guest_posts_buffers(guest: Guest) -> None:
    stream = await _connect(guest, 80)
    await stream.send_all(b"z" * (7 * 4096))  # more than the six posted RX buffers hold
    await settle()
    first = sum(len(p) for _, p in guest.receive())  # reposts the buffers it read
    await settle()
    rest = sum(len(p) for _, p in guest.receive())
    assert first == 6 * 4096 and first + rest == 7 * 4096


@with_guest
async def test_stopping_takes_what_the_guest_sent_last_before_ending_the_streams(
    guest: Guest,
) -> None:
    """The reply to a poweroff is in the TX ring, its kick not yet seen, when the VM stops."""
    stream = await _connect(guest, 1234)
    hdr = vs.Header(GUEST_CID, vs.HOST_CID, 1234, stream.host_port, 3, vs.TYPE_STREAM,
                    vs.Op.RW, 0, 65536, 0)  # fmt: skip
    guest.drv.ram.write(0xE0000, hdr.pack() + b"bye")
    guest.tx.post([(0xE0000, vs.HEADER.size + 3, False)])  # no kick: the VM stopped first
    guest.dev.stop()
    assert await stream.receive_some() == b"bye"
    assert await stream.receive_some() == b""


@with_guest
async def test_a_stopped_device_ends_its_streams_and_never_touches_the_queues(guest: Guest) -> None:
    stream = await _connect(guest, 49983)
    listener = guest.dev.listen(1024)
    outcome: list[bytes] = []

    async def read() -> None:
        outcome.append(await stream.receive_some())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await settle()
        guest.dev.stop()  # the VM's memory and interrupt lines go next
    assert outcome == [b""]  # the parked reader sees the end of the stream
    posted_before = guest.rx.take_used()
    with pytest.raises(trio.BrokenResourceError):
        await stream.send_all(b"late")
    await stream.aclose()  # a late close from the proxy is quiet
    with pytest.raises(ConnectionRefusedError):
        await guest.dev.connect(49983)
    with pytest.raises(trio.ClosedResourceError):
        await listener.accept()
    await settle()
    assert posted_before == [] and guest.rx.take_used() == []  # nothing written into RX
