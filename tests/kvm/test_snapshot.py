"""Snapshots on the host's KVM: a running guest is paused, saved, and cloned copy-on-write.

The guest prints "r", then spins until a flag byte in its memory becomes non-zero, prints that
byte and resets the machine. Clones get different flags from the host and must each print
their own: they share the snapshot's pages but not each other's writes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from cube.vmm import snapshot
from cube.vmm.vcpu import StopReason
from cube.vmm.vm import MicroVm, VmConfig
from tests.elfimage import make_vmlinux

pytestmark = pytest.mark.kvm

FLAG = 0x120_0000
CODE = (
    b"\xba\xf8\x03\x00\x00"  # mov edx, 0x3f8
    b"\xb0r\xee"  # mov al, 'r'; out dx, al
    + b"\xa0" + struct.pack("<I", FLAG)  # wait: mov al, [FLAG]
    + b"\x84\xc0\x74\xf7"  # test al, al; jz wait
    b"\xee\xb0\xfe\xe6\x64\xf4"  # out dx, al; reset
)  # fmt: skip


async def wait_for_console(vm: MicroVm, text: bytes, timeout: float = 30) -> None:
    with trio.fail_after(timeout):
        while text not in vm.serial.log_tail():
            await trio.sleep(0.01)


def snapshot_running_guest(tmp_path: Path) -> Path:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(make_vmlinux(CODE))
    vm = MicroVm.boot(VmConfig(kernel=kernel, memory_mib=64))
    target = tmp_path / "snap"

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(vm.run)
            await wait_for_console(vm, b"r")
            vm.pause()
            vm.save_snapshot(target, tmp_path)
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        vm.close()
    return target


def release_and_run(vm: MicroVm, flag: bytes) -> bytes:
    vm.ram.write(FLAG, flag)

    async def main() -> StopReason:
        with trio.fail_after(30):
            return (await vm.run()).reason

    try:
        assert trio.run(main) is StopReason.RESET
        return vm.serial.log_tail()
    finally:
        vm.close()


def test_clones_share_the_snapshot_and_diverge(tmp_path: Path) -> None:
    snap = snapshot_running_guest(tmp_path)
    memory_before = (snap / snapshot.MEMORY_FILE).read_bytes()
    clones = [MicroVm.restore(snap, tmp_path) for _ in range(3)]
    assert all(c.ram.read(FLAG, 1) == b"\0" for c in clones)
    outputs = [
        release_and_run(c, letter) for c, letter in zip(clones, (b"A", b"B", b"C"), strict=True)
    ]
    assert outputs == [b"A", b"B", b"C"]
    assert (snap / snapshot.MEMORY_FILE).read_bytes() == memory_before


def test_diff_snapshot_round_trip(tmp_path: Path) -> None:
    snap = snapshot_running_guest(tmp_path)
    clone = MicroVm.restore(snap, tmp_path)
    clone.ram.write(0x200_0000, b"diverged")
    diff = tmp_path / "diff"
    clone.save_snapshot(diff, tmp_path)
    clone.close()
    state = snapshot.read_state(diff)
    assert state.parent == str(snap)
    pages = snapshot.unpack_bits(
        (diff / snapshot.PAGES_FILE).read_bytes(), state.memory_size // 4096
    )
    assert pages[0x200_0000 // 4096] and sum(pages) < 16  # only what the clone wrote
    again = MicroVm.restore(diff, tmp_path)
    assert again.ram.read(0x200_0000, 8) == b"diverged"
    assert release_and_run(again, b"D") == b"D"
    fresh = MicroVm.restore(snap, tmp_path)
    assert fresh.ram.read(0x200_0000, 8) == bytes(8)
    fresh.close()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: (p / "state").write_bytes((p / "state").read_bytes()[:-10]), "truncated"),
        (
            lambda p: (p / "state").write_bytes(b"XXXXXXXX" + (p / "state").read_bytes()[8:]),
            "not a Cube",
        ),
        (lambda p: (p / snapshot.MEMORY_FILE).write_bytes(b"short"), "memory file"),
    ],
)
def test_damaged_snapshots_are_refused(
    tmp_path: Path, damage: Callable[[Path], object], message: str
) -> None:
    snap = snapshot_running_guest(tmp_path)
    damage(snap)
    with pytest.raises(snapshot.SnapshotError, match=message):
        MicroVm.restore(snap, tmp_path)
