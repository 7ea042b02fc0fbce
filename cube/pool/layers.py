"""Writing into a root filesystem tree that may hold hostile content, without ever leaving it.

OCI layers come from anywhere, and the tree they build is extracted on the host as root. A tar
member named `../../etc/cron.d/x`, `/etc/shadow`, a symlink `evil -> /` followed by `evil/etc/x`,
or a hard link to a host file would each write or expose something outside the build folder.
So nothing here uses tarfile's extraction: every member is applied by hand, and every path is
resolved by `in_root`, which reads symlinks in the tree as the guest will (relative to the tree's
root, `..` stopping at it) and never follows the final component. Members whose own names or
link targets point outside the tree are refused outright (LayerError), as the brief for image
import asks: a well-formed image never has them.

Whiteouts follow the OCI image spec: `.wh.NAME` deletes NAME from the lower layers and
`.wh..wh..opq` empties its directory of everything from the lower layers. Both only concern
lower layers, so a layer's whiteouts are all applied before any of its entries.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from collections.abc import Sequence
from pathlib import Path

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
MAX_SYMLINK_HOPS = 40
COPY_CHUNK = 1 << 20


class LayerError(ValueError):
    """A layer, or a path in the tree, tries to reach outside the root, or is malformed."""


def clean_parts(name: str) -> tuple[str, ...]:
    """The components of a member name; LayerError for absolute names or `..` components."""
    if name.startswith("/"):
        raise LayerError(f"absolute path {name!r} in a layer")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise LayerError(f"path {name!r} climbs out with '..'")
    return parts


def _walk(root: Path, parts: Sequence[str], create: bool) -> list[str]:
    """Resolve directory components chroot-style; the real components, all inside root."""
    resolved: list[str] = []
    todo = list(parts)
    hops = 0
    while todo:
        part = todo.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        here = root.joinpath(*resolved, part)
        if here.is_symlink():
            hops += 1
            if hops > MAX_SYMLINK_HOPS:
                raise LayerError(f"too many symlinks resolving {'/'.join(parts)!r}")
            target = os.readlink(here)
            if target.startswith("/"):
                resolved = []
            todo = target.split("/") + todo
            continue
        if not here.exists():
            if not create:
                raise LayerError(f"{'/'.join(parts)!r}: {'/'.join([*resolved, part])} is missing")
            here.mkdir(mode=0o755)
        elif not here.is_dir():
            raise LayerError(f"{'/'.join(parts)!r}: {'/'.join([*resolved, part])} is not a dir")
        resolved.append(part)
    return resolved


def in_root(root: Path, parts: Sequence[str], create: bool = True) -> Path:
    """The host path of root-relative `parts`: parents resolved inside root (and created when
    missing, unless `create` is false), the last component left as is, never followed."""
    if not parts:
        return root
    return root.joinpath(*_walk(root, parts[:-1], create), parts[-1])


def dir_in_root(root: Path, parts: Sequence[str], create: bool = True) -> Path:
    """Like in_root, but the last component is a directory and is resolved too."""
    return root.joinpath(*_walk(root, parts, create))


def remove(path: Path) -> None:
    """Delete a file, symlink or whole directory, never following a symlink."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


def symlink_escapes(parts: Sequence[str], target: str) -> bool:
    """Whether a relative symlink at `parts` climbs above the root. Absolute targets name a
    path inside the guest's root, so they cannot (in_root reads them that way too)."""
    if target.startswith("/"):
        return False
    depth = len(parts) - 1
    for part in target.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        elif part not in ("", "."):
            depth += 1
    return False


class Layer:
    """One uncompressed layer tar, applied onto a tree in two passes (whiteouts, then entries)."""

    def __init__(self, root: Path, tar_path: Path) -> None:
        self.root = root
        self.tar_path = tar_path
        self.as_root = os.geteuid() == 0
        self.skipped_devices = 0

    def apply(self) -> None:
        with tarfile.open(self.tar_path, "r:") as tar:
            members = [(clean_parts(m.name), m) for m in tar.getmembers()]
            for parts, _ in members:
                if parts and parts[-1].startswith(WHITEOUT):
                    self._whiteout(parts)
            for parts, member in members:
                if parts and not parts[-1].startswith(WHITEOUT):
                    self._entry(tar, parts, member)

    def _whiteout(self, parts: tuple[str, ...]) -> None:
        folder = dir_in_root(self.root, parts[:-1])
        if parts[-1] == OPAQUE:
            for child in folder.iterdir():
                remove(child)
            return
        name = parts[-1][len(WHITEOUT) :]
        if name in ("", ".", "..") or "/" in name:
            raise LayerError(f"bad whiteout {'/'.join(parts)!r}")
        remove(folder / name)

    def _entry(self, tar: tarfile.TarFile, parts: tuple[str, ...], m: tarfile.TarInfo) -> None:
        path = in_root(self.root, parts)
        if m.isdir():
            if path.is_symlink() or (path.exists() and not path.is_dir()):
                remove(path)
            path.mkdir(mode=0o755, exist_ok=True)
        elif m.ischr() or m.isblk():
            self.skipped_devices += 1  # the guest's /dev is devtmpfs: image nodes are never seen
            return
        else:
            if path.is_symlink() or path.exists():
                remove(path)
            if m.issym():
                if symlink_escapes(parts, m.linkname):
                    raise LayerError(f"symlink {m.name!r} -> {m.linkname!r} escapes the root")
                os.symlink(m.linkname, path)
            elif m.islnk():
                self._hardlink(parts, m, path)
                return
            elif m.isfifo():
                os.mkfifo(path)
            elif m.isfile():
                self._file(tar, m, path)
            else:
                raise LayerError(f"unsupported member type {m.type!r} for {m.name!r}")
        self._attributes(path, m)

    def _hardlink(self, parts: tuple[str, ...], m: tarfile.TarInfo, path: Path) -> None:
        source = in_root(self.root, clean_parts(m.linkname), create=False)
        if not (source.is_symlink() or source.exists()) or (
            source.is_dir() and not source.is_symlink()
        ):
            raise LayerError(f"hard link {m.name!r} -> {m.linkname!r}: no such file in the tree")
        os.link(source, path, follow_symlinks=False)

    def _file(self, tar: tarfile.TarFile, m: tarfile.TarInfo, path: Path) -> None:
        source = tar.extractfile(m)
        assert source is not None
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(source, out, COPY_CHUNK)

    def _attributes(self, path: Path, m: tarfile.TarInfo) -> None:
        """Owner before mode (chown clears set-id bits), then mtime; symlinks get an owner only."""
        if self.as_root:
            os.chown(path, m.uid, m.gid, follow_symlinks=False)
        if not m.issym():
            os.chmod(path, m.mode & 0o7777)
            if not m.isdir():
                os.utime(path, (m.mtime, m.mtime))


def apply_layer(root: Path, tar_path: Path) -> int:
    """Apply an uncompressed layer tar onto the tree at root; the number of device nodes skipped."""
    layer = Layer(root, tar_path)
    try:
        layer.apply()
    except tarfile.TarError as error:
        raise LayerError(f"{tar_path.name}: not a valid tar ({error})") from None
    return layer.skipped_devices
