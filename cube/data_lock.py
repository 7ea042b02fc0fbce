"""One `cube serve` per data dir.

Two daemons on one data dir would each take the other's records, paused sandboxes and VM work
folders for their own: one would resume a sandbox the other runs, or delete a VM's disk overlay
under it as a crash's leftover. An advisory lock held for the daemon's life rules that out; the
kernel drops it when the process dies however it dies, so a crash never leaves it behind.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = "serve.lock"


class DataDirBusy(RuntimeError):
    """Another live process holds the data dir."""


@contextmanager
def exclusive(data: Path) -> Iterator[None]:
    """Hold the data dir's lock, or raise DataDirBusy naming the holder's pid."""
    data.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(data / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise DataDirBusy(f"another cube serve (pid {holder}) uses {data}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)
