"""A small server side of the Connect protocol, JSON codec only, as the E2B SDK speaks it.

Why our own: the agent runs inside the guest with only the stdlib, trio, hypercorn, quart and
msgspec, so the connectrpc/protobuf stack of the e2b wheel is not available there. The subset the
SDK uses is small (protocol doc section 3.3):

- unary: ``application/json`` request and response bodies; errors as a non-200 status with
  ``{"code": "<connect code>", "message": ...}``;
- server streaming and client streaming: ``application/connect+json`` bodies made of 5-byte
  envelopes (flag byte, big-endian uint32 length, JSON); the response always has status 200 and
  ends with an end-of-stream envelope (flag 0x02) carrying ``{}`` or ``{"error": {...}}``.

Request messages are always read before the response starts (the one message of a
server-streaming call, the whole input of a client-streaming call): with Quart on Hypercorn a
chunked request body that is still arriving once the response has started was observed to come
out empty.

This module knows nothing about Quart: a call is dispatched from its headers and an async
iterator over the request body, and answers with a status, headers and either bytes or an async
iterator of bytes, which the HTTP layer sends as they come.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import struct
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

log = logging.getLogger(__name__)

UNARY_CONTENT_TYPE = "application/json"
STREAM_CONTENT_TYPE = "application/connect+json"

FLAG_COMPRESSED = 0x01
FLAG_END_STREAM = 0x02
_ENVELOPE = struct.Struct(">BI")

MAX_MESSAGE = 4 << 20
DEFAULT_KEEPALIVE = 90.0  # the largest request message accepted (SendInput carries user data)


class Code(enum.StrEnum):
    """The Connect error codes and the HTTP status each maps to for unary errors."""

    CANCELED = "canceled"
    UNKNOWN = "unknown"
    INVALID_ARGUMENT = "invalid_argument"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    PERMISSION_DENIED = "permission_denied"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    FAILED_PRECONDITION = "failed_precondition"
    ABORTED = "aborted"
    OUT_OF_RANGE = "out_of_range"
    UNIMPLEMENTED = "unimplemented"
    INTERNAL = "internal"
    UNAVAILABLE = "unavailable"
    DATA_LOSS = "data_loss"
    UNAUTHENTICATED = "unauthenticated"

    @property
    def http_status(self) -> int:
        return _HTTP_STATUS[self]


_HTTP_STATUS = {
    Code.CANCELED: 499,
    Code.UNKNOWN: 500,
    Code.INVALID_ARGUMENT: 400,
    Code.DEADLINE_EXCEEDED: 504,
    Code.NOT_FOUND: 404,
    Code.ALREADY_EXISTS: 409,
    Code.PERMISSION_DENIED: 403,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.FAILED_PRECONDITION: 400,
    Code.ABORTED: 409,
    Code.OUT_OF_RANGE: 400,
    Code.UNIMPLEMENTED: 501,
    Code.INTERNAL: 500,
    Code.UNAVAILABLE: 503,
    Code.DATA_LOSS: 500,
    Code.UNAUTHENTICATED: 401,
}


class ConnectError(Exception):
    """An RPC failure with a Connect code; the message reaches the SDK user verbatim."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _ErrorDetail(msgspec.Struct):
    code: str
    message: str


class _EndStream(msgspec.Struct, omit_defaults=True):
    error: _ErrorDetail | None = None


_encoder = msgspec.json.Encoder()


def error_json(err: ConnectError) -> bytes:
    return _encoder.encode(_ErrorDetail(err.code.value, err.message))


def envelope(payload: bytes, flags: int = 0) -> bytes:
    return _ENVELOPE.pack(flags, len(payload)) + payload


def end_stream(err: ConnectError | None = None) -> bytes:
    detail = None if err is None else _ErrorDetail(err.code.value, err.message)
    return envelope(_encoder.encode(_EndStream(detail)), FLAG_END_STREAM)


class EnvelopeDecoder:
    """Splits a byte stream into envelopes; bounded, and strict about what we never accept."""

    def __init__(self, max_message: int = MAX_MESSAGE) -> None:
        self._buf = bytearray()
        self._max = max_message

    def feed(self, data: bytes) -> list[bytes]:
        """The complete messages now available (end-of-stream envelopes from a client ignored)."""
        self._buf += data
        out: list[bytes] = []
        while len(self._buf) >= _ENVELOPE.size:
            flags, length = _ENVELOPE.unpack_from(self._buf)
            if length > self._max:
                raise ConnectError(Code.RESOURCE_EXHAUSTED, f"message of {length} bytes too large")
            if flags & FLAG_COMPRESSED:
                raise ConnectError(Code.INTERNAL, "compressed messages are not supported")
            end = _ENVELOPE.size + length
            if len(self._buf) < end:
                break
            payload = bytes(self._buf[_ENVELOPE.size : end])
            del self._buf[:end]
            if not flags & FLAG_END_STREAM:
                out.append(payload)
        return out

    def finish(self) -> None:
        if self._buf:
            raise ConnectError(Code.INVALID_ARGUMENT, "request body ends inside an envelope")


class Kind(enum.Enum):
    UNARY = "unary"
    SERVER_STREAM = "server_stream"
    CLIENT_STREAM = "client_stream"


@dataclass(frozen=True)
class Call:
    """What a handler may know about its request besides the message."""

    headers: Mapping[str, str]

    def header_int(self, name: str) -> int | None:
        """An integer header; None when absent, invalid_argument when not a number."""
        value = self.headers.get(name)
        if value is None or value == "":
            return None
        try:
            return int(value)
        except ValueError:
            raise ConnectError(Code.INVALID_ARGUMENT, f"bad {name} header {value!r}") from None

    def keepalive_interval(self) -> float:
        """Seconds between keepalive events on an idle stream (``Keepalive-Ping-Interval``,
        envd's default 90 when absent or not a positive integer)."""
        try:
            seconds = self.header_int("keepalive-ping-interval")
        except ConnectError:
            seconds = None
        return float(seconds) if seconds and seconds > 0 else DEFAULT_KEEPALIVE


Handler = Callable[[Call, Any], Any]


@dataclass(frozen=True)
class Method:
    kind: Kind
    request_type: type
    handler: Handler


class Service:
    """One Connect service: a name (``process.Process``) and its methods."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.methods: dict[str, Method] = {}

    def method(self, name: str, kind: Kind, request_type: type) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            self.methods[name] = Method(kind, request_type, handler)
            return handler

        return register


@dataclass(frozen=True)
class Answer:
    status: int
    content_type: str
    body: bytes | AsyncIterator[bytes]


def _decode(payload: bytes, request_type: type) -> Any:
    try:
        return msgspec.json.decode(payload or b"{}", type=request_type)
    except msgspec.DecodeError as e:
        raise ConnectError(Code.INVALID_ARGUMENT, f"invalid request message: {e}") from None


def _unary_error(err: ConnectError) -> Answer:
    return Answer(err.code.http_status, UNARY_CONTENT_TYPE, error_json(err))


def _internal(e: Exception) -> ConnectError:
    log.exception("RPC handler failed")
    return ConnectError(Code.INTERNAL, f"internal error: {type(e).__name__}: {e}")


async def _read_all(body: AsyncIterator[bytes], limit: int) -> bytes:
    data = bytearray()
    async for chunk in body:
        data += chunk
        if len(data) > limit:
            raise ConnectError(Code.RESOURCE_EXHAUSTED, "request body too large")
    return bytes(data)


async def dispatch(
    service: Service, method_name: str, headers: Mapping[str, str], body: AsyncIterator[bytes]
) -> Answer:
    """Run one RPC and return what to send. Never raises for a bad request."""
    method = service.methods.get(method_name)
    if method is None:
        return _unary_error(
            ConnectError(Code.UNIMPLEMENTED, f"{service.name}.{method_name} is not implemented")
        )
    content_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    call = Call(headers)
    if method.kind is Kind.UNARY:
        if content_type != UNARY_CONTENT_TYPE:
            return Answer(415, UNARY_CONTENT_TYPE, b"")
        return await _run_unary(method, call, body)
    if content_type != STREAM_CONTENT_TYPE:
        return Answer(415, STREAM_CONTENT_TYPE, b"")
    if method.kind is Kind.SERVER_STREAM:
        try:
            request = await _single_message(method, body)
        except ConnectError as e:
            return Answer(200, STREAM_CONTENT_TYPE, end_stream(e))
        return Answer(200, STREAM_CONTENT_TYPE, _run_server_stream(method, call, request))
    return Answer(200, STREAM_CONTENT_TYPE, await _run_client_stream(method, call, body))


async def _run_unary(method: Method, call: Call, body: AsyncIterator[bytes]) -> Answer:
    try:
        request = _decode(await _read_all(body, MAX_MESSAGE), method.request_type)
        response = await method.handler(call, request)
        return Answer(200, UNARY_CONTENT_TYPE, _encoder.encode(response))
    except ConnectError as e:
        return _unary_error(e)
    except Exception as e:
        return _unary_error(_internal(e))


async def _single_message(method: Method, body: AsyncIterator[bytes]) -> Any:
    """The one request message of a server-streaming call (read before the response starts)."""
    decoder = EnvelopeDecoder()
    messages: list[bytes] = []
    async for chunk in body:
        messages += decoder.feed(chunk)
        if len(messages) > 1:
            break
    decoder.finish()
    if len(messages) != 1:
        raise ConnectError(Code.INVALID_ARGUMENT, "a server-streaming call takes one message")
    return _decode(messages[0], method.request_type)


async def _run_server_stream(method: Method, call: Call, request: Any) -> AsyncIterator[bytes]:
    error: ConnectError | None = None
    try:
        async with contextlib.aclosing(method.handler(call, request)) as messages:
            async for message in messages:
                yield envelope(_encoder.encode(message))
    except ConnectError as e:
        error = e
    except Exception as e:
        error = _internal(e)
    yield end_stream(error)


async def _client_messages(
    method: Method, body: AsyncIterator[bytes], decoder: EnvelopeDecoder
) -> AsyncIterator[Any]:
    async for chunk in body:
        for payload in decoder.feed(chunk):
            yield _decode(payload, method.request_type)
    decoder.finish()


async def _run_client_stream(method: Method, call: Call, body: AsyncIterator[bytes]) -> bytes:
    """Consume the whole input stream, then answer: one message and the end of the stream."""
    try:
        requests = _client_messages(method, body, EnvelopeDecoder())
        async with contextlib.aclosing(requests):
            response = await method.handler(call, requests)
        return envelope(_encoder.encode(response)) + end_stream()
    except ConnectError as e:
        return end_stream(e)
    except Exception as e:
        return end_stream(_internal(e))
