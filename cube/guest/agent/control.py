"""The control port: the daemon's requests to the agent itself, one JSON line each way.

Requests and replies are ``cube.guest.wire``'s msgspec types. Refresh replaces the sandbox
settings every service reads (token, env vars, default user and workdir, mirrored to
``envs.json``) and, in the guest only, makes the machine a new one (``identity``). A bad line
gets an error reply; a line over ``MAX_CONTROL_MESSAGE`` ends the connection.
"""

from __future__ import annotations

import logging
import os

import msgspec
import trio

from cube.guest.agent.identity import apply_guest_identity
from cube.guest.agent.logring import RingHandler
from cube.guest.agent.metrics import MetricsSampler
from cube.guest.agent.state import AgentState
from cube.guest.wire import (
    MAX_CONTROL_MESSAGE,
    ControlRequest,
    GetLogs,
    GetMetrics,
    Identity,
    Ping,
    Prepare,
    Refresh,
    Reply,
    control_encoder,
    request_decoder,
)

log = logging.getLogger(__name__)

MAX_LOG_LINES = 1000


class Control:
    def __init__(
        self,
        state: AgentState,
        metrics: MetricsSampler,
        logs: RingHandler,
        envd_version: str,
    ) -> None:
        self._state = state
        self._metrics = metrics
        self._logs = logs
        self._version = envd_version

    def refresh(self, identity: Identity) -> Reply:
        state = self._state
        state.access_token = identity.access_token or None
        state.env_vars = dict(identity.env_vars)
        state.default_user = identity.default_user
        state.default_workdir = identity.default_workdir
        errors: list[str] = []
        try:
            state.write_envs_file()
        except OSError as e:
            errors.append(f"envs.json: {e}")
        if not state.users.host_mode:
            errors += apply_guest_identity(identity)
        log.info("identity refreshed for sandbox %s", identity.sandbox_id)
        if errors:
            log.error("identity refresh incomplete: %s", "; ".join(errors))
            return Reply(ok=False, error="; ".join(errors), envd_version=self._version)
        return Reply(ok=True, envd_version=self._version)

    async def answer(self, request: ControlRequest) -> Reply:
        if isinstance(request, Ping):
            return Reply(ok=True, envd_version=self._version)
        if isinstance(request, Refresh):
            return self.refresh(request.identity)
        if isinstance(request, GetMetrics):
            return Reply(ok=True, metrics=self._metrics.sample())
        if isinstance(request, GetLogs):
            return Reply(ok=True, logs=self._logs.tail(min(request.limit, MAX_LOG_LINES)))
        assert isinstance(request, Prepare)
        await trio.to_thread.run_sync(os.sync)
        return Reply(ok=True)

    async def handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            buffer = bytearray()
            try:
                while chunk := await stream.receive_some(65536):
                    buffer += chunk
                    while (end := buffer.find(b"\n")) >= 0:
                        line = bytes(buffer[:end])
                        del buffer[: end + 1]
                        await stream.send_all(
                            control_encoder.encode(await self._line(line)) + b"\n"
                        )
                    if len(buffer) > MAX_CONTROL_MESSAGE:
                        log.warning("control message over %d bytes; closing", MAX_CONTROL_MESSAGE)
                        return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return

    async def _line(self, line: bytes) -> Reply:
        try:
            request = request_decoder.decode(line)
        except msgspec.DecodeError as e:
            return Reply(ok=False, error=f"bad control message: {e}")
        try:
            return await self.answer(request)
        except Exception as e:
            log.exception("control request failed")
            return Reply(ok=False, error=f"{type(e).__name__}: {e}")
