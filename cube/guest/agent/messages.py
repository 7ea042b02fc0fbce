"""envd's Connect messages (process.Process and filesystem.Filesystem) as msgspec Structs.

These follow the proto3 canonical JSON mapping the SDK's codec speaks: lowerCamelCase names,
``bytes`` as standard base64, enums by name, ``int64`` as a string on output, default values
omitted (so ``{}`` is a valid message). A ``oneof`` is modelled as optional fields of which at
most one is set. Inputs accept the looser forms a proto3 parser accepts (numbers or strings for
integers, names or numbers for enums) through ``int | str`` fields normalised where they are read.
"""

from __future__ import annotations

import msgspec

# -- shared ---------------------------------------------------------------------------------------


class Message(msgspec.Struct, rename="camel", omit_defaults=True, kw_only=True):
    """Base for every wire message: camelCase keys, defaults left out of the output."""


class Empty(Message):
    pass


# -- process.Process ------------------------------------------------------------------------------


class ProcessConfig(Message):
    cmd: str = ""
    args: list[str] = []
    envs: dict[str, str] = {}
    cwd: str | None = None


class PtySize(Message):
    cols: int | str = 0
    rows: int | str = 0


class Pty(Message):
    size: PtySize | None = None


class ProcessSelector(Message):
    pid: int | str | None = None
    tag: str | None = None


class ProcessInput(Message):
    stdin: bytes | None = None
    pty: bytes | None = None


class StartRequest(Message):
    process: ProcessConfig = msgspec.field(default_factory=ProcessConfig)
    pty: Pty | None = None
    tag: str | None = None
    stdin: bool | None = None


class ConnectRequest(Message):
    process: ProcessSelector = msgspec.field(default_factory=ProcessSelector)


class UpdateRequest(Message):
    process: ProcessSelector = msgspec.field(default_factory=ProcessSelector)
    pty: Pty | None = None


class SendInputRequest(Message):
    process: ProcessSelector = msgspec.field(default_factory=ProcessSelector)
    input: ProcessInput = msgspec.field(default_factory=ProcessInput)


class SendSignalRequest(Message):
    process: ProcessSelector = msgspec.field(default_factory=ProcessSelector)
    signal: int | str = 0


class CloseStdinRequest(Message):
    process: ProcessSelector = msgspec.field(default_factory=ProcessSelector)


class StreamInputStart(Message):
    process: ProcessSelector = msgspec.field(default_factory=ProcessSelector)


class StreamInputData(Message):
    input: ProcessInput = msgspec.field(default_factory=ProcessInput)


class StreamInputRequest(Message):
    start: StreamInputStart | None = None
    data: StreamInputData | None = None
    keepalive: Empty | None = None


class StartEvent(Message):
    pid: int = 0


class DataEvent(Message):
    stdout: bytes | None = None
    stderr: bytes | None = None
    pty: bytes | None = None


class EndEvent(Message):
    exit_code: int = 0
    exited: bool = False
    status: str = ""
    error: str | None = None


class ProcessEvent(Message):
    start: StartEvent | None = None
    data: DataEvent | None = None
    end: EndEvent | None = None
    keepalive: Empty | None = None


class ProcessEventResponse(Message):
    """StartResponse and ConnectResponse have the same shape: one ProcessEvent."""

    event: ProcessEvent


class ProcessInfo(Message):
    config: ProcessConfig
    pid: int
    tag: str | None = None


class ListResponse(Message):
    processes: list[ProcessInfo] = []


# -- filesystem.Filesystem ------------------------------------------------------------------------


class PathRequest(Message):
    """StatRequest, MakeDirRequest and RemoveRequest: just a path."""

    path: str = ""


class MoveRequest(Message):
    source: str = ""
    destination: str = ""


class ListDirRequest(Message):
    path: str = ""
    depth: int | str = 0


class WatchRequest(Message):
    """WatchDirRequest and CreateWatcherRequest."""

    path: str = ""
    recursive: bool = False
    include_entry: bool = False
    allow_network_mounts: bool = False


class WatcherRequest(Message):
    """GetWatcherEventsRequest and RemoveWatcherRequest."""

    watcher_id: str = ""


class EntryInfo(Message):
    name: str = ""
    type: str = "FILE_TYPE_UNSPECIFIED"
    path: str = ""
    size: str = "0"  # int64: a string in proto3 JSON
    mode: int = 0
    permissions: str = ""
    owner: str = ""
    group: str = ""
    modified_time: str | None = None
    symlink_target: str | None = None
    metadata: dict[str, str] = {}


class EntryResponse(Message):
    """StatResponse, MakeDirResponse and MoveResponse."""

    entry: EntryInfo


class ListDirResponse(Message):
    entries: list[EntryInfo] = []


class FilesystemEvent(Message):
    name: str = ""
    type: str = "EVENT_TYPE_UNSPECIFIED"
    entry: EntryInfo | None = None


class WatchDirResponse(Message):
    start: Empty | None = None
    filesystem: FilesystemEvent | None = None
    keepalive: Empty | None = None


class CreateWatcherResponse(Message):
    watcher_id: str


class GetWatcherEventsResponse(Message):
    events: list[FilesystemEvent] = []
