"""Sandbox records rendered as the E2B response shapes."""

from __future__ import annotations

from datetime import UTC, datetime

from cube.api.schemas import Lifecycle, ListedSandbox, SandboxDetail, SandboxMetric, SandboxOut
from cube.guest.wire import Metrics
from cube.pool.records import SandboxRecord
from cube.pool.sandboxes import Sandbox

CLIENT_ID = "cube"  # deprecated in E2B but required in responses


def rfc3339(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).isoformat().replace("+00:00", "Z")


def sandbox_out(sandbox: Sandbox, domain: str | None) -> SandboxOut:
    record = sandbox.record
    return SandboxOut(
        template_id=record.template_id,
        sandbox_id=record.sandbox_id,
        client_id=CLIENT_ID,
        envd_version=record.envd_version,
        alias=record.alias,
        envd_access_token=record.access_token,
        traffic_access_token=record.traffic_token,
        domain=domain,
    )


def _listed_fields(record: SandboxRecord) -> dict[str, object]:
    return {
        "template_id": record.template_id,
        "sandbox_id": record.sandbox_id,
        "client_id": CLIENT_ID,
        "started_at": rfc3339(record.started_at),
        "end_at": rfc3339(record.end_at),
        "envd_version": record.envd_version,
        "cpu_count": record.resources.cpu_count,
        "memory_mb": record.resources.memory_mb,
        "disk_size_mb": record.resources.disk_mb,
        "state": "paused" if record.state == "paused" else "running",
        "alias": record.alias,
        "metadata": record.metadata,
    }


def listed(sandbox: Sandbox) -> ListedSandbox:
    return ListedSandbox(**_listed_fields(sandbox.record))  # type: ignore[arg-type]


def detail(sandbox: Sandbox, domain: str | None) -> SandboxDetail:
    record = sandbox.record
    return SandboxDetail(
        **_listed_fields(record),  # type: ignore[arg-type]
        envd_access_token=record.access_token,
        allow_internet_access=record.allow_internet_access,
        domain=domain,
        lifecycle=Lifecycle(auto_resume=record.auto_resume, on_timeout=record.on_timeout),
        network=record.network,
    )


def metric(metrics: Metrics) -> SandboxMetric:
    return SandboxMetric(
        timestamp=rfc3339(metrics.timestamp_unix),
        timestamp_unix=metrics.timestamp_unix,
        cpu_count=metrics.cpu_count,
        cpu_used_pct=metrics.cpu_used_pct,
        mem_used=metrics.mem_used,
        mem_total=metrics.mem_total,
        mem_cache=metrics.mem_cache,
        disk_used=metrics.disk_used,
        disk_total=metrics.disk_total,
    )
