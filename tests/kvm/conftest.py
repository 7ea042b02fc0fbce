"""Host-KVM tier: real /dev/kvm, of any flavour. Skipped with a reason where there is none."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

from cube.vmm.kvm import GuestMemory, Kvm, Vcpu, Vm
from cube.vmm.probe import start_real_mode

CODE_ADDR = 0x1000  # page 1; page 0 is left for guests to write to

RealModeVm = Callable[..., tuple[Vm, Vcpu]]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.access("/dev/kvm", os.R_OK | os.W_OK):
        return
    skip = pytest.mark.skip(reason="no usable /dev/kvm on this machine")
    for item in items:
        if "kvm" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def kvm() -> Iterator[Kvm]:
    with Kvm() as kvm:
        yield kvm


@pytest.fixture
def real_mode_vm(kvm: Kvm) -> Iterator[RealModeVm]:
    """Factory for a one-vCPU VM with RAM at 0 whose vCPU starts at CODE_ADDR in real mode."""
    vms: list[Vm] = []

    def make(
        code: bytes, memory_size: int = 0x2000, *, irqchip: bool = False, slot_flags: int = 0
    ) -> tuple[Vm, Vcpu]:
        vm = kvm.create_vm()
        vms.append(vm)
        if irqchip:
            vm.create_irqchip()
            vm.create_pit2()
        memory = GuestMemory.anonymous(memory_size)
        memory.view()[CODE_ADDR : CODE_ADDR + len(code)] = code
        vm.set_user_memory_region(0, 0, memory, slot_flags)
        vcpu = vm.create_vcpu(0)
        start_real_mode(vcpu, CODE_ADDR)
        return vm, vcpu

    yield make
    for vm in vms:
        vm.close()
