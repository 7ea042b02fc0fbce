"""VM exits are counted per reason on the vCPU threads and survive the VM (the daemon's
`cube_vm_exits_total` sums running and stopped VMs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from cube.pool.backend import Resources
from cube.pool.vmm_backend import VmInstance, VmmBackend
from tests.kvm.test_microvm import OUT_DX_AL, RESET, SERIAL_DX, boot, mov_al, run_to_stop

pytestmark = pytest.mark.kvm

# Three serial writes and the i8042 reset are PIO exits; the read of the first virtio-mmio
# device's magic is an MMIO exit.
GUEST = (
    SERIAL_DX + mov_al("a") + OUT_DX_AL + OUT_DX_AL + OUT_DX_AL
    + b"\xa1\x00\x10\x00\xc0"  # mov eax, [0xc0001000]
    + RESET + b"\xf4"
)  # fmt: skip


def test_exits_are_counted_by_reason(tmp_path: Path) -> None:
    vm = boot(tmp_path, GUEST)
    assert vm.exit_counts() == {}
    run_to_stop(vm)
    counts = vm.exit_counts()
    assert counts["io"] == 4 and counts["mmio"] == 1
    assert set(counts) <= {"io", "mmio", "intr"}  # a kick may interrupt KVM_RUN too


def test_backend_keeps_the_exits_of_stopped_vms(tmp_path: Path) -> None:
    backend = VmmBackend(tmp_path / "vms")
    workdir = tmp_path / "vms" / "one"
    workdir.mkdir(parents=True)
    resources = Resources(cpu_count=1, memory_mb=256, disk_mb=0)
    instance = VmInstance(boot(tmp_path, GUEST), workdir, resources, network=None)

    backend._instances.add(instance)  # as a restore does before starting the run task

    async def main() -> None:
        with trio.fail_after(60):
            await backend._run_vm(instance)  # the VM's whole life, as a sandbox's run task

    trio.run(main)
    assert instance.stopped.is_set()
    exits = backend.vm_exits()
    assert exits["io"] == 4 and exits["mmio"] == 1
