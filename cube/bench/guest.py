"""A tiny PVH-bootable guest for benchmarks and host-KVM tests: 32-bit code instead of a kernel.

Its code runs at CPL0, which PVM hosts emulate slowly but correctly for a handful of
instructions, so VMM mechanics (boot, exits, snapshots, clones, density) can be measured on any
KVM. It prints "r" on the serial port, then waits with `pause` until a flag byte in its memory
becomes non-zero, prints that byte and pulls the i8042 reset line. IDLE instead halts with
interrupts off after its "r": an idle guest whose vCPU thread sleeps in the kernel, as a real
idle sandbox's does, for density measurements.
"""

from __future__ import annotations

import struct

LOAD_ADDR = 0x100_0000
FLAG_ADDR = 0x120_0000
READY = b"r"

_EM_X86_64 = 62
_PT_LOAD, _PT_NOTE = 1, 4
_XEN_ELFNOTE_PHYS32_ENTRY = 18

WAIT_FOR_FLAG = (
    b"\xba\xf8\x03\x00\x00"  # mov edx, 0x3f8
    b"\xb0r\xee"  # mov al, 'r'; out dx, al
    + b"\xf3\x90"  # wait: pause
    + b"\xa0" + struct.pack("<I", FLAG_ADDR)  # mov al, [FLAG]
    + b"\x84\xc0\x74\xf5"  # test al, al; jz wait
    b"\xee\xb0\xfe\xe6\x64\xf4"  # out dx, al; mov al, 0xfe; out 0x64, al; hlt
)  # fmt: skip

IDLE = (
    b"\xba\xf8\x03\x00\x00"  # mov edx, 0x3f8
    b"\xb0r\xee"  # mov al, 'r'; out dx, al
    b"\xfa\xf4\xeb\xfc"  # halt: cli; hlt; jmp halt
)  # fmt: skip


def make_vmlinux(
    code: bytes = WAIT_FOR_FLAG,
    paddr: int = LOAD_ADDR,
    entry: int | None = LOAD_ADDR,
    bss: int = 4096,
) -> bytes:
    """An ELF64 whose one segment holds `code` at `paddr`, with a PVH note naming `entry`."""
    note = b""
    if entry is not None:
        desc = struct.pack("<Q", entry)
        note = struct.pack("<III", 4, len(desc), _XEN_ELFNOTE_PHYS32_ENTRY) + b"Xen\0" + desc
    phoff, phnum = 64, 2
    data_off = phoff + phnum * 56
    note_off = data_off + len(code)
    ehdr = struct.pack(
        "<16sHHIQQQIHHHHHH",
        b"\x7fELF\x02\x01\x01" + bytes(9),
        2, _EM_X86_64, 1, 0, phoff, 0, 0, 64, 56, phnum, 64, 0, 0,
    )  # fmt: skip
    load = struct.pack("<IIQQQQQQ", _PT_LOAD, 5, data_off, paddr, paddr, len(code),
                       len(code) + bss, 0x1000)  # fmt: skip
    notes = struct.pack("<IIQQQQQQ", _PT_NOTE, 4, note_off, 0, 0, len(note), len(note), 4)
    return ehdr + load + notes + code + note
