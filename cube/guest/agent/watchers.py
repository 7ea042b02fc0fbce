"""Directory watchers behind WatchDir (a stream) and CreateWatcher/GetWatcherEvents (polling).

Each watcher owns one inotify instance and a bounded queue of envd FilesystemEvents. Polled
watchers are read by a background task; a stream's watcher is read by the stream itself. Before
answering GetWatcherEvents, and before any request changes the filesystem, ``sync()`` drains
every watcher's pending kernel events. That makes SDK sequences deterministic: a file written
right after ``make_dir`` inside a recursively watched tree is seen, because the new directory's
watch was added before the write request ran, and events caused by a request are in the queue
when the next GetWatcherEvents is answered.
"""

from __future__ import annotations

import collections
import ctypes
import itertools
import logging
import os
import secrets
from collections.abc import AsyncIterator

import trio

from cube.guest.agent.connect import Code, ConnectError
from cube.guest.agent.entries import entry_info
from cube.guest.agent.inotify import DirWatch, WatchOverflow
from cube.guest.agent.messages import Empty, FilesystemEvent, WatchDirResponse

log = logging.getLogger(__name__)

MAX_WATCHERS = 256
MAX_QUEUED = 10_000  # unread events per watcher before it fails with resource_exhausted
_CARRIES_ENTRY = {"EVENT_TYPE_CREATE", "EVENT_TYPE_WRITE", "EVENT_TYPE_CHMOD"}

# statfs(2) magic numbers of network filesystems (include/uapi/linux/magic.h): envd refuses to
# watch on them unless asked to, because events there are unreliable.
_NETWORK_FS = {0x6969, 0xFF534D42, 0x517B, 0xFE534D42, 0x65735546}
_libc = ctypes.CDLL(None, use_errno=True)


def on_network_mount(path: str) -> bool:
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on x86-64 and arm64
    if _libc.statfs(os.fsencode(path), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ctypes.c_long.from_buffer(buf).value in _NETWORK_FS


class Watcher:
    def __init__(self, watch: DirWatch, include_entry: bool) -> None:
        self.watch = watch
        self.include_entry = include_entry
        self.queue: collections.deque[FilesystemEvent] = collections.deque()
        self.error: ConnectError | None = None
        self.scope = trio.CancelScope()
        self.wakeup = trio.Event()

    def drain(self) -> None:
        if self.error is not None:
            return
        try:
            changes = self.watch.drain()
        except WatchOverflow as e:
            self.error = ConnectError(Code.INTERNAL, f"watcher error: {e}")
            return
        except OSError as e:
            self.error = ConnectError(Code.INTERNAL, f"watcher error: {e.strerror}")
            return
        for change in changes:
            for kind in change.types:
                entry = None
                if self.include_entry and kind in _CARRIES_ENTRY:
                    try:
                        entry = entry_info(change.path)
                    except ConnectError:
                        entry = None  # gone again before we looked: best effort, as envd
                self.queue.append(FilesystemEvent(name=change.name, type=kind, entry=entry))
        if len(self.queue) > MAX_QUEUED:
            self.queue.clear()
            self.error = ConnectError(
                Code.RESOURCE_EXHAUSTED, "watcher error: too many unread events"
            )
        if self.queue or self.error is not None:
            self.wakeup.set()

    async def read_forever(self) -> None:
        """Drain the kernel's events into the queue as they arrive, until an error."""
        while self.error is None:
            await trio.lowlevel.wait_readable(self.watch.fileno())
            self.drain()

    async def wait(self, timeout: float) -> bool:
        """Wait until events (or an error) are queued, whoever drained them; False when idle
        for ``timeout`` seconds."""
        if self.queue or self.error is not None:
            return True
        self.wakeup = trio.Event()
        with trio.move_on_after(timeout) as idle:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.read_forever)
                await self.wakeup.wait()
                nursery.cancel_scope.cancel()
        return not idle.cancelled_caught

    def take(self) -> list[FilesystemEvent]:
        events = list(self.queue)
        self.queue.clear()
        return events

    def close(self) -> None:
        trio.lowlevel.notify_closing(self.watch.fileno())
        self.watch.close()


class Watchers:
    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self._all: set[Watcher] = set()
        self._polled: dict[str, Watcher] = {}
        self._ids = itertools.count(1)

    def sync(self) -> None:
        for watcher in self._all:
            watcher.drain()

    def _open(self, path: str, recursive: bool, include_entry: bool, network_ok: bool) -> Watcher:
        if len(self._all) >= MAX_WATCHERS:
            raise ConnectError(Code.RESOURCE_EXHAUSTED, "too many watchers")
        try:
            if not os.path.isdir(path):
                if not os.path.exists(path):
                    raise ConnectError(Code.NOT_FOUND, f"path {path} not found")
                raise ConnectError(Code.INVALID_ARGUMENT, f"path {path} not a directory")
            if not network_ok and on_network_mount(path):
                raise ConnectError(
                    Code.INVALID_ARGUMENT, f"cannot watch path on network filesystem: {path}"
                )
            watcher = Watcher(DirWatch(path, recursive), include_entry)
        except OSError as e:
            raise ConnectError(
                Code.INTERNAL, f"error adding path {path} to watcher: {e.strerror}"
            ) from None
        self._all.add(watcher)
        return watcher

    def _forget(self, watcher: Watcher) -> None:
        self._all.discard(watcher)
        watcher.close()

    async def stream(
        self,
        path: str,
        recursive: bool,
        include_entry: bool,
        network_ok: bool,
        keepalive: float,
    ) -> AsyncIterator[WatchDirResponse]:
        watcher = self._open(path, recursive, include_entry, network_ok)
        try:
            yield WatchDirResponse(start=Empty())
            while True:
                while watcher.queue:
                    yield WatchDirResponse(filesystem=watcher.queue.popleft())
                if watcher.error is not None:
                    raise watcher.error
                if not await watcher.wait(keepalive):
                    yield WatchDirResponse(keepalive=Empty())
        finally:
            self._forget(watcher)

    def create(self, path: str, recursive: bool, include_entry: bool, network_ok: bool) -> str:
        watcher = self._open(path, recursive, include_entry, network_ok)
        watcher_id = f"w{next(self._ids)}{secrets.token_hex(4)}"
        self._polled[watcher_id] = watcher
        self._nursery.start_soon(self._read_polled, watcher)
        return watcher_id

    async def _read_polled(self, watcher: Watcher) -> None:
        try:
            with watcher.scope:
                await watcher.read_forever()
        except Exception:
            log.exception("watcher on %s failed", watcher.watch.root)
            watcher.error = ConnectError(Code.INTERNAL, "watcher failed")
        finally:
            self._forget(watcher)

    def _polled_watcher(self, watcher_id: str) -> Watcher:
        watcher = self._polled.get(watcher_id)
        if watcher is None:
            raise ConnectError(Code.NOT_FOUND, f"watcher with id {watcher_id} not found")
        return watcher

    def events(self, watcher_id: str) -> list[FilesystemEvent]:
        watcher = self._polled_watcher(watcher_id)
        watcher.drain()
        if watcher.error is not None:
            raise watcher.error
        return watcher.take()

    def remove(self, watcher_id: str) -> None:
        self._polled_watcher(watcher_id).scope.cancel()
        del self._polled[watcher_id]
