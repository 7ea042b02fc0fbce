"""Tiny PVH-bootable ELF images for tests: a few bytes of 32-bit code in place of a kernel."""

from __future__ import annotations

import struct

EM_X86_64 = 62
PT_LOAD, PT_NOTE = 1, 4
XEN_ELFNOTE_PHYS32_ENTRY = 18
LOAD_ADDR = 0x100_0000


def make_vmlinux(
    code: bytes = b"\xf4", paddr: int = LOAD_ADDR, entry: int | None = LOAD_ADDR, bss: int = 4096
) -> bytes:
    """An ELF64 whose one segment holds `code` at `paddr`, with a PVH note naming `entry`."""
    note = b""
    if entry is not None:
        desc = struct.pack("<Q", entry)
        note = struct.pack("<III", 4, len(desc), XEN_ELFNOTE_PHYS32_ENTRY) + b"Xen\0" + desc
    phoff, phnum = 64, 2
    data_off = phoff + phnum * 56
    note_off = data_off + len(code)
    ehdr = struct.pack(
        "<16sHHIQQQIHHHHHH",
        b"\x7fELF\x02\x01\x01" + bytes(9),
        2, EM_X86_64, 1, 0, phoff, 0, 0, 64, 56, phnum, 64, 0, 0,
    )  # fmt: skip
    load = struct.pack("<IIQQQQQQ", PT_LOAD, 5, data_off, paddr, paddr, len(code),
                       len(code) + bss, 0x1000)  # fmt: skip
    notes = struct.pack("<IIQQQQQQ", PT_NOTE, 4, note_off, 0, 0, len(note), len(note), 4)
    return ehdr + load + notes + code + note
