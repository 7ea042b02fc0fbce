"""The lab runner without QEMU: its command line, the files it hands L1, and its supervision.

Supervision is exercised with small bash scripts standing in for QEMU: they print the ready
marker (or not), write an exit status (or not) and hang (or not), as L1 would.
"""

from __future__ import annotations

import contextlib
import io
import lzma
import os
import re
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from cube.lab import cli, image, qemu, runner
from cube.paths import CHECKOUT_DIR

IMAGE = runner.LabImage(Path("/c/rootfs.ext4"), Path("/c/vmlinux"), Path("/c/initrd.img"))
SHARES = [runner.Share("checkout", Path("/src/cube")), runner.Share("cache", Path("/var/c"))]


def _qemu(run_dir: Path = Path("/tmp/run"), forwards=(), shares=SHARES) -> list[str]:
    return runner.qemu_command(IMAGE, run_dir, shares, forwards, memory_mb=1024, cpus=2)


def _values(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == option]


# --- the QEMU command line ---


def test_l1_gets_emulated_amd_v_and_boots_our_init() -> None:
    argv = _qemu()
    assert _values(argv, "-accel") == ["tcg,thread=multi"]
    assert "+svm" in _values(argv, "-cpu")[0] and "+npt" in _values(argv, "-cpu")[0]
    assert _values(argv, "-kernel") == ["/c/vmlinux"]
    assert _values(argv, "-initrd") == ["/c/initrd.img"]
    assert f"init={image.INIT_PATH}" in _values(argv, "-append")[0].split()
    assert _values(argv, "-m") == ["1024M"]


def test_every_run_starts_from_the_pristine_image() -> None:
    (drive,) = _values(_qemu(), "-drive")
    assert drive.split(",")[0] == "file=/c/rootfs.ext4"
    assert "snapshot=on" in drive.split(",")


def test_console_goes_to_a_log_and_command_output_to_our_stdout() -> None:
    argv = _qemu(Path("/tmp/run"))
    # -nodefaults: no serial port, monitor or NIC but ours; order makes ttyS0 then ttyS1
    assert "-nodefaults" in argv
    assert _values(argv, "-serial") == ["file:/tmp/run/console.log", "chardev:cmdout"]
    assert _values(argv, "-chardev") == ["stdio,id=cmdout,signal=off"]


def test_shares_are_the_run_folder_plus_the_given_folders() -> None:
    virtfs = _values(_qemu(Path("/tmp/run")), "-virtfs")
    assert virtfs == [
        "local,path=/tmp/run,mount_tag=labrun,security_model=none",
        "local,path=/src/cube,mount_tag=checkout,security_model=none",
        "local,path=/var/c,mount_tag=cache,security_model=none",
    ]


def test_commas_in_paths_are_escaped_for_qemu() -> None:
    argv = _qemu(shares=[runner.Share("checkout", Path("/a,b"))])
    assert "local,path=/a,,b,mount_tag=checkout,security_model=none" in _values(argv, "-virtfs")


def test_no_network_unless_ports_are_forwarded() -> None:
    assert "-nic" not in _qemu()
    (nic,) = _values(_qemu(forwards=[(18080, 8080), (3000, 3000)]), "-nic")
    assert nic == (
        "user,model=virtio-net-pci,"
        "hostfwd=tcp:127.0.0.1:18080-:8080,hostfwd=tcp:127.0.0.1:3000-:3000"
    )


# --- what the run folder hands to L1 ---


def test_shares_are_mounted_parents_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkout = tmp_path / "checkout"
    monkeypatch.setattr(runner, "CHECKOUT_DIR", checkout)
    monkeypatch.setenv("CUBE_CACHE_DIR", str(checkout / ".cache"))
    assert [s.path for s in runner.lab_shares()] == [checkout, checkout / ".cache"]
    monkeypatch.setenv("CUBE_CACHE_DIR", str(tmp_path))
    assert [s.path for s in runner.lab_shares()] == [tmp_path, checkout]


def test_cache_share_is_created_and_at_the_host_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUBE_CACHE_DIR", str(tmp_path / "cache"))
    shares = {s.tag: s.path for s in runner.lab_shares()}
    assert shares == {"checkout": CHECKOUT_DIR, "cache": tmp_path / "cache"}
    assert (tmp_path / "cache").is_dir()


def _run_script(tmp_path: Path, command, env: dict[str, str]) -> str:
    script = tmp_path / "command.sh"
    script.write_text(runner.command_script(command, env, tmp_path))
    return subprocess.run(
        ["bash", str(script)], capture_output=True, text=True, check=True, env={}
    ).stdout


def test_command_script_passes_arguments_and_environment_exactly(tmp_path: Path) -> None:
    tricky = 'it\'s a "$HOME" `x`\nline two'
    env = {"TRICKY": tricky, "PLAIN": "1"}
    out = _run_script(
        tmp_path,
        [
            "python3",
            "-c",
            "import os,sys; print(repr((os.getcwd(), sys.argv[1:], os.environ['TRICKY'])))",
            "a b",
            "$PLAIN",
        ],
        env,
    )
    assert out.strip() == repr((str(tmp_path), ["a b", "$PLAIN"], tricky))


def test_a_string_command_is_shell_code(tmp_path: Path) -> None:
    assert _run_script(tmp_path, "echo $PLAIN && echo two", {"PLAIN": "one"}) == "one\ntwo\n"


@pytest.mark.parametrize("name", ["1X", "A-B", "A B", ""])
def test_invalid_environment_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="environment variable"):
        runner.command_script(["true"], {name: "x"}, Path("/"))


def test_an_empty_command_is_refused() -> None:
    with pytest.raises(ValueError):
        runner.command_script([], {}, Path("/"))


def test_run_folder_makes_cube_importable_from_the_checkout(tmp_path: Path) -> None:
    runner.write_run_folder(tmp_path, ["true"], SHARES, {"EXTRA": "1"})
    assert (tmp_path / "shares").read_text() == "checkout\t/src/cube\ncache\t/var/c\n"
    script = (tmp_path / "command.sh").read_text()
    assert f"export PYTHONPATH={image.SITE_DIR}:/src/cube\n" in script
    assert "export CUBE_CACHE_DIR=/var/c\n" in script
    assert "export EXTRA=1\n" in script


# --- the init script agrees with the runner ---

INIT = image.INIT_SCRIPT.read_text()


def test_init_script_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(image.INIT_SCRIPT)], check=True)


def test_init_script_speaks_the_runners_protocol() -> None:
    assert f"READY_MARKER={runner.READY_MARKER.decode().strip()} " in INIT
    assert f"ensure_mount 9p {runner.RUN_TAG} " in INIT
    for name in (runner.SHARES_FILE, runner.COMMAND_FILE, runner.STATUS_FILE):
        assert f'"$RUN/{name}"' in INIT
    assert re.search(r"console=ttyS0\b", runner.KERNEL_CMDLINE)
    assert "OUT=/dev/ttyS1\n" in INIT


# --- supervising QEMU (bash stands in for it) ---


def _fake_qemu(run_dir: Path, script: str) -> list[str]:
    return ["bash", "-c", script, "fake-qemu", str(run_dir)]


def _supervise(tmp_path: Path, script: str, *, timeout=10.0, boot_timeout=10.0, dump_wait=1.0):
    out = io.BytesIO()
    argv = _fake_qemu(tmp_path, script)
    status = runner.supervise(argv, tmp_path, out, timeout=timeout, boot_timeout=boot_timeout,
                              dump_wait=dump_wait)  # fmt: skip
    return status, out.getvalue()


def test_output_after_the_marker_is_streamed_and_the_status_returned(tmp_path: Path) -> None:
    status, out = _supervise(
        tmp_path,
        'printf "noise\\nCUBE-LAB-"; sleep 0.2; printf "READY\\nhello\\n"; sleep 0.2;'
        'printf "world\\n"; echo 7 > "$1/exit-status"',
    )
    assert (status, out) == (7, b"hello\nworld\n")


def _assert_killed(tmp_path: Path) -> None:
    pid = int((tmp_path / "pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_lab_that_never_gets_ready_fails_on_the_boot_timeout(tmp_path: Path) -> None:
    with pytest.raises(runner.LabFailure, match=r"not ready within 0\.5 s") as failure:
        _supervise(tmp_path, 'echo $$ > "$1/pid"; exec sleep 60', boot_timeout=0.5)
    assert failure.value.exit_code == runner.EXIT_LAB_FAILURE
    _assert_killed(tmp_path)


def test_a_hung_command_fails_on_the_timeout(tmp_path: Path) -> None:
    with pytest.raises(runner.LabFailure, match="past its timeout") as failure:
        _supervise(tmp_path, 'echo $$ > "$1/pid"; echo CUBE-LAB-READY; exec sleep 60', timeout=0.5)
    assert failure.value.exit_code == runner.EXIT_TIMEOUT
    _assert_killed(tmp_path)


def test_a_lab_that_stops_early_fails(tmp_path: Path) -> None:
    with pytest.raises(runner.LabFailure, match="before it was ready"):
        _supervise(tmp_path, "exit 1")
    with pytest.raises(runner.LabFailure, match="without reporting") as failure:
        _supervise(tmp_path, "echo CUBE-LAB-READY; echo partial")
    assert failure.value.exit_code == runner.EXIT_LAB_FAILURE


def test_a_failure_report_shows_the_end_of_the_console(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "console.log").write_text("".join(f"line {i}\n" for i in range(100)))
    runner.report_failure(runner.LabFailure("boom", 125), tmp_path)
    err = capsys.readouterr().err
    assert "boom" in err and str(tmp_path) in err
    assert "line 40\n" in err and "line 99\n" in err and "line 39\n" not in err


# --- the command line ---


def test_forward_and_env_parsing() -> None:
    assert cli.parse_forward("18080:8080") == (18080, 8080)
    assert cli.parse_forward("3000") == (3000, 3000)
    assert cli.parse_env("A=b=c") == ("A", "b=c")
    for bad in ("x:80", "80:", "0:80", "80:70000"):
        with pytest.raises(typer.BadParameter):
            cli.parse_forward(bad)
    with pytest.raises(typer.BadParameter):
        cli.parse_env("NOVALUE")


def test_run_passes_everything_after_the_command_through(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(cli, "run_in_lab", lambda command, **kw: calls.append((command, kw)) or 3)
    result = CliRunner().invoke(
        cli.lab_app,
        [
            "run",
            "-f",
            "18080:8080",
            "-e",
            "A=1",
            "--timeout",
            "9",
            "python3",
            "-m",
            "pytest",
            "--timeout",
            "5",
        ],
    )
    assert result.exit_code == 3, result.output
    ((command, kw),) = calls
    assert command == ["python3", "-m", "pytest", "--timeout", "5"]
    assert kw["forwards"] == [(18080, 8080)] and kw["env"] == {"A": "1"} and kw["timeout"] == 9


def test_run_with_one_argument_runs_shell_code(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(cli, "run_in_lab", lambda command, **kw: calls.append(command) or 0)
    assert CliRunner().invoke(cli.lab_app, ["run", "--", "make a && make b"]).exit_code == 0
    assert calls == ["make a && make b"]


def test_colours_follow_the_host_terminal() -> None:
    assert runner.terminal_env(False, "xterm", 120) == {"TERM": "dumb", "NO_COLOR": "1"}
    assert runner.terminal_env(True, "xterm", 120) == {"TERM": "xterm", "COLUMNS": "120"}


# --- image helpers ---


def _bzimage(payload: bytes, elf_size: int) -> bytes:
    """A bzImage as the boot protocol lays it out: a setup header naming one setup sector
    and where the payload is (here, 16 bytes into the protected-mode code), then the payload
    with the decompressed size appended and a trailer."""
    setup = bytearray(1024)
    setup[0x1F1] = 1
    setup[0x202:0x206] = b"HdrS"
    with_size = payload + struct.pack("<I", elf_size)
    struct.pack_into("<II", setup, 0x248, 16, len(with_size))
    return bytes(setup) + bytes(16) + with_size + b"trailer"


def test_vmlinux_is_extracted_from_the_bzimage() -> None:
    elf = b"\x7fELF" + os.urandom(4096)
    xz = lzma.compress(elf, format=lzma.FORMAT_XZ)
    assert image.extract_vmlinux(_bzimage(xz, len(elf))) == elf
    zstd = subprocess.run(["zstd", "-c", "-q"], input=elf, capture_output=True, check=True).stdout
    assert image.extract_vmlinux(_bzimage(zstd, len(elf))) == elf
    with pytest.raises(image.ImageError):
        image.extract_vmlinux(b"no payload here")
    with pytest.raises(image.ImageError):
        image.extract_vmlinux(_bzimage(b"gzip?" + bytes(64), len(elf)))


def test_the_l1_kernel_is_a_choice_of_two_with_its_own_image(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert image.image_key("6.1") != image.image_key("6.12")
    monkeypatch.setenv(image.L1_KERNEL_ENV, "5.10")
    with pytest.raises(image.ImageError, match=r"choose one of 6\.1, 6\.12"):
        image.l1_kernel()


def test_module_names_from_module_listings() -> None:
    listing = [
        "kernel/arch/x86/kvm/kvm-amd.ko: kernel/arch/x86/kvm/kvm.ko",
        "usr/lib/modules/6.1.0-50-amd64/kernel/fs/9p/9p.ko.xz",
        "usr/lib/modules/6.1.0-50-amd64/modules.dep",
        "kernel/drivers/block/virtio_blk.ko",
    ]
    assert image.module_names(listing) == {"kvm_amd", "9p", "virtio_blk"}


def test_lab_requirements_are_the_projects_runtime_and_test_ones(tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\ndependencies = ["trio>=0.27"]\n'
        '[project.optional-dependencies]\ntest = ["pytest>=8"]\ndocs = ["sphinx"]\n'
    )
    assert image.python_requirements(pyproject) == ["trio>=0.27", "pytest>=8"]


@pytest.mark.parametrize(
    ("results", "expected", "runs"),
    [
        ([(125, True), (0, False)], 0, 2),  # L1 panicked: the command runs once more
        ([(125, True), (125, True), (125, True)], 125, 3),  # ...but at most twice more
        ([(1, False)], 1, 1),  # the command's own failure is never repeated
    ],
)
def test_only_an_l1_panic_repeats_a_run(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    results: list[tuple[int, bool]],
    expected: int,
    runs: int,
) -> None:
    outcomes = iter(results)
    calls: list[object] = []
    monkeypatch.setattr(runner, "build_image", lambda: tmp_path)
    monkeypatch.setattr(runner, "cache_dir", lambda: tmp_path)
    monkeypatch.setattr(runner, "_run_once", lambda *args: calls.append(args) or next(outcomes))
    assert runner.run_in_lab("true", timeout=1, boot_timeout=1) == expected
    assert len(calls) == runs


def test_the_outer_qemu_can_run_from_a_debian_13_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the root's own loader and libraries, its firmware first on QEMU's search path."""
    outer = qemu.in_root(Path("/r"))
    argv = runner.qemu_command(IMAGE, Path("/tmp/run"), SHARES, (), memory_mb=1024, cpus=2,
                               qemu=outer.argv)  # fmt: skip
    assert argv[: len(outer.argv)] == list(outer.argv)
    assert argv[:5] == ["env", "QEMU_MODULE_DIR=/r/usr/lib/x86_64-linux-gnu/qemu",
                        "/r/lib64/ld-linux-x86-64.so.2", "--library-path",
                        "/r/lib/x86_64-linux-gnu:/r/usr/lib/x86_64-linux-gnu"]  # fmt: skip
    assert argv[5] == "/r/usr/bin/qemu-system-x86_64"
    assert _values(argv, "-L") == ["/r/usr/share/qemu", "/r/usr/share/seabios"]
    assert _qemu()[0] == "qemu-system-x86_64"  # the host's, by default
    monkeypatch.setenv(qemu.ENV, "qemu-7")
    with pytest.raises(qemu.QemuChoiceError, match="choose one of host, debian13"):
        qemu.outer_qemu()


def test_the_lab_runs_qemu_10_or_newer_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(qemu.ENV, raising=False)
    monkeypatch.setattr(qemu, "host_version", lambda: 7)
    assert qemu.chosen() == "debian13"
    monkeypatch.setattr(qemu, "host_version", lambda: 10)
    assert qemu.chosen() == "host"
    monkeypatch.setenv(qemu.ENV, "host")
    monkeypatch.setattr(qemu, "host_version", lambda: 7)
    assert qemu.chosen() == "host"  # asked for by name


# --- dumps before a hung command is stopped ---

# L1 as l1-init.sh's watcher plays it: it answers the dump request with a dump on the command's
# output (as pytest's is) and a copy of serve's log, then dump-done; and the command hangs on.
ANSWERS_DUMPS = """echo $$ > "$1/pid"; echo CUBE-LAB-READY
until [ -e "$1/dump-request" ]; do sleep 0.1; done
echo "Thread 0x0000000000000001 (most recent call first):"
echo "a dump" > "$1/serve-7.log"; touch "$1/dump-done"; exec sleep 60"""


def test_a_hung_command_asks_l1_for_dumps_before_it_is_stopped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    with pytest.raises(runner.CommandTimeout) as failure:
        _supervise(tmp_path, ANSWERS_DUMPS, timeout=0.5, dump_wait=30.0)
    assert time.monotonic() - started < 15  # not the whole dump_wait: L1 answered
    assert (tmp_path / runner.DUMP_REQUEST).exists()
    assert failure.value.answered is True
    assert failure.value.exit_code == runner.EXIT_TIMEOUT
    _assert_killed(tmp_path)
    runner.report_failure(failure.value, tmp_path)
    err = capsys.readouterr().err
    assert "past its timeout" in err and "L1 answered the dump request" in err
    assert f"in {tmp_path / 'serve-7.log'}" in err and f"in {tmp_path / 'console.log'}" in err


def test_the_dumps_travel_on_the_command_output_while_the_runner_waits(tmp_path: Path) -> None:
    out = io.BytesIO()
    with pytest.raises(runner.CommandTimeout):
        runner.supervise(_fake_qemu(tmp_path, ANSWERS_DUMPS), tmp_path, out, timeout=0.5,
                         boot_timeout=10, dump_wait=30)  # fmt: skip
    assert b"Thread 0x0000000000000001 (most recent call first):" in out.getvalue()


def test_the_wait_for_dumps_is_bounded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    with pytest.raises(runner.CommandTimeout) as failure:
        _supervise(tmp_path, 'echo $$ > "$1/pid"; echo CUBE-LAB-READY; exec sleep 60',
                   timeout=0.5, dump_wait=1.5)  # fmt: skip
    assert 2.0 <= time.monotonic() - started < 10
    assert (tmp_path / runner.DUMP_REQUEST).exists()
    assert failure.value.answered is False
    _assert_killed(tmp_path)
    runner.report_failure(failure.value, tmp_path)
    assert "L1 did not answer the dump request" in capsys.readouterr().err


def test_the_init_script_answers_the_dump_request() -> None:
    assert f"DUMP_REQUEST={runner.DUMP_REQUEST} DUMP_DONE={runner.DUMP_DONE} " in INIT
    assert '"$RUN/$DUMP_REQUEST"' in INIT and '"$RUN/$DUMP_DONE"' in INIT
    assert "dump_when_asked &\n" in INIT
    assert "echo l >/proc/sysrq-trigger\n" in INIT and "echo w >/proc/sysrq-trigger\n" in INIT
    # each serve's log (its stderr's file) copied as the runner names it
    assert '"/proc/$pid/fd/2"' in INIT and '>"$RUN/serve-$pid.log"' in INIT
    assert runner.SERVE_LOGS == "serve-*.log"


def _init_pattern(name: str) -> str:
    match = re.search(rf"^{name}='([^']+)'$", INIT, re.MULTILINE)
    assert match, name
    return match[1]


@contextlib.contextmanager
def _processes(*command_lines: str) -> Iterator[list[int]]:
    """Processes whose command line (as pgrep -f sees it) is each of `command_lines`."""
    procs = [subprocess.Popen(["bash", "-c", 'exec -a "$0" sleep 60', line])
             for line in command_lines]  # fmt: skip
    try:
        time.sleep(0.3)  # until each has exec'd
        yield [proc.pid for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def _pgrep(pattern: str) -> set[int]:
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    return {int(pid) for pid in found.split()}


def test_the_watchers_patterns_find_serve_and_pytest_and_never_themselves() -> None:
    serve, pytest_ = _init_pattern("SERVE_PATTERN"), _init_pattern("PYTEST_PATTERN")
    with _processes(
        "python3 -m cube serve --listen 127.0.0.1:3000",
        "/usr/bin/python3 -m cube serve --config /c/cube.toml",
        "python3 -u -m pytest -m lab tests/lab",
        f"bash -c pgrep -f '{serve}' '{pytest_}'",  # a watcher with the patterns in its command
        "python3 -m cube lab serve --port 3000",
        "python3 -m cube template build base",
    ) as (serve1, serve2, tests, watcher, lab_serve, build):
        assert _pgrep(serve) & {serve1, serve2, tests, watcher, lab_serve, build} == {
            serve1,
            serve2,
        }
        assert _pgrep(pytest_) & {serve1, serve2, tests, watcher, lab_serve, build} == {tests}


def test_the_dump_watcher_signals_only_processes_that_catch_sigusr1() -> None:
    """SIGUSR1's default action ends a process: one that would not dump must not get it."""
    script = (Path(image.INIT_SCRIPT)).read_text()
    function = re.search(r"^catches_usr1\(\) \{.*?^\}", script, re.S | re.M)
    assert function is not None
    catcher = subprocess.Popen(
        [sys.executable, "-c", "import signal, sys, time; signal.signal(signal.SIGUSR1, "
         "lambda *a: None); print(flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    plain = subprocess.Popen(["sleep", "60"])
    try:
        assert catcher.stdout is not None and catcher.stdout.readline()
        check = f"{function.group(0)}\ncatches_usr1 {catcher.pid} && ! catches_usr1 {plain.pid}"
        assert subprocess.run(["bash", "-c", check]).returncode == 0
    finally:
        for process in (catcher, plain):
            process.kill()
            process.wait()


def test_labs_run_side_by_side_only_as_far_as_the_host_has_cpus(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(runner, "cache_dir", lambda: tmp_path)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(runner, "SLOT_POLL", 0.01)
    third_started = threading.Event()

    def third_lab() -> None:
        with runner._lab_slots(1):
            third_started.set()

    with runner._lab_slots(1), runner._lab_slots(1):
        waiting = threading.Thread(target=third_lab)
        waiting.start()
        assert not third_started.wait(0.5)
    waiting.join(10)
    assert third_started.is_set()
    with runner._lab_slots(2):  # a two-CPU lab takes the whole host
        waiting = threading.Thread(target=third_lab)
        third_started.clear()
        waiting.start()
        assert not third_started.wait(0.5)
    waiting.join(10)
    assert third_started.is_set()
