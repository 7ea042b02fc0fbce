"""The template store: one folder per template in the data dir, described by `template.json`.

    <data dir>/templates/<name>/
      template.json       metadata (msgspec JSON, replaced atomically), naming the current build
      build-<id>/
        rootfs.ext4       the read-only base disk every sandbox of the build shares
        snapshot/         the booted guest's memory snapshot (cube.vmm.snapshot format)
        build.log         everything the build printed, guest console included

Folders are named after the template's name, so the SDK's names (`base`,
`code-interpreter-v1`) find them directly; the E2B template id is stable across rebuilds (a
rebuild reuses it). Every build gets a folder of its own: a paused sandbox's (or a sandbox
snapshot's) diff names its build's snapshot as its parent, so a rebuild (an upgrade of Cube
changes the template's inputs) must not take that build away. Builds that never finished go
when the next build begins; finished ones only through `prune`, which the daemon runs at
start, when no sandbox is running, with the parents that paused sandboxes still need.

Status only moves building -> ready or building -> error; a new build starts again at building.
A build holds `<name>.lock` (flock) for its whole length, so two builds of one name cannot
interleave and `remove` refuses a template that is being built. Metadata that does not decode
is reported as corrupt, naming the file, never guessed at.
"""

from __future__ import annotations

import contextlib
import fcntl
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import msgspec

from cube.paths import data_dir
from cube.pool.atomic import write_atomic
from cube.pool.backend import Image, Resources
from cube.pool.catalog import TemplateInfo
from cube.pool.identity import new_id

META_FILE = "template.json"
ROOTFS_FILE = "rootfs.ext4"
SNAPSHOT_DIR = "snapshot"
LOG_FILE = "build.log"
BUILD_PREFIX = "build-"
NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
Status = Literal["building", "ready", "error"]
TRANSITIONS: dict[str, set[str]] = {"building": {"ready", "error"}, "ready": set(), "error": set()}


class TemplateError(Exception):
    """A template is missing, corrupt, busy, or a change to it is not allowed."""


class Template(msgspec.Struct, kw_only=True):
    """Everything known about one template; `inputs` hashes what went into its build, so an
    identical rebuild can be skipped."""

    name: str
    id: str
    status: Status
    source: str  # "debian" or "oci:<path>"
    cpus: int
    memory_mb: int
    disk_mb: int = 0
    envd_version: str | None = None
    start_cmd: str | None = None
    ready_cmd: str | None = None
    env: dict[str, str] = {}
    workdir: str | None = None
    user: str | None = None
    apt: list[str] = []
    pip: list[str] = []
    interpreter: bool = False
    inputs: str = ""
    created_at: float
    built_at: float | None = None
    error: str | None = None
    rootfs: str
    snapshot: str
    build_log: str


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise TemplateError(
            f"bad template name {name!r}: lowercase letters, digits, '-' and '_', "
            "starting with a letter or digit, at most 63 characters"
        )
    return name


class TemplateStore:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root or data_dir() / "templates"

    def folder(self, name: str) -> Path:
        return self.root / check_name(name)

    @contextlib.contextmanager
    def building(self, name: str) -> Iterator[None]:
        """Hold the template's build lock; TemplateError if another build holds it."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f"{check_name(name)}.lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise TemplateError(f"template {name!r} is being built right now") from None
            yield

    def begin(self, name: str, **fields: object) -> Template:
        """Start a (re)build in a new build folder, status building. Call inside `building`."""
        folder = self.folder(name)
        previous = self._read_or_none(folder)
        for unfinished in self._builds(folder):
            if not (unfinished / SNAPSHOT_DIR).is_dir():
                shutil.rmtree(unfinished)  # nothing can name a snapshot that was never made
        build = folder / f"{BUILD_PREFIX}{new_id(12)}"
        build.mkdir(parents=True)
        template = Template(
            name=name,
            id=previous.id if previous else new_id(),
            status="building",
            created_at=time.time(),
            rootfs=str(build / ROOTFS_FILE),
            snapshot=str(build / SNAPSHOT_DIR),
            build_log=str(build / LOG_FILE),
            **fields,  # type: ignore[arg-type]
        )
        self._write(template)
        return template

    @staticmethod
    def _builds(folder: Path) -> list[Path]:
        if not folder.is_dir():
            return []
        return [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(BUILD_PREFIX)]

    def prune(self, needed: set[Path]) -> list[Path]:
        """Delete every build that is neither a template's current one nor the parent of a
        snapshot in `needed` (snapshot folders); returns what was deleted. Only safe while no
        sandbox runs: a running clone's next pause would name its build as parent."""
        keep = {path.resolve() for path in needed}
        removed = []
        for name in self._names():
            current = self._read_or_none(self.root / name)
            if current is not None:
                keep.add(Path(current.snapshot).resolve())
            for build in self._builds(self.root / name):
                if (build / SNAPSHOT_DIR).resolve() not in keep:
                    shutil.rmtree(build)
                    removed.append(build)
        return removed

    def update(self, template: Template, status: Status, **changes: object) -> Template:
        """Move a template to `status` (building -> ready or error) with other field changes."""
        if status not in TRANSITIONS[template.status]:
            raise TemplateError(f"template {template.name}: {template.status} -> {status}")
        updated = msgspec.structs.replace(template, status=status, **changes)
        self._write(updated)
        return updated

    def _write(self, template: Template) -> None:
        write_atomic(self.folder(template.name) / META_FILE, template, mode=0o644)

    def _read(self, folder: Path) -> Template:
        path = folder / META_FILE
        try:
            template = msgspec.json.decode(path.read_bytes(), type=Template)
        except FileNotFoundError:
            raise TemplateError(f"no template named {folder.name!r}") from None
        except msgspec.DecodeError as error:
            raise TemplateError(
                f"{path}: corrupt template metadata ({error}); `cube template rm {folder.name}`"
            ) from None
        if template.name != folder.name:
            raise TemplateError(f"{path}: names template {template.name!r}, not {folder.name!r}")
        return template

    def _read_or_none(self, folder: Path) -> Template | None:
        try:
            return self._read(folder)
        except TemplateError:
            return None

    def _names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and NAME.match(p.name))

    def get(self, name_or_id: str) -> Template:
        """The template with this name or E2B id; TemplateError if none (or it is corrupt)."""
        if NAME.match(name_or_id) and (self.root / name_or_id / META_FILE).exists():
            return self._read(self.root / name_or_id)
        for name in self._names():
            template = self._read_or_none(self.root / name)
            if template is not None and template.id == name_or_id:
                return template
        raise TemplateError(f"no template named {name_or_id!r}")

    def list(self) -> list[Template]:
        """All templates by name; TemplateError names the first corrupt one."""
        return [self._read(self.root / name) for name in self._names()]

    def remove(self, name_or_id: str) -> str:
        """Delete a template's folder (even a corrupt one, by name); the name removed."""
        if NAME.match(name_or_id) and (self.root / name_or_id).is_dir():
            name = name_or_id
        else:
            name = self.get(name_or_id).name
        with self.building(name):
            shutil.rmtree(self.root / name)
        (self.root / f"{name}.lock").unlink(missing_ok=True)
        return name

    def lookup(self, name_or_id: str) -> TemplateInfo | None:
        """The daemon's view (cube.pool.catalog.Catalog): None if unknown or unreadable."""
        try:
            template = self.get(name_or_id)
        except TemplateError:
            return None
        image = None
        if template.status == "ready":
            image = Image(
                template_id=template.id,
                resources=Resources(
                    cpu_count=template.cpus, memory_mb=template.memory_mb, disk_mb=template.disk_mb
                ),
                folder=Path(template.snapshot),
                envd_version=template.envd_version or "0.0.0",
            )
        return TemplateInfo(
            template_id=template.id, alias=template.name, image=image, status=template.status
        )
