"""Kernel IOPub messages, translated into ``/execute`` output lines.

Only the message kinds the SDK models become output; status and the rest return nothing (the
caller watches ``status: idle`` itself to know when a cell is done).
"""

from __future__ import annotations

import datetime
from typing import Any

from cube.guest.interpreter.bundle import to_result
from cube.guest.interpreter.protocol import Error, NumberOfExecutions, Output, Stderr, Stdout


def _timestamp(header: dict[str, Any]) -> str:
    date = header.get("date")
    if isinstance(date, datetime.datetime):
        return date.isoformat()
    if isinstance(date, str):
        return date
    return datetime.datetime.now(datetime.UTC).isoformat()


def translate(msg: dict[str, Any]) -> Output | None:
    kind = msg.get("msg_type")
    content = msg.get("content") or {}
    if kind == "stream":
        text = str(content.get("text", ""))
        stamp = _timestamp(msg.get("header") or {})
        if content.get("name") == "stderr":
            return Stderr(text=text, timestamp=stamp)
        return Stdout(text=text, timestamp=stamp)
    if kind in ("execute_result", "display_data"):
        return to_result(dict(content.get("data") or {}), kind == "execute_result")
    if kind == "error":
        traceback = content.get("traceback") or []
        return Error(
            name=str(content.get("ename", "")),
            value=str(content.get("evalue", "")),
            traceback="\n".join(str(line) for line in traceback),
        )
    if kind == "execute_input" and isinstance(content.get("execution_count"), int):
        return NumberOfExecutions(content["execution_count"])
    return None
