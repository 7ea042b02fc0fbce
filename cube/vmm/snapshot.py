"""The on-disk snapshot: a folder holding the VM's state, its memory and its disk overlays.

    snapshot/
      state       header (magic, format version, length, SHA-256) + msgpack `SnapshotState`
      memory      guest RAM, regions back to back; sparse where the guest never wrote
      memory.pages  only in a diff: one bit per page present in `memory`
      diskN.overlay, diskN.overlay.map   the VM's private disk writes up to the snapshot

A snapshot is written into a temporary sibling folder and renamed into place, so a reader sees
a whole snapshot or none. The state file is checksummed and versioned: a truncated, corrupt or
foreign file is refused with `SnapshotError` before anything is built from it. Memory is checked
for size on every restore, not hashed: hashing RAM would cost more than the restore itself.

A *diff* snapshot names a parent full snapshot and stores only the pages that differ from it;
restoring maps the parent's memory privately and copies the diff's pages over it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import msgspec

from cube.vmm.cpu import VcpuState
from cube.vmm.devices.i8042 import I8042State
from cube.vmm.devices.serial import SerialState
from cube.vmm.devices.virtio_mmio import MmioState
from cube.vmm.devices.virtio_net import NetState
from cube.vmm.kvm import PAGE_SIZE

MAGIC = b"CUBESNAP"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIQ32s")
STATE_FILE = "state"
MEMORY_FILE = "memory"
PAGES_FILE = "memory.pages"
MAX_STATE_BYTES = 64 << 20


class SnapshotError(ValueError):
    """The snapshot cannot be used; the message says what is wrong with it."""


class VmState(msgspec.Struct, frozen=True):
    clock: bytes
    pit: bytes
    irqchips: list[bytes]


class DiskState(msgspec.Struct, frozen=True):
    base: str
    frozen: list[str]  # absolute paths of older frozen overlays, bottom first
    overlay: str  # this snapshot's own overlay, relative to the snapshot folder
    read_only: bool


class VirtioState(msgspec.Struct, frozen=True):
    kind: str  # "blk", "vsock", "rng" or "net"
    mmio: MmioState
    disk: DiskState | None = None
    net: NetState | None = None  # the MAC; the tap is given again to every restore


class SnapshotState(msgspec.Struct, frozen=True):
    memory_size: int
    cmdline: str
    vcpus: list[VcpuState]
    vm: VmState
    serial: SerialState
    i8042: I8042State
    virtio: list[VirtioState]
    parent: str | None = None  # a diff's full parent snapshot folder


def write_state(folder: Path, state: SnapshotState) -> None:
    payload = msgspec.msgpack.encode(state)
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, len(payload), hashlib.sha256(payload).digest())
    _write_synced(folder / STATE_FILE, header + payload)


def read_state(folder: Path) -> SnapshotState:
    path = folder / STATE_FILE
    try:
        with open(path, "rb") as f:
            head = f.read(_HEADER.size)
            if len(head) < _HEADER.size or head[:8] != MAGIC:
                raise SnapshotError(f"{folder} is not a Cube snapshot")
            _, version, length, digest = _HEADER.unpack(head)
            if version != FORMAT_VERSION:
                raise SnapshotError(
                    f"{folder} has snapshot format {version}; this Cube reads {FORMAT_VERSION}"
                )
            if length > MAX_STATE_BYTES:
                raise SnapshotError(f"{folder}: state of {length} bytes is implausibly large")
            payload = f.read(length + 1)
    except FileNotFoundError:
        raise SnapshotError(
            f"{folder} has no state file (not a snapshot, or an unfinished one)"
        ) from None
    if len(payload) != length:
        raise SnapshotError(f"{folder}: state file is truncated or has trailing bytes")
    if hashlib.sha256(payload).digest() != digest:
        raise SnapshotError(f"{folder}: state file checksum mismatch (corrupt)")
    try:
        return msgspec.msgpack.decode(payload, type=SnapshotState)
    except msgspec.ValidationError as error:
        raise SnapshotError(f"{folder}: state does not decode: {error}") from None


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@contextmanager
def writing(target: Path) -> Iterator[Path]:
    """A temporary folder that becomes `target` (which must not exist) if the block succeeds."""
    if target.exists():
        raise FileExistsError(f"snapshot {target} already exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# Memory.

PM_PRESENT = 1 << 63
PM_SWAPPED = 1 << 62
PM_FILE = 1 << 61


def page_flags(address: int, size: int) -> list[int]:
    """/proc/self/pagemap entries for our own mapping [address, +size): one u64 per page."""
    pages = size // PAGE_SIZE
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(address // PAGE_SIZE * 8)
        raw = f.read(pages * 8)
    return list(struct.unpack(f"<{pages}Q", raw))


def touched_pages(flags: list[int]) -> list[bool]:
    """Pages a fresh anonymous mapping has ever had written or read (the rest are zero)."""
    return [bool(f & (PM_PRESENT | PM_SWAPPED)) for f in flags]


def private_pages(flags: list[int]) -> list[bool]:
    """Pages of a MAP_PRIVATE file mapping that were copied on write: the guest changed them."""
    return [bool(f & (PM_PRESENT | PM_SWAPPED)) and not f & PM_FILE for f in flags]


def write_pages(fd: int, file_offset: int, view: memoryview, wanted: list[bool]) -> None:
    """Write the wanted pages of `view` at their offsets, in runs; the rest stays a hole."""
    index, count = 0, len(wanted)
    while index < count:
        if not wanted[index]:
            index += 1
            continue
        end = index
        while end < count and wanted[end]:
            end += 1
        start_byte, end_byte = index * PAGE_SIZE, end * PAGE_SIZE
        os.pwrite(fd, view[start_byte:end_byte], file_offset + start_byte)
        index = end


def pack_bits(bits: list[bool]) -> bytes:
    out = bytearray((len(bits) + 7) // 8)
    for i, bit in enumerate(bits):
        if bit:
            out[i >> 3] |= 1 << (i & 7)
    return bytes(out)


def unpack_bits(data: bytes, count: int) -> list[bool]:
    if len(data) != (count + 7) // 8:
        raise SnapshotError("page bitmap does not match the memory size")
    return [bool(data[i >> 3] & (1 << (i & 7))) for i in range(count)]


def check_memory_file(folder: Path, size: int) -> Path:
    path = folder / MEMORY_FILE
    try:
        actual = path.stat().st_size
    except FileNotFoundError:
        raise SnapshotError(f"{folder} has no memory file") from None
    if actual != size:
        raise SnapshotError(f"{folder}: memory file has {actual} bytes, the state says {size}")
    return path
