"""`cube install-systemd`: run `cube serve` as a systemd service.

The unit is rendered from UNIT below with this installation's `cube` executable, so a venv
install works as well as a system one. SIGTERM is what `cube serve` treats as a graceful stop
(pause or kill running sandboxes per its config, flush state); TimeoutStopSec leaves it room to
pause many sandboxes before systemd escalates to SIGKILL.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

UNIT = """\
[Unit]
Description=Cube: E2B-compatible sandboxes as KVM microVMs
After=network-online.target
Wants=network-online.target

[Service]
Type=exec
ExecStart={exec_start}
Environment=CUBE_DATA_DIR={data_dir}
KillSignal=SIGTERM
TimeoutStopSec=300
Restart=on-failure
RestartSec=2
LimitNOFILE=1048576

[Install]
WantedBy=multi-user.target
"""


def render(cube: str, data_dir: Path, config: Path | None) -> str:
    exec_start = f"{cube} serve" + (f" --config {config}" if config else "")
    return UNIT.format(exec_start=exec_start, data_dir=data_dir)


def install_systemd_command(
    config: Annotated[Path | None, typer.Option(help="A TOML file for `cube serve`.")] = None,
    data_dir: Annotated[Path, typer.Option(help="CUBE_DATA_DIR for the service.")] = Path(
        "/var/lib/cube"
    ),
    unit_dir: Annotated[Path, typer.Option(help="Where units live.")] = Path("/etc/systemd/system"),
    enable: Annotated[bool, typer.Option(help="Also enable and start it now.")] = False,
) -> None:
    """Write cube.service for `cube serve` (and optionally enable and start it)."""
    cube = shutil.which("cube") or f"{sys.executable} -m cube"
    unit = unit_dir / "cube.service"
    unit.write_text(render(cube, data_dir, config.resolve() if config else None))
    typer.echo(f"wrote {unit}")
    if enable:
        subprocess.run(["systemctl", "daemon-reload"], check=True)
        subprocess.run(["systemctl", "enable", "--now", "cube.service"], check=True)
        typer.echo("cube.service enabled and started")
    else:
        typer.echo("start it with: systemctl daemon-reload && systemctl enable --now cube.service")
