"""The `cube` command line. Each group lives beside the code it drives; this only wires them."""

from __future__ import annotations

import typer

from cube.bench.cli import bench_app
from cube.doctor import doctor_command
from cube.guestkernel import kernel_app
from cube.lab.cli import lab_app
from cube.vmm.cli import vm_app

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Cube: E2B-compatible sandboxes as KVM microVMs.",
)
app.command("doctor")(doctor_command)
app.add_typer(kernel_app, name="kernel")
app.add_typer(lab_app, name="lab")
app.add_typer(vm_app, name="vm")
app.add_typer(bench_app, name="bench")
