"""Snapshots on the host's KVM: a running guest is paused, saved, and cloned copy-on-write.

The guest (cube.bench.guest) prints "r", then spins until a flag byte in its memory becomes
non-zero, prints that byte and resets the machine. Clones get different flags from the host and
must each print their own: they share the snapshot's pages but not each other's writes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from cube.bench.guest import FLAG_ADDR as FLAG
from cube.bench.vmm import make_snapshot
from cube.vmm import snapshot
from cube.vmm.vcpu import StopReason
from cube.vmm.vm import MicroVm

pytestmark = pytest.mark.kvm


def snapshot_running_guest(tmp_path: Path) -> Path:
    return make_snapshot(tmp_path, memory_mib=64)


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
