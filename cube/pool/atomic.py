"""Atomic msgspec files: write to a temporary name, fsync, rename over the old one.

A crash leaves either the old file or the new one, never a torn one, so the daemon can trust
everything it reads back after a restart.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TypeVar

import msgspec

T = TypeVar("T")

_encoder = msgspec.json.Encoder()


def write_atomic(path: Path, value: object, mode: int = 0o600) -> None:
    """Replace ``path`` with ``value`` encoded as JSON; ``mode`` because records hold tokens."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, _encoder.encode(value))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read(path: Path, kind: type[T]) -> T:
    return msgspec.json.decode(path.read_bytes(), type=kind)
