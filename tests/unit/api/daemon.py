"""Runs `cube serve`'s daemon in a background thread for SDK tests: the process backend, the
default in-memory templates, a fresh data dir and one API key."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import msgspec
import trio

from cube.apikeys import ApiKeyStore
from cube.config import Config
from cube.pool.process_backend import ProcessBackend
from cube.serve import process_catalog, run_daemon


@dataclass
class Daemon:
    url: str
    api_key: str
    data_dir: Path

    def opts(self, **extra: object) -> dict[str, object]:
        """Connection options for every SDK call."""
        return {"api_url": self.url, "sandbox_url": self.url, "api_key": self.api_key, **extra}


@contextmanager
def running_daemon(data_dir: Path, **settings: object) -> Iterator[Daemon]:
    config = msgspec.convert(
        {"data_dir": str(data_dir), "listen": "127.0.0.1:0", "graceful_timeout": 0.5, **settings},
        Config,
        strict=False,
    )
    key, _ = ApiKeyStore(data_dir).create("tests")
    started = threading.Event()
    box: dict[str, object] = {}

    async def main() -> None:
        stop = trio.Event()
        box["stop"], box["token"] = stop, trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as outer:
            backend = ProcessBackend(data_dir / "process-backend" / "sandboxes")
            await outer.start(backend.run)
            async with trio.open_nursery() as inner:
                binds = await inner.start(
                    partial(
                        run_daemon,
                        config,
                        backend,
                        process_catalog(config),
                        shutdown_trigger=stop.wait,
                    )
                )
                box["url"] = binds[0]
                started.set()
            outer.cancel_scope.cancel()

    def thread_main() -> None:
        try:
            trio.run(main)
        except BaseException as exc:
            box["error"] = exc
            started.set()
            raise

    thread = threading.Thread(target=thread_main, daemon=True)
    thread.start()
    started.wait(60)
    if "error" in box:
        raise RuntimeError("daemon failed to start") from box["error"]  # type: ignore[arg-type]
    try:
        yield Daemon(url=str(box["url"]), api_key=key, data_dir=data_dir)
    finally:
        trio.from_thread.run_sync(box["stop"].set, trio_token=box["token"])  # type: ignore[union-attr,arg-type]
        thread.join(60)
