"""The contract between the daemon and the agent inside each guest, over virtio-vsock.

The guest has no network path to the host for control traffic: everything the daemon says to a
sandbox arrives on one of two vsock ports the agent listens on.

- RELAY_PORT carries sandbox traffic (envd on 49983, the code interpreter on 49999, any user
  server). The host opens a connection and sends one line, ``CONNECT <tcp port>\\n``; the agent
  answers ``OK\\n`` and from then on splices the connection to ``127.0.0.1:<tcp port>`` inside the
  guest, or answers ``ERR <reason>\\n`` and closes (nothing listens there, bad line). One relay
  format for every port keeps the proxy generic: it never needs to know what a port speaks.
- CONTROL_PORT carries the daemon's requests to the agent itself, one JSON message per line
  (msgspec tagged unions below), each answered by one Reply line. The most important is
  Refresh, pushed after every restore from a snapshot so that clones of one template never share
  a token, hostname, machine-id, random state, address or a stale wall clock.

The same agent can listen on TCP or a Unix socket instead of vsock (tests run it as a host
process); the formats do not change.
"""

from __future__ import annotations

import msgspec

RELAY_PORT = 1024
CONTROL_PORT = 1025
ENVD_PORT = 49983
INTERPRETER_PORT = 49999

MAX_LINE = 4096  # a relay request or a control reply header never needs more
MAX_CONTROL_MESSAGE = 1 << 20  # env vars and a CA bundle fit; anything bigger is refused


class RelayError(Exception):
    """A relay request line that is not ``CONNECT <port>`` with 1 <= port <= 65535."""


def relay_request(port: int) -> bytes:
    if not 1 <= port <= 65535:
        raise RelayError(f"port {port} is out of range")
    return b"CONNECT %d\n" % port


def parse_relay_request(line: bytes) -> int:
    """The guest TCP port a relay request names; raises RelayError for anything else."""
    verb, _, rest = line.rstrip(b"\n").partition(b" ")
    if verb != b"CONNECT" or not rest.isdigit() or len(rest) > 5:
        raise RelayError(f"bad relay request {line[:64]!r}")
    port = int(rest)
    if not 1 <= port <= 65535:
        raise RelayError(f"port {port} is out of range")
    return port


RELAY_OK = b"OK\n"


class NetConfig(msgspec.Struct, frozen=True, kw_only=True):
    """eth0's addresses in CIDR form (``10.11.0.2/30``), gateways, DNS resolvers and MAC."""

    address: str
    gateway: str
    dns: list[str] = []
    mac: str | None = None
    address6: str | None = None
    gateway6: str | None = None


class Identity(msgspec.Struct, frozen=True, kw_only=True):
    """Who this guest is, pushed after boot and after every restore.

    ``wall_clock_ns`` is the host's CLOCK_REALTIME when the message was built; ``rng_seed`` is
    fresh host randomness credited to the guest kernel's pool (so clones do not replay the
    template's random stream). ``access_token`` None means envd access is not secured.
    """

    sandbox_id: str
    hostname: str
    machine_id: str
    wall_clock_ns: int
    rng_seed: bytes
    access_token: str | None = None
    env_vars: dict[str, str] = {}
    default_user: str = "user"
    default_workdir: str | None = None
    network: NetConfig | None = None


class Ping(msgspec.Struct, tag="ping", frozen=True):
    pass


class Refresh(msgspec.Struct, tag="refresh", frozen=True):
    identity: Identity


class GetMetrics(msgspec.Struct, tag="metrics", frozen=True):
    pass


class GetLogs(msgspec.Struct, tag="logs", frozen=True):
    """The agent's own recent log lines (bounded), newest last."""

    limit: int = 200


class Prepare(msgspec.Struct, tag="prepare", frozen=True):
    """About to be paused or snapshotted: sync filesystems so the disk overlay is consistent."""


ControlRequest = Ping | Refresh | GetMetrics | GetLogs | Prepare


class Metrics(msgspec.Struct, frozen=True, kw_only=True):
    """What envd's /metrics reports, in bytes and percent."""

    timestamp_unix: int
    cpu_count: int
    cpu_used_pct: float
    mem_total: int
    mem_used: int
    mem_cache: int
    disk_total: int
    disk_used: int


class Reply(msgspec.Struct, frozen=True, kw_only=True):
    """ok False carries a human-readable error; data depends on the request."""

    ok: bool
    error: str | None = None
    envd_version: str | None = None
    metrics: Metrics | None = None
    logs: list[str] | None = None


control_encoder = msgspec.json.Encoder()
request_decoder = msgspec.json.Decoder(ControlRequest)
reply_decoder = msgspec.json.Decoder(Reply)
