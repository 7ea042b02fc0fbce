"""envd's HTTP surface as a Quart app: Connect RPCs, /files, /health, /envs, /metrics.

The access-token check wraps every route, as envd's middleware does: when the sandbox has a
token, everything but ``GET /health``, ``GET /files``, ``POST /files`` and ``POST /init`` needs a
matching ``X-Access-Token`` (``/files`` accepts a signature instead). Errors outside the Connect
routes are envd's ``{"code": <status>, "message": ...}``; nothing a client sends may crash the
agent, so unexpected exceptions become a logged 500.
"""

from __future__ import annotations

import logging

import msgspec
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from cube.guest.agent.connect import Service, dispatch
from cube.guest.agent.files import FilesApi, json_error
from cube.guest.agent.metrics import MetricsSampler, envd_json
from cube.guest.agent.state import AgentState

log = logging.getLogger(__name__)

UNAUTHORIZED = (
    "unauthorized access, please provide a valid access token or method signing if supported"
)
_OPEN_ROUTES = {("GET", "/health"), ("GET", "/files"), ("POST", "/files"), ("POST", "/init")}


def create_app(
    state: AgentState, services: list[Service], files: FilesApi, metrics: MetricsSampler
) -> QuartTrio:
    app = QuartTrio(__name__)
    # Streams (process output, watches, uploads) last as long as they last; bodies are bounded
    # where they are read (Connect messages) or go to disk (uploads).
    app.config.update(MAX_CONTENT_LENGTH=None, BODY_TIMEOUT=None, RESPONSE_TIMEOUT=None)
    by_name = {service.name: service for service in services}

    @app.before_request
    async def check_token() -> Response | None:
        if (request.method, request.path) in _OPEN_ROUTES:
            return None
        if not state.token_ok(request.headers.get("X-Access-Token")):
            return json_error(401, UNAUTHORIZED)
        return None

    @app.get("/health")
    async def health() -> Response:
        return Response(b"", status=204)

    @app.get("/envs")
    async def envs() -> Response:
        response = Response(msgspec.json.encode(state.env_vars), content_type="application/json")
        response.headers["Cache-Control"] = "no-store"
        return response

    @app.get("/metrics")
    async def get_metrics() -> Response:
        body = msgspec.json.encode(envd_json(metrics.sample()))
        return Response(body, content_type="application/json")

    @app.get("/files")
    async def download() -> Response:
        return await files.download()

    @app.post("/files")
    async def upload() -> Response:
        return await files.upload()

    @app.post("/<service_name>/<method_name>")
    async def rpc(service_name: str, method_name: str) -> Response:
        service = by_name.get(service_name)
        if service is None:
            return json_error(404, f"unknown service {service_name}")
        answer = await dispatch(service, method_name, request.headers, request.body)
        return Response(answer.body, status=answer.status, content_type=answer.content_type)

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        return json_error(error.code or 500, error.description or error.name)

    @app.errorhandler(Exception)
    async def crash(error: Exception) -> Response:
        log.exception("request %s %s failed", request.method, request.path)
        return json_error(500, f"internal error: {type(error).__name__}")

    return app
