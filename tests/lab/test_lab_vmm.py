"""Our VMM boots the real guest kernel, and clones it from snapshots (runs inside the lab).

The guest is the kernel from guest-kernel/ with tests/guest/vmm_test_init.c as /init: it checks
its virtio disk, says hello to the host over vsock, and answers commands on vsock port 1234.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from cube.guestkernel import find_kernel
from cube.vmm.devices.virtio_vsock import VsockStream
from cube.vmm.vcpu import Stop, StopReason
from cube.vmm.vm import DiskConfig, MicroVm, VmConfig
from tests.lab.artifacts import find_vmm_test_initramfs

pytestmark = pytest.mark.lab

COMMAND_PORT = 1234
HELLO_PORT = 1235
DISK_HEAD = b"cube-disk-sector"
BOOT_TIMEOUT = 300  # nested TCG is slow; the guest normally reaches init in seconds


@pytest.fixture
def config(tmp_path: Path) -> VmConfig:
    kernel, initrd = find_kernel(), find_vmm_test_initramfs()
    assert kernel is not None and initrd is not None, (
        "run `python -m tests.lab.artifacts` on the host"
    )
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.write(DISK_HEAD)
        f.truncate(8 << 20)
    return VmConfig(
        kernel=kernel,
        initrd=initrd,
        cmdline="rdinit=/init quiet",
        disks=(DiskConfig(base=disk, overlay=tmp_path / "disk.overlay"),),
    )


async def read_line(stream: VsockStream) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = await stream.receive_some(256)
        if not chunk:
            break
        data += chunk
    return data.decode().strip()


async def command(vm: MicroVm, line: str) -> str:
    """Send one command to the guest's vsock server, retrying while it is not listening yet."""
    assert vm.vsock is not None
    try:
        with trio.fail_after(BOOT_TIMEOUT):
            while True:
                try:
                    stream = await vm.vsock.connect(COMMAND_PORT, timeout=30)
                    break
                except ConnectionRefusedError:
                    await trio.sleep(0.2)
    except (TimeoutError, trio.TooSlowError) as error:
        raise AssertionError(f"no answer to {line!r}; console:\n{vm.console_tail()}") from error
    async with stream:
        await stream.send_all(line.encode() + b"\n")
        with trio.fail_after(BOOT_TIMEOUT):
            return await read_line(stream)


async def wait_for_console(vm: MicroVm, text: bytes) -> None:
    with trio.fail_after(BOOT_TIMEOUT):
        while text not in vm.serial.log_tail():
            await trio.sleep(0.05)


def run_vms(vms: list[MicroVm], body: Callable[[], Awaitable[None]]) -> list[Stop]:
    """Run the VMs while `body` drives them; return how each stopped, and close them."""
    stops: list[Stop] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:

            async def run(vm: MicroVm) -> None:
                stops.append(await vm.run())

            for vm in vms:
                nursery.start_soon(run, vm)
            await body()
            with trio.fail_after(60):
                while len(stops) < len(vms):
                    await trio.sleep(0.05)

    try:
        trio.run(main)
    finally:
        for vm in vms:
            vm.close()
    return stops


def test_real_kernel_boots_with_disk_and_vsock(config: VmConfig) -> None:
    vm = MicroVm.boot(config)
    base_before = config.disks[0].base.read_bytes()
    hello: list[str] = []

    async def body() -> None:
        assert vm.vsock is not None
        async with vm.vsock.listen(HELLO_PORT) as listener:
            with trio.fail_after(BOOT_TIMEOUT):
                async with await listener.accept() as stream:
                    hello.append(await read_line(stream))
        await wait_for_console(vm, b"CUBE-VMM-TEST-READY")
        assert await command(vm, "ping") == "pong 1"
        assert await command(vm, "poweroff") == "bye"

    (stop,) = run_vms([vm], body)
    console = vm.serial.log_tail()
    assert stop.reason is StopReason.RESET
    assert hello == ["hello-from-guest"]
    assert b"CUBE-BLK-READ " + DISK_HEAD in console
    assert b"CUBE-BLK-OK" in console
    assert config.disks[0].base.read_bytes() == base_before  # writes went to the overlay


def boot_and_snapshot(config: VmConfig, target: Path, workdir: Path) -> None:
    vm = MicroVm.boot(config)

    async def body() -> None:
        await wait_for_console(vm, b"CUBE-VMM-TEST-READY")
        assert await command(vm, "ping") == "pong 1"
        vm.pause()
        vm.save_snapshot(target, workdir)
        vm.request_stop()

    run_vms([vm], body)


def test_ten_clones_answer_and_diverge(config: VmConfig, tmp_path: Path) -> None:
    snap = tmp_path / "snap"
    boot_and_snapshot(config, snap, tmp_path)
    clones = []
    for i in range(10):
        workdir = tmp_path / f"clone{i}"
        workdir.mkdir()
        clones.append(MicroVm.restore(snap, workdir))

    async def body() -> None:
        for i, clone in enumerate(clones):
            assert await command(clone, f"set clone-{i}") == "ok"
        for i, clone in enumerate(clones):
            assert await command(clone, "get") == f"clone-{i}"
            assert await command(clone, "ping") == "pong 2"  # each continues from the snapshot
        for clone in clones:
            assert await command(clone, "poweroff") == "bye"

    stops = run_vms(clones, body)
    assert [s.reason for s in stops] == [StopReason.RESET] * 10


def test_diff_snapshot_of_a_clone_round_trips(config: VmConfig, tmp_path: Path) -> None:
    snap, diff = tmp_path / "snap", tmp_path / "diff"
    boot_and_snapshot(config, snap, tmp_path)
    (tmp_path / "a").mkdir()
    clone = MicroVm.restore(snap, tmp_path / "a")

    async def change_and_snapshot() -> None:
        assert await command(clone, "set from-the-diff") == "ok"
        clone.pause()
        clone.save_snapshot(diff, tmp_path / "a")
        clone.request_stop()

    run_vms([clone], change_and_snapshot)
    (tmp_path / "b").mkdir()
    again = MicroVm.restore(diff, tmp_path / "b")
    (tmp_path / "c").mkdir()
    fresh = MicroVm.restore(snap, tmp_path / "c")

    async def check() -> None:
        assert await command(again, "get") == "from-the-diff"
        assert await command(fresh, "get") == ""
        for vm in (again, fresh):
            assert await command(vm, "poweroff") == "bye"

    run_vms([again, fresh], check)
