"""Languages other than Python: bash (bash_kernel) and JavaScript/TypeScript (Deno's kernel)."""

from __future__ import annotations

import pytest
from e2b import SandboxException
from e2b_code_interpreter import Sandbox

from tests.unit.interpreter.conftest import Server, needs_deno


def test_bash_output_state_and_cwd(sandbox: Sandbox, server: Server) -> None:
    assert sandbox.run_code("echo hello", language="bash").logs.stdout == ["hello\n"]
    sandbox.run_code("GREETING=hi", language="bash")
    assert sandbox.run_code("echo $GREETING", language="BASH").logs.stdout == ["hi\n"]
    assert sandbox.run_code("pwd", language="bash").logs.stdout == [f"{server.home}\n"]


def test_bash_failure_is_an_error(sandbox: Sandbox) -> None:
    execution = sandbox.run_code("false", language="bash")
    assert execution.error is not None


def test_shell_escape_from_python(sandbox: Sandbox, server: Server) -> None:
    assert "".join(sandbox.run_code("!pwd").logs.stdout).strip() == str(server.home)


@needs_deno
def test_javascript(sandbox: Sandbox) -> None:
    execution = sandbox.run_code("console.log('Hello, World!')", language="js")
    assert execution.logs.stdout == ["Hello, World!\n"]
    assert sandbox.run_code("await Promise.resolve('Hello')", language="javascript").text == "Hello"
    sandbox.run_code("globalThis.kept = 41", language="js")
    assert sandbox.run_code("kept + 1", language="js").text == "42"
    esm = "import { readFileSync } from 'node:fs'\nconsole.log(typeof readFileSync)"
    assert sandbox.run_code(esm, language="js").logs.stdout == ["function\n"]
    error = sandbox.run_code("throw new Error('boom')", language="js").error
    assert error is not None
    assert (error.name, error.value) == ("Error", "boom")


@needs_deno
def test_javascript_outputs_are_never_lost(sandbox: Sandbox) -> None:
    """Deno can publish a cell's last outputs just after its idle status; none may be dropped."""
    for i in range(12):
        execution = sandbox.run_code(f"console.log('line {i}'); {i}", language="js")
        assert (execution.logs.stdout, execution.text) == ([f"line {i}\n"], str(i))


@needs_deno
def test_typescript(sandbox: Sandbox) -> None:
    code = "const message: string = 'typed'; console.log(message)"
    assert sandbox.run_code(code, language="ts").logs.stdout == ["typed\n"]


def test_unsupported_language_is_a_clear_error(sandbox: Sandbox) -> None:
    with pytest.raises(SandboxException, match="not supported"):
        sandbox.run_code("print(1)", language="r")
