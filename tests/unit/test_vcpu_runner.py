"""The vCPU runner's stop request, without KVM: a stand-in holds the `kvm_run` page."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from cube.vmm.bus import Bus
from cube.vmm.kvm import ffi
from cube.vmm.vcpu import VcpuRunner


def _runner(kvm_run: Any) -> VcpuRunner:
    vcpu: Any = SimpleNamespace(kvm_run=kvm_run, index=0)
    return VcpuRunner(vcpu, Bus("pio"), Bus("mmio"), on_stop=lambda stop: None)


def test_stop_request_flags_the_run_page() -> None:
    page = ffi.new("struct kvm_run *")
    _runner(page).request_stop()
    assert page.immediate_exit == 1


def test_stop_request_after_the_vcpu_was_closed_is_a_no_op() -> None:
    """A guest that died on its own is released before the daemon kills its sandbox; that kill
    once raised AttributeError here and took the whole daemon down."""
    _runner(ffi.NULL).request_stop()
