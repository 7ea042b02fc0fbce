"""The entry point: ``python -m cube.guest.interpreter --listen 127.0.0.1:49999``
``--state-dir /run/cube --cwd /home/user``.

Runs until SIGTERM or SIGINT, then shuts every kernel down before exiting (kernels are child
processes; leaving them behind would leak memory in a guest that is snapshotted).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

from hypercorn.asyncio import serve
from hypercorn.config import Config

from cube.guest.interpreter.app import create_app
from cube.guest.interpreter.contexts import Registry
from cube.guest.interpreter.envs import GlobalEnvs
from cube.guest.wire import INTERPRETER_PORT


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cube.guest.interpreter")
    parser.add_argument("--listen", default=f"127.0.0.1:{INTERPRETER_PORT}", help="host:port")
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path("/run/cube"),
        help="where the guest agent keeps envs.json",
    )
    parser.add_argument("--cwd", default="/home/user", help="default working directory")
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


async def run(args: argparse.Namespace) -> None:
    registry = Registry(GlobalEnvs(args.state_dir), args.cwd)
    config = Config()
    config.bind = [args.listen]
    config.keep_alive_timeout = 640  # as upstream: idle SDK connections are reused for minutes
    config.graceful_timeout = 5
    # The app's startup starts the default kernels, which takes minutes on a slow (nested, TCG)
    # first boot; Hypercorn's 60 s default would kill the server and restart it from scratch.
    config.startup_timeout = 600
    config.accesslog = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await serve(create_app(registry), config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
