"""`cube bench ...`: print measurement tables (never pass/fail: these machines are noisy)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cube.bench import egress, virtio_net, vmm

bench_app = typer.Typer(no_args_is_help=True, help="Measure Cube (tables, not verdicts).")


@bench_app.command("vmm")
def bench_vmm(
    restores: Annotated[int, typer.Option(min=1, help="Restores to time")] = 200,
    clones: Annotated[int, typer.Option(min=1, help="Idle clones for the density figure")] = 500,
    memory: Annotated[int, typer.Option(min=64, help="Guest memory, MiB")] = 256,
) -> None:
    """Snapshot restore latency and memory per idle clone, on this host's KVM."""
    typer.echo(vmm.run(restores, clones, memory))


@bench_app.command("net")
def bench_net(
    rounds: Annotated[int, typer.Option(min=1, help="Full rings each way through virtio-net")] = 40,
) -> None:
    """Egress filter cost per packet, network set-up time, virtio-net frame rates (root)."""
    typer.echo(egress.run())
    typer.echo(virtio_net.measure(rounds).table())
    typer.echo(virtio_net.measure(rounds, frame_bytes=65000, tso=True).table())


@bench_app.command("api")
def bench_api(
    url: Annotated[str, typer.Option(help="A running `cube serve`")] = "http://127.0.0.1:3000",
    key: Annotated[str, typer.Option(envvar="E2B_API_KEY", help="An API key")] = "",
    template: Annotated[str, typer.Option(help="Template to create")] = "base",
    creates: Annotated[int, typer.Option(min=1, help="Creates per concurrency level")] = 50,
    concurrency: Annotated[list[int] | None, typer.Option(help="Levels (repeatable)")] = None,
) -> None:
    """Create latency (p50/p95/p99) and creates/s through a running `cube serve`."""
    from cube.bench import api  # httpx comes with the test extra, not the daemon's deps

    typer.echo(api.run(url, key, template, creates, concurrency or [1, 50]))


@bench_app.command("exec")
def bench_exec(
    url: Annotated[str, typer.Option(help="A running `cube serve`")] = "http://127.0.0.1:3000",
    key: Annotated[str, typer.Option(envvar="E2B_API_KEY", help="An API key")] = "",
    template: Annotated[
        str, typer.Option(help="Template to create and to boot the peer from")
    ] = "base",
    samples: Annotated[int, typer.Option(min=1, help="Timed rounds of each kind")] = 50,
    warmup: Annotated[int, typer.Option(min=0, help="Rounds run first and discarded")] = 5,
    data_dir: Annotated[
        Path | None, typer.Option(help="The daemon's data dir (its templates)")
    ] = None,
) -> None:
    """commands.run("true") through the SDK, beside QEMU microvm + serial on the same guest."""
    from cube.bench import exec as bench  # the E2B SDK comes with the test extra

    typer.echo(bench.run(url, key, template, samples, warmup, data_dir))
