"""Build-once artifacts in the cache, keyed by a hash of everything that goes into them.

A build writes into a private temporary folder next to its final place and is renamed into place
only when complete, so an interrupted build never leaves a half-made artifact that a later run
would trust. A lock file serialises concurrent builders of the same key (two `make` runs, or the
lab and a test); the loser of the race finds the finished folder and returns it.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from cube.paths import cache_dir


def digest(parts: Iterable[bytes | str | Path]) -> str:
    """A short, stable hash over file contents and literal strings, in order."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            h.update(b"file:" + part.name.encode() + b"\0")
            h.update(part.read_bytes())
        elif isinstance(part, str):
            h.update(b"str:" + part.encode())
        else:
            h.update(b"bytes:" + part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def artifact_dir(kind: str, key: str) -> Path:
    return cache_dir() / kind / key


def is_built(kind: str, key: str) -> bool:
    return artifact_dir(kind, key).is_dir()


def ensure_built(kind: str, key: str, build: Callable[[Path], None]) -> Path:
    """Return the artifact folder for (kind, key), running `build(tmpdir)` first if it is missing.

    `build` fills the empty folder it is given; on success that folder becomes the artifact.
    """
    final = artifact_dir(kind, key)
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.is_dir():
            return final
        tmp = final.parent / f".{key}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            build(tmp)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final
