"""The vCPU runner's stop request and thread, without KVM: a stand-in holds the `kvm_run` page."""

from __future__ import annotations

import os
import threading
from types import SimpleNamespace
from typing import Any

import pytest
import trio

from cube.vmm.bus import Bus
from cube.vmm.kvm import ffi, lib
from cube.vmm.vcpu import (
    TRIPLE_FAULT,
    VCPU_NICE,
    Stop,
    StopReason,
    VcpuRunner,
    install_kick_handler,
)


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


class _OneExit:
    """A stand-in vCPU whose first KVM_RUN ends in a triple fault, noting where it ran."""

    index = 0

    def __init__(self) -> None:
        self.kvm_run = ffi.new("struct kvm_run *")
        self.thread: tuple[int, int, str] | None = None

    def run(self) -> int:
        thread = threading.current_thread()
        self.thread = (threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0), thread.name)
        return lib.KVM_EXIT_SHUTDOWN


def test_a_vcpu_runs_on_a_thread_of_its_own_below_the_daemon() -> None:
    vcpu: Any = _OneExit()
    stops: list[Stop] = []

    def stopped(stop: Stop) -> None:
        stops.append(stop)
        runner.request_stop()

    runner = VcpuRunner(vcpu, Bus("pio"), Bus("mmio"), on_stop=stopped)
    install_kick_handler()  # the stop request signals the thread, as it would in KVM_RUN
    trio.run(runner.run_in_own_thread, "vcpu 0")
    native_id, nice, name = vcpu.thread
    assert native_id != threading.get_native_id() and name == "vcpu 0"
    assert nice == min(19, os.getpriority(os.PRIO_PROCESS, 0) + VCPU_NICE)
    assert stops == [Stop(StopReason.SHUTDOWN, TRIPLE_FAULT)]


def test_an_error_in_the_vcpu_thread_reaches_the_vm_task() -> None:
    page = ffi.new("struct kvm_run *")
    vcpu: Any = SimpleNamespace(kvm_run=page, index=0, run=lambda: 1 / 0)
    runner = VcpuRunner(vcpu, Bus("pio"), Bus("mmio"), on_stop=lambda stop: None)
    with pytest.raises(ZeroDivisionError):
        trio.run(runner.run_in_own_thread, "vcpu 0")
