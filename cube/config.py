"""`cube serve` settings: a TOML file, overridden by command-line flags.

Example (every key optional)::

    data_dir = "/var/lib/cube"
    listen = "127.0.0.1:3000"
    backend = "vmm"                  # or "process": agents as host processes (development)
    domain = "sandbox.example.com"   # returned to clients; enables Host routing
    on_shutdown = "pause"            # or "kill": what SIGTERM does to running sandboxes
    graceful_timeout = 10.0          # seconds requests get to finish; idle keep-alive
                                     # connections also hold shutdown this long

    [pool]                           # warm sandboxes kept ready, per template name or id
    base = 1                         # (the default; a template not listed gets none)
    "code-interpreter-v1" = 1

    [sandbox]
    default_timeout = 300
    max_timeout = 86400
    cpu_count = 2                    # resources of templates that do not say
    memory_mb = 512
    disk_mb = 2048

    [limits]
    max_sandboxes_per_key = 100      # concurrent running sandboxes per API key
    max_body_bytes = 1048576         # control-plane request bodies (not proxied uploads)

    [network]                        # sandbox networking (vmm backend; needs root)
    enabled = true                   # false: sandboxes get no network at all
    range4 = "10.20.0.0/16"          # one /30 per sandbox; must be unused on the host
    range6 = "fd63:7562:6500::/64"   # one /126 per sandbox
    uplink = "eth0"                  # NAT out of this interface (default: the default route's)
    pool_size = 8                    # taps kept ready
    dns_upstream = "192.0.2.53"      # where sandbox DNS goes (default: the host's resolver)
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import msgspec

from cube.net.manager import NetworkConfig
from cube.pool.backend import Resources


class SandboxDefaults(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    default_timeout: int = 300
    max_timeout: int = 24 * 3600
    cpu_count: int = 2
    memory_mb: int = 512
    disk_mb: int = 2048

    def resources(self) -> Resources:
        return Resources(cpu_count=self.cpu_count, memory_mb=self.memory_mb, disk_mb=self.disk_mb)


class Limits(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    max_sandboxes_per_key: int | None = 100
    max_body_bytes: int = 1 << 20


class NetworkSettings(NetworkConfig, frozen=True, forbid_unknown_fields=True):
    enabled: bool = True


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    data_dir: str | None = None  # None: cube.paths.data_dir()
    listen: str = "127.0.0.1:3000"
    backend: Literal["vmm", "process"] = "vmm"
    domain: str | None = None
    on_shutdown: Literal["pause", "kill"] = "pause"
    graceful_timeout: float = 10.0  # seconds in-flight requests get to finish on SIGTERM
    pool: dict[str, int] = msgspec.field(default_factory=lambda: {"base": 1})
    sandbox: SandboxDefaults = SandboxDefaults()
    limits: Limits = Limits()
    network: NetworkSettings = NetworkSettings()


def load(path: Path | None) -> Config:
    """The file's settings (defaults when there is no file); unknown keys are errors so that
    typos do not silently fall back to defaults."""
    if path is None:
        return Config()
    return msgspec.toml.decode(path.read_bytes(), type=Config)
