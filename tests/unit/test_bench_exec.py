"""`cube bench exec`'s serial driver and peer command line, without QEMU.

A real shell on a pseudo-terminal stands in for the guest's serial console: the terminal echoes
what is typed and the shell prints prompts, as the peer's console does. Nothing here asserts
how long anything takes.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from e2b.exceptions import SandboxException

from cube.bench import exec as bench

PEER = bench.Peer(Path("/k/vmlinux"), Path("/t/base/rootfs.ext4"), cpus=1, memory_mb=512)


@pytest.fixture
def on_terminal() -> Iterator[Callable[[list[str]], int]]:
    """Start a process on a fresh pty (PS1 set as the peer's kernel sets it); its master fd.
    Every process started is ended afterwards."""
    started: list[tuple[subprocess.Popen[bytes], int]] = []

    def start(argv: list[str]) -> int:
        master, slave = os.openpty()
        env = {"PATH": os.environ["PATH"], "PS1": bench.PROMPT_SETTING}
        process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env)
        os.close(slave)  # the child's copy is the only one: its exit reads as EIO on the master
        started.append((process, master))
        return master

    yield start
    for process, master in started:
        process.kill()
        process.wait()
        os.close(master)


def test_commands_are_timed_to_their_own_marker_on_an_echoing_terminal(on_terminal) -> None:
    master = on_terminal(["sh", "-i"])
    shell = bench.SerialShell(master, master)
    shell.wait_for(bench.PROMPT, timeout=30)
    for command in ["true", bench.SDK_COMMAND, "true"]:
        assert shell.run(command, timeout=30) >= 0


def test_the_typed_line_echoed_back_is_not_taken_for_the_answer(on_terminal) -> None:
    # cat answers nothing but the typed line itself (and the terminal echoes it too)
    master = on_terminal(["cat"])
    shell = bench.SerialShell(master, master)
    with pytest.raises(bench.PeerError, match="no '@@1@@'") as failure:
        shell.run("true", timeout=1)
    assert "echo @@$((0+1))@@" in str(failure.value)  # the tail shows what came back


def test_booting_waits_for_the_prompt_through_pipes_as_qemu_stdio_gives_it() -> None:
    argv = ["sh", "-c", f"echo kernel noise; PS1='{bench.PROMPT_SETTING}' exec sh -i"]
    with bench.booted_shell(argv) as (shell, boot_ms):
        assert boot_ms >= 0
        assert shell.run("true", timeout=30) >= 0


def test_a_peer_that_dies_before_its_prompt_fails_with_its_output() -> None:
    with (
        pytest.raises(bench.PeerError, match="console closed") as failure,
        bench.booted_shell(["sh", "-c", "echo Kernel panic"]),
    ):
        pass
    assert "Kernel panic" in str(failure.value)


def test_the_peer_boots_cubes_kernel_and_template_with_a_shell_on_its_serial() -> None:
    argv = PEER.qemu_argv()
    assert argv[argv.index("-kernel") + 1] == "/k/vmlinux"
    assert argv[argv.index("-smp") + 1] == "1" and argv[argv.index("-m") + 1] == "512M"
    assert "-enable-kvm" in argv and argv[argv.index("-M") + 1] == "microvm,acpi=off"
    cmdline = argv[argv.index("-append") + 1].split()
    assert {"console=ttyS0", "root=/dev/vda", "init=/bin/sh", "HOME=/home/user"} <= set(cmdline)
    assert f"PS1={bench.PROMPT_SETTING}" in cmdline


def test_the_template_rootfs_is_attached_copy_on_write_never_written() -> None:
    argv = PEER.qemu_argv()
    drive = argv[argv.index("-drive") + 1].split(",")
    assert "file=/t/base/rootfs.ext4" in drive and "snapshot=on" in drive


class _FailingCommands:
    def run(self, command: str) -> None:
        raise SandboxException("The sandbox was not found")


def test_a_failed_sdk_command_is_recorded_not_raised() -> None:
    cube = bench.CubeSide(SimpleNamespace(commands=_FailingCommands()), 40.0, 0.0)
    assert cube.round_trip() is None
    assert len(cube.failures) == 1 and "The sandbox was not found" in cube.failures[0]


def test_the_report_gives_both_ratios_and_keeps_boot_apart() -> None:
    rounds = bench.Rounds(cube=[10.0], peer_sdk_command=[5.0], peer_builtin=[2.0])
    cube = bench.CubeSide(SimpleNamespace(), create_ms=40.0, created_at=0.0)
    text = "\n".join(bench.report(rounds, cube, boot_ms=2500.0))
    assert "2.00x against the same command" in text and "5.00x against the builtin" in text
    assert "Sandbox.create 40 ms" in text and "shell prompt 2500 ms" in text
    assert "failed" not in text


def test_the_report_says_when_commands_failed() -> None:
    rounds = bench.Rounds(cube=[], peer_sdk_command=[5.0], peer_builtin=[2.0])
    cube = bench.CubeSide(SimpleNamespace(), 40.0, 0.0, failures=["1.0 s after the create: x"])
    text = "\n".join(bench.report(rounds, cube, boot_ms=2500.0))
    assert "every command failed" in text and "1 commands failed" in text
    assert "x against" not in text
