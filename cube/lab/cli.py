"""`cube lab`: build the nested lab's L1 image and run commands inside it.

`cube lab run` is what `make test-lab` and developers on PVM hosts use to reach hardware-style
KVM; `cube lab serve` runs the daemon in L1 with its port forwarded, so E2B clients on the host
can talk to sandboxes that only the lab can boot.
"""

from __future__ import annotations

import math
from typing import Annotated

import typer

from cube.lab.image import build_image
from cube.lab.runner import L1_CPUS, run_in_lab
from cube.pool.template import TemplateStore
from cube.pool.template_build import build_defaults

lab_app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="The nested KVM lab: a Debian L1 guest under QEMU TCG with emulated AMD-V.",
)

# Everything from the first positional on belongs to the command, its options included, so
# `cube lab run python3 -m pytest -x` needs no `--` (which still works).
_PASS_THROUGH = {"ignore_unknown_options": True, "allow_interspersed_args": False}

BootTimeout = Annotated[
    float, typer.Option(help="Seconds L1 may take to boot before the run fails.")
]
Memory = Annotated[int, typer.Option("--memory-mb", help="L1's memory in MiB.")]
Cpus = Annotated[int, typer.Option(help="L1's virtual CPUs.")]


def parse_forward(spec: str) -> tuple[int, int]:
    """HOST:GUEST (or a single PORT for both) into a (host, guest) port pair."""
    host, sep, guest = spec.partition(":")
    try:
        ports = (int(host), int(guest if sep else host))
    except ValueError:
        raise typer.BadParameter(f"{spec!r} is not HOST:GUEST ports") from None
    if not all(0 < port < 65536 for port in ports):
        raise typer.BadParameter(f"{spec!r}: ports go from 1 to 65535")
    return ports


def parse_env(spec: str) -> tuple[str, str]:
    name, sep, value = spec.partition("=")
    if not sep or not name:
        raise typer.BadParameter(f"{spec!r} is not NAME=VALUE")
    return name, value


def command_of(args: list[str]) -> list[str] | str:
    """One argument is shell code (`cube lab run 'make x && make y'`), several are argv."""
    return args[0] if len(args) == 1 else args


@lab_app.command()
def build() -> None:
    """Build the L1 image if it is not cached yet, and print its folder."""
    typer.echo(build_image())


@lab_app.command(context_settings=_PASS_THROUGH)
def run(
    command: Annotated[
        list[str], typer.Argument(help="The command; a single argument is run as shell code.")
    ],
    forward: Annotated[
        list[str] | None,
        typer.Option("--forward", "-f", help="HOST:GUEST, forward 127.0.0.1:HOST to L1's GUEST."),
    ] = None,
    env: Annotated[
        list[str] | None,
        typer.Option("--env", "-e", help="NAME=VALUE for the command's environment."),
    ] = None,
    timeout: Annotated[
        float, typer.Option(help="Seconds the command may run once L1 is up.")
    ] = 3600.0,
    boot_timeout: BootTimeout = 300.0,
    memory_mb: Memory = 6144,
    cpus: Cpus = L1_CPUS,
) -> None:
    """Run a command in a fresh L1, from the checkout, and exit with its status."""
    raise typer.Exit(
        run_in_lab(
            command_of(command),
            forwards=[parse_forward(spec) for spec in forward or []],
            env=dict(parse_env(spec) for spec in env or []),
            timeout=timeout,
            boot_timeout=boot_timeout,
            memory_mb=memory_mb,
            cpus=cpus,
        )
    )


@lab_app.command()
def serve(
    port: Annotated[int, typer.Option(help="Port of `cube serve`, on L1 and on the host.")] = 3000,
    boot_timeout: BootTimeout = 300.0,
    memory_mb: Memory = 6144,
    cpus: Cpus = L1_CPUS,
) -> None:
    """Run `cube serve` in L1, reachable on the host at 127.0.0.1:PORT, until interrupted.

    The data dir is the host's (shared with L1), so API keys made with `cube apikey create` on
    the host work, and templates snapshotted in one lab run are reused by the next; their root
    filesystems are built on the host first (L1 has no network for debootstrap or pip).
    """
    build_defaults(TemplateStore(), rootfs_only=True)
    raise typer.Exit(
        run_in_lab(
            f"cube template build-defaults && exec cube serve --listen 0.0.0.0:{port}",
            forwards=[(port, port)],
            timeout=math.inf,
            boot_timeout=boot_timeout,
            memory_mb=memory_mb,
            cpus=cpus,
        )
    )
