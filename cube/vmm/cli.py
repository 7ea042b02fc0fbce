"""`cube vm ...`: boot a guest by hand, for people debugging a kernel or a template."""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated

import trio
import typer

from cube.vmm.snapshot import SnapshotError
from cube.vmm.vcpu import Stop
from cube.vmm.vm import DiskConfig, MicroVm, VmConfig, VmError

vm_app = typer.Typer(no_args_is_help=True, help="Boot and inspect microVMs directly.")


class _Console:
    """Copies guest console bytes to stdout a line at a time: one write per byte would cost a
    system call per byte, which is what the guest's console does to us already."""

    def __init__(self) -> None:
        self._pending = bytearray()

    def __call__(self, data: bytes) -> None:
        self._pending += data
        if b"\n" in data or len(self._pending) >= 4096:
            self.flush()

    def flush(self) -> None:
        sys.stdout.buffer.write(self._pending)
        sys.stdout.buffer.flush()
        self._pending.clear()


def _config(
    kernel: Path,
    rootfs: Path | None,
    initrd: Path | None,
    cmdline: str,
    cpus: int,
    memory: int,
    scratch: Path,
) -> VmConfig:
    """The root filesystem is attached copy-on-write: the guest may write to it, but its
    writes go to an overlay in `scratch`, so the image is never changed."""
    disks: tuple[DiskConfig, ...] = ()
    if rootfs is not None:
        disks = (DiskConfig(base=rootfs, overlay=scratch / "rootfs.overlay"),)
        cmdline = f"root=/dev/vda rw {cmdline}".strip()
    return VmConfig(kernel=kernel, cmdline=cmdline, vcpus=cpus, memory_mib=memory, disks=disks,
                    initrd=initrd)  # fmt: skip


def _build(make: Callable[[], MicroVm]) -> MicroVm:
    try:
        return make()
    except (OSError, ValueError, SnapshotError) as error:
        typer.echo(f"cube vm: cannot build the VM: {error}", err=True)
        raise typer.Exit(2) from error


def _run(vm: MicroVm, console: _Console, body: Callable[[], Awaitable[None]] | None = None) -> None:
    """Run `vm` until it stops (or until `body` returns, which then stops it)."""

    async def main() -> Stop:
        async with trio.open_nursery() as nursery:
            if body is not None:
                nursery.start_soon(body)
            stop = await vm.run()
            nursery.cancel_scope.cancel()
            return stop

    try:
        stop = trio.run(main)
    except VmError as error:
        typer.echo(f"\ncube vm: {error}", err=True)
        raise typer.Exit(1) from error
    finally:
        console.flush()
        vm.close()
    typer.echo(f"\ncube vm: guest stopped ({stop.reason.value}: {stop.detail})", err=True)


Kernel = Annotated[Path, typer.Option(exists=True, dir_okay=False, help="Uncompressed vmlinux")]
Rootfs = Annotated[
    Path | None, typer.Option(exists=True, dir_okay=False, help="ext4 image (kept unchanged)")
]
Initrd = Annotated[Path | None, typer.Option(exists=True, dir_okay=False)]
Cmdline = Annotated[str, typer.Option(help="Appended to Cube's base command line")]
Cpus = Annotated[int, typer.Option(min=1, max=8)]
Memory = Annotated[int, typer.Option(min=64, help="MiB")]


@vm_app.command("run")
def run(
    kernel: Kernel,
    rootfs: Rootfs = None,
    initrd: Initrd = None,
    cmdline: Cmdline = "",
    cpus: Cpus = 1,
    memory: Memory = 256,
) -> None:
    """Boot KERNEL with its console on this terminal until the guest reboots or powers off."""
    with tempfile.TemporaryDirectory(prefix="cube-vm-") as scratch:
        config = _config(kernel, rootfs, initrd, cmdline, cpus, memory, Path(scratch))
        console = _Console()
        _run(_build(lambda: MicroVm.boot(config, console=console)), console)


@vm_app.command("snapshot")
def snapshot_cmd(
    kernel: Kernel,
    to: Annotated[Path, typer.Option(help="Snapshot folder to create (must not exist)")],
    when: Annotated[str, typer.Option(help="Snapshot once the console has printed this text")] = "",
    after: Annotated[float, typer.Option(min=0, help="...or after this many seconds")] = 0.0,
    rootfs: Rootfs = None,
    initrd: Initrd = None,
    cmdline: Cmdline = "",
    cpus: Cpus = 1,
    memory: Memory = 256,
) -> None:
    """Boot KERNEL, then pause it and save a snapshot into TO (restore it with `cube vm restore`).

    The disk overlay is saved with the snapshot; the rootfs image must stay where it is.
    """
    if to.exists():
        typer.echo(f"cube vm snapshot: {to} already exists", err=True)
        raise typer.Exit(2)
    if not when and not after:
        typer.echo("cube vm snapshot: say when, with --when TEXT or --after SECONDS", err=True)
        raise typer.Exit(2)
    with tempfile.TemporaryDirectory(prefix="cube-vm-") as scratch:
        config = _config(kernel, rootfs, initrd, cmdline, cpus, memory, Path(scratch))
        console = _Console()
        vm = _build(lambda: MicroVm.boot(config, console=console))

        async def take() -> None:
            if when:
                while when.encode() not in vm.serial.log_tail():
                    await trio.sleep(0.05)
            await trio.sleep(after)
            vm.pause()
            vm.save_snapshot(to, Path(scratch))
            typer.echo(f"\ncube vm snapshot: saved {to}", err=True)
            vm.request_stop()

        _run(vm, console, take)


@vm_app.command("restore")
def restore_cmd(
    folder: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="Snapshot folder")],
    tap: Annotated[
        str | None, typer.Option(help="An existing tap, for a snapshot with a network device")
    ] = None,
) -> None:
    """Restore a snapshot (full or diff) with its console on this terminal, until it stops.

    Disk writes go to a temporary overlay that is thrown away; the snapshot is not changed.
    """
    with tempfile.TemporaryDirectory(prefix="cube-vm-") as scratch:
        console = _Console()
        vm = _build(lambda: MicroVm.restore(folder, Path(scratch), console=console, net_tap=tap))
        _run(vm, console)
