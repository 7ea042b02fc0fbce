"""Resource usage as envd reports it on ``/metrics`` and the control port's GetMetrics.

CPU use is measured between two calls (like gopsutil's ``cpu.Percent(0)`` that envd uses), so
the first answer covers the time since boot. Memory "used" is total - available, disk is the
root filesystem.
"""

from __future__ import annotations

import os
import time

from cube.guest.wire import Metrics


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies summed over all CPUs, from /proc/stat's first line."""
    with open("/proc/stat", "rb") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user/nice
    return total - idle, total


def _meminfo() -> dict[str, int]:
    values: dict[str, int] = {}
    with open("/proc/meminfo", "rb") as f:
        for line in f:
            key, _, rest = line.partition(b":")
            parts = rest.split()
            if parts:
                values[key.decode()] = int(parts[0]) * 1024
    return values


class MetricsSampler:
    def __init__(self) -> None:
        self._last = (0, 0)

    def sample(self) -> Metrics:
        busy, total = _cpu_times()
        last_busy, last_total = self._last
        self._last = (busy, total)
        elapsed = total - last_total
        cpu_pct = round(100.0 * (busy - last_busy) / elapsed, 2) if elapsed > 0 else 0.0
        mem = _meminfo()
        mem_total = mem.get("MemTotal", 0)
        mem_used = mem_total - mem.get("MemAvailable", mem.get("MemFree", 0))
        disk = os.statvfs("/")
        disk_total = disk.f_blocks * disk.f_frsize
        return Metrics(
            timestamp_unix=int(time.time()),
            cpu_count=os.cpu_count() or 1,
            cpu_used_pct=cpu_pct,
            mem_total=mem_total,
            mem_used=mem_used,
            mem_cache=mem.get("Cached", 0),
            disk_total=disk_total,
            disk_used=disk_total - disk.f_bavail * disk.f_frsize,
        )


def envd_json(m: Metrics) -> dict[str, int | float]:
    """The ``/metrics`` body, with envd's key names (and its deprecated MiB fields)."""
    return {
        "ts": m.timestamp_unix,
        "cpu_count": m.cpu_count,
        "cpu_used_pct": m.cpu_used_pct,
        "mem_total": m.mem_total,
        "mem_used": m.mem_used,
        "mem_cache": m.mem_cache,
        "mem_total_mib": m.mem_total >> 20,
        "mem_used_mib": m.mem_used >> 20,
        "disk_used": m.disk_used,
        "disk_total": m.disk_total,
    }
