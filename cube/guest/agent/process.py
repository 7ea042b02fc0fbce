"""process.Process: start commands and PTYs as the sandbox users, stream their output, signal them.

Processes belong to the agent, not to the request that started them: their output pumps and
reapers run in a service-wide nursery, so a client may disconnect and later ``Connect`` again.
Output goes to whoever is subscribed at the moment (the Start stream, Connect streams) and is
dropped when nobody is, as envd does. A process that has exited is kept in a bounded record so
that a late Connect still learns how it ended (``start`` then ``end``).

``Connect-Timeout-Ms`` on Start is the process's lifetime (SIGKILL when it runs out);
``Keepalive-Ping-Interval`` sets how often an idle stream gets a keepalive event.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import logging
import math
import os
import signal
import struct
import subprocess
import termios
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import trio

from cube.guest.agent.connect import Call, Code, ConnectError, Kind, Service
from cube.guest.agent.messages import (
    CloseStdinRequest,
    ConnectRequest,
    DataEvent,
    Empty,
    EndEvent,
    ListResponse,
    ProcessConfig,
    ProcessEvent,
    ProcessEventResponse,
    ProcessInfo,
    ProcessInput,
    ProcessSelector,
    PtySize,
    SendInputRequest,
    SendSignalRequest,
    StartEvent,
    StartRequest,
    StreamInputRequest,
    UpdateRequest,
)
from cube.guest.agent.state import AgentState
from cube.guest.agent.users import PathError, User, resolve

log = logging.getLogger(__name__)

MAX_PROCESSES = 1024
MAX_EXITED = 256  # exited processes remembered for a late Connect
CHUNK = 32 << 10
SUBSCRIBER_BUFFER = 64
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Go's names for signals, as envd's "signal: <name>" status strings carry them.
_SIGNAL_NAMES = {
    1: "hangup",
    2: "interrupt",
    3: "quit",
    4: "illegal instruction",
    5: "trace/breakpoint trap",
    6: "aborted",
    7: "bus error",
    8: "floating point exception",
    9: "killed",
    10: "user defined signal 1",
    11: "segmentation fault",
    12: "user defined signal 2",
    13: "broken pipe",
    14: "alarm clock",
    15: "terminated",
}

_SIGNALS = {
    "SIGNAL_SIGKILL": signal.SIGKILL,
    "SIGNAL_SIGTERM": signal.SIGTERM,
    9: signal.SIGKILL,
    15: signal.SIGTERM,
}


def end_event(returncode: int) -> EndEvent:
    """envd's end event for a wait status: ``exit status N`` or ``signal: killed`` (code -1)."""
    if returncode >= 0:
        status = f"exit status {returncode}"
        return EndEvent(
            exit_code=returncode,
            exited=True,
            status=status,
            error=status if returncode else None,
        )
    signum = -returncode
    status = f"signal: {_SIGNAL_NAMES.get(signum, f'signal {signum}')}"
    return EndEvent(exit_code=-1, exited=False, status=status, error=status)


def _as_int(value: int | str | None, what: str) -> int:
    try:
        return int(value or 0)
    except ValueError:
        raise ConnectError(Code.INVALID_ARGUMENT, f"bad {what} {value!r}") from None


def _winsize(size: PtySize | None) -> bytes:
    rows = _as_int(size.rows, "rows") if size else 0
    cols = _as_int(size.cols, "cols") if size else 0
    if not (0 <= rows <= 0xFFFF and 0 <= cols <= 0xFFFF):
        raise ConnectError(Code.INVALID_ARGUMENT, "pty size out of range")
    return struct.pack("HHHH", rows, cols, 0, 0)


def _take_controlling_tty() -> None:
    """Runs in the PTY child after setsid: make the PTY its controlling terminal."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


@dataclass(eq=False)
class Proc:
    pid: int
    config: ProcessConfig
    tag: str | None
    process: trio.Process
    pty: trio.lowlevel.FdStream | None
    stdin: trio.abc.SendStream | None
    subscribers: set[trio.MemorySendChannel[ProcessEvent]] = field(default_factory=set)
    stdin_lock: trio.Lock = field(default_factory=trio.Lock)
    output_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    drop_output_on_exit: bool = False
    end: EndEvent | None = None

    def subscribe(self) -> trio.MemoryReceiveChannel[ProcessEvent]:
        send, recv = trio.open_memory_channel[ProcessEvent](SUBSCRIBER_BUFFER)
        self.subscribers.add(send)
        return recv


@dataclass(frozen=True)
class Exited:
    pid: int
    tag: str | None
    end: EndEvent


class ProcessService:
    def __init__(self, state: AgentState, nursery: trio.Nursery) -> None:
        self._state = state
        self._nursery = nursery
        self._live: dict[int, Proc] = {}
        self._exited: collections.OrderedDict[int, Exited] = collections.OrderedDict()
        self.service = Service("process.Process")
        method = self.service.method
        method("List", Kind.UNARY, Empty)(self.list)
        method("Start", Kind.SERVER_STREAM, StartRequest)(self.start)
        method("Connect", Kind.SERVER_STREAM, ConnectRequest)(self.connect)
        method("Update", Kind.UNARY, UpdateRequest)(self.update)
        method("SendInput", Kind.UNARY, SendInputRequest)(self.send_input)
        method("StreamInput", Kind.CLIENT_STREAM, StreamInputRequest)(self.stream_input)
        method("SendSignal", Kind.UNARY, SendSignalRequest)(self.send_signal)
        method("CloseStdin", Kind.UNARY, CloseStdinRequest)(self.close_stdin)

    # -- lookup ---------------------------------------------------------------------------------

    def _find(self, selector: ProcessSelector) -> Proc:
        if selector.pid is not None:
            pid = _as_int(selector.pid, "pid")
            proc = self._live.get(pid)
            if proc is None:
                raise ConnectError(Code.NOT_FOUND, f"process with pid {pid} not found")
            return proc
        if selector.tag is not None:
            for proc in self._live.values():
                if proc.tag == selector.tag:
                    return proc
            raise ConnectError(Code.NOT_FOUND, f"process with tag {selector.tag} not found")
        raise ConnectError(Code.INVALID_ARGUMENT, "process selector needs a pid or a tag")

    def _find_exited(self, selector: ProcessSelector) -> Exited | None:
        if selector.pid is not None:
            return self._exited.get(_as_int(selector.pid, "pid"))
        return next((e for e in self._exited.values() if e.tag == selector.tag), None)

    # -- spawning -------------------------------------------------------------------------------

    def _environment(self, user: User, envs: dict[str, str]) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", DEFAULT_PATH),
            "HOME": user.home,
            "USER": user.name,
            "LOGNAME": user.name,
        }
        env.update(self._state.env_vars)
        env.update(envs)
        return env

    async def _spawn(self, user: User, request: StartRequest) -> Proc:
        if len(self._live) >= MAX_PROCESSES:
            raise ConnectError(Code.RESOURCE_EXHAUSTED, "too many processes")
        config = request.process
        try:
            cwd = resolve(config.cwd or "", user, self._state.default_workdir)
        except PathError as e:
            raise ConnectError(Code.INVALID_ARGUMENT, str(e)) from None
        if not os.path.exists(cwd):
            raise ConnectError(Code.INVALID_ARGUMENT, f"cwd '{cwd}' does not exist")
        options: dict[str, object] = {
            "cwd": cwd,
            "env": self._environment(user, config.envs),
        }
        if user.switch:
            options.update(user=user.uid, group=user.gid, extra_groups=list(user.groups))
        argv = [config.cmd, *config.args]
        slave = -1
        master: trio.lowlevel.FdStream | None = None
        try:
            if request.pty is not None:
                master_fd, slave = os.openpty()
                master = trio.lowlevel.FdStream(master_fd)
                fcntl.ioctl(slave, termios.TIOCSWINSZ, _winsize(request.pty.size))
                if user.switch:
                    os.fchown(slave, user.uid, -1)
                options.update(
                    stdin=slave,
                    stdout=slave,
                    stderr=slave,
                    start_new_session=True,
                    preexec_fn=_take_controlling_tty,
                )
            else:
                keep_stdin = request.stdin is None or request.stdin
                options.update(
                    stdin=subprocess.PIPE if keep_stdin else subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                )
            process = await trio.lowlevel.open_process(argv, **options)  # type: ignore[call-overload]
        except ConnectError:
            if master is not None:
                await master.aclose()
            raise
        except (OSError, ValueError, subprocess.SubprocessError) as e:
            if master is not None:
                await master.aclose()
            raise ConnectError(
                Code.INVALID_ARGUMENT, f"error starting process '{' '.join(argv)}': {e}"
            ) from None
        finally:
            if slave >= 0:
                os.close(slave)
        proc = Proc(
            pid=process.pid,
            config=config,
            tag=request.tag,
            process=process,
            pty=master,
            stdin=process.stdin,
        )
        self._exited.pop(proc.pid, None)
        self._live[proc.pid] = proc
        return proc

    # -- running --------------------------------------------------------------------------------

    async def _publish(self, proc: Proc, event: ProcessEvent) -> None:
        for channel in list(proc.subscribers):
            try:
                await channel.send(event)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                proc.subscribers.discard(channel)

    async def _pump(self, proc: Proc, stream: trio.abc.ReceiveStream, kind: str) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while chunk := await stream.receive_some(CHUNK):
                if proc.subscribers:
                    await self._publish(proc, ProcessEvent(data=DataEvent(**{kind: chunk})))

    async def _pump_all(self, proc: Proc, pumps_done: trio.Event) -> None:
        with proc.output_scope:
            async with trio.open_nursery() as nursery:
                if proc.pty is not None:
                    nursery.start_soon(self._pump, proc, proc.pty, "pty")
                else:
                    assert proc.process.stdout is not None and proc.process.stderr is not None
                    nursery.start_soon(self._pump, proc, proc.process.stdout, "stdout")
                    nursery.start_soon(self._pump, proc, proc.process.stderr, "stderr")
        pumps_done.set()

    async def _kill_at(self, proc: Proc, deadline: float) -> None:
        await trio.sleep_until(deadline)
        with contextlib.suppress(ProcessLookupError):
            proc.process.kill()
        proc.output_scope.cancel()

    async def _supervise(self, proc: Proc, deadline: float) -> None:
        """Pump output until the process has exited and its output ended, then publish ``end``.

        It runs in the service nursery: a failure here is logged, never allowed to end the agent.
        """
        try:
            await self._run(proc, deadline)
        except Exception:
            log.exception("supervising process %d failed", proc.pid)

    async def _run(self, proc: Proc, deadline: float) -> None:
        try:
            async with trio.open_nursery() as nursery:
                pumps_done = trio.Event()
                nursery.start_soon(self._pump_all, proc, pumps_done)
                if deadline < math.inf:
                    nursery.start_soon(self._kill_at, proc, deadline)
                await proc.process.wait()
                if proc.drop_output_on_exit:
                    proc.output_scope.cancel()
                await pumps_done.wait()
                nursery.cancel_scope.cancel()
            end = end_event(proc.process.returncode or 0)
            proc.end = end
            self._live.pop(proc.pid, None)
            self._exited[proc.pid] = Exited(proc.pid, proc.tag, end)
            while len(self._exited) > MAX_EXITED:
                self._exited.popitem(last=False)
            await self._publish(proc, ProcessEvent(end=end))
        finally:
            self._live.pop(proc.pid, None)
            if proc.process.returncode is None:  # only when the agent itself is shutting down
                proc.process.kill()
            for channel in proc.subscribers:
                channel.close()
            streams = (proc.pty, proc.stdin, proc.process.stdout, proc.process.stderr)
            for resource in streams:
                if resource is not None:
                    with trio.CancelScope(shield=True):
                        await resource.aclose()

    async def _stream(
        self, pid: int, events: trio.MemoryReceiveChannel[ProcessEvent], interval: float
    ) -> AsyncIterator[ProcessEventResponse]:
        """``start``, then the subscription's events, with a keepalive whenever it is idle.

        The channel is closed however the stream ends, so a vanished client unsubscribes and
        never holds up the process's output.
        """
        with events:
            yield ProcessEventResponse(ProcessEvent(start=StartEvent(pid=pid)))
            while True:
                with trio.move_on_after(interval) as idle:
                    try:
                        event = await events.receive()
                    except trio.EndOfChannel:
                        return
                if idle.cancelled_caught:
                    yield ProcessEventResponse(ProcessEvent(keepalive=Empty()))
                else:
                    yield ProcessEventResponse(event)

    # -- RPCs -----------------------------------------------------------------------------------

    async def list(self, call: Call, request: Empty) -> ListResponse:
        return ListResponse(
            [ProcessInfo(config=p.config, pid=p.pid, tag=p.tag) for p in self._live.values()]
        )

    async def start(self, call: Call, request: StartRequest) -> AsyncIterator[ProcessEventResponse]:
        user = self._state.rpc_user(call.headers.get("authorization"))
        timeout_ms = call.header_int("connect-timeout-ms")
        interval = call.keepalive_interval()
        proc = await self._spawn(user, request)
        events = proc.subscribe()
        deadline = (
            trio.current_time() + timeout_ms / 1000 if timeout_ms and timeout_ms > 0 else math.inf
        )
        stream = self._stream(proc.pid, events, interval)
        self._nursery.start_soon(self._supervise, proc, deadline)
        async with contextlib.aclosing(stream):
            async for response in stream:
                yield response

    async def connect(
        self, call: Call, request: ConnectRequest
    ) -> AsyncIterator[ProcessEventResponse]:
        try:
            proc = self._find(request.process)
        except ConnectError:
            exited = self._find_exited(request.process)
            if exited is None:
                raise
            yield ProcessEventResponse(ProcessEvent(start=StartEvent(pid=exited.pid)))
            yield ProcessEventResponse(ProcessEvent(end=exited.end))
            return
        stream = self._stream(proc.pid, proc.subscribe(), call.keepalive_interval())
        async with contextlib.aclosing(stream):
            async for response in stream:
                yield response

    async def update(self, call: Call, request: UpdateRequest) -> Empty:
        proc = self._find(request.process)
        if request.pty is not None:
            if proc.pty is None:
                raise ConnectError(Code.INTERNAL, "error resizing tty: tty not assigned to process")
            fcntl.ioctl(proc.pty.fileno(), termios.TIOCSWINSZ, _winsize(request.pty.size))
        return Empty()

    async def _write_input(self, proc: Proc, data: ProcessInput) -> None:
        if data.pty is not None:
            if proc.pty is None:
                raise ConnectError(
                    Code.INTERNAL, "error writing to tty: tty not assigned to process"
                )
            stream: trio.abc.SendStream = proc.pty
            payload = data.pty
        elif data.stdin is not None:
            if proc.pty is not None or proc.stdin is None:
                raise ConnectError(
                    Code.INTERNAL, "error writing to stdin: stdin not enabled or closed"
                )
            stream, payload = proc.stdin, data.stdin
        else:
            raise ConnectError(Code.UNIMPLEMENTED, "input needs stdin or pty data")
        async with proc.stdin_lock:
            try:
                await stream.send_all(payload)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                raise ConnectError(
                    Code.INTERNAL, f"error writing to process {proc.pid}: {e}"
                ) from None

    async def send_input(self, call: Call, request: SendInputRequest) -> Empty:
        await self._write_input(self._find(request.process), request.input)
        return Empty()

    async def stream_input(self, call: Call, requests: AsyncIterator[StreamInputRequest]) -> Empty:
        proc: Proc | None = None
        async for request in requests:
            if request.start is not None:
                proc = self._find(request.start.process)
            elif request.data is not None:
                if proc is None:
                    raise ConnectError(Code.FAILED_PRECONDITION, "input before the start event")
                await self._write_input(proc, request.data.input)
        return Empty()

    async def send_signal(self, call: Call, request: SendSignalRequest) -> Empty:
        proc = self._find(request.process)
        signum = _SIGNALS.get(request.signal)
        if signum is None:
            raise ConnectError(Code.UNIMPLEMENTED, f"invalid signal: {request.signal}")
        proc.drop_output_on_exit = True
        with contextlib.suppress(ProcessLookupError):
            proc.process.send_signal(signum)
        return Empty()

    async def close_stdin(self, call: Call, request: CloseStdinRequest) -> Empty:
        proc = self._find(request.process)
        if proc.pty is not None:
            raise ConnectError(
                Code.UNKNOWN,
                "error closing stdin: cannot close stdin for PTY process, send Ctrl+D instead",
            )
        if proc.stdin is not None:
            async with proc.stdin_lock:
                await proc.stdin.aclose()
            proc.stdin = None
        return Empty()
