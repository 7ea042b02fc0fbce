"""A scripted virtio driver over bytearray RAM: the guest side of the device tests.

It does, register by register and ring entry by ring entry, what Linux's virtio_mmio and
virtio_ring do, so the devices under test see the same traffic a real guest would produce.
"""

from __future__ import annotations

import struct

from cube.vmm.devices import virtio_mmio as mmio
from cube.vmm.virtqueue import DESC_F_NEXT, DESC_F_WRITE

QSIZE = 8
RING_BYTES = 0x1000  # one page per ring part, per queue
DATA_BASE = 0x80000


class Ram:
    def __init__(self, size: int = 1 << 20) -> None:
        self.buf = bytearray(size)

    def read(self, gpa: int, size: int) -> bytes:
        if gpa < 0 or gpa + size > len(self.buf):
            raise ValueError("outside RAM")
        return bytes(self.buf[gpa : gpa + size])

    def write(self, gpa: int, data: bytes | memoryview) -> None:
        if gpa < 0 or gpa + len(data) > len(self.buf):
            raise ValueError("outside RAM")
        self.buf[gpa : gpa + len(data)] = data

    def view(self, gpa: int, size: int) -> memoryview:
        """RAM lent out without a copy, as GuestRam.view does."""
        if gpa < 0 or size < 0 or gpa + size > len(self.buf):
            raise ValueError("outside RAM")
        return memoryview(self.buf)[gpa : gpa + size]

    def fence(self) -> None:
        pass


class Queue:
    def __init__(self, ram: Ram, index: int) -> None:
        self.ram = ram
        base = 0x1000 + index * 3 * RING_BYTES
        self.desc, self.avail, self.used = base, base + RING_BYTES, base + 2 * RING_BYTES
        self.avail_idx = 0
        self.used_seen = 0
        self.free = list(range(QSIZE))

    def post(self, buffers: list[tuple[int, int, bool]]) -> int:
        """Chain (addr, len, device_writable) buffers and make the chain available."""
        ids = [self.free.pop(0) for _ in buffers]
        for pos, (i, (addr, length, writable)) in enumerate(zip(ids, buffers, strict=True)):
            last = pos == len(ids) - 1
            flags = (0 if last else DESC_F_NEXT) | (DESC_F_WRITE if writable else 0)
            nxt = 0 if last else ids[pos + 1]
            self.ram.write(self.desc + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))
        slot = self.avail_idx % QSIZE
        self.ram.write(self.avail + 4 + 2 * slot, struct.pack("<H", ids[0]))
        self.avail_idx += 1
        self.ram.write(self.avail + 2, struct.pack("<H", self.avail_idx & 0xFFFF))
        self._chains = getattr(self, "_chains", {})
        self._chains[ids[0]] = ids
        return ids[0]

    def take_used(self) -> list[tuple[int, int]]:
        """(head, written) for every chain the device returned since the last call."""
        (idx,) = struct.unpack("<H", self.ram.read(self.used + 2, 2))
        out = []
        while self.used_seen != idx:
            slot = self.used_seen % QSIZE
            head, length = struct.unpack("<II", self.ram.read(self.used + 4 + 8 * slot, 8))
            self.free.extend(self._chains.pop(head))
            out.append((head, length))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return out


class Driver:
    def __init__(self, backend: mmio.VirtioBackend, features: int = mmio.F_VERSION_1) -> None:
        self.ram = Ram()
        self.irqs = 0
        self.dev = mmio.VirtioMmio(backend, self.ram, irq=self._irq)
        self.features = features
        self.queues: list[Queue] = []

    def _irq(self) -> None:
        self.irqs += 1

    def reg(self, offset: int, value: int | None = None) -> int:
        if value is None:
            return struct.unpack("<I", self.dev.read(offset, 4))[0]
        self.dev.write(offset, struct.pack("<I", value))
        return value

    def bring_up(self, num_queues: int = 1) -> int:
        self.reg(0x70, 0)
        self.ram.write(0x1000, bytes(num_queues * 3 * RING_BYTES))
        self.queues = [Queue(self.ram, i) for i in range(num_queues)]
        self.reg(0x70, mmio.STATUS_ACKNOWLEDGE | mmio.STATUS_DRIVER)
        for sel in (0, 1):
            self.reg(0x24, sel)
            self.reg(0x20, (self.features >> (32 * sel)) & 0xFFFFFFFF)
        self.reg(0x70, self.reg(0x70) | mmio.STATUS_FEATURES_OK)
        if not self.reg(0x70) & mmio.STATUS_FEATURES_OK:
            return self.reg(0x70)
        for i, q in enumerate(self.queues):
            self.reg(0x30, i)
            assert self.reg(0x34) >= QSIZE
            self.reg(0x38, QSIZE)
            for off, addr in ((0x80, q.desc), (0x90, q.avail), (0xA0, q.used)):
                self.reg(off, addr)
                self.reg(off + 4, 0)
            self.reg(0x44, 1)
        self.reg(0x70, self.reg(0x70) | mmio.STATUS_DRIVER_OK)
        return self.reg(0x70)

    def kick(self, queue: int) -> None:
        self.reg(mmio.QUEUE_NOTIFY, queue)
