"""The on-disk record of each sandbox, in ``<data>/sandboxes/<id>/record.json``.

Records are what survives a restart of `cube serve`: paused sandboxes come back as paused (their
pause folder sits next to the record), and sandboxes that were running when the daemon died are
marked ``lost`` with a reason instead of vanishing.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Literal

import msgspec
import trio

from cube.pool.atomic import read, write_atomic
from cube.pool.backend import Resources

log = logging.getLogger(__name__)
SANDBOXES_DIR = "sandboxes"  # in the data dir: the RecordStore's root
PAUSED_DIR = "paused"  # in a sandbox's folder: everything a paused sandbox needs to resume
DEATH_REPORT = "death.json"  # in a sandbox's folder: why a sandbox that died by itself did

State = Literal["running", "paused", "lost"]
OnTimeout = Literal["kill", "pause"]


class SandboxRecord(msgspec.Struct, kw_only=True):
    """Everything the API reports about a sandbox and everything needed to resume it.
    Times are unix seconds (float)."""

    sandbox_id: str
    template_id: str
    alias: str | None
    state: State
    started_at: float
    end_at: float
    resources: Resources
    envd_version: str
    access_token: str
    traffic_token: str | None = None  # required on user ports when public traffic is off
    on_timeout: OnTimeout = "kill"
    auto_pause_memory: bool = True  # false: an expiry pause is filesystem-only
    auto_resume: bool = False
    paused_memory: bool = True  # false: paused filesystem-only, so a resume reboots it
    metadata: dict[str, str] = {}
    env_vars: dict[str, str] = {}
    owner: str = ""  # the id (not the secret) of the API key that created it
    allow_internet_access: bool | None = None
    network: dict[str, object] | None = None
    lost_reason: str | None = None


class RecordStore:
    """One folder per sandbox under ``root``; writes go through a worker thread so that fsync
    never stalls the event loop."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def folder(self, sandbox_id: str) -> Path:
        return self.root / sandbox_id

    def pause_folder(self, sandbox_id: str) -> Path:
        return self.folder(sandbox_id) / PAUSED_DIR

    async def save(self, record: SandboxRecord) -> None:
        def write() -> None:
            folder = self.folder(record.sandbox_id)
            folder.mkdir(exist_ok=True, mode=0o700)
            write_atomic(folder / "record.json", record)

        await trio.to_thread.run_sync(write)

    async def save_death(self, sandbox_id: str, report: tuple[str, ...]) -> None:
        """Keep the report of a sandbox that died by itself, for its log (the VM is gone)."""
        folder = self.folder(sandbox_id)
        await trio.to_thread.run_sync(write_atomic, folder / DEATH_REPORT, report)

    def death(self, sandbox_id: str) -> list[str]:
        """The report kept by `save_death`; none if the sandbox was lost another way."""
        try:
            return read(self.folder(sandbox_id) / DEATH_REPORT, list[str])
        except FileNotFoundError:
            return []
        except (OSError, msgspec.DecodeError) as exc:
            return [f"the death report cannot be read: {exc}"]

    async def remove(self, sandbox_id: str) -> None:
        await trio.to_thread.run_sync(shutil.rmtree, self.folder(sandbox_id), True)

    def load_all(self) -> list[SandboxRecord]:
        """Every readable record; unreadable ones are logged and left in place for an operator."""
        records = []
        for path in sorted(self.root.glob("*/record.json")):
            try:
                records.append(read(path, SandboxRecord))
            except (OSError, msgspec.DecodeError) as exc:
                log.error("unreadable sandbox record", extra={"path": str(path), "error": str(exc)})
        return records
