"""What the request handlers share: the lifecycle, the key store, metrics and a few settings."""

from __future__ import annotations

from dataclasses import dataclass

from cube.api.prom import DaemonMetrics
from cube.apikeys import ApiKey, ApiKeyStore
from cube.pool.backend import Backend
from cube.pool.sandboxes import Sandboxes


@dataclass
class ApiContext:
    sandboxes: Sandboxes
    backend: Backend
    keys: ApiKeyStore
    metrics: DaemonMetrics
    domain: str | None = None  # returned to clients as the sandbox domain (Host routing)
    max_sandboxes_per_key: int | None = None
    max_body_bytes: int = 1 << 20

    def limit_for(self, key: ApiKey) -> int | None:
        return key.max_sandboxes if key.max_sandboxes is not None else self.max_sandboxes_per_key
