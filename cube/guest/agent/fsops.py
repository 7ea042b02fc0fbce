"""Blocking filesystem operations with envd's semantics; the services run them in threads."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat

from cube.guest.agent.connect import Code, ConnectError
from cube.guest.agent.entries import entry_info
from cube.guest.agent.messages import EntryInfo

MAX_LIST_ENTRIES = 100_000  # one ListDir answer must stay a sane size


def ensure_dirs(path: str, uid: int, gid: int) -> None:
    """Create ``path`` and its missing parents (0755, owned by the user), like envd's EnsureDirs.

    Raises OSError, or NotADirectoryError naming the first component that is not a directory.
    """
    parts: list[str] = []
    current = path
    while current not in ("/", ""):
        parts.append(current)
        current = os.path.dirname(current)
    for sub in reversed(parts):
        try:
            st = os.stat(sub)
        except FileNotFoundError:
            with contextlib.suppress(FileExistsError):
                os.mkdir(sub, 0o755)
            os.chown(sub, uid, gid)
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(f"path is a file: {sub}")


def list_dir(requested: str, depth: int) -> list[EntryInfo]:
    """Entries below ``requested`` down to ``depth`` levels; a symlinked directory is listed but
    links below it are not followed; paths are reported under ``requested``."""
    try:
        resolved = os.path.realpath(requested, strict=True)
    except FileNotFoundError:
        raise ConnectError(Code.NOT_FOUND, f"path not found: {requested}") from None
    except OSError as e:
        raise ConnectError(Code.INTERNAL, f"error resolving symlink: {e.strerror}") from None
    if not os.path.isdir(resolved):
        raise ConnectError(Code.INVALID_ARGUMENT, f"path is not a directory: {resolved}")
    entries: list[EntryInfo] = []

    def walk(rel: str, level: int) -> None:
        try:
            with os.scandir(os.path.join(resolved, rel) if rel else resolved) as it:
                names = sorted(e.name for e in it)
        except OSError as e:
            if rel:
                return  # vanished or unreadable below the root: skip it, as a walk does
            raise ConnectError(Code.INTERNAL, f"error reading directory: {e.strerror}") from None
        for name in names:
            child = os.path.join(rel, name) if rel else name
            try:
                entry = entry_info(os.path.join(resolved, child))
            except ConnectError as e:
                if e.code is Code.NOT_FOUND:
                    continue
                raise
            entry.path = os.path.join(requested, child)
            entries.append(entry)
            if len(entries) > MAX_LIST_ENTRIES:
                raise ConnectError(Code.RESOURCE_EXHAUSTED, "too many entries; list less deep")
            is_link = entry.symlink_target is not None
            if level < depth and entry.type == "FILE_TYPE_DIRECTORY" and not is_link:
                walk(child, level + 1)

    walk("", 1)
    return entries


def remove_all(path: str) -> None:
    """Remove a file, link or whole tree; a missing path is not an error (os.RemoveAll)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)
