"""The daemon's Prometheus metrics, rendered in the text exposition format by hand (a few
gauges, counters and one histogram do not justify a client library)."""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable, Iterable, Mapping

from cube.pool.sandboxes import Sandboxes
from cube.pool.warm import WarmPool

CREATE_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class Histogram:
    def __init__(self, buckets: Iterable[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value

    def render(self, name: str) -> list[str]:
        lines, cumulative = [], 0
        for bound, count in zip(self.buckets, self.counts, strict=False):
            cumulative += count
            lines.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        cumulative += self.counts[-1]
        lines += [
            f'{name}_bucket{{le="+Inf"}} {cumulative}',
            f"{name}_sum {self.total}",
            f"{name}_count {cumulative}",
        ]
        return lines


class DaemonMetrics:
    """`vm_exits` gives KVM exits by reason (the VMM backend's); without it (the process
    backend runs no VMs) the `cube_vm_exits_total` family is left out."""

    def __init__(
        self,
        sandboxes: Sandboxes,
        pool: WarmPool,
        vm_exits: Callable[[], Mapping[str, int]] | None = None,
    ) -> None:
        self._sandboxes = sandboxes
        self._pool = pool
        self._vm_exits = vm_exits
        self.create_seconds = Histogram(CREATE_BUCKETS)
        self.events: Counter[str] = Counter()  # created, create_failed, killed, proxied...

    def render(self) -> str:
        states = Counter(s.record.state for s in self._sandboxes.all())
        states["lost"] = len(self._sandboxes.lost)
        lines = ["# HELP cube_sandboxes Sandboxes by state.", "# TYPE cube_sandboxes gauge"]
        lines += [
            f'cube_sandboxes{{state="{s}"}} {states[s]}' for s in ("running", "paused", "lost")
        ]
        lines += [
            "# HELP cube_pool_ready Warm sandboxes ready per template.",
            "# TYPE cube_pool_ready gauge",
        ]
        lines += [f'cube_pool_ready{{template="{t}"}} {n}' for t, n in self._pool.depth().items()]
        lines += [
            "# HELP cube_events_total Lifecycle and proxy events.",
            "# TYPE cube_events_total counter",
        ]
        lines += [f'cube_events_total{{event="{e}"}} {n}' for e, n in sorted(self.events.items())]
        lines += [
            "# HELP cube_sandbox_create_seconds Time to answer a create.",
            "# TYPE cube_sandbox_create_seconds histogram",
        ]
        lines += self.create_seconds.render("cube_sandbox_create_seconds")
        if self._vm_exits is not None:
            lines += [
                "# HELP cube_vm_exits_total KVM exits that reached the VMM, by reason.",
                "# TYPE cube_vm_exits_total counter",
            ]
            exits = sorted(self._vm_exits().items())
            lines += [f'cube_vm_exits_total{{reason="{r}"}} {n}' for r, n in exits]
        return "\n".join(lines) + "\n"
