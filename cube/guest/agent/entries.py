"""EntryInfo for a path, as envd builds it, and user metadata stored as ``user.e2b.*`` xattrs.

The details the SDK and its tests rely on: ``mode`` holds the permission bits only (0o644, not
0o100644); ``permissions`` is Go's ``FileMode.String()`` (``-rw-r--r--``, ``drwxr-xr-x``,
``Lrwxrwxrwx``); a symlink reports its target's type and permission bits, its own size and
permission string and the resolved target path; owner and group are names when the guest knows
them. ``isSymlink`` stays unset, as upstream envd (0.6.13) leaves it: SDK 2.63 would report
the link as a SYMLINK then, while E2B's own tests expect a link to a file to read as a FILE.
"""

from __future__ import annotations

import errno
import os
import stat
from datetime import UTC, datetime

from cube.guest.agent.connect import Code, ConnectError
from cube.guest.agent.messages import EntryInfo
from cube.guest.agent.users import group_name, owner_name

METADATA_PREFIX = "user.e2b."
MAX_METADATA_KEY = 255 - len(METADATA_PREFIX)  # the VFS caps a whole xattr name at 255 bytes
MAX_METADATA_TOTAL = 4096  # ext4 keeps all of an inode's xattrs within one block


def _file_type(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "FILE_TYPE_FILE"
    if stat.S_ISDIR(mode):
        return "FILE_TYPE_DIRECTORY"
    if stat.S_ISLNK(mode):
        return "FILE_TYPE_SYMLINK"
    return "FILE_TYPE_UNSPECIFIED"


_GO_TYPE_LETTERS = (
    (stat.S_ISDIR, "d"),
    (stat.S_ISLNK, "L"),
    (stat.S_ISBLK, "D"),
    (stat.S_ISFIFO, "p"),
    (stat.S_ISSOCK, "S"),
)


def go_mode_string(mode: int) -> str:
    """Go's os.FileMode.String() for a Unix st_mode (what envd reports as ``permissions``)."""
    letters = "".join(letter for test, letter in _GO_TYPE_LETTERS if test(mode))
    if stat.S_ISCHR(mode):
        letters += "Dc"  # Go marks a character device as both device and char device
    if mode & stat.S_ISUID:
        letters += "u"
    if mode & stat.S_ISGID:
        letters += "g"
    if mode & stat.S_ISVTX:
        letters += "t"
    rwx = "".join(ch if mode & (1 << (8 - i)) else "-" for i, ch in enumerate("rwxrwxrwx"))
    return (letters or "-") + rwx


def rfc3339(ns: int) -> str:
    seconds, nanos = divmod(ns, 1_000_000_000)
    stamp = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{nanos:09d}Z" if nanos else f"{stamp}Z"


def read_metadata(path: str) -> dict[str, str]:
    """The file's ``user.e2b.*`` xattrs; best effort (none when unsupported or unreadable)."""
    try:
        names = os.listxattr(path)
    except OSError:
        return {}
    metadata: dict[str, str] = {}
    for name in names:
        if not name.startswith(METADATA_PREFIX):
            continue
        try:
            metadata[name[len(METADATA_PREFIX) :]] = os.getxattr(path, name).decode()
        except (OSError, UnicodeDecodeError):
            continue  # set out of band with bytes a proto string cannot carry
    return metadata


def validate_metadata(metadata: dict[str, str]) -> None:
    """Raise ValueError with envd's wording for metadata that could not be stored."""
    total = 0
    for key, value in metadata.items():
        if not key:
            raise ValueError("metadata key must not be empty")
        if len(key) > MAX_METADATA_KEY:
            raise ValueError(f"metadata key {key!r} exceeds {MAX_METADATA_KEY} bytes")
        for label, text in (("key", key), (f"value for key {key!r}", value)):
            if any(not 0x20 <= ord(c) <= 0x7E for c in text):
                raise ValueError(f"metadata {label} contains non-printable-ASCII characters")
        total += len(METADATA_PREFIX) + len(key) + len(value)
    if total > MAX_METADATA_TOTAL:
        raise ValueError(f"total metadata size {total} exceeds {MAX_METADATA_TOTAL} bytes")


def replace_metadata(fd: int, metadata: dict[str, str]) -> None:
    """Make the open file's metadata exactly ``metadata``.

    Touches only what changes: every xattr call raises an IN_ATTRIB event for watchers, and a
    plain upload must produce exactly create, chmod and write.
    """
    try:
        existing = [n for n in os.listxattr(fd) if n.startswith(METADATA_PREFIX)]
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP) and not metadata:
            return
        raise
    for name in existing:
        if name[len(METADATA_PREFIX) :] not in metadata:
            os.removexattr(fd, name)
    for key, value in metadata.items():
        os.setxattr(fd, METADATA_PREFIX + key, value.encode())


def entry_info(path: str) -> EntryInfo:
    """EntryInfo for ``path`` (not following a final symlink); not_found when it is missing."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise ConnectError(
            Code.NOT_FOUND, f"file not found: no such file or directory: {path}"
        ) from None
    except NotADirectoryError:
        raise ConnectError(Code.NOT_FOUND, f"file not found: not a directory: {path}") from None
    except OSError as e:
        raise ConnectError(Code.INTERNAL, f"error getting file info: {e.strerror}") from None
    file_type = _file_type(st.st_mode)
    perm = stat.S_IMODE(st.st_mode) & 0o777
    target: str | None = None
    if stat.S_ISLNK(st.st_mode):
        target = os.path.realpath(path)
        try:
            target_st = os.stat(target)
            file_type, perm = _file_type(target_st.st_mode), stat.S_IMODE(target_st.st_mode) & 0o777
        except OSError:
            file_type, perm = "FILE_TYPE_UNSPECIFIED", 0
    return EntryInfo(
        name=os.path.basename(path.rstrip("/")) or "/",
        type=file_type,
        path=path,
        size=str(st.st_size),
        mode=perm,
        permissions=go_mode_string(st.st_mode),
        owner=owner_name(st.st_uid),
        group=group_name(st.st_gid),
        modified_time=rfc3339(st.st_mtime_ns),
        symlink_target=target,
        metadata=read_metadata(path),
    )
