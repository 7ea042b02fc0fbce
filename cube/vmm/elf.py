"""Loading an uncompressed `vmlinux` (ELF64, x86-64) and finding its PVH entry point.

Cube boots kernels through PVH: the ELF carries a Xen note with a 32-bit entry point that takes
a `hvm_start_info` in EBX, so the VMM needs no page tables or zero page (vmm-facts.md §1.2).
Everything read from the file is checked against the file's size and the guest's RAM before it
is used: a truncated or hostile image gets a `KernelImageError`, never a write outside RAM.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Protocol

from cube.vmm.layout import HIMEM_START

ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
EM_X86_64 = 62
PT_LOAD = 1
PT_NOTE = 4
XEN_ELFNOTE_PHYS32_ENTRY = 18

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_NHDR = struct.Struct("<III")


class KernelImageError(ValueError):
    """The kernel image cannot be booted; the message says why."""


class GuestWriter(Protocol):
    def write(self, gpa: int, data: bytes | memoryview) -> None: ...


@dataclass(frozen=True)
class Segment:
    paddr: int
    offset: int
    filesz: int
    memsz: int


@dataclass(frozen=True)
class KernelImage:
    segments: tuple[Segment, ...]
    pvh_entry: int

    @property
    def end(self) -> int:
        """First guest-physical byte past the kernel (its .bss included)."""
        return max(s.paddr + s.memsz for s in self.segments)


def _align4(n: int) -> int:
    return (n + 3) & ~3


def _pvh_entry(data: bytes, offset: int, size: int) -> int | None:
    pos, end = offset, offset + size
    while pos + _NHDR.size <= end:
        namesz, descsz, ntype = _NHDR.unpack_from(data, pos)
        name_at = pos + _NHDR.size
        desc_at = name_at + _align4(namesz)
        pos = desc_at + _align4(descsz)
        if pos > end:
            break
        name = data[name_at : name_at + namesz]
        if ntype == XEN_ELFNOTE_PHYS32_ENTRY and name == b"Xen\0" and descsz >= 4:
            return int.from_bytes(data[desc_at : desc_at + 4], "little")
    return None


def parse_vmlinux(data: bytes) -> KernelImage:
    """Read the loadable segments and the PVH entry point of an x86-64 vmlinux."""
    if len(data) < _EHDR.size or data[:4] != ELF_MAGIC:
        hint = " (a bzImage? Cube boots the uncompressed vmlinux)" if b"HdrS" in data[:1024] else ""
        raise KernelImageError(f"not an ELF file{hint}")
    ident, _type, machine, _ver, _entry, phoff, _shoff, _fl, _eh, phentsize, phnum, *_ = (
        _EHDR.unpack_from(data)
    )
    if ident[4] != ELFCLASS64 or ident[5] != ELFDATA2LSB or machine != EM_X86_64:
        raise KernelImageError("not a 64-bit little-endian x86-64 ELF")
    if phentsize != _PHDR.size or phoff + phnum * phentsize > len(data):
        raise KernelImageError("ELF program headers are malformed or truncated")
    segments: list[Segment] = []
    entry: int | None = None
    for i in range(phnum):
        p_type, _f, offset, _vaddr, paddr, filesz, memsz, _align = _PHDR.unpack_from(
            data, phoff + i * phentsize
        )
        if offset + filesz > len(data):
            raise KernelImageError(f"segment {i} runs past the end of the file (truncated?)")
        if p_type == PT_LOAD and memsz:
            if filesz > memsz:
                raise KernelImageError(f"segment {i} has more file bytes than memory bytes")
            if paddr < HIMEM_START:
                raise KernelImageError(f"segment {i} loads below 1 MiB at {paddr:#x}")
            segments.append(Segment(paddr, offset, filesz, memsz))
        elif p_type == PT_NOTE and entry is None:
            entry = _pvh_entry(data, offset, filesz)
    if not segments:
        raise KernelImageError("ELF has no loadable segments")
    if entry is None:
        raise KernelImageError("kernel has no PVH entry note: build it with CONFIG_PVH=y")
    return KernelImage(tuple(segments), entry)


def load_vmlinux(data: bytes, memory: GuestWriter, ram_end: int) -> KernelImage:
    """Copy the kernel's segments to their physical addresses; the kernel zeroes its own .bss."""
    image = parse_vmlinux(data)
    if image.end > ram_end:
        raise KernelImageError(
            f"kernel needs RAM up to {image.end:#x} but the guest's low RAM ends at {ram_end:#x}"
        )
    view = memoryview(data)
    for seg in image.segments:
        memory.write(seg.paddr, view[seg.offset : seg.offset + seg.filesz])
    return image
