"""MicroVm end to end on the host's KVM, with a few bytes of 32-bit code as the "kernel".

The code runs at CPL0, which PVM emulates slowly but correctly for a handful of instructions,
so this exercises the real boot path (ELF, PVH entry state, irqchip, vCPU thread, PIO and MMIO
dispatch, serial, i8042 reset, stop and teardown) on any KVM.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from cube.bench.guest import make_vmlinux
from cube.vmm.vcpu import Stop, StopReason
from cube.vmm.vm import TRIPLE_FAULT_NOTE, MicroVm, VmConfig

pytestmark = pytest.mark.kvm

OUT_DX_AL = b"\xee"
SERIAL_DX = b"\xba\xf8\x03\x00\x00"  # mov edx, 0x3f8
RESET = b"\xb0\xfe\xe6\x64"  # mov al, 0xfe; out 0x64, al


def mov_al(ch: str) -> bytes:
    return b"\xb0" + ch.encode()


def boot(tmp_path: Path, code: bytes, **config: object) -> MicroVm:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(make_vmlinux(code))
    return MicroVm.boot(VmConfig(kernel=kernel, **config))  # type: ignore[arg-type]


def run_to_stop(vm: MicroVm, timeout: float = 60) -> Stop:
    async def main() -> Stop:
        with trio.fail_after(timeout):
            return await vm.run()

    try:
        return trio.run(main)
    finally:
        vm.close()


def test_guest_prints_reads_mmio_and_resets(tmp_path: Path) -> None:
    code = (
        SERIAL_DX + mov_al("o") + OUT_DX_AL + mov_al("k") + OUT_DX_AL
        + b"\xa1\x00\x10\x00\xc0"  # mov eax, [0xc0001000]: virtio-mmio magic "virt"
        + OUT_DX_AL  # low byte: "v"
        + RESET + b"\xf4"
    )  # fmt: skip
    vm = boot(tmp_path, code)
    stop = run_to_stop(vm)
    assert stop.reason is StopReason.RESET
    assert vm.serial.log_tail() == b"okv"


def test_a_triple_fault_is_reported_with_the_vcpu_state(tmp_path: Path) -> None:
    """ud2 with the PVH entry's empty IDT cannot be delivered, nor can the #DF that follows:
    the guest dies with nothing on its console to say why, so the report must."""
    code = SERIAL_DX + mov_al("x") + OUT_DX_AL + b"\x0f\x0b"  # ud2
    vm = boot(tmp_path, code)
    try:
        stop = trio.run(vm.run)
        report = vm.crash_report()
    finally:
        vm.close()
    assert stop == Stop(StopReason.SHUTDOWN, "triple fault") and vm.died()
    assert report[:2] == ["guest stopped: shutdown (triple fault)", TRIPLE_FAULT_NOTE]
    text = "\n".join(report)
    for expected in ("vCPU 0 (", "rip=0x", "cr0=0x", "cs: sel=", "idt: base=", "exception: nr="):
        assert expected in text
    assert "last exits, oldest first: io out 0x3f8, shutdown" in text
    assert report[-2:] == ["--- console tail ---", "x"]


def test_cancelling_run_stops_a_spinning_guest(tmp_path: Path) -> None:
    vm = boot(tmp_path, b"\xeb\xfe")  # jmp $

    async def main() -> None:
        with trio.move_on_after(0.5):
            await vm.run()

    try:
        trio.run(main)
    finally:
        vm.close()


def test_bad_kernel_is_refused_without_leaking(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"not an elf")
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(ValueError, match="ELF"):
        MicroVm.boot(VmConfig(kernel=kernel))
    assert len(os.listdir("/proc/self/fd")) == before


def test_vm_create_destroy_cycles_do_not_leak(tmp_path: Path) -> None:
    def count() -> tuple[int, int]:
        maps = Path("/proc/self/maps").read_text().count("\n")
        return len(os.listdir("/proc/self/fd")), maps

    boot(tmp_path, b"\xf4").close()  # warm up lazily created process state
    before = count()
    for _ in range(50):
        boot(tmp_path, b"\xf4").close()
    fds, maps = count()
    # Fewer mappings is no leak: an idle worker thread of an earlier test may exit meanwhile.
    assert fds == before[0] and maps <= before[1]
