"""Cells that do not end: client timeouts interrupt them, restarts and kernel deaths end them."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from e2b import TimeoutException
from e2b_code_interpreter import Sandbox

from tests.unit.interpreter.conftest import needs_deno


@pytest.mark.parametrize(
    ("language", "setup", "endless", "check", "expected"),
    [
        (
            "python",
            "progress = 'set'",
            "while True:\n    progress = 'looping'",
            "progress",
            "looping",
        ),
        pytest.param(
            "js", "globalThis.survivor = 5", "while (true) {}", "survivor", "5", marks=needs_deno
        ),
    ],
)
def test_client_timeout_interrupts_the_cell_and_keeps_state(
    sandbox: Sandbox, language: str, setup: str, endless: str, check: str, expected: str
) -> None:
    """Runs in the shared default contexts: after the interrupt they must simply work on."""
    sandbox.run_code(setup, language=language)
    with pytest.raises(TimeoutException):
        sandbox.run_code(endless, language=language, timeout=2)
    # Without the interrupt this would wait behind the endless loop until its own timeout.
    assert sandbox.run_code(check, language=language, timeout=60).text == expected


def test_bash_interrupt(sandbox: Sandbox) -> None:
    with pytest.raises(TimeoutException):
        sandbox.run_code("sleep 300", language="bash", timeout=2)
    execution = sandbox.run_code("echo after", language="bash", timeout=60)
    assert execution.logs.stdout == ["after\n"]


def test_kernel_death_is_reported_and_the_context_recovers(sandbox: Sandbox) -> None:
    context = sandbox.create_code_context()
    try:
        sandbox.run_code("doomed = 1", context=context)
        execution = sandbox.run_code("import os; os._exit(1)", context=context, timeout=60)
        assert execution.error is not None
        assert execution.error.name == "ContextRestarting"
        after = sandbox.run_code("'doomed' in globals()", context=context, timeout=60)
        assert after.text == "False"
    finally:
        sandbox.remove_code_context(context)


def test_restart_ends_a_running_cell(sandbox: Sandbox) -> None:
    context = sandbox.create_code_context()
    started = threading.Event()
    try:
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(
                sandbox.run_code,
                "print('started', flush=True)\nwhile True:\n    pass",
                context=context,
                on_stdout=lambda _: started.set(),
                timeout=120,
            )
            assert started.wait(60)
            sandbox.restart_code_context(context)
            execution = running.result()
        assert execution.error is not None
        assert execution.error.name == "ContextRestarting"
        assert sandbox.run_code("1 + 1", context=context, timeout=60).text == "2"
    finally:
        sandbox.remove_code_context(context)
