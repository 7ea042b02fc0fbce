"""A marker initramfs for boot benchmarks, made without a compiler.

`cube bench vmm --boot` times the guest kernel from boot to its first user-space instruction,
in Cube's VMM and in QEMU, with the same kernel and the same initramfs. The lab's L1 guest has
no gcc, and the product should not need one to measure itself, so the init is a static x86-64
ELF executable assembled here by hand (as cube.bench.guest assembles its PVH guest), and the
archive is a newc cpio written here too (the format the kernel unpacks into its rootfs).

The init does three system calls and nothing else:

1. write(1, "CUBE-GUEST-INIT-OK\\n"): fd 1 is /dev/console, which the kernel opens as fds 0-2
   before it runs /init (so the archive must hold that node);
2. ioctl(1, TCSBRK, 1), i.e. tcdrain(): waits until the UART has sent the line, so the restart
   that follows cannot cut the marker off the console;
3. reboot(LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2, LINUX_REBOOT_CMD_RESTART, 0), again and
   again should it ever return (init must never exit: the kernel panics when it does).

Restart, not power-off: without ACPI the kernel turns a power-off into a halt that no VMM
notices, whereas a restart leaves through `reboot=k` (the i8042 reset that Cube's VMM turns into
a stop) or `reboot=t` (a triple fault; QEMU microvm has no i8042, and with -no-reboot QEMU exits
on it). Never run the binary on a host: as root, its third call restarts the machine.
"""

from __future__ import annotations

import struct
from pathlib import Path

MARKER = "CUBE-GUEST-INIT-OK"
MESSAGE = f"{MARKER}\n".encode()

# Where the one segment (the whole file, headers included) is mapped: the traditional base of a
# non-PIE x86-64 executable, page aligned, far from the null page.
LOAD_ADDR = 0x40_0000
EHDR_SIZE = 64  # sizeof(Elf64_Ehdr)
PHDR_SIZE = 56  # sizeof(Elf64_Phdr)
CODE_OFFSET = EHDR_SIZE + PHDR_SIZE  # the code follows the only program header
ENTRY = LOAD_ADDR + CODE_OFFSET

_ET_EXEC, _EM_X86_64, _EV_CURRENT = 2, 62, 1
_PT_LOAD, _PF_X, _PF_R = 1, 1, 4

# x86-64 system call numbers (arch/x86/entry/syscalls/syscall_64.tbl) and their arguments.
SYS_WRITE, SYS_IOCTL, SYS_REBOOT = 1, 16, 169
TCSBRK = 0x5409  # with a non-zero argument: wait until output is sent (tcdrain), no break
LINUX_REBOOT_MAGIC1 = 0xFEE1DEAD
LINUX_REBOOT_MAGIC2 = 0x28121969
LINUX_REBOOT_CMD_RESTART = 0x01234567

# newc cpio mode bits (see the kernel's Documentation/driver-api/early-userspace/buffer-format.rst)
_DIR = 0o040000
_REG = 0o100000
_CHR = 0o020000


def _u32(value: int) -> bytes:
    return struct.pack("<I", value)


def init_code() -> bytes:
    """The init's instructions followed by its message.

    `mov r32, imm32` is one opcode byte (0xb8 + register number) and the value; writing a 32-bit
    register zeroes its upper half, so it sets the whole 64-bit register. `syscall` takes the
    number in rax and the arguments in rdi, rsi, rdx, r10. The only address in the code is the
    message's, RIP-relative, so the code does not depend on where it is loaded.
    """
    reboot = (
        b"\xb8" + _u32(SYS_REBOOT)  # mov eax, SYS_REBOOT
        + b"\xbf" + _u32(LINUX_REBOOT_MAGIC1)  # mov edi, MAGIC1
        + b"\xbe" + _u32(LINUX_REBOOT_MAGIC2)  # mov esi, MAGIC2
        + b"\xba" + _u32(LINUX_REBOOT_CMD_RESTART)  # mov edx, CMD_RESTART
        + b"\x45\x31\xd2"  # xor r10d, r10d (REX.RB, xor, ModRM r10/r10): arg 0
        + b"\x0f\x05"  # syscall
    )  # fmt: skip
    # jmp rel8 counts from its own end: back over itself and the whole reboot block.
    loop = b"\xeb" + struct.pack("<b", -(len(reboot) + 2))
    drain = (
        b"\xb8" + _u32(SYS_IOCTL)  # mov eax, SYS_IOCTL
        + b"\xbf" + _u32(1)  # mov edi, 1 (stdout)
        + b"\xbe" + _u32(TCSBRK)  # mov esi, TCSBRK
        + b"\xba" + _u32(1)  # mov edx, 1 (non-zero: drain, no break)
        + b"\x0f\x05"  # syscall
    )  # fmt: skip
    write_tail = (
        b"\xba" + _u32(len(MESSAGE))  # mov edx, len(MESSAGE)
        + b"\x0f\x05"  # syscall
    )  # fmt: skip
    # lea's displacement counts from its own end, which the rest of the code then fills up to
    # the message.
    after_lea = len(write_tail) + len(drain) + len(reboot) + len(loop)
    write_head = (
        b"\xb8" + _u32(SYS_WRITE)  # mov eax, SYS_WRITE
        + b"\xbf" + _u32(1)  # mov edi, 1 (stdout: /dev/console)
        + b"\x48\x8d\x35" + struct.pack("<i", after_lea)  # lea rsi, [rip + rel32]: MESSAGE
    )  # fmt: skip
    return write_head + write_tail + drain + reboot + loop + MESSAGE


def make_init() -> bytes:
    """The init as a static ELF64 executable: header, one PT_LOAD program header, code.

    The segment maps the whole file read+execute at LOAD_ADDR (offset 0, so p_offset and
    p_vaddr agree modulo the page size, as the loader requires); there are no sections, no
    interpreter and no writable data. The kernel gives init a stack; the code never uses it.
    """
    body = init_code()
    size = CODE_OFFSET + len(body)
    ehdr = struct.pack(
        "<16sHHIQQQIHHHHHH",
        # e_ident: magic, ELFCLASS64, ELFDATA2LSB, EV_CURRENT, ELFOSABI_SYSV, ABI version 0, pad
        b"\x7fELF\x02\x01\x01\x00\x00" + bytes(7),
        _ET_EXEC,  # e_type: fixed addresses, not PIE
        _EM_X86_64,  # e_machine
        _EV_CURRENT,  # e_version
        ENTRY,  # e_entry: the first instruction, right after the program header
        EHDR_SIZE,  # e_phoff: the program header follows this header
        0,  # e_shoff: no section headers
        0,  # e_flags
        EHDR_SIZE,  # e_ehsize
        PHDR_SIZE,  # e_phentsize
        1,  # e_phnum
        0,  # e_shentsize: no section headers
        0,  # e_shnum
        0,  # e_shstrndx
    )
    phdr = struct.pack(
        "<IIQQQQQQ",
        _PT_LOAD,  # p_type
        _PF_R | _PF_X,  # p_flags
        0,  # p_offset: from the first byte of the file
        LOAD_ADDR,  # p_vaddr
        LOAD_ADDR,  # p_paddr (ignored for user programs)
        size,  # p_filesz: the whole file
        size,  # p_memsz: no bss
        0x1000,  # p_align: one page
    )
    return ehdr + phdr + body


def _cpio_entry(
    ino: int, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
) -> bytes:
    """One newc record: header, NUL-terminated name and data, each padded to 4 bytes.

    Fields are fixed (uid/gid 0, mtime 0) so the archive depends only on its contents.
    """
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
    head = b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
    head += b"\0" * (-len(head) % 4)
    return head + data + b"\0" * (-len(data) % 4)


def make_cpio(init: bytes) -> bytes:
    """An uncompressed newc archive with /dev, /dev/console (char 5:1) and an executable /init.

    The kernel opens /dev/console on the initramfs before it runs /init; without the node, init
    starts with no stdin/stdout/stderr.
    """
    return b"".join(
        [
            _cpio_entry(1, "dev", _DIR | 0o755),
            _cpio_entry(2, "dev/console", _CHR | 0o600, rdev=(5, 1)),
            _cpio_entry(3, "init", _REG | 0o755, init),
            _cpio_entry(0, "TRAILER!!!", 0),
        ]
    )


def write_marker_initramfs(path: Path) -> Path:
    """Write the marker initramfs (a few hundred bytes, deterministic) to `path`."""
    path.write_bytes(make_cpio(make_init()))
    return path
