"""`cube bench ...`: print measurement tables (never pass/fail: these machines are noisy)."""

from __future__ import annotations

from typing import Annotated

import typer

from cube.bench import vmm

bench_app = typer.Typer(no_args_is_help=True, help="Measure Cube (tables, not verdicts).")


@bench_app.command("vmm")
def bench_vmm(
    restores: Annotated[int, typer.Option(min=1, help="Restores to time")] = 200,
    clones: Annotated[int, typer.Option(min=1, help="Idle clones for the density figure")] = 500,
    memory: Annotated[int, typer.Option(min=64, help="Guest memory, MiB")] = 256,
) -> None:
    """Snapshot restore latency and memory per idle clone, on this host's KVM."""
    typer.echo(vmm.run(restores, clones, memory))
