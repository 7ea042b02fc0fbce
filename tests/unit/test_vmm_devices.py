"""Legacy devices and the bus, driven the way Linux's drivers drive them."""

import pytest

from cube.vmm import gdt
from cube.vmm.bus import Bus
from cube.vmm.devices import serial as uart
from cube.vmm.devices.i8042 import I8042
from cube.vmm.devices.serial import Serial


class Counter:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def test_serial_console_output_reaches_log_and_sink() -> None:
    seen: list[bytes] = []
    dev = Serial(irq=Counter(), sink=seen.append)
    for ch in b"hello\n":
        dev.write(uart.DATA, bytes((ch,)))
    assert dev.log_tail() == b"hello\n"
    assert b"".join(seen) == b"hello\n"
    assert dev.read(uart.LSR, 1)[0] & uart.LSR_IDLE == uart.LSR_IDLE


def test_serial_log_is_bounded_to_its_tail() -> None:
    dev = Serial(irq=Counter(), log_bytes=8)
    for ch in b"0123456789":
        dev.write(uart.DATA, bytes((ch,)))
    assert dev.log_tail() == b"23456789"


def test_serial_input_fifo_raises_rx_interrupt_and_is_bounded() -> None:
    irq = Counter()
    dev = Serial(irq=irq)
    dev.write(uart.IER, b"\x01")
    assert dev.feed(b"x" * 100) == uart.FIFO_SIZE
    assert irq.count == 1
    assert dev.read(uart.IIR_FCR, 1)[0] & 0x0F == uart.IIR_RX_DATA
    assert dev.read(uart.IIR_FCR, 1)[0] & 0x0F == uart.IIR_NONE  # one-shot
    assert dev.read(uart.LSR, 1)[0] & uart.LSR_DATA_READY
    assert dev.read(uart.DATA, 1) == b"x"


def test_serial_divisor_latch_and_ier_mask() -> None:
    dev = Serial(irq=Counter())
    dev.write(uart.LCR, bytes((uart.LCR_DLAB,)))
    dev.write(uart.DATA, b"\x01")
    dev.write(uart.IER, b"\x00")
    assert dev.state().divisor == 1
    dev.write(uart.LCR, b"\x03")
    dev.write(uart.IER, b"\xff")
    assert dev.read(uart.IER, 1) == b"\x0f"


def test_serial_state_round_trip() -> None:
    dev = Serial(irq=Counter())
    dev.write(uart.IER, b"\x01")
    dev.feed(b"abc")
    clone = Serial(irq=Counter())
    clone.restore(dev.state())
    assert clone.state() == dev.state()
    assert clone.read(uart.DATA, 1) == b"a"


def test_i8042_reset_command_stops_the_vm() -> None:
    reset = Counter()
    dev = I8042(on_reset=reset)
    dev.write(4, bytes((0x20,)))
    assert dev.read(4, 1)[0] & 0x01
    assert dev.read(0, 1) == b"\x05"
    dev.write(4, b"\xfe")
    assert reset.count == 1


class Recorder:
    def __init__(self) -> None:
        self.writes: list[tuple[int, bytes]] = []

    def read(self, offset: int, size: int) -> bytes:
        return offset.to_bytes(size, "little")

    def write(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, data))


def test_bus_routes_by_offset_and_ignores_unclaimed_addresses() -> None:
    bus = Bus("pio")
    dev = Recorder()
    bus.register(0x3F8, 8, dev)
    bus.write(0x3FA, b"\x07")
    assert dev.writes == [(2, b"\x07")]
    assert bus.read(0x3FC, 1) == b"\x04"
    assert bus.read(0x80, 1) == b"\x00"
    bus.write(0x80, b"\x01")
    with pytest.raises(ValueError, match="overlaps"):
        bus.register(0x3F0, 9, Recorder())


def test_gdt_decodes_flat_segments() -> None:
    segs = gdt.boot_segments()
    cs, tr = segs["cs"], segs["tr"]
    assert (cs.base, cs.limit, cs.type, cs.db, cs.l, cs.g, cs.present) == (
        0,
        0xFFFFFFFF,
        0xB,
        1,
        0,
        1,
        1,
    )
    assert (tr.limit, tr.type, tr.g, tr.s) == (0x67, 0xB, 0, 0)
    assert len(gdt.table_bytes()) == 32
