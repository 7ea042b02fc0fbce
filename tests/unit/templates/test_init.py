"""Guest init: its config format, restart backoff, environments, and the supervisor loop run as
an ordinary child process (everything but the PID 1 set-up: mounts, hostname, reboot)."""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cube.guest.init import (
    BACKOFF_MAX,
    READY_MARKER,
    InitConfig,
    Service,
    backoff,
    service_env,
    user_env,
)
from cube.paths import CHECKOUT_DIR

DEADLINE = 60.0  # generous: the loop only has to get there eventually


def test_config_round_trip() -> None:
    config = InitConfig(
        hostname="h",
        env={"A": "1"},
        services=[Service(name="agent", argv=["python3", "-m", "x"], env={"B": "2"})],
        ready_cmd="true",
        ready_user="user",
    )
    assert InitConfig.load(config.dump()) == config


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("not json", "bad init config"),
        ("[]", "top level"),
        ('{"services": [{"name": "a"}]}', "argv"),
        ('{"surprise": 1}', "surprise"),
        ('{"services": [{"name": "a", "argv": []}]}', "empty argv"),
        ('{"services": [{"name": "a", "argv": ["x"]}, {"name": "a", "argv": ["y"]}]}', "duplicate"),
    ],
)
def test_bad_configs_are_refused(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        InitConfig.load(text)


def test_backoff_doubles_up_to_a_ceiling() -> None:
    delays = [backoff(n) for n in range(1, 12)]
    assert delays[:3] == [0.5, 1.0, 2.0]
    assert delays == sorted(delays)
    assert delays[-1] == BACKOFF_MAX


def test_environments() -> None:
    root = user_env({"PATH": "/custom", "X": "1"}, None)
    assert root["PATH"] == "/custom" and root["HOME"] == "/root" and root["USER"] == "root"
    entry = pwd.struct_passwd(("user", "x", 1000, 1000, "", "/home/user", "/bin/bash"))
    service = Service(name="s", argv=["x"], env={"X": "2"})
    env = service_env(InitConfig(env={"X": "1"}), service, entry)
    assert env["X"] == "2" and env["HOME"] == "/home/user" and env["LOGNAME"] == "user"


SUPERVISOR = """
import sys
from cube.guest.init import InitConfig, Supervisor
Supervisor(InitConfig.load(open(sys.argv[1]).read())).run()
print("supervisor returned", flush=True)
"""


class Supervised:
    """The supervisor in a child process, its output in a file (services inherit it, so a pipe
    would stay open after the supervisor exits); every service it started is killed at the end."""

    def __init__(self, tmp_path: Path, config: InitConfig) -> None:
        (tmp_path / "init.json").write_text(config.dump())
        self.out = tmp_path / "out"
        with open(self.out, "wb") as out:
            self.child = subprocess.Popen(
                [sys.executable, "-c", SUPERVISOR, str(tmp_path / "init.json")],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": str(CHECKOUT_DIR)},
            )

    def text(self) -> str:
        return self.out.read_text()

    def wait_for(self, predicate: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + DEADLINE
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{self.text()}"
            time.sleep(0.05)

    def close(self) -> None:
        if self.child.poll() is None:
            self.child.kill()
            self.child.wait()
        for pid in re.findall(r"started \w+ \(pid (\d+)\)", self.text()):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(int(pid), signal.SIGKILL)


def test_supervisor_restarts_reaps_probes_and_stops(tmp_path: Path) -> None:
    starts, flag = tmp_path / "starts", tmp_path / "flag"
    config = InitConfig(
        services=[
            Service(name="flaky", argv=["/bin/sh", "-c", f"echo run >> {starts}; exit 3"]),
            Service(name="steady", argv=["sleep", "1000"]),
        ],
        ready_cmd=f"test -e {flag}",
    )
    supervised = Supervised(tmp_path, config)
    try:
        supervised.wait_for(
            lambda: starts.exists() and len(starts.read_text().split()) >= 2, "a restart"
        )
        assert READY_MARKER not in supervised.text()
        flag.touch()
        supervised.wait_for(lambda: READY_MARKER in supervised.text(), "readiness")
        supervised.child.send_signal(signal.SIGTERM)
        supervised.wait_for(lambda: "supervisor returned" in supervised.text(), "shutdown")
    finally:
        supervised.close()
    text = supervised.text()
    assert "flaky exited (3)" in text
    assert "flaky will restart in 0.5 s" in text
    assert text.count("started steady") == 1


def test_supervisor_without_probe_is_ready_at_once(tmp_path: Path) -> None:
    supervised = Supervised(tmp_path, InitConfig(services=[Service(name="s", argv=["sleep", "9"])]))
    try:
        supervised.wait_for(lambda: READY_MARKER in supervised.text(), "readiness")
    finally:
        supervised.close()


def test_a_service_of_a_missing_user_never_runs_as_root(tmp_path: Path) -> None:
    flag = tmp_path / "ran"
    service = Service(name="s", argv=["touch", str(flag)], user="no-such-user-cube")
    supervised = Supervised(tmp_path, InitConfig(services=[service]))
    try:
        supervised.wait_for(lambda: "no user 'no-such-user-cube'" in supervised.text(), "refusal")
    finally:
        supervised.close()
    assert not flag.exists()
