"""`cube template ...`: build, list, inspect and remove sandbox templates."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Annotated

import msgspec
import typer

from cube.guestkernel import KernelError
from cube.pool.buildlog import BuildError
from cube.pool.rootfs_cache import BuildSpec
from cube.pool.template import TemplateError, TemplateStore
from cube.pool.template_build import build_defaults, build_template

template_app = typer.Typer(no_args_is_help=True, help="Sandbox templates: build, list, remove.")

ROOTFS_ONLY_HELP = (
    "Only build and cache the root filesystem (for hosts that cannot boot guests, e.g. PVM); "
    "then run the same build inside `cube lab run` to boot and snapshot it"
)


def _fail(error: Exception) -> typer.Exit:
    typer.echo(f"cube template: {error}", err=True)
    return typer.Exit(1)


@template_app.command("build")
def build_command(
    name: str,
    from_oci: Annotated[
        Path | None,
        typer.Option(exists=True, help="A `docker save` tarball or an OCI image layout folder"),
    ] = None,
    from_debian: Annotated[bool, typer.Option(help="Debian bookworm (the default)")] = False,
    apt: Annotated[list[str] | None, typer.Option(help="Extra Debian package")] = None,
    pip: Annotated[list[str] | None, typer.Option(help="Extra pip requirement")] = None,
    interpreter: Annotated[bool, typer.Option(help="Add the code interpreter")] = False,
    cpus: Annotated[int, typer.Option(min=1, max=8)] = 2,
    memory: Annotated[int, typer.Option(min=128, help="MiB")] = 1024,
    disk: Annotated[int | None, typer.Option(min=64, help="MiB (default: files + 1 GiB)")] = None,
    start_cmd: Annotated[str | None, typer.Option(help="Runs in the background, kept up")] = None,
    ready_cmd: Annotated[str | None, typer.Option(help="Snapshot once this exits 0")] = None,
    rootfs_only: Annotated[bool, typer.Option(help=ROOTFS_ONLY_HELP)] = False,
) -> None:
    """Build template NAME: root filesystem, first boot, memory snapshot."""
    if from_debian and from_oci:
        raise _fail(ValueError("--from-debian and --from-oci exclude each other"))
    if from_oci is not None and apt:
        raise _fail(ValueError("--apt works with --from-debian only (install them in the image)"))
    spec = BuildSpec(
        name=name, oci=from_oci.resolve() if from_oci else None, apt=tuple(apt or ()),
        pip=tuple(pip or ()), interpreter=interpreter, cpus=cpus, memory_mb=memory,
        disk_mb=disk, start_cmd=start_cmd, ready_cmd=ready_cmd,
    )  # fmt: skip
    try:
        template = build_template(spec, TemplateStore(), rootfs_only=rootfs_only)
    except (BuildError, TemplateError, KernelError) as error:
        raise _fail(error) from None
    if template is not None:
        typer.echo(f"{template.name} ({template.id}) ready")


@template_app.command("build-defaults")
def build_defaults_command(
    rootfs_only: Annotated[bool, typer.Option(help=ROOTFS_ONLY_HELP)] = False,
) -> None:
    """Build `base` and `code-interpreter-v1` unless they are up to date."""
    try:
        build_defaults(TemplateStore(), rootfs_only=rootfs_only)
    except (BuildError, TemplateError, KernelError) as error:
        raise _fail(error) from None


@template_app.command("ls")
def ls_command() -> None:
    """List templates: name, id, status, resources, build time."""
    try:
        templates = TemplateStore().list()
    except TemplateError as error:
        raise _fail(error) from None
    rows = [("NAME", "ID", "STATUS", "CPUS", "MEMORY", "DISK", "ENVD", "BUILT")]
    for t in templates:
        built = t.built_at or t.created_at
        when = datetime.datetime.fromtimestamp(built).strftime("%Y-%m-%d %H:%M")
        rows.append((t.name, t.id, t.status, str(t.cpus), f"{t.memory_mb}M", f"{t.disk_mb}M",
                     t.envd_version or "-", when))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        typer.echo("  ".join(cells).rstrip())


@template_app.command("inspect")
def inspect_command(
    name: str,
    log: Annotated[bool, typer.Option(help="Print the build log instead")] = False,
) -> None:
    """Print a template's metadata as JSON (or its build log)."""
    try:
        template = TemplateStore().get(name)
    except TemplateError as error:
        raise _fail(error) from None
    if log:
        typer.echo(Path(template.build_log).read_text(errors="replace"), nl=False)
    else:
        typer.echo(msgspec.json.format(msgspec.json.encode(template), indent=2))


@template_app.command("rm")
def rm_command(names: list[str]) -> None:
    """Remove templates (by name or id)."""
    store = TemplateStore()
    for name in names:
        try:
            typer.echo(f"removed {store.remove(name)}")
        except TemplateError as error:
            raise _fail(error) from None
