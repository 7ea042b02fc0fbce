"""envd's ``/files``: download (GET) and upload (POST), with gzip both ways and signed URLs.

These routes skip the access-token middleware (as in envd) because a signed URL may stand in for
the token: ``signature=v1_<base64 sha256 of path:operation:username:token[:expiration]>`` with
an optional ``signature_expiration`` (unix seconds). A token header, when sent, takes precedence.
Errors are JSON ``{"code": <status>, "message": ...}``; the SDK reads ``message``, and the
expired-signature body is compared verbatim by E2B's tests.

Uploads stream to disk: multipart (field ``file``, filename = destination path) or a raw
``application/octet-stream`` body with ``path``; parents are created and everything is owned by
the user; ``X-Metadata-<key>`` headers replace the file's ``user.e2b.<key>`` xattrs; a full disk
answers 507, which the SDK turns into NotEnoughSpaceException.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import hmac
import mimetypes
import os
import stat
import time
import zlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

import msgspec
import trio
from quart import Response, request

from cube.guest.agent.entries import read_metadata, replace_metadata, validate_metadata
from cube.guest.agent.fsops import ensure_dirs
from cube.guest.agent.multipart import MultipartError, MultipartParser, PartData, PartEnd, PartStart
from cube.guest.agent.state import AgentState
from cube.guest.agent.users import PathError, UnknownUser, User, resolve
from cube.guest.agent.watchers import Watchers

CHUNK = 1 << 20
WRITE_BUFFER = 1 << 20
METADATA_HEADER = "x-metadata-"


class FilesError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Error(msgspec.Struct):
    code: int
    message: str


def json_error(status: int, message: str) -> Response:
    """envd's error body: ``{"code": status, "message": ...}`` plus Go's trailing newline."""
    body = msgspec.json.encode(_Error(status, message)) + b"\n"
    response = Response(body, status=status, content_type="application/json; charset=utf-8")
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


def signature(path: str, operation: str, username: str, token: str, expiration: int | None) -> str:
    parts = [path, operation, username, token]
    if expiration is not None:
        parts.append(str(expiration))
    digest = hashlib.sha256(":".join(parts).encode()).digest()
    return "v1_" + base64.b64encode(digest).decode().rstrip("=")


def check_signing(
    state: AgentState, headers: Mapping[str, str], args: Mapping[str, str], operation: str
) -> None:
    """Raise FilesError(401) unless the token header or a valid, unexpired signature is there."""
    token = state.access_token
    if not token:
        return
    header = headers.get("X-Access-Token")
    if header:
        if not state.token_ok(header):
            raise FilesError(401, "access token present in header but does not match")
        return
    given = args.get("signature")
    if given is None:
        raise FilesError(401, "missing signature query parameter")
    raw_expiration = args.get("signature_expiration")
    try:
        expiration = int(raw_expiration) if raw_expiration is not None else None
    except ValueError:
        raise FilesError(400, f"invalid signature_expiration {raw_expiration!r}") from None
    expected = signature(
        args.get("path", ""), operation, args.get("username", ""), token, expiration
    )
    if not hmac.compare_digest(expected.encode(), given.encode("utf-8", "surrogateescape")):
        raise FilesError(401, "invalid signature")
    if expiration is not None and expiration < time.time():
        raise FilesError(401, "signature is already expired")


def _accepted_encoding(header: str) -> str:
    """envd's Accept-Encoding negotiation: ``gzip`` or ``identity``; FilesError(406) if neither."""
    if not header.strip():
        return "identity"
    offers: list[tuple[float, str]] = []
    for item in header.split(","):
        name, _, params = item.strip().partition(";")
        quality = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key.lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 1.0
        offers.append((quality, name.strip().lower()))
    rejected = {n for q, n in offers if q == 0}
    identity_explicit = any(n == "identity" and q > 0 for q, n in offers)
    identity_rejected = "identity" in rejected or ("*" in rejected and not identity_explicit)
    for quality, name in sorted(offers, key=lambda o: -o[0]):
        if quality == 0:
            continue
        if name == "identity":
            return "identity"
        if name == "*":
            return "gzip" if identity_rejected else "identity"
        if name == "gzip":
            return "gzip"
    if not identity_rejected:
        return "identity"
    raise FilesError(
        406, "error parsing Accept-Encoding: no acceptable encoding found, supported: [gzip]"
    )


async def _gunzip(body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    inflater = zlib.decompressobj(wbits=31)
    try:
        async for chunk in body:
            if data := inflater.decompress(chunk):
                yield data
        if tail := inflater.flush():
            yield tail
    except zlib.error as e:
        raise FilesError(400, f"error decompressing request body: {e}") from None
    if not inflater.eof:
        raise FilesError(400, "error decompressing request body: unexpected EOF")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class _FileSink:
    """One file being uploaded: created (or truncated) and chowned first, then written in
    buffered chunks, then given its metadata."""

    def __init__(self, path: str, user: User, metadata: dict[str, str]) -> None:
        self.path = path
        self._user = user
        self._metadata = metadata
        self._buffer = bytearray()
        self._fd = -1

    def open(self) -> None:
        user = self._user
        try:
            ensure_dirs(os.path.dirname(self.path), user.uid, user.gid)
        except OSError as e:
            raise FilesError(500, f"error ensuring directories: {e}") from None
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            st = None
        except OSError as e:
            raise FilesError(500, f"error getting file info: {e}") from None
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise FilesError(400, f"path is a directory: {self.path}")
        chowned = False
        if st is not None:
            try:
                os.chown(self.path, user.uid, user.gid)
                chowned = True
            except FileNotFoundError:
                pass
            except OSError as e:
                raise FilesError(500, f"error changing file ownership: {e}") from None
        try:
            self._fd = os.open(
                self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666
            )
            if not chowned:
                os.fchown(self._fd, user.uid, user.gid)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise FilesError(507, f"not enough inodes available: {e}") from None
            raise FilesError(500, f"error opening file: {e}") from None

    async def write(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) >= WRITE_BUFFER:
            await self._flush()

    async def _flush(self) -> None:
        if not self._buffer:
            return
        data, self._buffer = bytes(self._buffer), bytearray()
        try:
            await trio.to_thread.run_sync(_write_all, self._fd, data)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise FilesError(507, "not enough disk space available") from None
            raise FilesError(500, f"error writing file: {e}") from None

    async def finish(self) -> dict[str, Any]:
        await self._flush()
        try:
            replace_metadata(self._fd, self._metadata)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise FilesError(507, f"not enough space for file metadata: {e}") from None
            raise FilesError(500, f"error writing file metadata: {e}") from None
        self.close()
        info: dict[str, Any] = {
            "name": os.path.basename(self.path),
            "type": "file",
            "path": self.path,
        }
        if metadata := read_metadata(self.path):
            info["metadata"] = metadata
        return info

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class FilesApi:
    def __init__(self, state: AgentState, watchers: Watchers) -> None:
        self._state = state
        self._watchers = watchers

    def _user(self) -> User:
        name = request.args.get("username") or self._state.default_user
        try:
            return self._state.users.lookup(name)
        except UnknownUser as e:
            raise FilesError(401, str(e)) from None

    def _resolve(self, path: str, user: User) -> str:
        try:
            return resolve(path, user, self._state.default_workdir)
        except PathError as e:
            raise FilesError(400, f"error resolving path: {e}") from None

    async def download(self) -> Response:
        try:
            return await self._download()
        except FilesError as e:
            return json_error(e.status, e.message)

    async def _download(self) -> Response:
        check_signing(self._state, request.headers, request.args, "read")
        user = self._user()
        path = self._resolve(request.args.get("path", ""), user)
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            raise FilesError(404, f"path '{path}' does not exist") from None
        except OSError as e:
            raise FilesError(500, f"error checking if path exists '{path}': {e}") from None
        if stat.S_ISDIR(st.st_mode):
            raise FilesError(400, f"path '{path}' is a directory")
        encoding = _accepted_encoding(request.headers.get("Accept-Encoding", ""))
        try:
            source = await trio.open_file(path, "rb")
        except OSError as e:
            raise FilesError(500, f"error opening file '{path}': {e}") from None
        content_type = mimetypes.guess_type(path)[0] or "application/octet-stream"
        if content_type.startswith("text/"):
            content_type += "; charset=utf-8"
        response = Response(_stream_file(source, encoding == "gzip"), content_type=content_type)
        response.headers["Content-Disposition"] = f'inline; filename="{os.path.basename(path)}"'
        response.headers["Vary"] = "Accept-Encoding"
        if encoding == "gzip":
            response.headers["Content-Encoding"] = "gzip"
        else:
            response.headers["Content-Length"] = str(st.st_size)
        return response

    async def upload(self) -> Response:
        sink: _FileSink | None = None
        try:
            check_signing(self._state, request.headers, request.args, "write")
            user = self._user()
            body: AsyncIterator[bytes] = request.body  # type: ignore[assignment]
            content_encoding = request.headers.get("Content-Encoding", "").strip().lower()
            if content_encoding == "gzip":
                body = _gunzip(body)
            elif content_encoding not in ("", "identity"):
                raise FilesError(
                    400,
                    "error decompressing request body: unsupported Content-Encoding: "
                    f"{content_encoding}, supported: [gzip]",
                )
            metadata = {
                key[len(METADATA_HEADER) :].lower(): value
                for key, value in request.headers.items()
                if key.lower().startswith(METADATA_HEADER) and len(key) > len(METADATA_HEADER)
            }
            try:
                validate_metadata(metadata)
            except ValueError as e:
                raise FilesError(400, f"invalid metadata: {e}") from None
            media_type = request.mimetype
            self._watchers.sync()
            if media_type == "application/octet-stream":
                if "path" not in request.args:
                    raise FilesError(400, "path query parameter is required for raw body upload")
                sink = _FileSink(self._resolve(request.args["path"], user), user, metadata)
                sink.open()
                async for chunk in body:
                    await sink.write(chunk)
                written = [await sink.finish()]
            elif media_type.startswith("multipart/"):
                boundary = request.mimetype_params.get("boundary", "")
                written = await self._multipart(body, boundary, user, metadata)
            else:
                raise FilesError(
                    400,
                    f"unsupported content type: {request.content_type}, "
                    "expected multipart/form-data or application/octet-stream",
                )
            return Response(msgspec.json.encode(written), content_type="application/json")
        except FilesError as e:
            return json_error(e.status, e.message)
        finally:
            if sink is not None:
                sink.close()

    async def _multipart(
        self, body: AsyncIterator[bytes], boundary: str, user: User, metadata: dict[str, str]
    ) -> list[dict[str, Any]]:
        written: list[dict[str, Any]] = []
        sink: _FileSink | None = None
        try:
            parser = MultipartParser(boundary)
            async for chunk in body:
                for event in parser.feed(chunk):
                    if isinstance(event, PartStart):
                        sink = self._part_sink(event, user, metadata, written)
                    elif isinstance(event, PartData) and sink is not None:
                        await sink.write(event.data)
                    elif isinstance(event, PartEnd) and sink is not None:
                        written.append(await sink.finish())
                        sink = None
            parser.finish()
        except MultipartError as e:
            raise FilesError(400, f"error reading form: {e}") from None
        finally:
            if sink is not None:
                sink.close()
        return written

    def _part_sink(
        self, part: PartStart, user: User, metadata: dict[str, str], written: list[dict[str, Any]]
    ) -> _FileSink | None:
        if part.name != "file":
            return None
        target = request.args.get("path")
        if target is None:
            if not part.filename:
                raise FilesError(400, "error resolving path: filename not found in part")
            target = part.filename
        path = self._resolve(target, user)
        if any(item["path"] == path for item in written):
            raise FilesError(
                400,
                f"you cannot upload multiple files to the same path '{path}' in one upload "
                "request, only the first specified file was uploaded",
            )
        sink = _FileSink(path, user, metadata)
        sink.open()
        return sink


async def _stream_file(source: trio.abc.AsyncResource, gzip: bool) -> AsyncIterator[bytes]:
    deflater = zlib.compressobj(wbits=31) if gzip else None
    async with source:
        while chunk := await source.read(CHUNK):  # type: ignore[attr-defined]
            if deflater is None:
                yield chunk
            elif data := deflater.compress(chunk):
                yield data
    if deflater is not None:
        yield deflater.flush()
