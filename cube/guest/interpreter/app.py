"""The HTTP routes (protocol doc §4): ``/execute``, ``/contexts``, ``/health``.

Error bodies are plain text because the SDK shows them verbatim (404 becomes
``NotFoundException(text)``, anything else ``SandboxException("<status> <reason>: <text>")``).
Request bodies are size-capped by Quart (``MAX_CONTENT_LENGTH``, 413) and decoded strictly;
nothing a client sends can raise out of a handler.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypeVar

import msgspec
from quart import Quart, Response, request

from cube.guest.interpreter import languages
from cube.guest.interpreter.contexts import Registry, TooManyContexts
from cube.guest.interpreter.kernel import KernelContext, KernelStartError
from cube.guest.interpreter.protocol import (
    MAX_BODY,
    MAX_CODE,
    MAX_ENV_VALUE,
    MAX_ENV_VARS,
    MAX_PATH,
    ContextInfo,
    CreateContextRequest,
    ExecuteRequest,
    encode,
    encode_line,
)

T = TypeVar("T")


class BadRequest(Exception):
    pass


def _text(body: str, status: int) -> Response:
    return Response(body, status=status, mimetype="text/plain")


def _json(value: Any) -> Response:
    return Response(encode(value), mimetype="application/json")


def _info(context: KernelContext) -> ContextInfo:
    return ContextInfo(id=context.id, language=context.language, cwd=context.cwd)


async def _decode(kind: type[T]) -> T:
    body = await request.get_data(as_text=False)
    try:
        return msgspec.json.decode(body or b"{}", type=kind)
    except msgspec.DecodeError as e:
        raise BadRequest(f"invalid request body: {e}") from e


def _check_execute(req: ExecuteRequest) -> dict[str, str]:
    if req.context_id and req.language:
        raise BadRequest("Only one of context_id or language can be provided")
    if len(req.code) > MAX_CODE:
        raise BadRequest(f"code is longer than {MAX_CODE} characters")
    env_vars = req.env_vars or {}
    if len(env_vars) > MAX_ENV_VARS:
        raise BadRequest(f"more than {MAX_ENV_VARS} env vars")
    for name, value in env_vars.items():
        if not languages.ENV_NAME.fullmatch(name):
            raise BadRequest(f"invalid env var name {name[:64]!r}")
        if len(value) > MAX_ENV_VALUE or "\0" in value:
            raise BadRequest(f"env var {name} is too long or contains NUL")
    return env_vars


def create_app(registry: Registry) -> Quart:
    app = Quart(__name__)
    app.config.update(MAX_CONTENT_LENGTH=MAX_BODY, RESPONSE_TIMEOUT=None, BODY_TIMEOUT=60)

    @app.before_serving
    async def start_defaults() -> None:
        await registry.start()

    @app.after_serving
    async def stop_kernels() -> None:
        await registry.close()

    @app.errorhandler(BadRequest)
    async def bad_request(e: BadRequest) -> Response:
        return _text(str(e), 400)

    @app.errorhandler(languages.UnsupportedLanguage)
    async def unsupported(e: languages.UnsupportedLanguage) -> Response:
        return _text(str(e), 400)

    @app.errorhandler(KernelStartError)
    async def start_failed(e: KernelStartError) -> Response:
        return _text(str(e), 500)

    @app.errorhandler(TooManyContexts)
    async def too_many(e: TooManyContexts) -> Response:
        return _text(str(e), 429)

    @app.get("/health")
    async def health() -> Response:
        return _json("OK")

    @app.post("/execute")
    async def execute() -> Response:
        req = await _decode(ExecuteRequest)
        env_vars = _check_execute(req)
        if req.context_id:
            context = registry.get(req.context_id)
            if context is None:
                return _text(f"Context {req.context_id} not found", 404)
        else:
            context = await registry.default(languages.normalize(req.language))

        async def lines() -> AsyncIterator[bytes]:
            async for output in context.stream(req.code, env_vars):
                yield encode_line(output)

        return Response(lines(), mimetype="application/x-ndjson")

    @app.post("/contexts")
    async def create_context() -> Response:
        req = await _decode(CreateContextRequest)
        if req.cwd is not None and (len(req.cwd) > MAX_PATH or "\0" in req.cwd):
            raise BadRequest("invalid cwd")
        context = await registry.create(languages.normalize(req.language), req.cwd or None)
        return _json(_info(context))

    @app.get("/contexts")
    async def list_contexts() -> Response:
        return _json([_info(c) for c in registry.all()])

    @app.post("/contexts/<context_id>/restart")
    async def restart_context(context_id: str) -> Response:
        context = registry.get(context_id)
        if context is None:
            return _text(f"Context {context_id} not found", 404)
        await context.restart()
        return _json(None)

    @app.delete("/contexts/<context_id>")
    async def remove_context(context_id: str) -> Response:
        if not await registry.remove(context_id):
            return _text(f"Context {context_id} not found", 404)
        return _json(None)

    return app
