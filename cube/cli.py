"""The `cube` command line. Each group lives beside the code it drives; this only wires them."""

from __future__ import annotations

import typer

from cube.apikeys import apikey_app
from cube.bench.cli import bench_app
from cube.doctor import doctor_command
from cube.guestkernel import kernel_app
from cube.lab.cli import lab_app
from cube.pool.template_cli import template_app
from cube.sandbox_cli import sandbox_app
from cube.serve import serve_command
from cube.systemd import install_systemd_command
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
app.add_typer(template_app, name="template")
app.command("serve")(serve_command)
app.command("install-systemd")(install_systemd_command)
app.add_typer(apikey_app, name="apikey")
app.add_typer(sandbox_app, name="sandbox")
