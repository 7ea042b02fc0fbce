"""The E2B control-plane endpoints (protocol doc §1.2), one thin handler each.

Handlers decode and validate with msgspec, call the lifecycle, and render with views.py; every
refusal surfaces as an ApiError or LifecycleError, which the app turns into ``{code, message}``.
"""

from __future__ import annotations

import time
from typing import TypeVar

import msgspec
from quart import Blueprint, Response, g, request

from cube.api import listing, views
from cube.api.context import ApiContext
from cube.api.errors import ApiError, error_response, json_response
from cube.api.schemas import (
    Connect,
    Fork,
    ForkResult,
    LogEntry,
    LogLine,
    NetworkConfig,
    NewSandbox,
    Pause,
    Refresh,
    Resume,
    SandboxLogs,
    SandboxLogsV2,
    SnapshotInfo,
    SnapshotRequest,
    Timeout,
)
from cube.net.policy import EgressPolicy, PolicyError, compile_policy
from cube.pool.sandboxes import CreateSpec, LifecycleError

T = TypeVar("T")
MAX_FORKS = 20
DEFAULT_LOG_LINES = 200
NO_CONTENT = 204


def _empty(status: int) -> Response:
    return Response(b"", status=status)


async def _body(kind: type[T]) -> T:
    data = await request.get_data()
    try:
        return msgspec.json.decode(data or b"{}", type=kind)
    except msgspec.ValidationError as exc:
        raise ApiError(400, f"invalid request body: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise ApiError(400, "request body is not valid JSON") from exc


def _int_arg(name: str) -> int | None:
    value = request.args.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ApiError(400, f"{name} must be an integer") from None


def _network(config: NetworkConfig | None, internet: bool | None) -> dict[str, object] | None:
    """Check the egress rules as E2B does (400 on a bad entry) and return them for storage."""
    if config is None and internet is None:
        return None
    config = config or NetworkConfig()
    policy = EgressPolicy(
        allow_internet_access=internet if internet is not None else True,
        allow_out=tuple(config.allow_out or ()),
        deny_out=tuple(config.deny_out or ()),
    )
    try:
        compile_policy(policy)
    except PolicyError as exc:
        raise ApiError(400, str(exc)) from exc
    return msgspec.to_builtins(config)


def build_routes(ctx: ApiContext) -> Blueprint:
    bp = Blueprint("e2b", __name__)
    sandboxes = ctx.sandboxes

    @bp.before_request
    async def authenticate() -> Response | None:
        key = ctx.keys.verify(request.headers.get("X-API-Key"))
        if key is None:
            return error_response(401, "Invalid API key")
        g.api_key = key
        return None

    # ----- create, get, list, kill --------------------------------------------------------

    @bp.post("/sandboxes")
    @bp.post("/v2/sandboxes")
    async def create() -> Response:
        body = await _body(NewSandbox)
        started = time.perf_counter()
        spec = CreateSpec(
            template=body.template_id,
            timeout=body.timeout,
            metadata=body.metadata or {},
            env_vars=body.env_vars or {},
            on_timeout="pause" if body.auto_pause else "kill",
            auto_pause_memory=body.auto_pause_memory is not False,
            auto_resume=bool(body.auto_resume and body.auto_resume.enabled),
            allow_internet_access=body.allow_internet_access,
            network=_network(body.network, body.allow_internet_access),
            private_traffic=body.network is not None and body.network.allow_public_traffic is False,
        )
        try:
            sandbox = await sandboxes.create(spec, g.api_key.key_id, ctx.limit_for(g.api_key))
        except LifecycleError:
            ctx.metrics.events["create_failed"] += 1
            raise
        ctx.metrics.create_seconds.observe(time.perf_counter() - started)
        ctx.metrics.events["created"] += 1
        return json_response(views.sandbox_out(sandbox, ctx.domain), 201)

    @bp.get("/sandboxes/<sandbox_id>")
    async def get_sandbox(sandbox_id: str) -> Response:
        return json_response(views.detail(sandboxes.get(sandbox_id), ctx.domain))

    @bp.get("/sandboxes")
    async def list_v1() -> Response:
        metadata = listing.parse_metadata(request.args.get("metadata"))
        found = [
            s for s in sandboxes.all() if listing.matches(s, metadata, {"running"}, None, None)
        ]
        return json_response([views.listed(s) for s in found])

    @bp.get("/v2/sandboxes")
    async def list_v2() -> Response:
        args = request.args
        metadata = listing.parse_metadata(args.get("metadata"))
        states = listing.parse_states(args.get("state"))
        started_after = listing.parse_time(args.get("startedAfter"))
        template = args.get("template") or None
        descending = listing.parse_order(args.get("order"))
        limit = listing.parse_limit(args.get("limit"))
        found = [
            s
            for s in sandboxes.all()
            if listing.matches(s, metadata, states, started_after, template)
        ]
        chunk, token = listing.page(
            found,
            lambda s: (s.record.started_at, s.record.sandbox_id),
            descending,
            limit,
            args.get("nextToken"),
        )
        headers = {"X-Next-Token": token} if token else {}
        return json_response([views.listed(s) for s in chunk], headers=headers)

    @bp.delete("/sandboxes/<sandbox_id>")
    async def kill(sandbox_id: str) -> Response:
        await sandboxes.kill(sandbox_id)
        ctx.metrics.events["killed"] += 1
        return _empty(NO_CONTENT)

    # ----- timeouts, connect, pause, resume -----------------------------------------------

    @bp.post("/sandboxes/<sandbox_id>/timeout")
    async def set_timeout(sandbox_id: str) -> Response:
        body = await _body(Timeout)
        await sandboxes.set_timeout(sandbox_id, body.timeout)
        return _empty(NO_CONTENT)

    @bp.post("/sandboxes/<sandbox_id>/refreshes")
    async def refresh(sandbox_id: str) -> Response:
        body = await _body(Refresh)
        if body.duration is not None and not 0 <= body.duration <= 3600:
            raise ApiError(400, "duration must be between 0 and 3600 seconds")
        await sandboxes.extend(sandbox_id, body.duration or sandboxes.settings.default_timeout)
        return _empty(NO_CONTENT)

    @bp.post("/sandboxes/<sandbox_id>/connect")
    @bp.post("/v2/sandboxes/<sandbox_id>/connect")
    async def connect(sandbox_id: str) -> Response:
        body = await _body(Connect)
        sandbox, resumed = await sandboxes.connect(
            sandbox_id, body.timeout, memory=body.memory is not False
        )
        return json_response(views.sandbox_out(sandbox, ctx.domain), 201 if resumed else 200)

    @bp.post("/sandboxes/<sandbox_id>/pause")
    async def pause(sandbox_id: str) -> Response:
        body = await _body(Pause)
        await sandboxes.pause(sandbox_id, body.require_healthy_guest, body.memory is not False)
        return _empty(NO_CONTENT)

    @bp.post("/sandboxes/<sandbox_id>/resume")
    async def resume(sandbox_id: str) -> Response:
        body = await _body(Resume)
        sandbox = await sandboxes.resume(sandbox_id, body.timeout)
        return json_response(views.sandbox_out(sandbox, ctx.domain), 201)

    @bp.put("/sandboxes/<sandbox_id>/network")
    async def update_network(sandbox_id: str) -> Response:
        """The lists are replaced as given (an omitted list becomes empty); an omitted
        allow_internet_access keeps the sandbox's current setting."""
        body = await _body(NetworkConfig)
        network = _network(body, body.allow_internet_access)
        await sandboxes.update_network(sandbox_id, network or {}, body.allow_internet_access)
        return _empty(NO_CONTENT)

    @bp.get("/sandboxes/<sandbox_id>/network")
    async def network_stats(sandbox_id: str) -> Response:
        """Cube's own: the egress filter's counters and its newest drops (what, when, why)."""
        return json_response(sandboxes.network_stats(sandbox_id))

    # ----- fork and snapshots -------------------------------------------------------------

    @bp.post("/sandboxes/<sandbox_id>/fork")
    async def fork(sandbox_id: str) -> Response:
        body = await _body(Fork)
        if not 1 <= body.count <= MAX_FORKS:
            raise ApiError(400, f"count must be between 1 and {MAX_FORKS}")
        results = await sandboxes.fork(
            sandbox_id, body.count, body.timeout, g.api_key.key_id, ctx.limit_for(g.api_key)
        )
        out = [
            ForkResult(error={"code": r.status, "message": r.message})
            if isinstance(r, LifecycleError)
            else ForkResult(sandbox=views.sandbox_out(r, ctx.domain))
            for r in results
        ]
        return json_response(out, 201)

    @bp.post("/sandboxes/<sandbox_id>/snapshots")
    async def create_snapshot(sandbox_id: str) -> Response:
        body = await _body(SnapshotRequest)
        record = await sandboxes.snapshot(sandbox_id, body.name)
        return json_response(SnapshotInfo(snapshot_id=record.snapshot_id, names=record.names), 201)

    @bp.get("/snapshots")
    async def list_snapshots() -> Response:
        args = request.args
        found = sandboxes.snapshots.list(args.get("sandboxID") or None, args.get("name") or None)
        chunk, token = listing.page(
            found,
            lambda r: (r.created_at, r.snapshot_id),
            False,
            listing.parse_limit(args.get("limit")),
            args.get("nextToken"),
        )
        headers = {"X-Next-Token": token} if token else {}
        body = [SnapshotInfo(snapshot_id=r.snapshot_id, names=r.names) for r in chunk]
        return json_response(body, headers=headers)

    @bp.delete("/templates/<path:template_id>")
    async def delete_template(template_id: str) -> Response:
        """Deletes snapshots; templates themselves are managed with `cube template`."""
        if await sandboxes.snapshots.remove(template_id):
            return _empty(NO_CONTENT)
        raise ApiError(404, f"snapshot '{template_id}' not found")

    # ----- metrics and logs ---------------------------------------------------------------

    @bp.get("/sandboxes/<sandbox_id>/metrics")
    async def sandbox_metrics(sandbox_id: str) -> Response:
        start, end = _int_arg("start"), _int_arg("end")
        sample = await sandboxes.metrics(sandbox_id)
        in_range = (
            sample is not None
            and (start is None or sample.timestamp_unix >= start)
            and (end is None or sample.timestamp_unix <= end)
        )
        return json_response([views.metric(sample)] if in_range and sample else [])

    @bp.get("/sandboxes/metrics")
    async def many_metrics() -> Response:
        ids = [i for i in (request.args.get("sandbox_ids") or "").split(",") if i]
        out = {}
        for sandbox_id in ids:
            sample = await sandboxes.metrics(sandbox_id)
            if sample is not None:
                out[sandbox_id] = views.metric(sample)
        return json_response({"sandboxes": out})

    async def _log_entries(sandbox_id: str) -> list[LogEntry]:
        limit = _int_arg("limit") or DEFAULT_LOG_LINES
        console, agent = await sandboxes.logs(sandbox_id, limit)
        now = views.rfc3339(time.time())
        return [
            LogEntry(timestamp=now, message=line, level="info", fields={"source": source})
            for source, lines in (("console", console), ("agent", agent))
            for line in lines
        ]

    @bp.get("/sandboxes/<sandbox_id>/logs")
    async def logs_v1(sandbox_id: str) -> Response:
        entries = await _log_entries(sandbox_id)
        lines = [LogLine(timestamp=e.timestamp, line=e.message) for e in entries]
        return json_response(SandboxLogs(logs=lines, log_entries=entries))

    @bp.get("/v2/sandboxes/<sandbox_id>/logs")
    async def logs_v2(sandbox_id: str) -> Response:
        return json_response(SandboxLogsV2(logs=await _log_entries(sandbox_id)))

    return bp
