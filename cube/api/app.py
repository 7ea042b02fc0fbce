"""The ASGI application on the daemon's one port: sandbox traffic goes to the proxy, the rest
to the Quart control-plane app.

The split happens before Quart sees the request, so proxied bodies stream straight through
without Quart's request/response wrappers (which would read and time out whole bodies).
"""

from __future__ import annotations

from quart import Response
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from cube.api.context import ApiContext
from cube.api.errors import ApiError, error_response
from cube.api.proxy import BadRoute, Proxy, Receive, Scope, Send, send_json
from cube.api.routes import build_routes
from cube.pool.sandboxes import LifecycleError

CONTROL_PLANE_TIMEOUT_S = 600  # pause, fork and snapshot of big sandboxes can take a while


def create_control_app(ctx: ApiContext) -> QuartTrio:
    app = QuartTrio("cube")
    app.config.update(
        MAX_CONTENT_LENGTH=ctx.max_body_bytes,
        BODY_TIMEOUT=CONTROL_PLANE_TIMEOUT_S,
        RESPONSE_TIMEOUT=CONTROL_PLANE_TIMEOUT_S,
    )
    app.register_blueprint(build_routes(ctx))

    @app.get("/health")
    async def health() -> Response:
        return Response(b"", status=204)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(ctx.metrics.render(), content_type="text/plain; version=0.0.4")

    @app.errorhandler(ApiError)
    async def api_error(exc: ApiError) -> Response:
        return error_response(exc.status, exc.message, exc.headers)

    @app.errorhandler(LifecycleError)
    async def lifecycle_error(exc: LifecycleError) -> Response:
        # A full key stays full until something is killed: retrying cannot help.
        headers = {"Should-Retry": "false"} if exc.status == 429 else None
        return error_response(exc.status, exc.message, headers)

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        # An oversized body is left unread: the connection cannot carry another request.
        headers = {"Connection": "close"} if exc.code == 413 else None
        return error_response(exc.code or 500, exc.description or exc.name, headers)

    return app


class CubeApp:
    """The ASGI entry point Hypercorn serves."""

    def __init__(self, ctx: ApiContext) -> None:
        self.control = create_control_app(ctx)
        self.proxy = Proxy(ctx)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            try:
                target = self.proxy.route(scope)
            except BadRoute as exc:
                await send_json(send, 400, {"code": 400, "message": str(exc)})
                return
            if target is not None:
                await self.proxy.handle(scope, receive, send, target)
                return
        await self.control(scope, receive, send)
