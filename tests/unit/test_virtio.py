"""The virtio-mmio transport, virtqueues, virtio-rng and virtio-blk, driven by a scripted guest."""

import struct
from pathlib import Path

from cube.vmm.devices import virtio_blk
from cube.vmm.devices import virtio_mmio as mmio
from cube.vmm.devices.virtio_rng import VirtioRng
from cube.vmm.disk import LayeredDisk
from cube.vmm.virtqueue import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE
from tests.unit.fake_driver import QSIZE, Driver


def test_identity_registers() -> None:
    d = Driver(VirtioRng())
    assert d.reg(0x0) == mmio.MAGIC and d.reg(0x4) == 2 and d.reg(0x8) == 4
    d.reg(0x14, 1)
    assert d.reg(0x10) & 1  # VERSION_1 is bit 32


def test_rng_fills_writable_buffers_and_interrupts() -> None:
    d = Driver(VirtioRng())
    assert d.bring_up() & mmio.STATUS_DRIVER_OK
    q = d.queues[0]
    head = q.post([(0x90000, 16, True), (0x90010, 16, True)])
    d.kick(0)
    assert q.take_used() == [(head, 32)]
    assert d.ram.read(0x90000, 32) != bytes(32)
    assert d.irqs == 1 and d.reg(0x60) & mmio.INT_USED_BUFFER
    d.reg(0x64, mmio.INT_USED_BUFFER)
    assert d.reg(0x60) == 0


def test_indirect_table_is_followed() -> None:
    d = Driver(VirtioRng())
    d.bring_up()
    table = 0x8000
    d.ram.write(table, struct.pack("<QIHH", 0x90000, 8, DESC_F_WRITE | DESC_F_NEXT, 1))
    d.ram.write(table + 16, struct.pack("<QIHH", 0x90100, 8, DESC_F_WRITE, 0))
    q = d.queues[0]
    head = q.post([(table, 32, False)])
    d.ram.write(q.desc + 16 * head, struct.pack("<QIHH", table, 32, DESC_F_INDIRECT, 0))
    d.kick(0)
    assert q.take_used() == [(head, 16)]


def test_looping_chain_breaks_only_the_device() -> None:
    d = Driver(VirtioRng())
    d.bring_up()
    q = d.queues[0]
    head = q.post([(0x90000, 8, True), (0x90000, 8, True)])
    d.ram.write(
        q.desc + 16 * (head + 1), struct.pack("<QIHH", 0x90000, 8, DESC_F_WRITE | DESC_F_NEXT, head)
    )
    d.kick(0)
    assert d.reg(0x70) & mmio.STATUS_NEEDS_RESET
    assert d.reg(0x60) & mmio.INT_CONFIG_CHANGE
    assert d.bring_up() & mmio.STATUS_DRIVER_OK  # the driver's reset brings it back
    assert not d.reg(0x70) & mmio.STATUS_NEEDS_RESET


def test_buffer_outside_ram_breaks_only_the_device() -> None:
    d = Driver(VirtioRng())
    d.bring_up()
    d.queues[0].post([(1 << 40, 8, True)])
    d.kick(0)
    assert d.reg(0x70) & mmio.STATUS_NEEDS_RESET


def test_driver_without_version_1_is_refused() -> None:
    d = Driver(VirtioRng(), features=0)
    assert not d.bring_up() & mmio.STATUS_FEATURES_OK


def test_event_idx_suppresses_interrupts_until_used_event() -> None:
    d = Driver(VirtioRng(), features=mmio.F_VERSION_1 | mmio.F_EVENT_IDX)
    d.bring_up()
    q = d.queues[0]
    d.ram.write(q.avail + 4 + 2 * QSIZE, struct.pack("<H", 5))  # used_event: wake me at entry 6
    for i in range(6):
        q.post([(0x90000 + 16 * i, 4, True)])
        d.kick(0)
        q.take_used()
    assert d.irqs == 1  # only when used idx moved past 5


def test_transport_state_round_trips() -> None:
    d = Driver(VirtioRng())
    d.bring_up()
    again = mmio.VirtioMmio(VirtioRng(), d.ram, irq=lambda: None)
    again.restore(d.dev.state())
    assert again.state() == d.dev.state()


def _blk_request(d: Driver, rtype: int, sector: int, data_len: int, write_data: bytes = b"") -> int:
    """Queue header, data, status as Linux does (three descriptors); returns the status byte."""
    hdr, data, status = 0x90000, 0xA0000, 0xB0000
    d.ram.write(hdr, struct.pack("<IIQ", rtype, 0, sector))
    d.ram.write(data, write_data)
    d.ram.write(status, b"\xff")
    q = d.queues[0]
    q.post([(hdr, 16, False), (data, data_len, rtype == virtio_blk.T_IN), (status, 1, True)])
    d.kick(0)
    q.take_used()
    return d.ram.read(status, 1)[0]


def test_blk_reads_writes_and_refuses_out_of_range(tmp_path: Path) -> None:
    base = tmp_path / "base.img"
    base.write_bytes(b"B" * 8192)
    disk = LayeredDisk.open(base, [], tmp_path / "top.overlay")
    d = Driver(virtio_blk.VirtioBlk(disk))
    assert struct.unpack("<Q", d.dev.read(0x100, 8))[0] == 16  # capacity in sectors
    d.bring_up()
    assert _blk_request(d, virtio_blk.T_OUT, 2, 512, b"W" * 512) == virtio_blk.S_OK
    assert _blk_request(d, virtio_blk.T_IN, 1, 1024) == virtio_blk.S_OK
    assert d.ram.read(0xA0000, 1024) == b"B" * 512 + b"W" * 512
    assert base.read_bytes() == b"B" * 8192
    assert _blk_request(d, virtio_blk.T_IN, 16, 512) == virtio_blk.S_IOERR
    assert _blk_request(d, virtio_blk.T_IN, 0, 100) == virtio_blk.S_IOERR
    assert _blk_request(d, 99, 0, 512) == virtio_blk.S_UNSUPP
    assert not d.reg(0x70) & mmio.STATUS_NEEDS_RESET
    disk.close()


def test_read_only_blk_refuses_writes(tmp_path: Path) -> None:
    base = tmp_path / "base.img"
    base.write_bytes(bytes(4096))
    disk = LayeredDisk.open(base, [], tmp_path / "top.overlay")
    d = Driver(virtio_blk.VirtioBlk(disk, read_only=True))
    d.bring_up()
    assert _blk_request(d, virtio_blk.T_OUT, 0, 512, b"x" * 512) == virtio_blk.S_IOERR
    disk.close()


def test_draining_a_queue_rearms_event_idx_kicks() -> None:
    d = Driver(VirtioRng(), features=mmio.F_VERSION_1 | mmio.F_EVENT_IDX)
    d.bring_up()
    q = d.queues[0]
    for i in range(3):
        q.post([(0x90000 + 16 * i, 4, True)])
        d.kick(0)
        q.take_used()
        (avail_event,) = struct.unpack("<H", d.ram.read(q.used + 4 + 8 * QSIZE, 2))
        assert avail_event == i + 1  # the driver must kick again for its next buffer
