"""A streaming multipart/form-data parser for uploads.

Why not the framework's form parser: it spools whole files before the handler sees them, drops
the directory part of a filename in places, and its limits are global. The SDK's upload puts
the destination path in each part's ``filename``, and files can be far bigger than memory, so
parts are parsed incrementally: ``feed`` returns events as bytes arrive and file data is written
to disk as it comes. Part headers are bounded, and so is the number of parts.
"""

from __future__ import annotations

import email.message
import email.utils
from dataclasses import dataclass

MAX_PART_HEADERS = 16 << 10
MAX_PARTS = 1000


class MultipartError(ValueError):
    pass


@dataclass(frozen=True)
class PartStart:
    name: str | None
    filename: str | None


@dataclass(frozen=True)
class PartData:
    data: bytes


@dataclass(frozen=True)
class PartEnd:
    pass


Event = PartStart | PartData | PartEnd

_PREAMBLE, _AFTER_DELIMITER, _HEADERS, _BODY, _DONE = range(5)


def _disposition(header_block: bytes) -> PartStart:
    message = email.message.Message()
    for line in header_block.decode("utf-8", "surrogateescape").split("\r\n"):
        key, sep, value = line.partition(":")
        if not sep:
            raise MultipartError(f"malformed part header {line[:64]!r}")
        message[key.strip()] = value.strip()
    name = message.get_param("name", header="content-disposition")
    filename = message.get_param("filename", header="content-disposition")
    return PartStart(
        name=email.utils.collapse_rfc2231_value(name) if name is not None else None,
        filename=email.utils.collapse_rfc2231_value(filename) if filename is not None else None,
    )


class MultipartParser:
    def __init__(self, boundary: str) -> None:
        if not boundary or len(boundary) > 200:
            raise MultipartError("bad multipart boundary")
        self._delimiter = b"\r\n--" + boundary.encode("latin-1")
        self._buf = bytearray(b"\r\n")  # so that the first delimiter looks like every other one
        self._state = _PREAMBLE
        self._parts = 0

    def feed(self, data: bytes) -> list[Event]:
        self._buf += data
        events: list[Event] = []
        while self._step(events):
            pass
        return events

    def finish(self) -> None:
        if self._state != _DONE:
            raise MultipartError("multipart body ends before its closing delimiter")

    def _step(self, events: list[Event]) -> bool:
        """Advance the state machine once; False when more input is needed."""
        buf, delim = self._buf, self._delimiter
        if self._state == _PREAMBLE:
            at = buf.find(delim)
            if at < 0:
                del buf[: max(0, len(buf) - len(delim))]
                return False
            del buf[: at + len(delim)]
            self._state = _AFTER_DELIMITER
            return True
        if self._state == _AFTER_DELIMITER:
            if len(buf) < 2:
                return False
            if buf[:2] == b"--":
                self._state = _DONE
                buf.clear()
                return False
            end = buf.find(b"\r\n")
            if end < 0:
                if len(buf) > 256:
                    raise MultipartError("garbage after a multipart delimiter")
                return False
            if buf[:end].strip(b" \t"):
                raise MultipartError("garbage after a multipart delimiter")
            del buf[: end + 2]
            self._state = _HEADERS
            return True
        if self._state == _HEADERS:
            end = -2 if buf.startswith(b"\r\n") else buf.find(b"\r\n\r\n")
            if end == -1:
                if len(buf) > MAX_PART_HEADERS:
                    raise MultipartError("multipart part headers too large")
                return False
            self._parts += 1
            if self._parts > MAX_PARTS:
                raise MultipartError("too many multipart parts")
            events.append(_disposition(bytes(buf[:end])) if end >= 0 else PartStart(None, None))
            del buf[: end + 4]
            self._state = _BODY
            return True
        if self._state == _BODY:
            at = buf.find(delim)
            if at < 0:
                keep = len(delim) - 1
                if len(buf) > keep:
                    events.append(PartData(bytes(buf[: len(buf) - keep])))
                    del buf[: len(buf) - keep]
                return False
            if at:
                events.append(PartData(bytes(buf[:at])))
            events.append(PartEnd())
            del buf[: at + len(delim)]
            self._state = _AFTER_DELIMITER
            return True
        buf.clear()  # _DONE: the epilogue is ignored
        return False
