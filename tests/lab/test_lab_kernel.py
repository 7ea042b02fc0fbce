"""The guest kernel from `make kernel`, checked and booted inside the lab.

The boot under QEMU's microvm is the peer figure our own VMM is compared against: both boot the
same vmlinux and the compiler-free marker initramfs (cube.bench.initramfs), in the same lab run,
through `cube bench vmm --boot`'s own functions, and the test prints both times and their ratio
(a measurement, not an assertion; the lab is TCG-emulated and noisy). The boots fail the test
unless the init's marker reaches the console and its restart ends the VM.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cube.bench.initramfs import write_marker_initramfs
from cube.bench.vmm_lab import boot_cube, boot_qemu
from cube.guestkernel import find_kernel, missing_options
from cube.vmm.elf import parse_vmlinux

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def kernel() -> Path:
    path = find_kernel()
    assert path is not None, "no guest kernel in the cache: run `make kernel` on the host"
    return path


@pytest.fixture
def initramfs(tmp_path: Path) -> Path:
    return write_marker_initramfs(tmp_path / "marker.cpio")


def test_kernel_is_a_pvh_bootable_x86_64_elf(kernel: Path) -> None:
    image = parse_vmlinux(kernel.read_bytes())  # raises unless ELF64 x86-64 with a PVH note
    assert image.pvh_entry >= 0x100000


def test_kernel_config_has_every_required_option(kernel: Path) -> None:
    assert missing_options((kernel.parent / "config").read_text()) == []


def test_kernel_boots_to_init_under_qemu_microvm_and_cube(kernel: Path, initramfs: Path) -> None:
    qemu = boot_qemu(kernel, initramfs, memory_mib=256)  # BootFailed quotes the console
    cube = boot_cube(kernel, initramfs, memory_mib=256)
    print(
        f"\nboot to init's marker (lab, TCG-nested): qemu microvm {qemu.marker_ms / 1e3:.2f} s, "
        f"cube {cube.marker_ms / 1e3:.2f} s, cube/qemu {cube.marker_ms / qemu.marker_ms:.2f}; "
        f"to the VM's end: qemu {qemu.end_ms / 1e3:.2f} s, cube {cube.end_ms / 1e3:.2f} s"
    )
