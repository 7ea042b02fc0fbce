"""``/execute`` through the SDK's ``run_code``: logs, results, errors, counts, state."""

from __future__ import annotations

import asyncio
import datetime
import json

import httpx
import pytest
from e2b import InvalidArgumentException, NotFoundException
from e2b_code_interpreter import AsyncSandbox, Context, OutputMessage, Sandbox

from tests.unit.interpreter.conftest import Server


def test_stdout_and_stderr(sandbox: Sandbox) -> None:
    execution = sandbox.run_code("import sys\nprint('out')\nprint('err', file=sys.stderr)")
    assert execution.logs.stdout == ["out\n"]
    assert execution.logs.stderr == ["err\n"]
    assert execution.error is None
    assert execution.results == []


def test_stream_callbacks_carry_timestamps(sandbox: Sandbox) -> None:
    seen: list[OutputMessage] = []
    sandbox.run_code("print('a')", on_stdout=seen.append)
    assert [m.line for m in seen] == ["a\n"]
    assert isinstance(datetime.datetime.fromisoformat(str(seen[0].timestamp)), datetime.datetime)


def test_main_result_text_has_outer_quotes_stripped(sandbox: Sandbox) -> None:
    assert sandbox.run_code("'abc'").text == "abc"
    assert sandbox.run_code("1 + 1").text == "2"
    execution = sandbox.run_code("[1, 2]")
    assert execution.text == "[1, 2]"
    assert execution.results[0].is_main_result


def test_error_has_name_value_and_traceback(sandbox: Sandbox) -> None:
    execution = sandbox.run_code("def f():\n    raise ValueError('bad value')\nf()")
    assert execution.error is not None
    assert execution.error.name == "ValueError"
    assert execution.error.value == "bad value"
    assert "raise ValueError" in execution.error.traceback
    assert "\x1b[" not in execution.error.traceback  # no ANSI colours


def test_error_callback_and_stdout_before_the_error(sandbox: Sandbox) -> None:
    errors = []
    execution = sandbox.run_code("print('before')\nundefined_name", on_error=errors.append)
    assert execution.logs.stdout == ["before\n"]
    assert [e.name for e in errors] == ["NameError"]


def test_execution_count_increments(sandbox: Sandbox) -> None:
    first = sandbox.run_code("1").execution_count
    second = sandbox.run_code("1").execution_count
    assert isinstance(first, int)
    assert second == first + 1


def test_state_persists_between_calls(sandbox: Sandbox) -> None:
    sandbox.run_code("counter = 41")
    sandbox.run_code("counter += 1")
    assert sandbox.run_code("counter").text == "42"


def test_indented_code_runs(sandbox: Sandbox) -> None:
    execution = sandbox.run_code("\n    x = 3\n    x * 2\n    ")
    assert execution.text == "6"


def test_display_calls_and_main_result(sandbox: Sandbox) -> None:
    code = (
        "from IPython.display import display, HTML, Markdown, Latex, SVG, JSON, Javascript\n"
        "display(HTML('<b>hi</b>'))\n"
        "display(Markdown('# title'))\n"
        "display(Latex(r'$x^2$'))\n"
        "display(SVG('<svg xmlns=\"http://www.w3.org/2000/svg\"></svg>'))\n"
        "display(Javascript('console.log(1)'))\n"
        "display({'custom/type': 'payload', 'text/plain': 'custom'}, raw=True)\n"
        "{'a': 1, 'b': [1, 2]}\n"
    )
    execution = sandbox.run_code(code)
    assert execution.error is None
    *displays, main = execution.results
    assert not any(r.is_main_result for r in displays)
    assert displays[0].html == "<b>hi</b>"
    assert displays[1].markdown == "# title"
    assert displays[2].latex == "$x^2$"
    assert displays[3].svg is not None and "<svg" in displays[3].svg
    assert displays[4].javascript == "console.log(1)"
    assert displays[5].extra == {"custom/type": "payload"}
    assert displays[5].text == "custom"
    assert main.is_main_result
    assert main.json == {"a": 1, "b": [1, 2]}


def test_unknown_context_is_not_found(sandbox: Sandbox, server: Server) -> None:
    with pytest.raises(NotFoundException):
        sandbox.run_code("1", context=Context("nope", "python", "/"))
    response = httpx.post(f"{server.url}/execute", json={"code": "1", "context_id": "nope"})
    assert response.status_code == 404
    assert "nope" in response.text


def test_context_and_language_together_are_rejected(sandbox: Sandbox, server: Server) -> None:
    context = sandbox.list_code_contexts()[0]
    with pytest.raises(InvalidArgumentException):
        sandbox.run_code("1", context=context, language="python")  # the SDK checks first
    body = {"code": "1", "context_id": context.id, "language": "python", "env_vars": None}
    assert httpx.post(f"{server.url}/execute", json=body).status_code == 400


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"code": 5}',
        b'{"language": "python"}',
        b'{"code": "1", "env_vars": {"A B": "x"}}',
    ],
)
def test_bad_bodies_are_400(server: Server, body: bytes) -> None:
    response = httpx.post(f"{server.url}/execute", content=body)
    assert response.status_code == 400
    assert httpx.get(f"{server.url}/health").json() == "OK"


def test_oversized_body_is_refused(server: Server) -> None:
    body = json.dumps({"code": "x" * (17 << 20)})
    assert httpx.post(f"{server.url}/execute", content=body).status_code == 413


def test_wire_format_is_ndjson_ending_with_end_of_execution(server: Server) -> None:
    body = {"code": "print(1)\n2", "context_id": None, "language": None, "env_vars": None}
    with httpx.stream("POST", f"{server.url}/execute", json=body, timeout=60) as response:
        lines = [json.loads(line) for line in response.iter_lines()]
    assert response.status_code == 200
    types = [line["type"] for line in lines]
    assert types[0] == "number_of_executions"
    assert types[-1] == "end_of_execution"
    assert {"type": "result", "is_main_result": True, "text": "2"} in lines
    stdout = next(line for line in lines if line["type"] == "stdout")
    assert stdout["text"] == "1\n"
    assert "timestamp" in stdout


def test_keepalive_while_a_cell_is_silent(server: Server) -> None:
    body = {"code": "import time; time.sleep(6)", "language": "python"}
    with httpx.stream("POST", f"{server.url}/execute", json=body, timeout=60) as response:
        types = [json.loads(line)["type"] for line in response.iter_lines()]
    assert "keepalive" in types
    assert types[-1] == "end_of_execution"


def test_async_client(server: Server) -> None:
    async def run() -> tuple[list[str], str | None]:
        sandbox = await AsyncSandbox.create(debug=True, api_key="test", sandbox_url=server.url)
        lines: list[str] = []

        async def on_stdout(message: OutputMessage) -> None:
            lines.append(message.line)

        execution = await sandbox.run_code("print('async')\n'done'", on_stdout=on_stdout)
        return lines, execution.text

    assert asyncio.run(run()) == (["async\n"], "done")
