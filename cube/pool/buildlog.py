"""A template build's log: every line goes to the terminal and to the build's log file.

Builds take minutes (debootstrap, pip, booting the guest), so their output streams as it comes,
and the same lines stay in the template folder for `cube template inspect` after a failure.
Commands run through `BuildLog.run` have their stdout and stderr merged into the log line by line.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TextIO


class BuildError(RuntimeError):
    """A build step failed; the message says which and why (details are in the build log)."""


class BuildLog:
    def __init__(self, path: Path | None, terminal: TextIO | None = sys.stderr) -> None:
        self._file = open(path, "a", buffering=1) if path else None  # noqa: SIM115
        self._terminal = terminal
        self._lock = threading.Lock()  # the guest console writes from vCPU threads
        self._started = time.monotonic()

    def line(self, text: str) -> None:
        with self._lock:
            for sink in (self._terminal, self._file):
                if sink is not None:
                    sink.write(text.rstrip("\n") + "\n")
                    sink.flush()

    def step(self, text: str) -> None:
        """A milestone, stamped with the seconds since the build started."""
        self.line(f"[{time.monotonic() - self._started:7.1f}s] {text}")

    def run(self, argv: list[str], **kwargs: object) -> None:
        """Run a command with its output streamed into the log; BuildError if it fails."""
        self.step("$ " + " ".join(argv))
        with subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            **kwargs,  # type: ignore[call-overload]
        ) as child:
            assert child.stdout is not None
            for raw in child.stdout:
                self.line(raw.decode(errors="replace"))
        if child.returncode != 0:
            raise BuildError(f"{argv[0]} failed with exit status {child.returncode}")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> BuildLog:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
