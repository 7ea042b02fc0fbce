"""The PVH boot hand-off: `hvm_start_info`, its memory map and the command line.

Linux's PVH entry (arch/x86/platform/pvh) turns the memory map into its e820 table and BUG()s
without one, so the map must list every RAM region and mark the low-memory hole reserved
(vmm-facts.md §1.2). The initrd, when there is one, is module 0.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cube.vmm.elf import GuestWriter
from cube.vmm.layout import (
    CMDLINE_ADDR,
    CMDLINE_MAX,
    EBDA_START,
    HIMEM_START,
    PVH_INFO_ADDR,
    PVH_MEMMAP_ADDR,
    PVH_MODLIST_ADDR,
    RamRegion,
)

START_INFO_MAGIC = 0x336EC578
E820_RAM = 1
E820_RESERVED = 2

_START_INFO = struct.Struct("<IIIIQQQQII")
_MEMMAP_ENTRY = struct.Struct("<QQII")
_MODLIST_ENTRY = struct.Struct("<QQQQ")


@dataclass(frozen=True)
class Initrd:
    guest_addr: int
    size: int


def memory_map(regions: list[RamRegion]) -> list[tuple[int, int, int]]:
    """(addr, size, type) entries: low RAM, the reserved EBDA/ROM hole, then RAM from 1 MiB."""
    first = regions[0]
    entries = [
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
        (HIMEM_START, first.end - HIMEM_START, E820_RAM),
    ]
    entries += [(r.guest_addr, r.size, E820_RAM) for r in regions[1:]]
    return entries


def encode_cmdline(cmdline: str) -> bytes:
    raw = cmdline.encode() + b"\0"
    if len(raw) > CMDLINE_MAX:
        raise ValueError(f"kernel command line is {len(raw)} bytes; the limit is {CMDLINE_MAX}")
    return raw


def write_boot_info(
    memory: GuestWriter,
    regions: list[RamRegion],
    cmdline: str,
    initrd: Initrd | None = None,
) -> None:
    """Write everything the PVH entry point reads; its address goes in EBX."""
    memory.write(CMDLINE_ADDR, encode_cmdline(cmdline))
    entries = memory_map(regions)
    memory.write(PVH_MEMMAP_ADDR, b"".join(_MEMMAP_ENTRY.pack(a, s, t, 0) for a, s, t in entries))
    if initrd is not None:
        memory.write(PVH_MODLIST_ADDR, _MODLIST_ENTRY.pack(initrd.guest_addr, initrd.size, 0, 0))
    info = _START_INFO.pack(
        START_INFO_MAGIC,
        1,  # version: Linux refuses version 0 outside Xen
        0,
        1 if initrd else 0,
        PVH_MODLIST_ADDR if initrd else 0,
        CMDLINE_ADDR,
        0,  # no ACPI RSDP
        PVH_MEMMAP_ADDR,
        len(entries),
        0,
    )
    memory.write(PVH_INFO_ADDR, info)


def initrd_address(size: int, kernel_end: int, low_ram_end: int) -> int:
    """Place the initrd page-aligned at the top of low RAM, clear of the kernel."""
    addr = (low_ram_end - size) & ~0xFFF
    if addr < kernel_end:
        raise ValueError(f"initrd of {size} bytes does not fit between the kernel and end of RAM")
    return addr
