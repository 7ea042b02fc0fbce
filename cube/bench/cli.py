"""`cube bench ...`: print measurement tables (never pass/fail: these machines are noisy)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated

import typer

from cube.bench import egress, virtio_net, vmm, vmm_lab

bench_app = typer.Typer(no_args_is_help=True, help="Measure Cube (tables, not verdicts).")


@bench_app.command("vmm")
def bench_vmm(
    restores: Annotated[
        int, typer.Option(min=1, help="Restores to time (host tier, and --template's)")
    ] = 200,
    clones: Annotated[int, typer.Option(min=1, help="Idle clones for the density figure")] = 500,
    memory: Annotated[
        int, typer.Option(min=64, help="Guest memory, MiB (the bench guest's and --boot's)")
    ] = 256,
    boot: Annotated[
        int,
        typer.Option(
            min=0,
            help="Lab tier: boot the guest kernel N times in Cube's VMM and N in QEMU "
            "microvm, and compare (0: skip)",
        ),
    ] = 0,
    template: Annotated[
        str | None,
        typer.Option(
            help="Lab tier: time --restores restores of this template to its agent's reply"
        ),
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="--template's data dir (default: cube serve's)")
    ] = None,
    host_tier: Annotated[
        bool,
        typer.Option(
            "--host-tier",
            help="Also run the host-tier figures (the default without --boot and --template)",
        ),
    ] = False,
) -> None:
    """Restore latency and memory per idle clone on this host's KVM (the host tier); with
    --boot and/or --template, guest kernel boot vs QEMU microvm and restore to agent reply,
    which need hardware-style KVM (on PVM hosts: inside `cube lab run`). A refusal (no such
    KVM, no QEMU, no kernel or template) exits 2 before anything is measured."""
    if data_dir is not None and template is None:
        raise typer.BadParameter("goes with --template", param_hint="--data-dir")
    lab_tier = boot > 0 or template is not None
    try:
        with contextlib.ExitStack() as stack:
            # Every refusal comes before any measurement, so a combined run cannot fail late.
            if lab_tier:
                vmm_lab.require_hardware_kvm("--boot" if boot else "--template")
            kernel = vmm_lab.boot_kernel() if boot else None
            image = vmm_lab.template_image(template, data_dir) if template else None
            taps = stack.enter_context(vmm_lab.tap_for(image)) if image else None
            if host_tier or not lab_tier:
                typer.echo(vmm.run(restores, clones, memory))
            if kernel is not None:
                typer.echo(vmm_lab.run_boot(kernel, boot, memory))
            if template and image:
                typer.echo(vmm_lab.run_template(template, image, restores, taps))
    except vmm_lab.BenchRefused as exc:
        typer.echo(f"cube bench vmm: {exc}", err=True)
        raise typer.Exit(2) from None
    except vmm_lab.BenchFailed as exc:
        typer.echo(f"cube bench vmm: stopped: {exc}", err=True)
        raise typer.Exit(1) from None


@bench_app.command("net")
def bench_net(
    rounds: Annotated[int, typer.Option(min=1, help="Full rings each way through virtio-net")] = 40,
) -> None:
    """Egress filter cost per packet, network set-up time, virtio-net frame rates (root)."""
    typer.echo(egress.run())
    typer.echo(virtio_net.measure(rounds).table())
    typer.echo(virtio_net.measure(rounds, frame_bytes=65000, tso=True).table())


def int_list(text: str, minimum: int = 0) -> list[int]:
    """ "1,50" into [1, 50]; "" into [] (that measurement is skipped)."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a comma-separated list of integers") from None
    if any(value < minimum for value in values):
        raise typer.BadParameter(f"{text!r}: values start at {minimum}")
    return values


@bench_app.command("api")
def bench_api(
    url: Annotated[str, typer.Option(help="A running `cube serve`")] = "http://127.0.0.1:3000",
    key: Annotated[str, typer.Option(envvar="E2B_API_KEY", help="An API key")] = "",
    label: Annotated[str, typer.Option(help="Its name in the tables")] = "cube",
    data_dir: Annotated[
        Path | None, typer.Option(help="Its data dir, to size paused sandboxes")
    ] = None,
    peer: Annotated[str | None, typer.Option(help="A second serve measured beside it")] = None,
    peer_key: Annotated[str | None, typer.Option(help="The peer's key (default: --key)")] = None,
    peer_label: Annotated[str, typer.Option(help="The peer's name in the tables")] = "peer",
    peer_data_dir: Annotated[Path | None, typer.Option(help="The peer's data dir")] = None,
    template: Annotated[str, typer.Option(help="Template to create")] = "base",
    creates: Annotated[int, typer.Option(min=1, help="Creates per concurrency level")] = 50,
    concurrency: Annotated[str, typer.Option(help="Create concurrency levels")] = "1,50",
    dirty: Annotated[str, typer.Option(help='MiB dirtied before pause/resume ("": skip)')] = (
        "0,64,256"
    ),
    cycles: Annotated[int, typer.Option(min=1, help="Pause/resume cycles per size")] = 5,
    idle: Annotated[int, typer.Option(min=0, help="Idle sandboxes held (0: skip)")] = 20,
    settle: Annotated[float, typer.Option(min=0, help="Seconds they idle before measuring")] = 10,
) -> None:
    """Create latency, pause/resume vs dirty memory and idle sandboxes per GiB, through a
    running `cube serve` (and a peer beside it). Idle density reads this host's MemAvailable,
    so run it on the serve's machine."""
    import httpx  # httpx and the E2B SDK come with the test extra, not the daemon's deps

    from cube.bench import api

    targets = [api.Target(label, url, key, data_dir)]
    if peer is not None:
        targets.append(api.Target(peer_label, peer, peer_key or key, peer_data_dir))
    plan = api.Plan(
        template=template,
        creates=creates,
        concurrency=int_list(concurrency, minimum=1) or [1],
        dirty_mib=int_list(dirty),
        cycles=cycles,
        idle=idle,
        settle_s=settle,
    )
    try:
        for line in api.run(targets, plan):
            typer.echo(line)
    except (api.BenchError, httpx.HTTPError) as exc:
        typer.echo(f"cube bench api: stopped: {exc}", err=True)
        raise typer.Exit(1) from exc


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


@bench_app.command("soak")
def bench_soak(
    template: Annotated[str, typer.Option(help="The template to restore and reboot")] = "base",
    data_dir: Annotated[
        Path | None, typer.Option(help="The template's data dir (default: cube serve's)")
    ] = None,
    restores: Annotated[int, typer.Option(min=0, help="Restores to the agent's answer")] = 1000,
    width: Annotated[int, typer.Option(min=1, help="Restores in flight at once")] = 2,
    boots: Annotated[
        int, typer.Option(min=0, help="Kernel boots to the marker init, on each VMM")
    ] = 200,
    reboots: Annotated[
        int, typer.Option(min=0, help="Boots of the template's rootfs to init, on each VMM")
    ] = 100,
    minutes: Annotated[float, typer.Option(min=0.1, help="The whole soak's deadline")] = 60,
) -> None:
    """Count guest deaths: restores in Cube, and boots and reboots in Cube beside QEMU
    microvm, in one lab (hardware-style KVM: inside `cube lab run` on PVM hosts). Prints
    each death's report as it happens and a table at the end; exits 0 whatever it counted."""
    from cube.bench import soak

    try:
        with contextlib.ExitStack() as stack:
            vmm_lab.require_hardware_kvm("soak")
            kernel = vmm_lab.boot_kernel()
            image = vmm_lab.template_image(template, data_dir)
            taps = stack.enter_context(vmm_lab.tap_for(image, width))
            plan = soak.SoakPlan(boots, reboots, restores, width, minutes)
            typer.echo(soak.run(plan, kernel, template, image, taps))
    except vmm_lab.BenchRefused as exc:
        typer.echo(f"cube bench soak: {exc}", err=True)
        raise typer.Exit(2) from None
