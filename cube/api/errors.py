"""The E2B error body, ``{"code": <status>, "message": "..."}``, for every non-2xx answer.

The SDK's generated parsers require both keys on every documented error status, so the app
never lets Quart's HTML error pages through.
"""

from __future__ import annotations

import msgspec
from quart import Response


class ErrorBody(msgspec.Struct):
    code: int
    message: str


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def json_response(
    body: object, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(
        msgspec.json.encode(body), status=status, headers=headers, content_type="application/json"
    )


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return json_response(ErrorBody(code=status, message=message), status, headers)
