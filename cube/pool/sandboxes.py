"""The registry of sandboxes and their lifecycle: create, TTL, pause/resume, fork, snapshot, kill.

Every sandbox has a record on disk (records.py) and, while running, a backend instance. Each
sandbox has its own lock, so operations on one sandbox are ordered while different sandboxes
never wait on each other; creation takes no lock at all. One reaper task expires sandboxes at
their deadline (kill, or pause when the sandbox asked for auto-pause), and one watcher task per
running sandbox notices a sandbox that dies by itself. All of them belong to the nursery of
``run``.
"""

from __future__ import annotations

import heapq
import logging
import math
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import msgspec
import trio

from cube.guest.wire import GetLogs, GetMetrics, Metrics, Prepare, Reply
from cube.net.manager import NetStats, NetworkError, NetworkManager
from cube.net.policy import EgressPolicy, PolicyError
from cube.pool.backend import Backend, BackendError, Instance
from cube.pool.catalog import Catalog
from cube.pool.identity import identity_for, new_id, new_token, push_identity
from cube.pool.records import OnTimeout, RecordStore, SandboxRecord
from cube.pool.snapshots import SnapshotRecord, SnapshotStore
from cube.pool.warm import WarmPool

log = logging.getLogger(__name__)


class LifecycleError(Exception):
    """A refusal the API passes on as ``{code, message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    default_timeout: int = 300
    max_timeout: int = 24 * 3600
    on_shutdown: OnTimeout = "pause"  # what SIGTERM does to running sandboxes


class CreateSpec(msgspec.Struct, frozen=True, kw_only=True):
    template: str
    timeout: int | None = None
    metadata: dict[str, str] = {}
    env_vars: dict[str, str] = {}
    on_timeout: OnTimeout = "kill"
    auto_pause_memory: bool = True
    auto_resume: bool = False
    allow_internet_access: bool | None = None
    network: dict[str, object] | None = None
    private_traffic: bool = False  # network.allowPublicTraffic false: issue a traffic token


@dataclass(eq=False)
class Sandbox:
    record: SandboxRecord
    instance: Instance | None
    lock: trio.Lock = field(default_factory=trio.Lock)
    watch: trio.CancelScope = field(default_factory=trio.CancelScope)
    expiring: bool = False
    traffic: set[trio.CancelScope] = field(default_factory=set)  # proxied exchanges in flight


def _detach(sandbox: Sandbox) -> Instance | None:
    """Take a sandbox's instance away before pausing or killing it: from here the proxy routes
    nothing new to it, exchanges in flight are cut (a paused or dead guest would leave them
    hanging) and its death is no longer news."""
    instance, sandbox.instance = sandbox.instance, None
    sandbox.watch.cancel()
    for scope in sandbox.traffic:
        scope.cancel()
    return instance


def egress_policy(internet: bool | None, network: dict[str, object] | None) -> EgressPolicy:
    """A sandbox's rules as the network layer takes them, from its ``allow_internet_access``
    (unset means allowed, as in E2B) and ``network`` (the API's validated
    SandboxNetworkConfig JSON)."""
    lists = network or {}
    return EgressPolicy(
        allow_internet_access=internet is not False,
        allow_out=tuple(map(str, lists.get("allowOut") or ())),  # type: ignore[call-overload]
        deny_out=tuple(map(str, lists.get("denyOut") or ())),  # type: ignore[call-overload]
    )


def record_egress(record: SandboxRecord) -> EgressPolicy:
    return egress_policy(record.allow_internet_access, record.network)


class Sandboxes:
    def __init__(
        self,
        backend: Backend,
        catalog: Catalog,
        snapshots: SnapshotStore,
        pool: WarmPool,
        records: RecordStore,
        settings: Settings,
        network: NetworkManager | None = None,
    ) -> None:
        self._backend = backend
        self._network = network
        self._catalog = catalog
        self.snapshots = snapshots
        self._pool = pool
        self._records = records
        self.settings = settings
        self._live: dict[str, Sandbox] = {}
        self.lost: dict[str, SandboxRecord] = {}
        self._pending: dict[str, int] = {}  # creations in flight per owner, for limits
        self._deadlines: list[tuple[float, str]] = []
        self._wake = trio.Event()
        self._nursery: trio.Nursery | None = None

    # ----- running the registry -------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load records (paused ones come back, running ones were lost with the old process),
        then expire sandboxes and watch for deaths until cancelled."""
        for record in await trio.to_thread.run_sync(self._records.load_all):
            if record.state == "paused":
                self._live[record.sandbox_id] = Sandbox(record, None)
            else:
                if record.state == "running":
                    record.state = "lost"
                    record.lost_reason = "it was running when the daemon stopped unexpectedly"
                    await self._records.save(record)
                    log.warning("sandbox lost in a crash", extra={"sandbox": record.sandbox_id})
                self.lost[record.sandbox_id] = record
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await self._reap()

    async def shutdown(self) -> None:
        """Pause or kill every running sandbox (per settings) so their records are final."""
        async with trio.open_nursery() as nursery:
            for sandbox in list(self._live.values()):
                if sandbox.record.state == "running":
                    nursery.start_soon(self._stop_on_shutdown, sandbox)

    async def _stop_on_shutdown(self, sandbox: Sandbox) -> None:
        async with sandbox.lock:
            if sandbox.record.state != "running":
                return
            try:
                if self.settings.on_shutdown == "pause":
                    await self._pause(sandbox)
                    return
            except BackendError as exc:
                log.error("pause on shutdown failed; killing", extra={"error": str(exc)})
            await self._destroy(sandbox)

    async def _reap(self) -> None:
        """Expire sandboxes at their deadlines. The heap holds (deadline, id) pushed at every
        change; entries whose deadline has since moved are stale and skipped when they pop."""
        assert self._nursery is not None
        while True:
            now = time.time()
            while self._deadlines and self._deadlines[0][0] <= now:
                end_at, sandbox_id = heapq.heappop(self._deadlines)
                sandbox = self._live.get(sandbox_id)
                if sandbox is None or sandbox.expiring or sandbox.record.end_at != end_at:
                    continue
                if sandbox.record.state == "running":
                    sandbox.expiring = True
                    self._nursery.start_soon(self._expire, sandbox)
            upcoming = self._deadlines[0][0] if self._deadlines else math.inf
            self._wake = trio.Event()
            with trio.move_on_after(upcoming - now):
                await self._wake.wait()

    def _schedule(self, sandbox: Sandbox) -> None:
        """Tell the reaper about a running sandbox's (new) deadline."""
        heapq.heappush(self._deadlines, (sandbox.record.end_at, sandbox.record.sandbox_id))
        self._wake.set()

    async def _expire(self, sandbox: Sandbox) -> None:
        async with sandbox.lock:
            sandbox.expiring = False
            record = sandbox.record
            if record.state != "running" or record.end_at > time.time():
                return  # the timeout moved while we waited for the lock
            log.info("sandbox expired", extra={"sandbox": record.sandbox_id})
            if record.on_timeout == "pause":
                try:
                    await self._pause(sandbox, memory=record.auto_pause_memory)
                    return
                except BackendError as exc:
                    log.error("auto-pause failed; killing", extra={"error": str(exc)})
            await self._destroy(sandbox)

    def _start_watch(self, sandbox: Sandbox) -> None:
        assert self._nursery is not None and sandbox.instance is not None
        sandbox.watch = trio.CancelScope()
        self._nursery.start_soon(self._watch, sandbox, sandbox.instance, sandbox.watch)

    async def _watch(self, sandbox: Sandbox, instance: Instance, scope: trio.CancelScope) -> None:
        with scope:
            death = await self._backend.wait_dead(instance)
        if scope.cancelled_caught:
            return
        async with sandbox.lock:
            if sandbox.instance is not instance:
                return
            sandbox_id = sandbox.record.sandbox_id
            log.warning("sandbox died", extra={"sandbox": sandbox_id, "reason": death.reason})
            _detach(sandbox)
            self._live.pop(sandbox_id, None)
            sandbox.record.state = "lost"
            sandbox.record.lost_reason = death.reason
            self.lost[sandbox_id] = sandbox.record
            await self._records.save_death(sandbox_id, death.report)
            await self._records.save(sandbox.record)
            await self._backend.kill(instance)

    # ----- lookups --------------------------------------------------------------------------

    def all(self) -> list[Sandbox]:
        return list(self._live.values())

    def get(self, sandbox_id: str) -> Sandbox:
        sandbox = self._live.get(sandbox_id)
        if sandbox is not None:
            return sandbox
        lost = self.lost.get(sandbox_id)
        if lost is not None:
            raise LifecycleError(404, f"sandbox {sandbox_id} was lost: {lost.lost_reason}")
        raise LifecycleError(404, f"sandbox {sandbox_id} not found")

    def running(self, sandbox_id: str) -> Sandbox | None:
        """The sandbox if it is running right now (the proxy's lookup; never raises)."""
        sandbox = self._live.get(sandbox_id)
        return sandbox if sandbox is not None and sandbox.instance is not None else None

    def running_count(self, owner: str) -> int:
        return sum(
            1
            for s in self._live.values()
            if s.record.state == "running" and s.record.owner == owner
        )

    @contextmanager
    def _reserve(self, owner: str, limit: int | None, count: int = 1) -> Iterator[None]:
        """Hold ``count`` places under ``owner``'s concurrent-sandbox limit while creating."""
        pending = self._pending.get(owner, 0)
        if limit is not None and self.running_count(owner) + pending + count > limit:
            raise LifecycleError(429, f"concurrent sandbox limit of {limit} reached for this key")
        self._pending[owner] = pending + count
        try:
            yield
        finally:
            self._pending[owner] -= count

    def _timeout(self, timeout: int | None) -> int:
        value = self.settings.default_timeout if timeout is None else timeout
        if value <= 0 or value > self.settings.max_timeout:
            raise LifecycleError(
                400, f"timeout must be between 1 and {self.settings.max_timeout} seconds"
            )
        return value

    # ----- create, kill, timeouts -----------------------------------------------------------

    async def create(self, spec: CreateSpec, owner: str, limit: int | None) -> Sandbox:
        info = self._catalog.lookup(spec.template)
        if info is None:
            raise LifecycleError(404, f"template '{spec.template}' not found")
        if info.image is None:
            raise LifecycleError(400, f"template '{spec.template}' is not ready ({info.status})")
        timeout = self._timeout(spec.timeout)
        with self._reserve(owner, limit):
            sandbox_id, token = new_id(), new_token()
            egress = egress_policy(spec.allow_internet_access, spec.network)
            adopt = partial(self._adopt, sandbox_id=sandbox_id, token=token,
                            env_vars=spec.env_vars, egress=egress)  # fmt: skip
            try:
                instance, reply = await self._pool.take(info.image, adopt)
            except BackendError as exc:
                raise LifecycleError(500, f"failed to start sandbox: {exc}") from exc
            now = time.time()
            record = SandboxRecord(
                sandbox_id=sandbox_id,
                template_id=info.template_id,
                alias=info.alias,
                state="running",
                started_at=now,
                end_at=now + timeout,
                resources=instance.resources,
                envd_version=reply.envd_version or info.image.envd_version,
                access_token=token,
                traffic_token=new_token() if spec.private_traffic else None,
                on_timeout=spec.on_timeout,
                auto_pause_memory=spec.auto_pause_memory,
                auto_resume=spec.auto_resume,
                metadata=spec.metadata,
                env_vars=spec.env_vars,
                owner=owner,
                allow_internet_access=spec.allow_internet_access,
                network=spec.network,
            )
            with trio.CancelScope(shield=True):
                return await self._register(record, instance)

    async def _adopt(
        self,
        instance: Instance,
        sandbox_id: str,
        token: str,
        env_vars: dict[str, str],
        egress: EgressPolicy,
    ) -> Reply:
        """Make a started, resumed or forked sandbox ``sandbox_id``: open its network slot
        under ``egress``, then push the identity (with eth0's addresses). A sandbox that fails
        either is killed (so its slot goes back) and BackendError raised."""
        lease = instance.network
        if lease is not None and self._network is not None:
            try:
                await self._network.assign(lease, sandbox_id, egress)
            except BaseException as exc:
                with trio.CancelScope(shield=True):
                    await self._backend.kill(instance)
                if isinstance(exc, Exception):  # a kernel refusal, a bad policy: this sandbox's
                    raise BackendError(f"cannot give the sandbox its network: {exc}") from exc
                raise
        network = lease.guest if lease is not None else None
        identity = identity_for(sandbox_id, token, env_vars, network)
        return await push_identity(self._backend, instance, identity)

    async def _register(self, record: SandboxRecord, instance: Instance) -> Sandbox:
        sandbox = Sandbox(record, instance)
        self._live[record.sandbox_id] = sandbox
        try:
            await self._records.save(record)
        except OSError:
            self._live.pop(record.sandbox_id, None)
            await self._backend.kill(instance)
            raise
        self._start_watch(sandbox)
        self._schedule(sandbox)
        return sandbox

    async def kill(self, sandbox_id: str) -> None:
        if sandbox_id in self.lost:
            self.lost.pop(sandbox_id)
            with trio.CancelScope(shield=True):
                await self._backend.discard(self._records.pause_folder(sandbox_id))
                await self._records.remove(sandbox_id)
            return
        sandbox = self.get(sandbox_id)
        async with sandbox.lock:
            if self._live.get(sandbox_id) is not sandbox:
                raise LifecycleError(404, f"sandbox {sandbox_id} not found")
            await self._destroy(sandbox)

    async def _destroy(self, sandbox: Sandbox) -> None:
        with trio.CancelScope(shield=True):
            instance = _detach(sandbox)
            if instance is not None:
                await self._backend.kill(instance)
            else:
                await self._backend.discard(self._records.pause_folder(sandbox.record.sandbox_id))
            self._live.pop(sandbox.record.sandbox_id, None)
            await self._records.remove(sandbox.record.sandbox_id)

    def _running(self, sandbox_id: str) -> Sandbox:
        """A running sandbox; paused ones are "not found" for calls that need a live guest,
        as in E2B."""
        sandbox = self.get(sandbox_id)
        if sandbox.record.state != "running":
            raise LifecycleError(404, f"sandbox {sandbox_id} is paused")
        return sandbox

    async def set_timeout(self, sandbox_id: str, timeout: int) -> None:
        """Expiry becomes now + timeout (it may shorten; negative counts as zero)."""
        if timeout > self.settings.max_timeout:
            raise LifecycleError(
                400, f"timeout must be at most {self.settings.max_timeout} seconds"
            )
        sandbox = self._running(sandbox_id)
        await self._move_deadline(sandbox, time.time() + max(timeout, 0))

    async def extend(self, sandbox_id: str, seconds: int) -> None:
        """Keep a running sandbox alive at least ``seconds`` more (never shortens)."""
        sandbox = self._running(sandbox_id)
        timeout = self._timeout(seconds)
        await self._move_deadline(sandbox, max(sandbox.record.end_at, time.time() + timeout))

    async def _move_deadline(self, sandbox: Sandbox, end_at: float) -> None:
        async with sandbox.lock:
            sandbox.record.end_at = end_at
            await self._records.save(sandbox.record)
            self._schedule(sandbox)

    async def update_network(
        self, sandbox_id: str, network: dict[str, object], internet: bool | None
    ) -> None:
        """Replace the sandbox's allow/deny lists (``internet`` None keeps its
        ``allow_internet_access``). A running sandbox's filter follows at once; a paused one
        gets the new rules when it resumes."""
        sandbox = self.get(sandbox_id)
        async with sandbox.lock:
            record = sandbox.record
            record.network = network
            if internet is not None:
                record.allow_internet_access = internet
            await self._records.save(record)
            if self._network is not None and self._network.has_network(sandbox_id):
                try:
                    self._network.update_policy(sandbox_id, record_egress(record))
                except (NetworkError, PolicyError) as exc:
                    raise LifecycleError(400, str(exc)) from exc

    def network_stats(self, sandbox_id: str) -> NetStats:
        """Counters and recent drops of a running sandbox's egress filter."""
        sandbox = self.get(sandbox_id)
        if self._network is None or not self._network.has_network(sandbox_id):
            state = "is paused" if sandbox.record.state == "paused" else "has no network"
            raise LifecycleError(409, f"sandbox {sandbox_id} {state}")
        return self._network.stats(sandbox_id)

    # ----- pause, resume, connect -----------------------------------------------------------

    async def pause(
        self, sandbox_id: str, require_healthy: bool = False, memory: bool = True
    ) -> None:
        sandbox = self.get(sandbox_id)
        async with sandbox.lock:
            if sandbox.record.state == "paused":
                raise LifecycleError(409, f"sandbox {sandbox_id} is already paused")
            try:
                await self._pause(sandbox, require_healthy, memory)
            except BackendError as exc:
                raise LifecycleError(500, f"failed to pause sandbox: {exc}") from exc

    async def _pause(
        self, sandbox: Sandbox, require_healthy: bool = False, memory: bool = True
    ) -> None:
        """Caller holds the lock and has checked the sandbox runs.

        The sandbox reads as paused from the moment its pause begins, as E2B reports a pausing
        sandbox: it serves nothing any more, and a connect (waiting on the lock) resumes it.
        A pause that fails leaves it running. Without `memory` (filesystem-only) the backend
        still pauses it whole; its resume then reboots it (Backend.resume).
        """
        instance = sandbox.instance
        assert instance is not None
        sandbox_id = sandbox.record.sandbox_id
        with trio.CancelScope(shield=True):
            try:
                reply = await self._backend.control(instance, Prepare())
                if not reply.ok:
                    raise BackendError(reply.error or "prepare failed")
            except BackendError as exc:
                if require_healthy:
                    raise LifecycleError(409, f"guest is unhealthy: {exc}") from exc
                log.warning("prepare before pause failed", extra={"sandbox": sandbox_id})
            folder = self._records.pause_folder(sandbox_id)
            await trio.to_thread.run_sync(shutil.rmtree, folder, True)
            folder.mkdir(parents=True)
            _detach(sandbox)
            sandbox.record.state = "paused"
            sandbox.record.paused_memory = memory
            try:
                await self._backend.pause(instance, folder)
            except BackendError:
                sandbox.record.state = "running"
                sandbox.instance = instance  # still running: the caller decides (kill or report)
                self._start_watch(sandbox)
                raise
            await self._records.save(sandbox.record)
        log.info("sandbox paused", extra={"sandbox": sandbox_id})

    async def connect(
        self, sandbox_id: str, timeout: int | None, memory: bool = True
    ) -> tuple[Sandbox, bool]:
        """Resume a paused sandbox (rebooting it if either its pause or this call is without
        `memory`), or extend a running one's deadline (connect never shortens it). True when
        it was resumed."""
        sandbox = self.get(sandbox_id)
        seconds = self._timeout(timeout)
        async with sandbox.lock:
            if sandbox.record.state == "running":
                sandbox.record.end_at = max(sandbox.record.end_at, time.time() + seconds)
                await self._records.save(sandbox.record)
                self._schedule(sandbox)
                return sandbox, False
            await self._resume(sandbox, seconds, memory)
            return sandbox, True

    async def resume(self, sandbox_id: str, timeout: int | None) -> Sandbox:
        """The deprecated resume call: only for paused sandboxes."""
        sandbox = self.get(sandbox_id)
        seconds = self._timeout(timeout)
        async with sandbox.lock:
            if sandbox.record.state == "running":
                raise LifecycleError(409, f"sandbox {sandbox_id} is already running")
            await self._resume(sandbox, seconds)
            return sandbox

    async def wake(self, sandbox_id: str) -> Sandbox | None:
        """For the proxy: the running sandbox, resuming it first if it is paused with
        auto-resume; None when there is nothing to route to."""
        sandbox = self._live.get(sandbox_id)
        if sandbox is None or sandbox.instance is not None or not sandbox.record.auto_resume:
            return self.running(sandbox_id)
        async with sandbox.lock:
            if sandbox.record.state == "paused":
                try:
                    await self._resume(sandbox, self.settings.default_timeout)
                except LifecycleError:
                    return None
        return self.running(sandbox_id)

    async def _resume(self, sandbox: Sandbox, timeout: int, memory: bool = True) -> None:
        record = sandbox.record
        folder = self._records.pause_folder(record.sandbox_id)
        with trio.CancelScope(shield=True):
            try:
                instance = await self._backend.resume(folder, memory and record.paused_memory)
            except BackendError as exc:
                raise LifecycleError(500, f"failed to resume sandbox: {exc}") from exc
            try:
                await self._adopt(
                    instance, record.sandbox_id, record.access_token, record.env_vars,
                    record_egress(record),
                )  # fmt: skip
            except BackendError as exc:
                raise LifecycleError(500, f"resumed sandbox did not answer: {exc}") from exc
            sandbox.instance = instance
            record.state = "running"
            record.end_at = time.time() + timeout
            await self._records.save(record)
            await trio.to_thread.run_sync(shutil.rmtree, folder, True)
            self._start_watch(sandbox)
            self._schedule(sandbox)
        log.info("sandbox resumed", extra={"sandbox": record.sandbox_id})

    # ----- fork and snapshots ---------------------------------------------------------------

    async def fork(
        self, sandbox_id: str, count: int, timeout: int | None, owner: str, limit: int | None
    ) -> list[Sandbox | LifecycleError]:
        """``count`` copies of a running sandbox, each with its own id, token and deadline;
        a copy that fails to take its identity is reported in its place."""
        source = self._running(sandbox_id)
        seconds = self._timeout(timeout)
        with self._reserve(owner, limit, count):
            async with source.lock:
                if source.instance is None:
                    raise LifecycleError(409, f"sandbox {sandbox_id} is paused")
                try:
                    instances = await self._backend.fork(source.instance, count)
                except BackendError as exc:
                    raise LifecycleError(500, f"failed to fork sandbox: {exc}") from exc
            results: list[Sandbox | LifecycleError] = []
            with trio.CancelScope(shield=True):
                for instance in instances:
                    results.append(await self._adopt_fork(source.record, instance, seconds, owner))
        return results

    async def _adopt_fork(
        self, source: SandboxRecord, instance: Instance, timeout: int, owner: str
    ) -> Sandbox | LifecycleError:
        sandbox_id, token = new_id(), new_token()
        try:
            await self._adopt(instance, sandbox_id, token, source.env_vars, record_egress(source))
        except BackendError as exc:
            return LifecycleError(500, f"fork did not take its identity: {exc}")
        now = time.time()
        record = msgspec.structs.replace(
            source,
            sandbox_id=sandbox_id,
            access_token=token,
            traffic_token=new_token() if source.traffic_token else None,
            started_at=now,
            end_at=now + timeout,
            owner=owner,
            metadata=dict(source.metadata),
            env_vars=dict(source.env_vars),
        )
        return await self._register(record, instance)

    async def snapshot(self, sandbox_id: str, name: str | None) -> SnapshotRecord:
        sandbox = self._running(sandbox_id)
        snapshot_id = new_id()
        folder = self.snapshots.image_folder(snapshot_id)
        async with sandbox.lock:
            if sandbox.instance is None:
                raise LifecycleError(409, f"sandbox {sandbox_id} is paused")
            with trio.CancelScope(shield=True):
                try:
                    await self._backend.control(sandbox.instance, Prepare())
                    folder.mkdir(parents=True)
                    await self._backend.snapshot(sandbox.instance, folder)
                except BackendError as exc:
                    await self.snapshots.discard(snapshot_id)
                    raise LifecycleError(500, f"failed to snapshot sandbox: {exc}") from exc
                record = SnapshotRecord(
                    snapshot_id=snapshot_id,
                    names=[name] if name else [],
                    sandbox_id=sandbox_id,
                    template_id=sandbox.record.template_id,
                    created_at=time.time(),
                    resources=sandbox.record.resources,
                    envd_version=sandbox.record.envd_version,
                )
                await self.snapshots.add(record)
        return record

    # ----- observation ----------------------------------------------------------------------

    async def metrics(self, sandbox_id: str) -> Metrics | None:
        """The guest's current usage, or None while paused."""
        sandbox = self.get(sandbox_id)
        if sandbox.instance is None:
            return None
        try:
            reply = await self._backend.control(sandbox.instance, GetMetrics())
        except BackendError as exc:
            raise LifecycleError(500, f"failed to read metrics: {exc}") from exc
        return reply.metrics

    async def logs(self, sandbox_id: str, limit: int) -> tuple[list[str], list[str]]:
        """(console lines, agent log lines), oldest first; empty while paused. A sandbox that
        died by itself answers with its death report (cube.vmm.crash_report) as its console."""
        if sandbox_id in self.lost:
            report = await trio.to_thread.run_sync(self._records.death, sandbox_id)
            return report[-limit:] if limit > 0 else [], []
        sandbox = self.get(sandbox_id)
        if sandbox.instance is None:
            return [], []
        try:
            console = await self._backend.console(sandbox.instance, limit)
            reply = await self._backend.control(sandbox.instance, GetLogs(limit=limit))
        except BackendError as exc:
            raise LifecycleError(500, f"failed to read logs: {exc}") from exc
        return console, reply.logs or []
