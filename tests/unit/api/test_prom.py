"""The Prometheus text: the VM-exits family appears exactly when the backend runs VMs."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, cast

from cube.api.prom import DaemonMetrics
from cube.pool.process_backend import ProcessBackend
from cube.pool.vmm_backend import VmmBackend
from cube.serve import _vm_exits_of


class _NoSandboxes:
    lost: tuple[str, ...] = ()

    def all(self) -> list[object]:
        return []


class _EmptyPool:
    def depth(self) -> dict[str, int]:
        return {}


def _metrics(**kwargs: Any) -> DaemonMetrics:
    return DaemonMetrics(cast(Any, _NoSandboxes()), cast(Any, _EmptyPool()), **kwargs)


def test_vm_exits_are_a_counter_per_reason_read_at_each_scrape() -> None:
    exits = Counter({"io": 7, "mmio": 3})
    metrics = _metrics(vm_exits=lambda: exits)
    text = metrics.render()
    assert "# TYPE cube_vm_exits_total counter" in text
    assert 'cube_vm_exits_total{reason="io"} 7\n' in text
    assert 'cube_vm_exits_total{reason="mmio"} 3\n' in text
    exits["io"] += 1
    assert 'cube_vm_exits_total{reason="io"} 8\n' in metrics.render()


def test_only_the_vmm_backend_exports_vm_exits(tmp_path: Path) -> None:
    assert "cube_vm_exits_total" not in _metrics().render()
    assert _vm_exits_of(ProcessBackend(tmp_path / "process")) is None
    vm_exits = _vm_exits_of(VmmBackend(tmp_path / "vms"))
    assert vm_exits is not None and vm_exits() == {}
