"""Copy-on-write disks: a read-only stack of layers under one private writable layer.

A template's root filesystem is shared by every sandbox made from it and must never change, yet
each sandbox writes to its disk. So a disk is a stack: the base image at the bottom, then frozen
overlays (the template's own writes while it booted, a paused sandbox's writes), and on top the
sandbox's private overlay. Overlays are sparse files of the disk's full size plus a bitmap of the
4 KiB chunks they hold; a read takes each chunk from the topmost layer that has it.

A write that covers only part of a chunk not yet in the top layer first copies the chunk up, so
the bitmap never claims a chunk that is only partly written. Base files are opened read-only:
"the base is never written" is enforced by the kernel, not by care.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

CHUNK = 4096


class DiskError(OSError):
    """A disk layer is missing, has the wrong size, or its chunk map is corrupt."""


def _chunks_for(size: int) -> int:
    return (size + CHUNK - 1) // CHUNK


@dataclass
class Layer:
    """One file of the stack; `chunks` is None for a base image, which holds every chunk."""

    path: Path
    fd: int
    chunks: bytearray | None = None

    def has(self, index: int) -> bool:
        return self.chunks is None or bool(self.chunks[index >> 3] & (1 << (index & 7)))

    def mark(self, index: int) -> None:
        assert self.chunks is not None
        self.chunks[index >> 3] |= 1 << (index & 7)


def load_chunk_map(path: Path, size: int) -> bytearray:
    """The bitmap stored beside an overlay (`<overlay>.map`), checked against the disk size."""
    data = bytearray(path.read_bytes())
    if len(data) != (_chunks_for(size) + 7) // 8:
        raise DiskError(f"chunk map {path} does not match a disk of {size} bytes")
    return data


@dataclass
class LayeredDisk:
    size: int
    layers: list[Layer] = field(default_factory=list)  # bottom first; the last one is written

    @classmethod
    def open(cls, base: Path, frozen: list[Path], overlay: Path) -> LayeredDisk:
        """Stack `base`, the frozen overlays (each with its `.map`) and a new private overlay."""
        size = base.stat().st_size
        if size == 0 or size % 512:
            raise DiskError(f"disk image {base} has size {size}, not a positive multiple of 512")
        disk = cls(size)
        try:
            disk.layers.append(Layer(base, os.open(base, os.O_RDONLY | os.O_CLOEXEC)))
            for path in frozen:
                chunks = load_chunk_map(path.with_suffix(path.suffix + ".map"), size)
                disk.layers.append(Layer(path, os.open(path, os.O_RDONLY | os.O_CLOEXEC), chunks))
            fd = os.open(overlay, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            os.ftruncate(fd, size)
            disk.layers.append(Layer(overlay, fd, bytearray((_chunks_for(size) + 7) // 8)))
        except BaseException:
            disk.close()
            raise
        return disk

    @property
    def top(self) -> Layer:
        return self.layers[-1]

    def close(self) -> None:
        for layer in self.layers:
            os.close(layer.fd)
        self.layers.clear()

    def _source(self, index: int) -> Layer:
        for layer in reversed(self.layers):
            if layer.has(index):
                return layer
        raise AssertionError("the base layer holds every chunk")

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise DiskError(f"access {offset}+{length} outside a {self.size}-byte disk")

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        out = bytearray()
        pos, end = offset, offset + length
        while pos < end:
            index = pos // CHUNK
            layer = self._source(index)
            run_end = min(end, (index + 1) * CHUNK)
            while run_end < end and self._source(run_end // CHUNK) is layer:
                run_end = min(end, run_end + CHUNK)
            out += os.pread(layer.fd, run_end - pos, pos)
            pos = run_end
        return bytes(out)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self._check(offset, len(data))
        top, view = self.top, memoryview(data)
        pos, end = offset, offset + len(data)
        while pos < end:
            index = pos // CHUNK
            chunk_start = index * CHUNK
            chunk_end = min(chunk_start + CHUNK, self.size)
            piece_end = min(end, chunk_end)
            piece = view[pos - offset : piece_end - offset]
            if not top.has(index) and (pos > chunk_start or piece_end < chunk_end):
                whole = bytearray(self.read(chunk_start, chunk_end - chunk_start))
                whole[pos - chunk_start : piece_end - chunk_start] = piece
                os.pwrite(top.fd, whole, chunk_start)
            else:
                os.pwrite(top.fd, piece, pos)
            top.mark(index)
            pos = piece_end

    def freeze_top(self, frozen_path: Path, new_overlay: Path) -> None:
        """Make the top layer read-only under the name `frozen_path` (a link the caller made
        to it, e.g. inside a snapshot) and send further writes to a new overlay above it."""
        self.flush()
        top = self.top
        top.path = frozen_path
        fd = os.open(new_overlay, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        os.ftruncate(fd, self.size)
        self.layers.append(Layer(new_overlay, fd, bytearray((_chunks_for(self.size) + 7) // 8)))

    def flush(self) -> None:
        os.fdatasync(self.top.fd)

    def save_chunk_map(self, target: Path) -> None:
        """Write the top layer's bitmap to `target` (normally `<overlay>.map`), durably."""
        chunks = self.top.chunks
        assert chunks is not None
        with open(target, "wb") as f:
            f.write(chunks)
            f.flush()
            os.fsync(f.fileno())
