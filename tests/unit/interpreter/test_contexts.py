"""``/contexts``: defaults, create with language and cwd, list, restart, remove."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from e2b import NotFoundException
from e2b_code_interpreter import Sandbox

from tests.unit.interpreter.conftest import Server


def test_health(server: Server) -> None:
    response = httpx.get(f"{server.url}/health")
    assert response.status_code == 200
    assert response.json() == "OK"


def test_default_contexts_are_listed_once(sandbox: Sandbox, server: Server) -> None:
    contexts = sandbox.list_code_contexts()
    languages = [c.language for c in contexts]
    assert languages.count("python") >= 1
    assert len({c.id for c in contexts}) == len(contexts)
    assert "default" not in {c.id for c in contexts}
    python = next(c for c in contexts if c.language == "python")
    assert python.cwd == str(server.home)


def test_default_cwd(sandbox: Sandbox, server: Server) -> None:
    execution = sandbox.run_code("import os; print(os.getcwd())")
    assert execution.logs.stdout == [f"{server.home}\n"]


def test_create_with_cwd_and_isolated_state(sandbox: Sandbox, tmp_path: Path) -> None:
    context = sandbox.create_code_context(cwd=str(tmp_path), language="Python")
    try:
        assert context.language == "python"
        assert context.cwd == str(tmp_path)
        listed = [c for c in sandbox.list_code_contexts() if c.id == context.id]
        assert [(c.language, c.cwd) for c in listed] == [("python", str(tmp_path))]
        sandbox.run_code("only_here = 1", context=context)
        assert sandbox.run_code("import os; os.getcwd()", context=context).text == str(tmp_path)
        assert sandbox.run_code("only_here", context=context).text == "1"
        assert sandbox.run_code("only_here").error is not None  # the default context differs
    finally:
        sandbox.remove_code_context(context)


def test_restart_clears_state(sandbox: Sandbox) -> None:
    context = sandbox.create_code_context()
    try:
        sandbox.run_code("x = 1", context=context)
        sandbox.restart_code_context(context)
        execution = sandbox.run_code("x", context=context)
        assert execution.error is not None
        assert execution.error.name == "NameError"
        assert execution.error.value == "name 'x' is not defined"
    finally:
        sandbox.remove_code_context(context.id)


def test_remove(sandbox: Sandbox) -> None:
    context = sandbox.create_code_context()
    sandbox.remove_code_context(context.id)
    assert context.id not in [c.id for c in sandbox.list_code_contexts()]
    with pytest.raises(NotFoundException):
        sandbox.run_code("1", context=context)


def test_unknown_ids_are_not_found(sandbox: Sandbox) -> None:
    with pytest.raises(NotFoundException):
        sandbox.remove_code_context("nope")
    with pytest.raises(NotFoundException):
        sandbox.restart_code_context("nope")


def test_bad_create_requests(server: Server, tmp_path: Path) -> None:
    url = f"{server.url}/contexts"
    assert httpx.post(url, json={"language": "cobol"}).status_code == 400
    assert httpx.post(url, content=b"{").status_code == 400
    missing = httpx.post(url, json={"cwd": str(tmp_path / "missing")}, timeout=60)
    assert missing.status_code == 500
    assert "missing" in missing.text
