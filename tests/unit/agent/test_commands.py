"""commands.* through the real E2B SDK against the host-mode agent."""

from __future__ import annotations

import contextlib

import pytest
from e2b import CommandExitException, InvalidArgumentException, Sandbox, TimeoutException

from tests.unit.agent.harness import Agent


def test_run_captures_stdout_stderr_and_exit_code(sandbox: Sandbox) -> None:
    result = sandbox.commands.run("echo out; echo err >&2")
    assert (result.stdout, result.stderr, result.exit_code, result.error) == (
        "out\n",
        "err\n",
        0,
        None,
    )


def test_nonzero_exit_raises_command_exit_exception(sandbox: Sandbox) -> None:
    with pytest.raises(CommandExitException) as info:
        sandbox.commands.run("echo partial; exit 3")
    assert info.value.exit_code == 3
    assert info.value.stdout == "partial\n"
    assert info.value.error == "exit status 3"


def test_env_vars_request_and_sandbox_level(agent: Agent, sandbox: Sandbox) -> None:
    assert agent.refresh(env_vars={"SANDBOX_VAR": "from-sandbox", "SHADOWED": "sandbox"}).ok
    try:
        result = sandbox.commands.run(
            'echo "$SANDBOX_VAR $SHADOWED $REQUEST_VAR $USER $LOGNAME $HOME"',
            envs={"REQUEST_VAR": "from-request", "SHADOWED": "request"},
        )
    finally:
        assert agent.refresh().ok
    home = str(agent.user_home)
    assert result.stdout == f"from-sandbox request from-request user user {home}\n"


def test_cwd_defaults_to_home_and_can_be_set(agent: Agent, sandbox: Sandbox) -> None:
    assert sandbox.commands.run("pwd").stdout.strip() == str(agent.user_home)
    assert sandbox.commands.run("pwd", user="root").stdout.strip() == str(agent.root_home)
    assert sandbox.commands.run("pwd", cwd="/tmp").stdout.strip() == "/tmp"


def test_missing_cwd_is_invalid_argument(sandbox: Sandbox) -> None:
    with pytest.raises(InvalidArgumentException, match="does not exist"):
        sandbox.commands.run("pwd", cwd="/definitely/not/here")


def test_background_list_and_kill(sandbox: Sandbox) -> None:
    handle = sandbox.commands.run("sleep 60", background=True)
    assert handle.pid in [p.pid for p in sandbox.commands.list()]
    assert sandbox.commands.kill(handle.pid)
    with pytest.raises(CommandExitException) as info:
        handle.wait()
    assert info.value.exit_code == -1
    assert info.value.error == "signal: killed"
    assert handle.pid not in [p.pid for p in sandbox.commands.list()]
    assert not sandbox.commands.kill(handle.pid)


def test_stdin_send_and_close(sandbox: Sandbox) -> None:
    handle = sandbox.commands.run("cat", background=True, stdin=True)
    sandbox.commands.send_stdin(handle.pid, "hello ")
    handle.send_stdin(b"world\n")
    handle.close_stdin()
    assert handle.wait().stdout == "hello world\n"


def test_stream_input(sandbox: Sandbox) -> None:
    handle = sandbox.commands.run("cat", background=True, stdin=True)
    sandbox.commands.stream_input(handle.pid, ["a", b"b", "c\n"])
    handle.close_stdin()
    assert handle.wait().stdout == "abc\n"


def test_stdin_false_reads_dev_null(sandbox: Sandbox) -> None:
    assert sandbox.commands.run("cat; echo done").stdout == "done\n"


def test_connect_to_running_and_exited_process(sandbox: Sandbox) -> None:
    handle = sandbox.commands.run("read line; echo got $line", background=True, stdin=True)
    other = sandbox.commands.connect(handle.pid)
    handle.disconnect()
    sandbox.commands.send_stdin(handle.pid, "x\n")
    assert other.wait().stdout == "got x\n"
    replay = sandbox.commands.connect(handle.pid)
    assert replay.wait().exit_code == 0


def test_timeout_ends_the_command(sandbox: Sandbox) -> None:
    with pytest.raises(TimeoutException):
        sandbox.commands.run("sleep 30", timeout=1)


def test_timeout_is_the_process_lifetime(sandbox: Sandbox) -> None:
    handle = sandbox.commands.run("sleep 30", background=True, timeout=1)
    with pytest.raises((CommandExitException, TimeoutException)):
        handle.wait()
    replay = sandbox.commands.connect(handle.pid)
    with pytest.raises(CommandExitException) as info:
        replay.wait()
    assert info.value.error == "signal: killed"


def test_callbacks_and_large_output(sandbox: Sandbox) -> None:
    chunks: list[str] = []
    result = sandbox.commands.run("head -c 300000 /dev/zero | tr '\\0' x", on_stdout=chunks.append)
    assert len(result.stdout) == 300000
    assert "".join(chunks) == result.stdout


def test_disconnected_client_does_not_stall_the_process(sandbox: Sandbox, name: str) -> None:
    handle = sandbox.commands.run(
        f"head -c 5000000 /dev/zero; touch {name}", background=True, timeout=0
    )
    handle.disconnect()
    replay = sandbox.commands.connect(handle.pid, timeout=30)
    with contextlib.suppress(CommandExitException):
        replay.wait()
    assert sandbox.files.exists(name)
