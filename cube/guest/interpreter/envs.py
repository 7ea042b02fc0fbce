"""Env vars for kernels: sandbox-global ones from ``<state_dir>/envs.json``, and per call.

The guest agent owns envs.json (a JSON object str -> str, replaced atomically whenever the
host pushes new env vars, e.g. after a restore), so the interpreter never has to call envd's
``/envs`` with a token it does not hold. The file is re-read only when its stat changes, and a
missing, oversized or malformed file counts as "no env vars" rather than an error: kernels must
keep running whatever the agent writes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import msgspec

from cube.guest.interpreter.languages import ENV_NAME, env_code

log = logging.getLogger(__name__)

MAX_FILE = 1 << 20
FILE_NAME = "envs.json"


class GlobalEnvs:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / FILE_NAME
        self._stamp: tuple[int, int, int] | None = None
        self._envs: dict[str, str] = {}

    def current(self) -> dict[str, str]:
        """The env vars as of now (a fresh copy the caller may keep)."""
        try:
            st = self.path.stat()
        except OSError:
            self._stamp, self._envs = None, {}
            return {}
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            self._stamp, self._envs = stamp, self._load()
        return dict(self._envs)

    def _load(self) -> dict[str, str]:
        try:
            with self.path.open("rb") as f:
                raw = f.read(MAX_FILE + 1)
            if len(raw) > MAX_FILE:
                raise ValueError("file too large")
            envs = msgspec.json.decode(raw, type=dict[str, str])
        except (OSError, ValueError, msgspec.DecodeError) as e:
            log.warning("ignoring %s: %s", self.path, e)
            return {}
        return {k: v for k, v in envs.items() if ENV_NAME.fullmatch(k) and "\0" not in v}


class KernelEnv:
    """The sandbox-global env vars one kernel has, and the code that changes its environment.

    A kernel starts with the global env vars in its environment (``launch``); when envs.json
    changes, the next execution first brings the kernel up to date (``sync_code``). Per-call
    env vars are set just before the cell (``call_code``) and afterwards each name goes back
    (``restore_code``) to its global value, else to the value the interpreter was launched with
    (which the kernel inherited), else it is unset.
    """

    def __init__(self, language: str, envs: GlobalEnvs) -> None:
        self.language = language
        self._envs = envs
        self._applied: dict[str, str] = {}

    def launch(self) -> dict[str, str]:
        """The whole environment for a new kernel process."""
        self._applied = self._envs.current()
        return {**os.environ, **self._applied}

    def sync_code(self) -> str:
        current = self._envs.current()
        changed = {k: v for k, v in current.items() if self._applied.get(k) != v}
        removed = [k for k in self._applied if k not in current]
        self._applied = current
        restore, unset = self._fallback(removed)
        return env_code(self.language, {**changed, **restore}, unset)

    def call_code(self, env_vars: Mapping[str, str]) -> str:
        return env_code(self.language, env_vars, [])

    def restore_code(self, env_vars: Mapping[str, str]) -> str:
        return env_code(self.language, *self._fallback(env_vars))

    def _fallback(self, names: Iterable[str]) -> tuple[dict[str, str], list[str]]:
        back = {k: self._applied.get(k, os.environ.get(k)) for k in names}
        restore = {k: v for k, v in back.items() if v is not None}
        return restore, [k for k, v in back.items() if v is None]
