"""A Jupyter MIME bundle (display_data / execute_result ``data``) as the SDK's ``Result``.

The MIME-type-to-key mapping and the stripping of one pair of outer quotes from text/plain
(so that ``'abc'`` reads as ``abc``) follow upstream's server, since SDK users compare
``execution.text`` against bare strings. Anything not in the mapping goes to ``extra``.
"""

from __future__ import annotations

from typing import Any

from cube.guest.interpreter.protocol import Result

_KEYS = {
    "text/html": "html",
    "text/markdown": "markdown",
    "image/svg+xml": "svg",
    "image/png": "png",
    "image/jpeg": "jpeg",
    "application/pdf": "pdf",
    "text/latex": "latex",
    "application/json": "json",
    "application/javascript": "javascript",
    "e2b/data": "data",
    "e2b/chart": "chart",
}


def _strip_quotes(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def to_result(data: dict[str, Any], is_main_result: bool) -> Result:
    formats: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for mime, value in data.items():
        if mime == "text/plain" and isinstance(value, str):
            formats["text"] = _strip_quotes(value)
        elif mime in _KEYS:
            formats[_KEYS[mime]] = value
        else:
            extra[mime] = value
    return Result(is_main_result=is_main_result, extra=extra or None, **formats)
