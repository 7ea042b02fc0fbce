"""Where Cube keeps things on disk.

Two roots, both overridable by environment variables so that tests, CI and systemd can place them:

- the *cache* (`CUBE_CACHE_DIR`, default `~/.cache/cube`) holds expensive build artifacts (guest
  kernel, lab image) keyed by a hash of their inputs. It lives outside the checkout so that a
  fresh clone, and CI on the same machine, reuse what was already built; deleting it only costs
  a rebuild.
- the *data dir* (`CUBE_DATA_DIR`) holds state that must survive: templates, snapshots, sandbox
  records, API keys. Run from a checkout it defaults to the checkout's `snapshots/` folder (as
  the architecture's layout says); installed elsewhere it is `/var/lib/cube` for root and
  `~/.local/share/cube` otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
CHECKOUT_DIR = PACKAGE_DIR.parent
GUEST_KERNEL_SRC = CHECKOUT_DIR / "guest-kernel"


def is_checkout() -> bool:
    """True when running from a source checkout (an editable install) rather than a wheel."""
    return (CHECKOUT_DIR / "pyproject.toml").is_file() and GUEST_KERNEL_SRC.is_dir()


def cache_dir() -> Path:
    env = os.environ.get("CUBE_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "cube"


def data_dir() -> Path:
    env = os.environ.get("CUBE_DATA_DIR")
    if env:
        return Path(env)
    if is_checkout():
        return CHECKOUT_DIR / "snapshots"
    if os.geteuid() == 0:
        return Path("/var/lib/cube")
    return Path.home() / ".local" / "share" / "cube"
