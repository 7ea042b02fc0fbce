"""``python -m cube.guest.agent``: the guest agent's command line."""

from __future__ import annotations

import argparse
import os
import sys

import trio

from cube.guest.agent.listen import AddressError, parse_address
from cube.guest.agent.main import Options, run, setup_logging
from cube.guest.wire import CONTROL_PORT, ENVD_PORT, RELAY_PORT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cube.guest.agent", description=__doc__)
    parser.add_argument("--envd", default=f"127.0.0.1:{ENVD_PORT}", help="HOST:PORT or unix:PATH")
    parser.add_argument(
        "--relay", default=f"vsock:{RELAY_PORT}", help="vsock:PORT, tcp:HOST:PORT or unix:PATH"
    )
    parser.add_argument("--control", default=f"vsock:{CONTROL_PORT}", help="like --relay")
    parser.add_argument("--state-dir", default="/run/cube", help="where envs.json is kept")
    parser.add_argument(
        "--host-mode",
        metavar="HOME_BASE",
        help="run as a host process for tests: users root and user are the current uid with "
        "homes under HOME_BASE, and the host's clock, hostname, machine-id, RNG and network "
        "are never touched",
    )
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    try:
        options = Options(
            envd=parse_address(args.envd),
            relay=parse_address(args.relay),
            control=parse_address(args.control),
            state_dir=args.state_dir,
            host_home=os.path.abspath(args.host_mode) if args.host_mode else None,
        )
    except AddressError as e:
        parser.error(str(e))
    ring = setup_logging(args.log_level)
    trio.run(run, options, ring)
    return 0


if __name__ == "__main__":
    sys.exit(main())
