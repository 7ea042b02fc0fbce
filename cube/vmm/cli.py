"""`cube vm ...`: boot a guest by hand, for people debugging a kernel or a template."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Annotated

import trio
import typer

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


@vm_app.command("run")
def run(
    kernel: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="Uncompressed vmlinux")],
    rootfs: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="ext4 image (kept unchanged)")
    ] = None,
    initrd: Annotated[Path | None, typer.Option(exists=True, dir_okay=False)] = None,
    cmdline: Annotated[str, typer.Option(help="Appended to Cube's base command line")] = "",
    cpus: Annotated[int, typer.Option(min=1, max=8)] = 1,
    memory: Annotated[int, typer.Option(min=64, help="MiB")] = 256,
) -> None:
    """Boot KERNEL with its console on this terminal until the guest reboots or powers off.

    The root filesystem is attached copy-on-write: the guest may write to it, but its writes go
    to a temporary overlay that is thrown away, so the image is never changed.
    """
    with tempfile.TemporaryDirectory(prefix="cube-vm-") as scratch:
        disks: tuple[DiskConfig, ...] = ()
        if rootfs is not None:
            disks = (DiskConfig(base=rootfs, overlay=Path(scratch) / "rootfs.overlay"),)
            cmdline = f"root=/dev/vda rw {cmdline}".strip()
        config = VmConfig(kernel=kernel, cmdline=cmdline, vcpus=cpus, memory_mib=memory,
                          disks=disks, initrd=initrd)  # fmt: skip
        console = _Console()
        try:
            vm = MicroVm.boot(config, console=console)
        except (OSError, ValueError) as error:
            typer.echo(f"cube vm run: cannot build the VM: {error}", err=True)
            raise typer.Exit(2) from error
        try:
            stop = trio.run(vm.run)
        except VmError as error:
            typer.echo(f"\ncube vm run: {error}", err=True)
            raise typer.Exit(1) from error
        finally:
            console.flush()
            vm.close()
    typer.echo(f"\ncube vm run: guest stopped ({stop.reason.value}: {stop.detail})", err=True)
