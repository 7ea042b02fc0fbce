"""One context: a Jupyter kernel, the executions queued on it, and its env var bookkeeping.

Each execution runs as its own task (``_run``) that holds the context's lock from before the
per-call env vars are set until after they are restored, so executions in one context never
interleave and the restore always happens, even when the client has gone. The HTTP side only
consumes that task's bounded output queue (``stream``); if it stops consuming (the client
disconnected), the run is marked abandoned, its remaining output is dropped and the kernel is
interrupted, so the next execution is not stuck behind a ``while True``.

Restart and removal do not wait for that lock (a runaway cell would block them forever): they
bump ``generation``, and a run that sees the kernel it started on replaced or dead ends with
upstream's ``ContextRestarting`` error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
from collections.abc import AsyncIterator, Mapping
from typing import Any

from jupyter_client.asynchronous import AsyncKernelClient
from jupyter_client.manager import AsyncKernelManager

from cube.guest.interpreter.envs import GlobalEnvs, KernelEnv
from cube.guest.interpreter.iopub import translate
from cube.guest.interpreter.languages import SpecManager, settle_time
from cube.guest.interpreter.protocol import EndOfExecution, Error, Keepalive, Output

log = logging.getLogger(__name__)

KEEPALIVE_INTERVAL = 5.0  # seconds of silence before a keepalive line
POLL_INTERVAL = 1.0  # how often a waiting run checks that its kernel is still the same and alive
START_TIMEOUT = 60.0
MAX_QUEUED = 256  # output lines buffered per execution before the kernel side waits


class KernelStartError(Exception):
    """The kernel process did not start or did not answer in time."""


class KernelGone(Exception):
    """The kernel a run was waiting on was restarted, removed or died."""


class _Run:
    """The link between one execution task and the HTTP response streaming it."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Output | None] = asyncio.Queue(MAX_QUEUED)
        self.abandoned = False
        self.in_cell = False

    async def emit(self, item: Output | None) -> None:
        if not self.abandoned:
            await self.queue.put(item)

    def abandon(self) -> None:
        self.abandoned = True
        while not self.queue.empty():  # unblock a put waiting on a full queue
            self.queue.get_nowait()


class KernelContext:
    def __init__(self, context_id: str, language: str, cwd: str, envs: GlobalEnvs) -> None:
        self.id = context_id
        self.language = language
        self.cwd = cwd
        self.generation = 0
        self._env = KernelEnv(language, envs)
        self._lock = asyncio.Lock()  # one execution at a time
        self._kernel_lock = asyncio.Lock()  # one start/restart/shutdown at a time
        self._km: AsyncKernelManager | None = None
        self._client: AsyncKernelClient | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        async with self._kernel_lock:
            await self._start()

    async def _start(self) -> None:
        km = AsyncKernelManager(kernel_name=self.language, kernel_spec_manager=SpecManager())
        try:
            await km.start_kernel(cwd=self.cwd, env=self._env.launch())
        except Exception as e:
            raise KernelStartError(f"cannot start the {self.language} kernel: {e}") from e
        client = km.client()
        client.start_channels()
        try:
            await client.wait_for_ready(timeout=START_TIMEOUT)
        except Exception as e:
            client.stop_channels()
            await km.shutdown_kernel(now=True)
            raise KernelStartError(f"the {self.language} kernel did not start: {e}") from e
        self._km, self._client = km, client

    async def _stop(self) -> None:
        self.generation += 1
        km, client = self._km, self._client
        self._km = self._client = None
        if client is not None:
            client.stop_channels()
        if km is not None:
            with contextlib.suppress(Exception):
                await km.shutdown_kernel(now=True)

    async def restart(self) -> None:
        async with self._kernel_lock:
            await self._stop()
            await self._start()

    async def shutdown(self) -> None:
        async with self._kernel_lock:
            self._closed = True
            await self._stop()

    async def _ensure_kernel(self) -> int:
        """Wait out a restart in progress, start a kernel again if the last start failed."""
        async with self._kernel_lock:
            if self._km is None:
                if self._closed:
                    raise KernelGone
                await self._start()
            return self.generation

    async def interrupt(self) -> None:
        if self._km is not None:
            try:
                await self._km.interrupt_kernel()
            except Exception as e:
                log.warning("interrupting context %s failed: %s", self.id, e)

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- executions ------------------------------------------------------------------------

    async def stream(self, code: str, env_vars: Mapping[str, str]) -> AsyncIterator[Output]:
        """The output lines of one execution, keepalives included, ``end_of_execution`` last."""
        run = _Run()
        task = self._spawn(self._run(code, dict(env_vars), run))
        try:
            while True:
                try:
                    item = await asyncio.wait_for(run.queue.get(), KEEPALIVE_INTERVAL)
                except TimeoutError:
                    yield Keepalive()
                    continue
                if item is None:
                    break
                yield item
        finally:
            if not task.done():
                run.abandon()
                self._spawn(self._interrupt_abandoned(run))
        yield EndOfExecution()

    async def _interrupt_abandoned(self, run: _Run) -> None:
        """Interrupt the cell of a run whose client left, checked as late as possible so that a
        signal meant for it is not delivered to whatever the kernel runs next."""
        if run.in_cell:
            log.info("client left during an execution in %s: interrupting", self.id)
            await self.interrupt()

    async def _run(self, code: str, env_vars: dict[str, str], run: _Run) -> None:
        async with self._lock:
            try:
                if run.abandoned:
                    return
                generation = await self._ensure_kernel()
                await self._silent(self._env.sync_code(), generation)
                await self._silent(self._env.call_code(env_vars), generation)
                try:
                    if not run.abandoned:
                        run.in_cell = True
                        await self._execute(code, run.emit, generation, silent=False)
                        run.in_cell = False
                finally:
                    if env_vars and generation == self.generation:
                        await self._silent(self._env.restore_code(env_vars), generation)
            except KernelGone:
                await run.emit(
                    Error(name="ContextRestarting", value="Context was restarted", traceback="")
                )
            except Exception as e:
                log.exception("execution in %s failed", self.id)
                await run.emit(Error(name=type(e).__name__, value=str(e), traceback=""))
            finally:
                await run.emit(None)

    async def _silent(self, code: str, generation: int) -> None:
        """Run bookkeeping code that leaves no trace: no output, no execution count."""
        if not code:
            return

        async def log_errors(item: Output | None) -> None:
            if isinstance(item, Error):
                log.warning("bookkeeping code failed in %s: %s %s", self.id, item.name, item.value)

        await self._execute(code, log_errors, generation, silent=True)

    async def _execute(self, code: str, emit: Any, generation: int, *, silent: bool) -> None:
        client = self._client
        if client is None or generation != self.generation:
            raise KernelGone
        msg_id = client.execute(
            code, silent=silent, store_history=not silent, allow_stdin=False, stop_on_error=True
        )
        settle = settle_time(self.language)
        idle = False
        while True:
            if idle:
                try:  # outputs the kernel publishes just after saying idle
                    msg = await client.get_iopub_msg(timeout=settle)
                except queue.Empty:
                    return
            else:
                msg = await self._next_message(client, generation)
            if (msg.get("parent_header") or {}).get("msg_id") != msg_id:
                continue  # left over from an abandoned or earlier execution
            content = msg.get("content") or {}
            if msg.get("msg_type") == "status" and content.get("execution_state") == "idle":
                if not settle:
                    return
                idle = True
            output = translate(msg)
            if output is not None:
                await emit(output)

    async def _next_message(self, client: AsyncKernelClient, generation: int) -> dict[str, Any]:
        while True:
            km = self._km
            if generation != self.generation or km is None:
                raise KernelGone
            try:
                return await client.get_iopub_msg(timeout=POLL_INTERVAL)
            except queue.Empty:
                pass
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # this task is being cancelled, not just the socket's poll
                raise KernelGone from None  # a restart closed the channels under us
            except Exception as e:
                raise KernelGone from e
            if not await km.is_alive():
                if generation == self.generation:  # died by itself, not by a restart
                    log.warning("kernel of context %s died: restarting it", self.id)
                    await self.restart()
                raise KernelGone
