"""Directory watches on Linux inotify through ctypes (the stdlib has no binding).

``DirWatch`` watches one directory, optionally its whole subtree (new subdirectories are added
as their create events are read), and turns raw events into envd's event types the way fsnotify
does for envd: create/moved-to -> CREATE, modify -> WRITE, delete/delete-self -> REMOVE,
moved-from/move-self -> RENAME, attrib -> CHMOD. Names are relative to the watched directory.
Reads never block; callers wait for readability of ``fileno()`` with trio.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

WATCH_MASK = (
    IN_MODIFY
    | IN_ATTRIB
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CREATE
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
)

# In fsnotify's order, which is the order envd emits the types of one raw event in.
_TYPES = (
    (IN_CREATE | IN_MOVED_TO, "EVENT_TYPE_CREATE"),
    (IN_MOVE_SELF | IN_MOVED_FROM, "EVENT_TYPE_RENAME"),
    (IN_ATTRIB, "EVENT_TYPE_CHMOD"),
    (IN_MODIFY, "EVENT_TYPE_WRITE"),
    (IN_DELETE | IN_DELETE_SELF, "EVENT_TYPE_REMOVE"),
)

_EVENT = struct.Struct("iIII")
_READ_SIZE = 64 << 10
MAX_WATCHES = 8192  # directories per DirWatch: a recursive watch on / must not eat the kernel's

_libc = ctypes.CDLL(None, use_errno=True)
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
_libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]


class WatchOverflow(Exception):
    """The kernel dropped events (its queue overflowed): the stream of changes has a gap."""


@dataclass(frozen=True)
class Change:
    name: str  # relative to the watched directory; "." for the directory itself
    path: str  # absolute
    types: tuple[str, ...]


def _check(result: int) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


class DirWatch:
    """An inotify instance watching one directory (and, if recursive, its subdirectories)."""

    def __init__(self, root: str, recursive: bool) -> None:
        self.root = root
        self.recursive = recursive
        self._fd = _check(_libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC))
        self._dirs: dict[int, str] = {}
        try:
            self._add("")
        except BaseException:
            self.close()
            raise

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _add(self, rel: str) -> None:
        """Watch ``rel`` and, when recursive, every directory below it (without following links)."""
        pending = [rel]
        while pending and len(self._dirs) < MAX_WATCHES:
            current = pending.pop()
            full = os.path.join(self.root, current) if current else self.root
            try:
                wd = _check(
                    _libc.inotify_add_watch(self._fd, os.fsencode(full), WATCH_MASK | IN_ONLYDIR)
                )
            except OSError:
                if not current:
                    raise
                continue  # vanished or unreadable below the root: nothing to watch there
            self._dirs[wd] = current
            if not self.recursive:
                continue
            try:
                with os.scandir(full) as it:
                    for entry in it:
                        if entry.is_dir(follow_symlinks=False):
                            pending.append(os.path.join(current, entry.name))
            except OSError:
                continue

    def _read_raw(self) -> Iterator[tuple[int, int, str]]:
        while True:
            try:
                data = os.read(self._fd, _READ_SIZE)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                raise
            offset = 0
            while offset < len(data):
                wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                start = offset + _EVENT.size
                name = os.fsdecode(data[start : start + length].rstrip(b"\0"))
                offset = start + length
                yield wd, mask, name

    def drain(self) -> list[Change]:
        """Every change queued so far (non-blocking)."""
        changes: list[Change] = []
        for wd, mask, name in self._read_raw():
            if mask & IN_Q_OVERFLOW:
                raise WatchOverflow("too many filesystem events: the kernel queue overflowed")
            if mask & IN_IGNORED:
                self._dirs.pop(wd, None)
                continue
            parent = self._dirs.get(wd)
            if parent is None:
                continue
            if not name:
                if parent:
                    continue  # a subdirectory's own delete/move: its parent reports it by name
                rel = "."
            else:
                rel = os.path.join(parent, name) if parent else name
            if self.recursive and mask & IN_ISDIR and mask & (IN_CREATE | IN_MOVED_TO):
                self._add(rel)
            types = tuple(kind for bits, kind in _TYPES if mask & bits)
            if types:
                full = self.root if rel == "." else os.path.join(self.root, rel)
                changes.append(Change(rel, full, types))
        return changes
