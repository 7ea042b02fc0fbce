"""The template build's pure parts and the `cube template` command line (no guest is booted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio
from typer.testing import CliRunner

from cube.cli import app
from cube.guest.init import READY_MARKER
from cube.pool import template_build
from cube.pool.buildlog import BuildError, BuildLog
from cube.pool.rootfs_cache import BuildSpec, rootfs_key
from cube.pool.template import TemplateStore
from cube.pool.template_build import GuestConsole, _first_error, is_up_to_date, template_key


def test_guest_console_lines_go_to_the_log_and_the_marker_is_noticed(tmp_path: Path) -> None:
    log = BuildLog(tmp_path / "log", terminal=None)
    console = GuestConsole(log)
    console(b"[ 0.1] booting\r\ncube-init: temp")
    assert not console.ready
    console(READY_MARKER.removeprefix("cube-init: temp").encode() + b"\r\nnext")
    assert console.ready
    log.close()
    assert (tmp_path / "log").read_text() == f"guest| [ 0.1] booting\nguest| {READY_MARKER}\n"


def test_build_log_runs_commands_into_the_file(tmp_path: Path) -> None:
    with BuildLog(tmp_path / "log", terminal=None) as log:
        log.run(["sh", "-c", "echo out; echo err >&2"])
        with pytest.raises(BuildError, match="exit status 3"):
            log.run(["sh", "-c", "exit 3"])
    text = (tmp_path / "log").read_text()
    assert "out\nerr\n" in text
    assert "$ sh -c exit 3" in text


def test_keys_follow_the_inputs() -> None:
    base = BuildSpec(name="a")
    assert rootfs_key(base) == rootfs_key(BuildSpec(name="other-name"))
    assert rootfs_key(base) != rootfs_key(BuildSpec(name="a", pip=("rich",)))
    assert rootfs_key(base) != rootfs_key(BuildSpec(name="a", interpreter=True))
    assert rootfs_key(base) != rootfs_key(BuildSpec(name="a", start_cmd="x"))
    assert rootfs_key(base) == rootfs_key(BuildSpec(name="a", cpus=4))
    assert template_key(base) != template_key(BuildSpec(name="a", cpus=4))


def test_up_to_date_needs_a_ready_template_with_the_same_inputs(tmp_path: Path) -> None:
    store = TemplateStore(tmp_path)
    spec = BuildSpec(name="base")
    assert not is_up_to_date(store, spec)
    with store.building("base"):
        template = store.begin("base", source="debian", cpus=2, memory_mb=1024,
                               inputs=template_key(spec))  # fmt: skip
    assert not is_up_to_date(store, spec)
    store.update(template, "ready")
    assert is_up_to_date(store, spec)
    assert not is_up_to_date(store, BuildSpec(name="base", memory_mb=2048))


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("CUBE_DATA_DIR", str(tmp_path))
    return CliRunner()


def test_cli_ls_inspect_rm(cli: CliRunner, tmp_path: Path) -> None:
    assert cli.invoke(app, ["template", "ls"]).stdout.split() == [
        "NAME", "ID", "STATUS", "CPUS", "MEMORY", "DISK", "ENVD", "BUILT",
    ]  # fmt: skip
    store = TemplateStore(tmp_path / "templates")
    with store.building("base"):
        template = store.begin("base", source="debian", cpus=2, memory_mb=1024)
    Path(template.build_log).write_text("line one\n")
    listed = cli.invoke(app, ["template", "ls"])
    assert listed.exit_code == 0 and "base" in listed.stdout and "building" in listed.stdout
    inspected = cli.invoke(app, ["template", "inspect", template.id])
    assert json.loads(inspected.stdout)["name"] == "base"
    assert cli.invoke(app, ["template", "inspect", "base", "--log"]).stdout == "line one\n"
    missing = cli.invoke(app, ["template", "inspect", "nope"])
    assert missing.exit_code == 1 and "no template named 'nope'" in missing.stderr
    assert cli.invoke(app, ["template", "rm", "base"]).stdout == "removed base\n"
    assert cli.invoke(app, ["template", "rm", "base"]).exit_code == 1


def test_cli_refuses_conflicting_sources(cli: CliRunner, tmp_path: Path) -> None:
    image = tmp_path / "image.tar"
    image.write_bytes(b"")
    both = cli.invoke(app, ["template", "build", "x", "--from-debian", "--from-oci", str(image)])
    assert both.exit_code == 1 and "exclude each other" in both.stderr
    apt = cli.invoke(app, ["template", "build", "x", "--from-oci", str(image), "--apt", "vim"])
    assert apt.exit_code == 1 and "--from-debian only" in apt.stderr


def test_nursery_groups_are_unwrapped() -> None:
    error = BuildError("the guest stopped")
    nested = BaseExceptionGroup("outer", [ExceptionGroup("inner", [error]), KeyboardInterrupt()])
    assert _first_error(nested) is error


def test_failed_build_says_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(spec: BuildSpec, log: BuildLog) -> Path:
        log.line("working on it")
        raise RuntimeError("mirror unreachable")

    monkeypatch.setattr(template_build, "build_rootfs", broken)
    store = TemplateStore(tmp_path)
    with pytest.raises(BuildError, match="mirror unreachable"):
        template_build.build_template(BuildSpec(name="base"), store)
    template = store.get("base")
    assert (template.status, template.error) == ("error", "mirror unreachable")
    log = Path(template.build_log).read_text()
    assert "working on it" in log and "build failed: mirror unreachable" in log


class SilentVsock:
    async def connect(self, port: int, timeout: float) -> None:
        await trio.sleep(timeout)
        raise ConnectionError("no agent")


class DyingGuest:
    """Below the build: a VM whose guest stops on its own before its agent answers."""

    vsock = SilentVsock()

    async def run(self) -> None:
        return None

    def crash_report(self) -> list[str]:
        return [
            "guest stopped: shutdown (triple fault)",
            "vCPU 0 (RIP 0x1000)",
            "--- console tail ---",
        ]


def test_a_guest_that_dies_in_the_build_fails_it_with_its_crash_report(tmp_path: Path) -> None:
    log = BuildLog(tmp_path / "build.log")
    template = TemplateStore(tmp_path).begin("base", source="debian", cpus=1, memory_mb=256)
    vm, console = DyingGuest(), GuestConsole(log)
    with pytest.raises(BaseExceptionGroup) as caught:
        trio.run(template_build._drive, vm, template, console, tmp_path, log)
    error = _first_error(caught.value)
    assert isinstance(error, BuildError)
    assert str(error).splitlines()[1:3] == [
        "guest stopped: shutdown (triple fault)",
        "vCPU 0 (RIP 0x1000)",
    ]
