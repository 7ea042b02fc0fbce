"""The hand-made marker initramfs: ELF fields, instructions and cpio layout, read, never run.

The init's last system call restarts the machine it runs on (the test host, as root), so it is
only ever executed inside a guest (the lab's boot test); here its bytes are checked, and its
instructions disassembled by objdump where the host has it.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from cube.bench import initramfs
from cube.bench.initramfs import (
    CODE_OFFSET,
    ENTRY,
    LOAD_ADDR,
    MESSAGE,
    make_cpio,
    make_init,
    write_marker_initramfs,
)


def test_elf_header_names_a_static_x86_64_executable() -> None:
    elf = make_init()
    fields = struct.unpack_from("<16sHHIQQQIHHHHHH", elf)
    ident, e_type, machine, version, entry, phoff, shoff, flags = fields[:8]
    ehsize, phentsize, phnum, shentsize, shnum, shstrndx = fields[8:]
    assert ident == b"\x7fELF\x02\x01\x01\x00" + bytes(8)  # 64-bit, little-endian, SysV
    assert (e_type, machine, version) == (2, 62, 1)  # ET_EXEC, EM_X86_64, EV_CURRENT
    assert (phoff, ehsize, phentsize, phnum) == (64, 64, 56, 1)
    assert (shoff, shentsize, shnum, shstrndx, flags) == (0, 0, 0, 0, 0)
    assert entry == ENTRY == LOAD_ADDR + CODE_OFFSET


def test_one_read_execute_segment_maps_the_whole_file() -> None:
    elf = make_init()
    p_type, p_flags, offset, vaddr, paddr, filesz, memsz, align = struct.unpack_from(
        "<IIQQQQQQ", elf, 64
    )
    assert (p_type, p_flags) == (1, 5)  # PT_LOAD, R+X: no writable memory at all
    assert (offset, vaddr, paddr) == (0, LOAD_ADDR, LOAD_ADDR)
    assert filesz == memsz == len(elf)
    assert align == 0x1000 and vaddr % align == offset % align
    assert vaddr <= ENTRY < vaddr + filesz


def _at(elf: bytes, addr: int, length: int) -> bytes:
    return elf[addr - LOAD_ADDR : addr - LOAD_ADDR + length]


def test_the_write_points_at_the_message_and_the_loop_at_the_reboot() -> None:
    elf = make_init()
    lea = elf.index(b"\x48\x8d\x35")  # lea rsi, [rip + rel32]
    (displacement,) = struct.unpack_from("<i", elf, lea + 3)
    message = LOAD_ADDR + lea + 7 + displacement
    length = struct.unpack_from("<I", elf, lea + 8)[0]  # the mov edx after the lea
    assert _at(elf, message, length) == MESSAGE == b"CUBE-GUEST-INIT-OK\n"
    assert elf.endswith(MESSAGE)
    jmp = len(elf) - len(MESSAGE) - 2
    assert elf[jmp] == 0xEB
    target = jmp + 2 + struct.unpack_from("<b", elf, jmp + 1)[0]
    assert elf[target : target + 5] == b"\xb8" + struct.pack("<I", initramfs.SYS_REBOOT)


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump is not installed")
def test_objdump_reads_write_drain_and_a_restart_loop(tmp_path: Path) -> None:
    code = tmp_path / "code"
    code.write_bytes(make_init()[CODE_OFFSET : -len(MESSAGE)])
    listing = subprocess.run(
        ["objdump", "-D", "-b", "binary", "-m", "i386:x86-64", f"--adjust-vma={ENTRY:#x}",
         str(code)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    instructions = [
        " ".join(line.split("\t")[2].split())
        for line in listing.splitlines()
        if re.match(r"\s+[0-9a-f]+:\t", line)
    ]
    message = ENTRY + len(code.read_bytes())
    lea_end = ENTRY + 5 + 5 + 7  # two moves and the lea itself
    reboot = ENTRY + 24 + 22  # after the write's 24 bytes and the drain's 22
    assert instructions == [
        "mov $0x1,%eax",  # SYS_write
        "mov $0x1,%edi",
        f"lea {message - lea_end:#x}(%rip),%rsi # {message:#x}",
        f"mov ${len(MESSAGE):#x},%edx",
        "syscall",
        "mov $0x10,%eax",  # SYS_ioctl
        "mov $0x1,%edi",
        "mov $0x5409,%esi",  # TCSBRK
        "mov $0x1,%edx",
        "syscall",
        "mov $0xa9,%eax",  # SYS_reboot
        "mov $0xfee1dead,%edi",
        "mov $0x28121969,%esi",
        "mov $0x1234567,%edx",  # LINUX_REBOOT_CMD_RESTART
        "xor %r10d,%r10d",
        "syscall",
        f"jmp {reboot:#x}",
    ]


def _cpio_members(archive: bytes) -> dict[str, tuple[int, tuple[int, int], bytes]]:
    """Parse a newc archive: name -> (mode, (rdevmajor, rdevminor), data)."""
    entries = {}
    at = 0
    while True:
        head = archive[at : at + 110]
        assert head[:6] == b"070701"
        fields = [int(head[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        mode, size, rdev, namesize = fields[1], fields[6], (fields[9], fields[10]), fields[11]
        name = archive[at + 110 : at + 110 + namesize - 1].decode()
        at = (at + 110 + namesize + 3) & ~3
        if name == "TRAILER!!!":
            break
        entries[name] = (mode, rdev, archive[at : at + size])
        at = (at + size + 3) & ~3
    assert at == len(archive)
    return entries


def test_cpio_is_a_newc_archive_with_console_and_init() -> None:
    assert _cpio_members(make_cpio(b"\x7fELF-init")) == {
        "dev": (0o040755, (0, 0), b""),
        "dev/console": (0o020600, (5, 1), b""),
        "init": (0o100755, (0, 0), b"\x7fELF-init"),
    }


def test_marker_initramfs_holds_the_hand_made_init(tmp_path: Path) -> None:
    path = write_marker_initramfs(tmp_path / "marker.cpio")
    assert _cpio_members(path.read_bytes())["init"] == (0o100755, (0, 0), make_init())
