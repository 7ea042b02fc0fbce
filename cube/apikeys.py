"""API keys: created and revoked by operators, stored hashed in ``<data>/apikeys.json``.

Only the SHA-256 of each key is kept, so the file (and a leak of it) never reveals a usable key;
the key itself is printed once, at creation. The daemon re-reads the file when it changes, so
`cube apikey create/revoke` take effect without a restart.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from pathlib import Path
from typing import Annotated

import msgspec
import typer

from cube import paths
from cube.pool.atomic import read, write_atomic

FILE_NAME = "apikeys.json"
PREFIX = "e2b_"  # E2B's own prefix, so tools that look for it are not confused


class ApiKey(msgspec.Struct, kw_only=True):
    key_id: str
    name: str
    sha256: str
    created_at: float
    max_sandboxes: int | None = None  # None: the daemon's default limit
    revoked: bool = False


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


class ApiKeyStore:
    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / FILE_NAME
        self._stamp: tuple[int, int] | None = None
        self._keys: list[ApiKey] = []
        self._by_digest: dict[str, ApiKey] = {}

    def _reload(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._stamp, self._keys, self._by_digest = None, [], {}
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        self._keys = read(self.path, list[ApiKey])
        self._by_digest = {k.sha256: k for k in self._keys if not k.revoked}
        self._stamp = stamp

    def records(self) -> list[ApiKey]:
        self._reload()
        return list(self._keys)

    def verify(self, key: str | None) -> ApiKey | None:
        """The active key record for ``key``, or None."""
        if not key:
            return None
        self._reload()
        return self._by_digest.get(_digest(key))

    def create(self, name: str, max_sandboxes: int | None = None) -> tuple[str, ApiKey]:
        """A new key (returned once, never stored) and its record."""
        self._reload()
        key = PREFIX + secrets.token_hex(20)
        record = ApiKey(
            key_id=secrets.token_hex(4),
            name=name,
            sha256=_digest(key),
            created_at=time.time(),
            max_sandboxes=max_sandboxes,
        )
        self._write([*self._keys, record])
        return key, record

    def revoke(self, key_id: str) -> bool:
        self._reload()
        found = False
        for record in self._keys:
            if record.key_id == key_id and not record.revoked:
                record.revoked = found = True
        if found:
            self._write(self._keys)
        return found

    def _write(self, keys: list[ApiKey]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(self.path, keys)
        self._stamp = None
        self._reload()


apikey_app = typer.Typer(no_args_is_help=True, help="Manage the API keys `cube serve` accepts.")

DataDir = Annotated[Path | None, typer.Option(help="Default: the daemon's data dir.")]


@apikey_app.command("create")
def create_command(
    name: Annotated[str, typer.Argument(help="A label for the key.")] = "default",
    max_sandboxes: Annotated[
        int | None, typer.Option(help="Concurrent running sandboxes for this key.")
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Create a key and print it (the only time it is shown)."""
    key, record = ApiKeyStore(data_dir or paths.data_dir()).create(name, max_sandboxes)
    typer.echo(f"id {record.key_id}  name {record.name}")
    typer.echo(key)


@apikey_app.command("ensure")
def ensure_command(data_dir: DataDir = None) -> None:
    """Create and print a key named "default" unless an active key exists (for `make serve`)."""
    store = ApiKeyStore(data_dir or paths.data_dir())
    if any(not record.revoked for record in store.records()):
        typer.echo(
            "cube apikey: an active API key exists (`cube apikey list`; keys are stored "
            "hashed, so make a new one with `cube apikey create` if you lost it)"
        )
        return
    key, record = store.create("default")
    typer.echo(f"cube apikey: created key {record.key_id}; use it as E2B_API_KEY:")
    typer.echo(key)


@apikey_app.command("list")
def list_command(data_dir: DataDir = None) -> None:
    """List keys (ids and names; keys themselves are not stored)."""
    for record in ApiKeyStore(data_dir or paths.data_dir()).records():
        created = time.strftime("%Y-%m-%d %H:%M", time.gmtime(record.created_at))
        limit = "default" if record.max_sandboxes is None else str(record.max_sandboxes)
        status = "revoked" if record.revoked else "active"
        typer.echo(f"{record.key_id}  {record.name:20}  {created}  limit={limit}  {status}")


@apikey_app.command("revoke")
def revoke_command(key_id: str, data_dir: DataDir = None) -> None:
    """Revoke a key by its id; the daemon refuses it from its next request."""
    if not ApiKeyStore(data_dir or paths.data_dir()).revoke(key_id):
        typer.echo(f"no active key with id {key_id}", err=True)
        raise typer.Exit(1)
