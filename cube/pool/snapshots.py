"""Snapshots of sandboxes, kept in ``<data>/sandbox-snapshots/<id>/`` and usable as templates.

A snapshot is a template image written by the backend (``image/``) plus a small record; it is
looked up by id or by name like any template, so ``Sandbox.create(snapshot_id)`` just works.
Names behave like tags: giving an existing name to a new snapshot moves it there.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import msgspec
import trio

from cube.pool.atomic import read, write_atomic
from cube.pool.backend import Image, Resources
from cube.pool.catalog import TemplateInfo

log = logging.getLogger(__name__)
SNAPSHOTS_DIR = "sandbox-snapshots"  # in the data dir: the SnapshotStore's root
IMAGE_DIR = "image"  # in a snapshot's folder: the backend's startable image


class SnapshotRecord(msgspec.Struct, kw_only=True):
    snapshot_id: str
    names: list[str]
    sandbox_id: str
    template_id: str
    created_at: float
    resources: Resources
    envd_version: str


class SnapshotStore:
    """The snapshot records, indexed in memory; ordered oldest first for stable paging."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._records: dict[str, SnapshotRecord] = {}
        for path in root.glob("*/snapshot.json"):
            try:
                record = read(path, SnapshotRecord)
            except (OSError, msgspec.DecodeError) as exc:
                log.error("unreadable snapshot", extra={"path": str(path), "error": str(exc)})
                continue
            self._records[record.snapshot_id] = record

    def image_folder(self, snapshot_id: str) -> Path:
        """Where the backend writes the image; created empty by the caller's snapshot call."""
        return self.root / snapshot_id / IMAGE_DIR

    def lookup(self, name_or_id: str) -> TemplateInfo | None:
        record = self._records.get(name_or_id) or next(
            (r for r in self._records.values() if name_or_id in r.names), None
        )
        if record is None:
            return None
        image = Image(
            template_id=record.snapshot_id,
            resources=record.resources,
            folder=self.image_folder(record.snapshot_id),
            envd_version=record.envd_version,
        )
        alias = record.names[0] if record.names else None
        return TemplateInfo(template_id=record.snapshot_id, alias=alias, image=image)

    def list(self, sandbox_id: str | None = None, name: str | None = None) -> list[SnapshotRecord]:
        return sorted(
            (
                r
                for r in self._records.values()
                if (sandbox_id is None or r.sandbox_id == sandbox_id)
                and (name is None or name in r.names or name == r.snapshot_id)
            ),
            key=lambda r: (r.created_at, r.snapshot_id),
        )

    async def add(self, record: SnapshotRecord) -> None:
        """Register a snapshot whose image is complete, taking its names from older ones."""
        for other in self._records.values():
            taken = [n for n in other.names if n in record.names]
            if taken:
                other.names = [n for n in other.names if n not in taken]
                await self._save(other)
        record.created_at = record.created_at or time.time()
        await self._save(record)
        self._records[record.snapshot_id] = record

    async def remove(self, snapshot_id: str) -> bool:
        if self._records.pop(snapshot_id, None) is None:
            return False
        await trio.to_thread.run_sync(shutil.rmtree, self.root / snapshot_id, True)
        return True

    async def discard(self, snapshot_id: str) -> None:
        """Remove a half-written snapshot folder (the backend failed)."""
        await trio.to_thread.run_sync(shutil.rmtree, self.root / snapshot_id, True)

    async def _save(self, record: SnapshotRecord) -> None:
        path = self.root / record.snapshot_id / "snapshot.json"
        await trio.to_thread.run_sync(write_atomic, path, record)
