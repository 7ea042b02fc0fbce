"""The guest kernel from `make kernel`, checked and booted inside the lab.

The boot under QEMU's microvm is the peer figure our own VMM is compared against: both boot the
same vmlinux and marker initramfs, in the same lab run, and the test prints both times and their
ratio (a measurement, not an assertion; the lab is TCG-emulated and noisy).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import trio

from cube.guestkernel import find_kernel, missing_options
from cube.vmm.elf import parse_vmlinux
from cube.vmm.vcpu import StopReason
from cube.vmm.vm import MicroVm, VmConfig
from tests.lab.artifacts import MARKER, find_test_initramfs

pytestmark = pytest.mark.lab

BOOT_TIMEOUT = 300


@pytest.fixture(scope="module")
def kernel() -> Path:
    path = find_kernel()
    assert path is not None, "no guest kernel in the cache: run `make kernel` on the host"
    return path


@pytest.fixture(scope="module")
def initramfs() -> Path:
    path = find_test_initramfs()
    assert path is not None, "no marker initramfs: run `python -m tests.lab.artifacts` on the host"
    return path


def test_kernel_is_a_pvh_bootable_x86_64_elf(kernel: Path) -> None:
    image = parse_vmlinux(kernel.read_bytes())  # raises unless ELF64 x86-64 with a PVH note
    assert image.pvh_entry >= 0x100000


def test_kernel_config_has_every_required_option(kernel: Path) -> None:
    assert missing_options((kernel.parent / "config").read_text()) == []


def qemu_microvm_boot(kernel: Path, initramfs: Path) -> tuple[float, str]:
    """Boot under QEMU microvm with KVM; microvm has no i8042, so reboot=t ends the VM."""
    start = time.perf_counter()
    done = subprocess.run(
        ["qemu-system-x86_64", "-M", "microvm,acpi=off", "-enable-kvm", "-cpu", "host",
         "-m", "256M", "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
         "-no-reboot", "-kernel", str(kernel), "-initrd", str(initramfs),
         "-append", "console=ttyS0 reboot=t panic=-1 quiet rdinit=/init"],
        capture_output=True, text=True, timeout=BOOT_TIMEOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    return time.perf_counter() - start, done.stdout + done.stderr


def cube_boot(kernel: Path, initramfs: Path) -> tuple[float, str]:
    start = time.perf_counter()
    config = VmConfig(kernel=kernel, initrd=initramfs, cmdline="quiet rdinit=/init")
    vm = MicroVm.boot(config)

    async def main() -> StopReason:
        with trio.fail_after(BOOT_TIMEOUT):
            return (await vm.run()).reason

    try:
        assert trio.run(main) is StopReason.RESET
    finally:
        vm.close()
    return time.perf_counter() - start, vm.console_tail()


def test_kernel_boots_to_init_under_qemu_microvm_and_cube(kernel: Path, initramfs: Path) -> None:
    qemu_seconds, qemu_console = qemu_microvm_boot(kernel, initramfs)
    assert MARKER in qemu_console, qemu_console[-2000:]
    cube_seconds, cube_console = cube_boot(kernel, initramfs)
    assert MARKER in cube_console, cube_console[-2000:]
    print(
        f"\nboot to init and back (lab, TCG-nested): qemu microvm {qemu_seconds:.2f} s, "
        f"cube {cube_seconds:.2f} s, cube/qemu {cube_seconds / qemu_seconds:.2f}"
    )
