"""Address buses that route a vCPU's port-I/O and MMIO exits to devices.

A device claims a range and sees offsets within it, so it need not know where it was placed.
Lookups are a bisect over sorted, non-overlapping ranges: the exit path stays short however many
devices a VM has. Accesses nobody claims read as zeros and are otherwise ignored, as on a real
board: a guest probing for hardware it does not have must not stop the VM.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Protocol


class BusDevice(Protocol):
    def read(self, offset: int, size: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...


@dataclass
class Bus:
    name: str
    _starts: list[int] = field(default_factory=list)
    _entries: list[tuple[int, int, BusDevice]] = field(default_factory=list)

    def register(self, base: int, size: int, device: BusDevice) -> None:
        if size <= 0:
            raise ValueError(f"{self.name}: empty range at {base:#x}")
        i = bisect.bisect_right(self._starts, base)
        prev_overlaps = i > 0 and self._entries[i - 1][0] + self._entries[i - 1][1] > base
        next_overlaps = i < len(self._entries) and base + size > self._entries[i][0]
        if prev_overlaps or next_overlaps:
            raise ValueError(f"{self.name}: range {base:#x}+{size:#x} overlaps a registered device")
        self._starts.insert(i, base)
        self._entries.insert(i, (base, size, device))

    def _find(self, addr: int, size: int) -> tuple[int, BusDevice] | None:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i < 0:
            return None
        base, length, device = self._entries[i]
        if addr + size > base + length:
            return None
        return addr - base, device

    def read(self, addr: int, size: int) -> bytes:
        hit = self._find(addr, size)
        return bytes(size) if hit is None else hit[1].read(hit[0], size)

    def write(self, addr: int, data: bytes) -> None:
        hit = self._find(addr, len(data))
        if hit is not None:
            hit[1].write(hit[0], data)
