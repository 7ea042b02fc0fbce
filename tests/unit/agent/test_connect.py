"""The Connect layer on its own: envelopes, the three call kinds, errors and their statuses."""

from __future__ import annotations

import json
import struct
from collections.abc import AsyncIterator

import msgspec
import pytest
import trio

from cube.guest.agent.connect import (
    Answer,
    Call,
    Code,
    ConnectError,
    EnvelopeDecoder,
    Kind,
    Service,
    dispatch,
    end_stream,
    envelope,
)
from tests.unit.agent.harness import frames


class Req(msgspec.Struct, rename="camel", omit_defaults=True):
    some_value: int = 0


class Resp(msgspec.Struct, rename="camel", omit_defaults=True):
    doubled: int = 0


service = Service("test.Test")


@service.method("Double", Kind.UNARY, Req)
async def double(call: Call, request: Req) -> Resp:
    if request.some_value < 0:
        raise ConnectError(Code.NOT_FOUND, "negative")
    if request.some_value == 13:
        raise RuntimeError("unlucky")
    return Resp(request.some_value * 2)


@service.method("Count", Kind.SERVER_STREAM, Req)
async def count(call: Call, request: Req) -> AsyncIterator[Resp]:
    for i in range(request.some_value):
        yield Resp(i)
    if request.some_value > 2:
        raise ConnectError(Code.RESOURCE_EXHAUSTED, "too many")


@service.method("Sum", Kind.CLIENT_STREAM, Req)
async def total(call: Call, requests: AsyncIterator[Req]) -> Resp:
    return Resp(sum([r.some_value async for r in requests]))


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def _body(answer: Answer) -> bytes:
    if isinstance(answer.body, bytes):
        return answer.body
    return b"".join([chunk async for chunk in answer.body])


def call(method: str, content_type: str, *parts: bytes) -> tuple[int, str, bytes]:
    async def run() -> tuple[int, str, bytes]:
        headers = {"content-type": content_type}
        answer = await dispatch(service, method, headers, _chunks(*parts))
        return answer.status, answer.content_type, await _body(answer)

    return trio.run(run)


def test_unary_success_and_camel_case() -> None:
    status, content_type, body = call("Double", "application/json", b'{"some', b'Value": 21}')
    assert (status, content_type, json.loads(body)) == (200, "application/json", {"doubled": 42})
    assert call("Double", "application/json; charset=utf-8", b"")[2] == b"{}"


@pytest.mark.parametrize(
    ("payload", "status", "code"),
    [
        (b'{"someValue": -1}', 404, "not_found"),
        (b'{"someValue": "x"}', 400, "invalid_argument"),
        (b"not json", 400, "invalid_argument"),
        (b'{"someValue": 13}', 500, "internal"),
    ],
)
def test_unary_errors(payload: bytes, status: int, code: str) -> None:
    got_status, _, body = call("Double", "application/json", payload)
    assert (got_status, json.loads(body)["code"]) == (status, code)


def test_unknown_method_and_wrong_content_type() -> None:
    status, _, body = call("Nope", "application/json", b"{}")
    assert (status, json.loads(body)["code"]) == (501, "unimplemented")
    assert call("Double", "application/connect+json", b"{}")[0] == 415
    assert call("Count", "application/json", b"{}")[0] == 415


def test_server_stream_messages_then_end() -> None:
    status, content_type, body = call(
        "Count", "application/connect+json", envelope(b'{"someValue": 2}')
    )
    assert (status, content_type) == (200, "application/connect+json")
    assert frames(body) == [(0, {}), (0, {"doubled": 1}), (2, {})]


def test_server_stream_error_in_end_message() -> None:
    request = envelope(b'{"someValue": 3}')
    _, _, body = call("Count", "application/connect+json", request[:3], request[3:])
    assert frames(body)[-1] == (2, {"error": {"code": "resource_exhausted", "message": "too many"}})
    _, _, body = call("Count", "application/connect+json", b"")
    assert frames(body) == [
        (
            2,
            {
                "error": {
                    "code": "invalid_argument",
                    "message": "a server-streaming call takes one message",
                }
            },
        )
    ]


def test_client_stream() -> None:
    parts = [envelope(b'{"someValue": %d}' % i) for i in range(5)]
    _, _, body = call("Sum", "application/connect+json", b"".join(parts))
    assert frames(body) == [(0, {"doubled": 10}), (2, {})]
    _, _, body = call("Sum", "application/connect+json", parts[0][:4])
    assert frames(body)[0][1]["error"]["code"] == "invalid_argument"  # type: ignore[index]


def test_envelope_decoder_bounds_and_flags() -> None:
    decoder = EnvelopeDecoder(max_message=10)
    assert decoder.feed(envelope(b"12")[:3]) == []
    assert decoder.feed(envelope(b"12")[3:] + end_stream()) == [b"12"]
    with pytest.raises(ConnectError) as info:
        decoder.feed(struct.pack(">BI", 0, 11))
    assert info.value.code is Code.RESOURCE_EXHAUSTED
    with pytest.raises(ConnectError):
        EnvelopeDecoder().feed(struct.pack(">BI", 1, 1) + b"x")


def test_status_mapping() -> None:
    expected = {
        Code.INVALID_ARGUMENT: 400,
        Code.UNAUTHENTICATED: 401,
        Code.PERMISSION_DENIED: 403,
        Code.NOT_FOUND: 404,
        Code.ALREADY_EXISTS: 409,
        Code.RESOURCE_EXHAUSTED: 429,
        Code.CANCELED: 499,
        Code.INTERNAL: 500,
        Code.UNKNOWN: 500,
        Code.UNIMPLEMENTED: 501,
        Code.UNAVAILABLE: 503,
        Code.DEADLINE_EXCEEDED: 504,
    }
    assert {code: code.http_status for code in expected} == expected
