"""Wiring: the services, the envd HTTP server, the relay and the control port in one trio run."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import hypercorn.trio
import trio
from hypercorn.config import Config

from cube.guest.agent import ENVD_VERSION, identity
from cube.guest.agent.app import create_app
from cube.guest.agent.control import Control
from cube.guest.agent.files import FilesApi
from cube.guest.agent.filesystem import FilesystemService
from cube.guest.agent.listen import Address, hypercorn_bind, open_listener
from cube.guest.agent.logring import RingHandler
from cube.guest.agent.metrics import MetricsSampler
from cube.guest.agent.process import ProcessService
from cube.guest.agent.relay import Relay
from cube.guest.agent.state import AgentState
from cube.guest.agent.users import Users
from cube.guest.agent.watchers import Watchers

log = logging.getLogger("cube.guest.agent")

MAX_HEADER_BYTES = 16 << 10  # request line plus headers; longer is refused by hypercorn


@dataclass(frozen=True)
class Options:
    envd: Address
    relay: Address
    control: Address
    state_dir: str
    host_home: str | None  # host mode: users root and user live here, as the current uid


def setup_logging(level: str) -> RingHandler:
    ring = RingHandler()
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    ring.setFormatter(formatter)
    stderr = logging.StreamHandler()
    stderr.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [stderr, ring]
    root.setLevel(level.upper())
    return ring


def _guarded(
    handler: Callable[[trio.SocketStream], Awaitable[None]],
) -> Callable[[trio.SocketStream], Awaitable[None]]:
    """A connection handler whose failure is logged: trio.serve_listeners would otherwise let
    one bad connection end the whole agent."""

    async def run(stream: trio.SocketStream) -> None:
        try:
            await handler(stream)
        except Exception:
            log.exception("connection handler failed")

    return run


async def _stop_on_signal(scope: trio.CancelScope) -> None:
    """SIGTERM/SIGINT end the agent cleanly: cancelling the services kills the processes they
    started instead of leaving them behind."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("stopping on %s", signal.Signals(signum).name)
            scope.cancel()
            return


def _hypercorn_config(bind: str) -> Config:
    config = Config()
    config.bind = [bind]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.h11_max_incomplete_size = MAX_HEADER_BYTES
    config.graceful_timeout = 1.0
    return config


async def run(options: Options, ring: RingHandler) -> None:
    # Files envd creates are 0644 and directories 0755 whatever umask started us.
    os.umask(0o022)
    users = Users(options.host_home)
    if not users.host_mode:
        identity.preload()  # before "ready", so a template's snapshot holds it
    for home in users.host_homes():
        os.makedirs(home, exist_ok=True)
    state = AgentState(users, options.state_dir)
    state.write_envs_file()
    metrics = MetricsSampler()
    control = Control(state, metrics, ring, ENVD_VERSION)
    relay = Relay()
    async with trio.open_nursery() as nursery:
        watchers = Watchers(nursery)
        processes = ProcessService(state, nursery)
        filesystem = FilesystemService(state, watchers)
        app = create_app(
            state, [processes.service, filesystem.service], FilesApi(state, watchers), metrics
        )
        config = _hypercorn_config(hypercorn_bind(options.envd))
        await nursery.start(hypercorn.trio.serve, app, config)
        relay_listener = await open_listener(options.relay)
        control_listener = await open_listener(options.control)
        nursery.start_soon(trio.serve_listeners, _guarded(relay.handle), [relay_listener])
        nursery.start_soon(trio.serve_listeners, _guarded(control.handle), [control_listener])
        nursery.start_soon(_stop_on_signal, nursery.cancel_scope)
        log.info(
            "agent %s ready: envd %s, relay %s, control %s%s",
            ENVD_VERSION,
            options.envd,
            options.relay,
            options.control,
            " (host mode)" if users.host_mode else "",
        )
