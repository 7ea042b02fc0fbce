"""The code interpreter's HTTP wire formats (protocol doc §4), as msgspec Structs.

Requests are decoded strictly (wrong types are a 400, never a crash); every `/execute` output
line is one of the tagged Structs below, encoded on its own ``\\n``-terminated line. ``Result``
omits absent formats (``omit_defaults``) because the SDK builds ``Result(**line)`` and upstream
sends only the formats a bundle has; ``is_main_result`` has no default so it is always sent.
"""

from __future__ import annotations

from typing import Any

import msgspec

MAX_BODY = 16 << 20  # a request body; the code inside it is bounded again below
MAX_CODE = 8 << 20  # characters of code in one cell
MAX_ENV_VARS = 1024  # per-call env vars
MAX_ENV_VALUE = 128 << 10  # characters in one env var value
MAX_PATH = 4096  # a context's cwd


class ExecuteRequest(msgspec.Struct, kw_only=True):
    """``POST /execute``; the SDK always sends all four keys, nulls included."""

    code: str
    context_id: str | None = None
    language: str | None = None
    env_vars: dict[str, str] | None = None


class CreateContextRequest(msgspec.Struct, kw_only=True):
    """``POST /contexts``; both keys are optional (the SDK omits unset ones)."""

    language: str | None = None
    cwd: str | None = None


class ContextInfo(msgspec.Struct, kw_only=True):
    """A context as ``/contexts`` reports it; the SDK reads ``id``, ``language`` and ``cwd``."""

    id: str
    language: str
    cwd: str


class Stdout(msgspec.Struct, tag="stdout", tag_field="type", kw_only=True):
    text: str
    timestamp: str


class Stderr(msgspec.Struct, tag="stderr", tag_field="type", kw_only=True):
    text: str
    timestamp: str


class Result(msgspec.Struct, tag="result", tag_field="type", kw_only=True, omit_defaults=True):
    """One display_data (``is_main_result`` false) or execute_result (true) bundle."""

    is_main_result: bool
    text: str | None = None
    html: str | None = None
    markdown: str | None = None
    svg: str | None = None
    png: str | None = None
    jpeg: str | None = None
    pdf: str | None = None
    latex: str | None = None
    json: Any = None
    javascript: str | None = None
    data: Any = None
    chart: Any = None
    extra: dict[str, Any] | None = None


class Error(msgspec.Struct, tag="error", tag_field="type", kw_only=True):
    name: str
    value: str
    traceback: str


class NumberOfExecutions(msgspec.Struct, tag="number_of_executions", tag_field="type"):
    execution_count: int


class Keepalive(msgspec.Struct, tag="keepalive", tag_field="type"):
    """Written every few idle seconds so that a vanished client is noticed by a failing write."""


class EndOfExecution(msgspec.Struct, tag="end_of_execution", tag_field="type"):
    pass


Output = Stdout | Stderr | Result | Error | NumberOfExecutions | Keepalive | EndOfExecution

_encoder = msgspec.json.Encoder()


def encode_line(output: Output) -> bytes:
    """One NDJSON line: the SDK ``json.loads`` every line, so no blank lines and one object each."""
    return _encoder.encode(output) + b"\n"


def encode(value: msgspec.Struct | list[ContextInfo]) -> bytes:
    return _encoder.encode(value)
