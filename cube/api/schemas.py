"""The E2B control-plane JSON, as msgspec Structs with the exact wire keys.

Requests are decoded strictly (wrong types are a 400) but tolerate unknown keys, since newer
SDKs add fields. Responses omit None-valued optional keys, which the SDK reads as "unset".
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

SandboxStateName = Literal["running", "paused"]


class AutoResume(msgspec.Struct, frozen=True):
    enabled: bool = False


class NetworkConfig(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """SandboxNetworkConfig (create) and SandboxNetworkUpdateConfig (PUT .../network)."""

    allow_out: list[str] | None = msgspec.field(name="allowOut", default=None)
    deny_out: list[str] | None = msgspec.field(name="denyOut", default=None)
    dns_servers: list[str] | None = msgspec.field(name="dnsServers", default=None)
    allow_public_traffic: bool | None = msgspec.field(name="allowPublicTraffic", default=None)
    mask_request_host: str | None = msgspec.field(name="maskRequestHost", default=None)
    https_ports: list[int] | None = msgspec.field(name="httpsPorts", default=None)
    egress_proxy: dict[str, Any] | None = msgspec.field(name="egressProxy", default=None)
    rules: dict[str, Any] | None = None
    allow_internet_access: bool | None = None


class NewSandbox(msgspec.Struct, frozen=True, kw_only=True):
    """Both NewSandboxV2 and v1 NewSandbox (which adds ``secure``, ignored: envd access is
    always secured)."""

    template_id: str = msgspec.field(name="templateID")
    timeout: int | None = None
    auto_pause: bool = msgspec.field(name="autoPause", default=False)
    auto_pause_memory: bool | None = msgspec.field(name="autoPauseMemory", default=None)
    auto_resume: AutoResume | None = msgspec.field(name="autoResume", default=None)
    allow_internet_access: bool | None = None
    network: NetworkConfig | None = None
    metadata: dict[str, str] | None = None
    env_vars: dict[str, str] | None = msgspec.field(name="envVars", default=None)
    secure: bool | None = None


class Connect(msgspec.Struct, frozen=True):
    timeout: int | None = None
    memory: bool | None = None


class Timeout(msgspec.Struct, frozen=True):
    timeout: int


class Refresh(msgspec.Struct, frozen=True):
    duration: int | None = None


class Pause(msgspec.Struct, frozen=True, kw_only=True):
    memory: bool | None = None
    require_healthy_guest: bool = msgspec.field(name="requireHealthyGuest", default=False)


class Resume(msgspec.Struct, frozen=True, kw_only=True):
    timeout: int | None = None
    auto_pause: bool | None = msgspec.field(name="autoPause", default=None)


class Fork(msgspec.Struct, frozen=True):
    timeout: int | None = None
    count: int = 1


class SnapshotRequest(msgspec.Struct, frozen=True):
    name: str | None = None
    memory: bool | None = None


class SandboxOut(msgspec.Struct, kw_only=True, omit_defaults=True):
    template_id: str = msgspec.field(name="templateID")
    sandbox_id: str = msgspec.field(name="sandboxID")
    client_id: str = msgspec.field(name="clientID")
    envd_version: str = msgspec.field(name="envdVersion")
    alias: str | None = None
    envd_access_token: str | None = msgspec.field(name="envdAccessToken", default=None)
    traffic_access_token: str | None = msgspec.field(name="trafficAccessToken", default=None)
    domain: str | None = None


class Lifecycle(msgspec.Struct, kw_only=True):
    auto_resume: bool = msgspec.field(name="autoResume")
    on_timeout: str = msgspec.field(name="onTimeout")


class ListedSandbox(msgspec.Struct, kw_only=True, omit_defaults=True):
    template_id: str = msgspec.field(name="templateID")
    sandbox_id: str = msgspec.field(name="sandboxID")
    client_id: str = msgspec.field(name="clientID")
    started_at: str = msgspec.field(name="startedAt")
    end_at: str = msgspec.field(name="endAt")
    envd_version: str = msgspec.field(name="envdVersion")
    cpu_count: int = msgspec.field(name="cpuCount")
    memory_mb: int = msgspec.field(name="memoryMB")
    disk_size_mb: int = msgspec.field(name="diskSizeMB")
    state: SandboxStateName
    alias: str | None = None
    metadata: dict[str, str] | None = None


class SandboxDetail(ListedSandbox, kw_only=True, omit_defaults=True):
    envd_access_token: str | None = msgspec.field(name="envdAccessToken", default=None)
    allow_internet_access: bool | None = msgspec.field(name="allowInternetAccess", default=None)
    domain: str | None = None
    lifecycle: Lifecycle | None = None
    network: dict[str, Any] | None = None


class SandboxMetric(msgspec.Struct, kw_only=True):
    timestamp: str
    timestamp_unix: int = msgspec.field(name="timestampUnix")
    cpu_count: int = msgspec.field(name="cpuCount")
    cpu_used_pct: float = msgspec.field(name="cpuUsedPct")
    mem_used: int = msgspec.field(name="memUsed")
    mem_total: int = msgspec.field(name="memTotal")
    mem_cache: int = msgspec.field(name="memCache")
    disk_used: int = msgspec.field(name="diskUsed")
    disk_total: int = msgspec.field(name="diskTotal")


class ForkResult(msgspec.Struct, omit_defaults=True):
    sandbox: SandboxOut | None = None
    error: dict[str, Any] | None = None


class SnapshotInfo(msgspec.Struct):
    snapshot_id: str = msgspec.field(name="snapshotID")
    names: list[str] = []


class LogLine(msgspec.Struct):
    timestamp: str
    line: str


class LogEntry(msgspec.Struct):
    timestamp: str
    message: str
    level: str
    fields: dict[str, str]


class SandboxLogs(msgspec.Struct):
    logs: list[LogLine]
    log_entries: list[LogEntry] = msgspec.field(name="logEntries")


class SandboxLogsV2(msgspec.Struct):
    logs: list[LogEntry]
