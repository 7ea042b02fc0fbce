"""Guest RAM as the devices see it: guest-physical addresses over the host mappings.

RAM is one or two regions (around the MMIO hole, see layout.py), each one host mapping and one
KVM memory slot. Devices read and write it by guest-physical address; every access is checked
to fall inside one region, because the addresses come from the guest. A snapshot's memory file
holds the regions back to back, so a restore maps region i at the sum of the sizes before it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cube.vmm.kvm import GuestMemory, fence
from cube.vmm.layout import RamRegion, ram_regions


class GuestMemoryError(ValueError):
    """A guest-physical access outside RAM (a device followed a bad guest pointer)."""


@dataclass
class _Slot:
    region: RamRegion
    memory: GuestMemory
    view: memoryview


class GuestRam:
    def __init__(self, slots: list[tuple[RamRegion, GuestMemory]]) -> None:
        self._slots = [_Slot(r, m, m.view()) for r, m in slots]
        self.size = sum(r.size for r, _ in slots)

    @classmethod
    def anonymous(cls, size: int) -> GuestRam:
        return cls([(r, GuestMemory.anonymous(r.size)) for r in ram_regions(size)])

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], size: int) -> GuestRam:
        """Map a memory snapshot privately: the guest's writes stay in this process."""
        slots, offset = [], 0
        for r in ram_regions(size):
            slots.append((r, GuestMemory.from_file(path, r.size, offset=offset)))
            offset += r.size
        return cls(slots)

    @property
    def regions(self) -> list[tuple[RamRegion, GuestMemory]]:
        return [(s.region, s.memory) for s in self._slots]

    @property
    def low_end(self) -> int:
        return self._slots[0].region.end

    def view(self, gpa: int, size: int) -> memoryview:
        """Bytes [gpa, gpa+size) of guest RAM, without copying; must not straddle regions."""
        for s in self._slots:
            start = gpa - s.region.guest_addr
            if size >= 0 and 0 <= start <= s.region.size - size:
                return s.view[start : start + size]
        raise GuestMemoryError(f"guest access {gpa:#x}+{size:#x} is outside RAM")

    def read(self, gpa: int, size: int) -> bytes:
        return bytes(self.view(gpa, size))

    def write(self, gpa: int, data: bytes | memoryview) -> None:
        self.view(gpa, len(data))[:] = data

    def fence(self) -> None:
        fence()

    def close(self) -> None:
        """Release the views; the mappings belong to the VM's memory slots, which unmap them."""
        for s in self._slots:
            s.view.release()
        self._slots.clear()
