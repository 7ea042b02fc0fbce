"""`cube apikey` and `cube sandbox` against a running daemon, and the config file format."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from e2b import Sandbox
from typer.testing import CliRunner

from cube.apikeys import ApiKeyStore
from cube.cli import app
from cube.config import load
from cube.pool.atomic import read
from cube.pool.records import SandboxRecord
from tests.unit.api.daemon import Daemon

runner = CliRunner()


def test_apikey_commands(tmp_path: Path) -> None:
    created = runner.invoke(
        app, ["apikey", "create", "ci", "--max-sandboxes", "3", "--data-dir", str(tmp_path)]
    )
    assert created.exit_code == 0
    key_id = created.stdout.split()[1]
    key = created.stdout.splitlines()[-1]
    assert key.startswith("e2b_") and key not in (tmp_path / "apikeys.json").read_text()
    listed = runner.invoke(app, ["apikey", "list", "--data-dir", str(tmp_path)])
    assert key_id in listed.stdout and "limit=3" in listed.stdout and "active" in listed.stdout
    assert (
        runner.invoke(app, ["apikey", "revoke", key_id, "--data-dir", str(tmp_path)]).exit_code == 0
    )
    assert "revoked" in runner.invoke(app, ["apikey", "list", "--data-dir", str(tmp_path)]).stdout
    assert (
        runner.invoke(app, ["apikey", "revoke", key_id, "--data-dir", str(tmp_path)]).exit_code == 1
    )


def test_sandbox_commands(daemon: Daemon) -> None:
    sbx = Sandbox.create(**daemon.opts())
    env = {"E2B_API_URL": daemon.url, "E2B_API_KEY": daemon.api_key}
    listed = runner.invoke(app, ["sandbox", "ls", "--data-dir", str(daemon.data_dir)], env=env)
    assert listed.exit_code == 0 and sbx.sandbox_id in listed.stdout
    ran = runner.invoke(app, ["sandbox", "exec", sbx.sandbox_id, "echo out; exit 7"], env=env)
    assert ran.exit_code == 7 and "out" in ran.stdout
    logs = runner.invoke(app, ["sandbox", "logs", sbx.sandbox_id], env=env)
    assert logs.exit_code == 0 and "[agent]" in logs.stdout
    assert runner.invoke(app, ["sandbox", "kill", sbx.sandbox_id], env=env).exit_code == 0
    assert runner.invoke(app, ["sandbox", "kill", sbx.sandbox_id], env=env).exit_code == 1


def test_config_file(tmp_path: Path) -> None:
    path = tmp_path / "cube.toml"
    path.write_text(
        'listen = "0.0.0.0:3000"\non_shutdown = "kill"\n[pool]\nbase = 3\n'
        "[sandbox]\nmax_timeout = 3600\n[limits]\nmax_sandboxes_per_key = 5\n"
    )
    config = load(path)
    assert (config.listen, config.on_shutdown, config.pool) == ("0.0.0.0:3000", "kill", {"base": 3})
    assert (config.sandbox.max_timeout, config.limits.max_sandboxes_per_key) == (3600, 5)
    assert load(None) == type(config)()


def test_install_systemd_writes_a_unit(tmp_path: Path) -> None:
    config = tmp_path / "cube.toml"
    config.write_text("")
    args = ["install-systemd", "--unit-dir", str(tmp_path), "--config", str(config)]
    assert runner.invoke(app, [*args, "--data-dir", "/srv/cube"]).exit_code == 0
    unit = (tmp_path / "cube.service").read_text()
    assert f"serve --config {config}" in unit and "CUBE_DATA_DIR=/srv/cube" in unit
    assert "KillSignal=SIGTERM" in unit


def test_cube_serve_stops_gracefully_on_sigterm(tmp_path: Path) -> None:
    """The real command: config file, JSON logs without secrets, SIGTERM pauses and exits 0."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    config = tmp_path / "cube.toml"
    config.write_text(f'listen = "127.0.0.1:{port}"\nbackend = "process"\ngraceful_timeout = 0.5\n')
    key, _ = ApiKeyStore(tmp_path).create("serve")
    command = [sys.executable, "-m", "cube", "serve", "--config", str(config)]
    server = subprocess.Popen(
        [*command, "--data-dir", str(tmp_path)], stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/health").status_code == 204:
                    break
            assert server.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        sbx = Sandbox.create(api_url=url, sandbox_url=url, api_key=key)
        sbx.files.write("kept.txt", "paused on shutdown")
        server.send_signal(signal.SIGTERM)
        _, logs = server.communicate(timeout=60)
    finally:
        server.kill()
    assert server.returncode == 0, logs
    record = read(tmp_path / "sandboxes" / sbx.sandbox_id / "record.json", SandboxRecord)
    assert record.state == "paused"
    lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    assert any(entry["msg"] == "sandbox paused" for entry in lines)
    assert key not in logs and record.access_token not in logs
    assert not [p for p in Path("/proc").glob("[0-9]*/cmdline") if str(tmp_path) in _cmdline(p)]


def _cmdline(path: Path) -> str:
    with contextlib.suppress(OSError):
        return path.read_bytes().decode(errors="replace")
    return ""
