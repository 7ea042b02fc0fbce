"""The guest-physical address map every Cube VM uses.

One fixed map for all VMs keeps snapshots portable between VMMs of the same version: a restored
guest finds its devices and boot structures where it left them. The values follow the
Firecracker/Cloud Hypervisor layout for x86-64 (shared/docs/vmm-facts.md §1.3), which Linux is
known to accept: boot structures below 1 MiB, RAM from 1 MiB up to a 1 GiB hole under 4 GiB for
MMIO devices and the APICs, and the rest of RAM above 4 GiB.
"""

from __future__ import annotations

from dataclasses import dataclass

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

# Boot structures (all below 1 MiB).
GDT_ADDR = 0x500
IDT_ADDR = 0x520
PVH_INFO_ADDR = 0x6000
PVH_MODLIST_ADDR = 0x6040
PVH_MEMMAP_ADDR = 0x7000
BOOT_STACK = 0x8FF0
CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 2048  # x86 COMMAND_LINE_SIZE
EBDA_START = 0x9FC00  # the MP table lives here, where Linux scans for it
HIMEM_START = 0x100000  # 1 MiB: RAM from here up is the kernel's

# The 32-bit hole: virtio-mmio slots at its bottom, the IOAPIC and LAPIC at its top.
MMIO_GAP_START = 0xC000_0000
MMIO_GAP_END = 1 << 32
VIRTIO_MMIO_BASE = 0xC000_1000
VIRTIO_MMIO_SIZE = 0x1000
IOAPIC_ADDR = 0xFEC0_0000
LAPIC_ADDR = 0xFEE0_0000
TSS_ADDR = 0xFFFB_D000  # KVM_SET_TSS_ADDR: 3 pages, neither RAM nor MMIO

# Interrupt lines (GSI = IOAPIC pin = Linux IRQ with an MP table).
GSI_I8042 = 1
GSI_SERIAL = 4
GSI_VIRTIO_FIRST = 5
GSI_VIRTIO_LAST = 23
IOAPIC_PINS = 24

MAX_VCPUS = 8


@dataclass(frozen=True)
class RamRegion:
    """A stretch of guest RAM, backed by one KVM memory slot."""

    guest_addr: int
    size: int

    @property
    def end(self) -> int:
        return self.guest_addr + self.size


def ram_regions(mem_size: int) -> list[RamRegion]:
    """Split `mem_size` bytes of RAM around the 32-bit MMIO hole."""
    if mem_size < 64 * MiB:
        raise ValueError(f"guest memory {mem_size} bytes is below the 64 MiB minimum")
    if mem_size % (2 * MiB):
        raise ValueError(f"guest memory {mem_size} bytes is not a multiple of 2 MiB")
    low = min(mem_size, MMIO_GAP_START)
    regions = [RamRegion(0, low)]
    if mem_size > low:
        regions.append(RamRegion(MMIO_GAP_END, mem_size - low))
    return regions


def virtio_slot(index: int) -> tuple[int, int]:
    """(MMIO base address, GSI) of the index-th virtio-mmio device."""
    gsi = GSI_VIRTIO_FIRST + index
    if index < 0 or gsi > GSI_VIRTIO_LAST:
        raise ValueError(f"no virtio-mmio slot {index}: at most {GSI_VIRTIO_LAST - 4} devices")
    return VIRTIO_MMIO_BASE + index * VIRTIO_MMIO_SIZE, gsi
