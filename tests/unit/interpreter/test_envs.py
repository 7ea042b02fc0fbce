"""Env vars: per call (set before the cell, restored after) and sandbox-global (envs.json)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from e2b_code_interpreter import Sandbox

from tests.unit.interpreter.conftest import Server

GET = "import os; os.environ.get('{}', 'unset')"


@pytest.fixture
def global_envs(server: Server) -> Iterator[Server]:
    yield server
    server.write_envs({})


def test_per_call_env_vars_are_restored(sandbox: Sandbox) -> None:
    value = 'it\'s "quoted"\n$HOME'
    execution = sandbox.run_code(
        "import os; print(os.environ['CALL_VAR'])", envs={"CALL_VAR": value}
    )
    assert execution.logs.stdout == [value + "\n"]
    assert sandbox.run_code(GET.format("CALL_VAR")).text == "unset"


def test_per_call_env_vars_reach_subprocesses(sandbox: Sandbox) -> None:
    execution = sandbox.run_code("!echo $SUB_VAR", envs={"SUB_VAR": "$(not run)"})
    assert "".join(execution.logs.stdout).strip() == "$(not run)"


def test_per_call_env_vars_in_bash(sandbox: Sandbox) -> None:
    execution = sandbox.run_code("echo $FOO", envs={"FOO": "bar baz"}, language="bash")
    assert execution.logs.stdout == ["bar baz\n"]
    after = sandbox.run_code("echo ${FOO:-default}", language="bash")
    assert after.logs.stdout == ["default\n"]


def test_global_env_vars_reach_running_kernels(sandbox: Sandbox, global_envs: Server) -> None:
    global_envs.write_envs({"GLOBAL_VAR": "one"})
    assert sandbox.run_code(GET.format("GLOBAL_VAR")).text == "one"
    assert sandbox.run_code("echo $GLOBAL_VAR", language="bash").logs.stdout == ["one\n"]
    global_envs.write_envs({"GLOBAL_VAR": "two", "OTHER_VAR": "x"})
    assert sandbox.run_code(GET.format("GLOBAL_VAR")).text == "two"
    global_envs.write_envs({"OTHER_VAR": "x"})
    assert sandbox.run_code(GET.format("GLOBAL_VAR")).text == "unset"


def test_per_call_override_falls_back_to_global(sandbox: Sandbox, global_envs: Server) -> None:
    global_envs.write_envs({"SHADOWED": "global"})
    assert sandbox.run_code(GET.format("SHADOWED"), envs={"SHADOWED": "call"}).text == "call"
    assert sandbox.run_code(GET.format("SHADOWED")).text == "global"


def test_new_context_starts_with_global_env_vars(sandbox: Sandbox, global_envs: Server) -> None:
    global_envs.write_envs({"AT_START": "yes"})
    context = sandbox.create_code_context()
    try:
        assert sandbox.run_code(GET.format("AT_START"), context=context).text == "yes"
    finally:
        sandbox.remove_code_context(context)


def test_malformed_envs_file_is_ignored(sandbox: Sandbox, global_envs: Server) -> None:
    (global_envs.state_dir / "envs.json").write_text("{not json")
    assert sandbox.run_code("1 + 1").text == "2"


def test_concurrent_calls_do_not_see_each_others_env_vars(sandbox: Sandbox) -> None:
    """Calls in one context are serialised from setting a call's env vars to restoring them."""
    slow = "import os, time; time.sleep(1); os.environ.get('PRIVATE_VAR', 'unset')"
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(sandbox.run_code, slow, envs={"PRIVATE_VAR": "mine"})
        second = pool.submit(sandbox.run_code, GET.format("PRIVATE_VAR"))
        assert first.result().text == "mine"
        assert second.result().text == "unset"
