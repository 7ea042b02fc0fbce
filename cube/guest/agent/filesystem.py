"""filesystem.Filesystem: Stat, MakeDir, Move, ListDir, Remove and the two kinds of watch.

Every path is resolved for the calling user (relative to their home). Blocking work that can be
large (listing or removing a tree) runs in a worker thread so one request cannot stall the
agent; the small calls run inline.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

import trio

from cube.guest.agent.connect import Call, Code, ConnectError, Kind, Service
from cube.guest.agent.entries import entry_info
from cube.guest.agent.fsops import ensure_dirs, list_dir, remove_all
from cube.guest.agent.messages import (
    CreateWatcherResponse,
    Empty,
    EntryResponse,
    GetWatcherEventsResponse,
    ListDirRequest,
    ListDirResponse,
    MoveRequest,
    PathRequest,
    WatchDirResponse,
    WatcherRequest,
    WatchRequest,
)
from cube.guest.agent.state import AgentState
from cube.guest.agent.users import PathError, User, resolve
from cube.guest.agent.watchers import Watchers


class FilesystemService:
    def __init__(self, state: AgentState, watchers: Watchers) -> None:
        self._state = state
        self._watchers = watchers
        self.service = Service("filesystem.Filesystem")
        method = self.service.method
        method("Stat", Kind.UNARY, PathRequest)(self.stat)
        method("MakeDir", Kind.UNARY, PathRequest)(self.make_dir)
        method("Move", Kind.UNARY, MoveRequest)(self.move)
        method("ListDir", Kind.UNARY, ListDirRequest)(self.list_dir)
        method("Remove", Kind.UNARY, PathRequest)(self.remove)
        method("WatchDir", Kind.SERVER_STREAM, WatchRequest)(self.watch_dir)
        method("CreateWatcher", Kind.UNARY, WatchRequest)(self.create_watcher)
        method("GetWatcherEvents", Kind.UNARY, WatcherRequest)(self.get_watcher_events)
        method("RemoveWatcher", Kind.UNARY, WatcherRequest)(self.remove_watcher)

    def _user_path(self, call: Call, path: str) -> tuple[User, str]:
        user = self._state.rpc_user(call.headers.get("authorization"))
        try:
            return user, resolve(path, user, self._state.default_workdir)
        except PathError as e:
            raise ConnectError(Code.INVALID_ARGUMENT, str(e)) from None

    async def stat(self, call: Call, request: PathRequest) -> EntryResponse:
        _, path = self._user_path(call, request.path)
        return EntryResponse(entry_info(path))

    async def make_dir(self, call: Call, request: PathRequest) -> EntryResponse:
        user, path = self._user_path(call, request.path)
        self._watchers.sync()
        try:
            is_dir = os.path.isdir(path)
            if is_dir or os.path.lexists(path):
                if is_dir:
                    raise ConnectError(Code.ALREADY_EXISTS, f"directory already exists: {path}")
                raise ConnectError(
                    Code.INVALID_ARGUMENT,
                    f"path already exists but it is not a directory: {path}",
                )
            ensure_dirs(path, user.uid, user.gid)
        except OSError as e:
            raise ConnectError(Code.INTERNAL, f"error creating directory: {e}") from None
        return EntryResponse(entry_info(path))

    async def move(self, call: Call, request: MoveRequest) -> EntryResponse:
        user, source = self._user_path(call, request.source)
        _, destination = self._user_path(call, request.destination)
        self._watchers.sync()
        try:
            ensure_dirs(os.path.dirname(destination), user.uid, user.gid)
            os.rename(source, destination)
        except FileNotFoundError as e:
            raise ConnectError(Code.NOT_FOUND, f"source file not found: {e.strerror}") from None
        except OSError as e:
            raise ConnectError(Code.INTERNAL, f"error renaming: {e}") from None
        return EntryResponse(entry_info(destination))

    async def list_dir(self, call: Call, request: ListDirRequest) -> ListDirResponse:
        _, path = self._user_path(call, request.path)
        try:
            depth = int(request.depth or 0) or 1
        except ValueError:
            raise ConnectError(Code.INVALID_ARGUMENT, f"bad depth {request.depth!r}") from None
        entries = await trio.to_thread.run_sync(list_dir, path, depth)
        return ListDirResponse(entries)

    async def remove(self, call: Call, request: PathRequest) -> Empty:
        _, path = self._user_path(call, request.path)
        self._watchers.sync()
        try:
            await trio.to_thread.run_sync(remove_all, path)
        except OSError as e:
            raise ConnectError(Code.INTERNAL, f"error removing file or directory: {e}") from None
        return Empty()

    async def watch_dir(self, call: Call, request: WatchRequest) -> AsyncIterator[WatchDirResponse]:
        _, path = self._user_path(call, request.path)
        stream = self._watchers.stream(
            path,
            request.recursive,
            request.include_entry,
            request.allow_network_mounts,
            call.keepalive_interval(),
        )
        async with contextlib.aclosing(stream):
            async for response in stream:
                yield response

    async def create_watcher(self, call: Call, request: WatchRequest) -> CreateWatcherResponse:
        _, path = self._user_path(call, request.path)
        watcher_id = self._watchers.create(
            path, request.recursive, request.include_entry, request.allow_network_mounts
        )
        return CreateWatcherResponse(watcher_id)

    async def get_watcher_events(
        self, call: Call, request: WatcherRequest
    ) -> GetWatcherEventsResponse:
        return GetWatcherEventsResponse(self._watchers.events(request.watcher_id))

    async def remove_watcher(self, call: Call, request: WatcherRequest) -> Empty:
        self._watchers.remove(request.watcher_id)
        return Empty()
